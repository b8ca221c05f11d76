"""The MLPerf-style loop honours its settings and reports its conditions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.bench import BenchSettings, compare, percentiles, run_benchmark

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
KEY = GOLDEN / "golden.pub"


def test_percentiles_of_known_values():
    p = percentiles([i * 1_000_000 for i in range(1, 101)])  # 1..100 ms
    assert p["count"] == 100 and p["min_ms"] == 1 and p["max_ms"] == 100
    assert p["p50_ms"] == pytest.approx(50.5) and p["p90_ms"] == pytest.approx(90.1)
    assert p["p99_ms"] == pytest.approx(99.01) and p["mean_ms"] == pytest.approx(50.5)


def test_minimum_queries_and_duration_are_both_met():
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        r = run_benchmark(m, settings=BenchSettings(warmup=3, min_queries=123, min_duration_s=0.3,
                                                    offline_batch=4, offline_min_batches=7))
    ss = r["single_stream"]
    assert ss["inference"]["count"] >= 123 and ss["elapsed_s"] >= 0.3
    assert r["offline"]["batches"] >= 7 and r["offline"]["batch"] == 4
    assert r["inputs"] == "tensors" and "preprocess" not in ss
    sysd = r["system"]
    assert sysd["logical_cores"] >= 1 and sysd["cpu"]
    assert sysd["model"]["engine"] == "onnxruntime" and sysd["model"]["version"]
    assert sysd["model"]["precision"] == "fp32" and sysd["model"]["threads"] == 1


def test_max_duration_caps_a_run():
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        r = run_benchmark(m, settings=BenchSettings(warmup=0, min_queries=10**9, min_duration_s=0.0,
                                                    max_duration_s=0.2, offline_batch=None))
    assert r["single_stream"]["elapsed_s"] < 1.0 and r["offline"] is None


def test_sample_order_is_seeded(monkeypatch):
    """Same seed → same order of samples; another seed → another order."""
    seen: dict[int, list] = {}
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        samples = [{"x": np.full((1, 1, 2, 2), i, np.float32)} for i in range(16)]
        real_run = m.engine.run
        for seed in (1, 1, 2):
            order: list[int] = []

            def spy(feeds, order=order):
                order.append(int(feeds["x"].flat[0]))
                return real_run(feeds)

            monkeypatch.setattr(m.engine, "run", spy)
            run_benchmark(m, samples, BenchSettings(warmup=0, min_queries=16, min_duration_s=0, offline_batch=None,
                                                    seed=seed))
            seen.setdefault(seed, []).append(order[:16])
    assert seen[1][0] == seen[1][1]
    assert seen[1][0] != seen[2][0]
    assert sorted(seen[1][0]) == list(range(16))  # a permutation: every sample used once per pass


def test_compare_interleaves_and_alternates_who_goes_first(monkeypatch):
    calls: list[str] = []
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as a, edgekit_runtime.load(BUNDLE, keyring=KEY) as b:
        for name, m in (("a", a), ("b", b)):
            real = m.engine.run
            monkeypatch.setattr(m.engine, "run", lambda feeds, real=real, name=name: (calls.append(name), real(feeds))[1])
        r = compare({"a": a, "b": b}, settings=BenchSettings(warmup=0, min_queries=6, min_duration_s=0,
                                                            offline_batch=None))
    assert calls[:12] == ["a", "b", "b", "a"] * 3
    assert r["interleaved"] and r["ratios"]["a"]["p50_speedup_vs_a"] == 1.0
    assert r["ratios"]["b"]["p50_speedup_vs_a"] == pytest.approx(
        r["models"]["a"]["single_stream"]["inference"]["p50_ms"] / r["models"]["b"]["single_stream"]["inference"]["p50_ms"])
