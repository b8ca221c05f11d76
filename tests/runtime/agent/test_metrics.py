"""Streaming latency histogram, metrics window and system figures."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit_runtime.agent import LatencyHistogram, MetricsWindow, SystemStats


def _numpy_quantile(values, q):
    # the rank q·(n-1) the sketch targets, taken as the lower order statistic
    return float(np.quantile(values, q, method="lower"))


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "bimodal"])
def test_quantiles_within_the_relative_accuracy(dist):
    rng = np.random.default_rng(1)
    values = {"uniform": rng.uniform(0.001, 0.1, 20_000),
              "lognormal": rng.lognormal(np.log(0.01), 1.0, 20_000),
              "bimodal": np.concatenate([rng.normal(0.005, 0.0005, 15_000), rng.normal(0.2, 0.01, 5_000)])}[dist]
    h = LatencyHistogram(relative_accuracy=0.01)
    for v in values:
        h.add(float(v))
    assert h.count == len(values)
    for q in (0.5, 0.9, 0.95, 0.99):
        want = _numpy_quantile(values, q)
        assert h.quantile(q) == pytest.approx(want, rel=0.0101), q
    assert h.quantile(0) == values.min() and h.quantile(1) == values.max()
    assert len(h.buckets) < 1000  # memory follows the range, not the count


def test_memory_does_not_grow_with_the_number_of_values():
    h = LatencyHistogram()
    for i in range(100_000):
        h.add(0.010 + (i % 100) * 1e-5)
    assert len(h.buckets) <= 12 and h.count == 100_000


def test_merge_equals_one_sketch_of_everything():
    rng = np.random.default_rng(2)
    a_vals, b_vals = rng.uniform(0.001, 0.01, 500), rng.uniform(0.005, 0.05, 700)
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for v in a_vals:
        a.add(float(v))
        both.add(float(v))
    for v in b_vals:
        b.add(float(v))
        both.add(float(v))
    a.merge(b)
    assert a.buckets == both.buckets and a.count == both.count and a.quantile(0.99) == both.quantile(0.99)


def test_empty_and_invalid():
    h = LatencyHistogram()
    assert h.quantile(0.5) is None and h.summary_ms() == {"count": 0}
    with pytest.raises(ValueError):
        h.add(float("nan"))
    with pytest.raises(ValueError):
        h.add(-1.0)
    h.add(0.0)
    assert h.quantile(0.5) == 0.0


def test_window_counts_latency_and_errors_by_code():
    now = [100.0]
    w = MetricsWindow(clock=lambda: now[0])
    for ms in range(1, 101):  # 1..100 ms
        w.record(ms / 1000)
    w.record(0.5, items=4)  # a batch of four
    assert w.record(None, error_code=302) is True  # first of its code in the window: an event is due
    assert w.record(None, error_code=302) is False
    w.record(None, error_code=202)
    now[0] = 110.0
    body = w.close()
    assert body["window_s"] == 10.0 and body["inferences"] == 104 and body["calls"] == 104
    assert body["throughput_per_s"] == pytest.approx(10.4)
    lat = body["latency_ms"]
    assert lat["count"] == 101
    assert lat["p50"] == pytest.approx(51, rel=0.011) and lat["p99"] == pytest.approx(100, rel=0.011)
    assert lat["max"] == 500 and lat["min"] == 1
    assert body["errors"] == 3 and body["errors_by_code"] == {"202": 1, "302": 2}
    now[0] = 115.0
    empty = w.close()
    assert empty["inferences"] == 0 and empty["errors_by_code"] == {} and empty["latency_ms"] == {"count": 0}
    assert empty["totals"] == {"inferences": 104, "errors": 3}


def test_system_stats_from_proc_and_sys(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    (proc / "meminfo").write_text("MemTotal:        8000000 kB\nMemFree: 1 kB\nMemAvailable:    6000000 kB\n")
    (proc / "self" / "status").write_text("Name: x\nVmRSS:\t  204800 kB\n")
    for i, (name, milli) in enumerate([("cpu-thermal", 45500), ("gpu-thermal", 51000)]):
        zone = sys_ / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(name + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    stats = SystemStats(proc=proc, sys=sys_, tegrastats=False)
    (proc / "stat").write_text("cpu  200 0 200 1400 200 0 0 0 0 0\n")  # +200 busy of +1000
    s = stats.sample()
    assert s["cpu_percent"] == 20.0
    assert s["mem_total_mb"] == pytest.approx(7812.5) and s["mem_used_percent"] == 25.0
    assert s["rss_mb"] == 200.0
    assert s["temperature_c"] == {"cpu-thermal": 45.5, "gpu-thermal": 51.0}
    assert "tegrastats" not in s


def test_system_stats_on_this_machine():
    s = SystemStats(tegrastats=False)
    s.sample()
    out = s.sample()
    assert out["mem_total_mb"] > 0 and "temperature_c" in out
