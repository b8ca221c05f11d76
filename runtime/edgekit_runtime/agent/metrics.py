"""Inference metrics over a telemetry window, and the device's own vital signs.

* :class:`LatencyHistogram` — a streaming, log-bucketed histogram (DDSketch's
  mapping): bucket ``k`` holds values in ``(γ^(k-1), γ^k]`` with
  ``γ = (1+α)/(1-α)``, so any quantile it returns is within a relative error
  ``α`` (1% by default) of a value of rank ``q·(n-1)``. Memory grows with the
  *range* of latencies (~900 buckets from 1 µs to 100 s), never with their
  number, and two sketches merge by adding counts — the buckets travel in
  telemetry so a monitor can compute fleet-wide percentiles correctly.
* :class:`MetricsWindow` — inference count, throughput, latency, errors by
  their stable runtime code, for one window; thread-safe.
* :class:`SystemStats` — CPU, memory, load, temperatures from ``/proc`` and
  ``/sys/class/thermal``; ``tegrastats`` on a Jetson.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .. import jetson


class LatencyHistogram:
    """Streaming quantiles with a bounded relative error (values in seconds)."""

    def __init__(self, relative_accuracy: float = 0.01, min_value: float = 1e-9):
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = relative_accuracy
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self.gamma)
        self.min_value = min_value
        self.buckets: dict[int, int] = {}
        self.zero_count = 0  # values <= min_value
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float, count: int = 1) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"latency {value!r} is not a finite, non-negative number")
        if value <= self.min_value:
            self.zero_count += count
        else:
            k = math.ceil(math.log(value) / self._log_gamma)
            self.buckets[k] = self.buckets.get(k, 0) + count
        self.count += count
        self.sum += value * count
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def merge(self, other: "LatencyHistogram") -> None:
        if other.gamma != self.gamma:
            raise ValueError("cannot merge histograms of different accuracy")
        for k, c in other.buckets.items():
            self.buckets[k] = self.buckets.get(k, 0) + c
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value(self, k: int) -> float:
        return 2 * self.gamma**k / (self.gamma + 1)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1), or None when the histogram is empty."""
        if not 0 <= q <= 1:
            raise ValueError("q must be in [0, 1]")
        if self.count == 0:
            return None
        if q == 0:
            return self.min  # the extremes are tracked exactly
        if q == 1:
            return self.max
        rank = q * (self.count - 1)
        seen = self.zero_count
        if seen > rank:
            return self.min
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if seen > rank:
                return min(max(self._value(k), self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, Any]:
        """Count, mean, min/max and p50/p90/p95/p99 in milliseconds, plus the buckets."""
        if self.count == 0:
            return {"count": 0}
        out: dict[str, Any] = {"count": self.count, "mean": self.sum / self.count * 1e3,
                               "min": self.min * 1e3, "max": self.max * 1e3}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
            out[name] = self.quantile(q) * 1e3
        out["sketch"] = {"relative_accuracy": self.relative_accuracy, "unit": "s", "zero_count": self.zero_count,
                         "buckets": {str(k): c for k, c in sorted(self.buckets.items())}}
        return out


class MetricsWindow:
    """Inference counts, latency and errors since the last :meth:`close` (thread-safe)."""

    def __init__(self, clock=time.monotonic, relative_accuracy: float = 0.01):
        self._clock = clock
        self._accuracy = relative_accuracy
        self._lock = threading.Lock()
        self._reset(clock())
        self.totals = {"inferences": 0, "errors": 0}

    def _reset(self, now: float) -> None:
        self.started = now
        self.started_wall = time.time()
        self.latency = LatencyHistogram(self._accuracy)
        self.calls = 0
        self.items = 0
        self.errors: Counter[int] = Counter()

    def record(self, latency_s: float | None, *, items: int = 1, error_code: int | None = None) -> bool:
        """Count one call; returns True when it is the window's first error with this code."""
        with self._lock:
            self.calls += 1
            if error_code is not None:
                code = int(error_code)
                first = code not in self.errors
                self.errors[code] += 1
                self.totals["errors"] += 1
                return first  # a failed call's time is not an inference latency
            self.items += items
            self.totals["inferences"] += items
            if latency_s is not None:
                self.latency.add(latency_s)
            return False

    def close(self, now: float | None = None) -> dict[str, Any]:
        """The window's figures (a telemetry body fragment); a new window starts."""
        with self._lock:
            now = self._clock() if now is None else now
            window_s = max(now - self.started, 1e-9)
            body = {
                "window_s": round(window_s, 6),
                "window_start": self.started_wall,
                "inferences": self.items,
                "calls": self.calls,
                "throughput_per_s": self.items / window_s,
                "latency_ms": self.latency.summary_ms(),
                "errors": sum(self.errors.values()),
                "errors_by_code": {str(code): n for code, n in sorted(self.errors.items())},
                "totals": dict(self.totals),
            }
            self._reset(now)
            return body


class SystemStats:
    """CPU, memory, load and temperatures between two calls of :meth:`sample`.

    ``proc`` and ``sys`` are the roots of ``/proc`` and ``/sys`` (tests point
    them at a fake tree). ``tegrastats``: sample it in the background (default:
    on a Jetson only).
    """

    def __init__(self, proc: str | os.PathLike = "/proc", sys: str | os.PathLike = "/sys",
                 tegrastats: bool | None = None):
        self.proc = Path(proc)
        self.sys = Path(sys)
        self._cpu = self._cpu_times()
        self._process = (time.monotonic(), _process_cpu_s())
        self._tegra: jetson.TegraStats | None = None
        if tegrastats if tegrastats is not None else jetson.is_jetson():
            self._tegra = jetson.TegraStats(interval_ms=1000).__enter__()

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            fields = (self.proc / "stat").read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        return sum(values), idle

    def cpu_percent(self) -> float | None:
        now = self._cpu_times()
        before, self._cpu = self._cpu, now
        if now is None or before is None or now[0] <= before[0]:
            return None
        total, idle = now[0] - before[0], now[1] - before[1]
        return round(100.0 * (total - idle) / total, 2)

    def memory(self) -> dict[str, float]:
        info: dict[str, int] = {}
        try:
            for line in (self.proc / "meminfo").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    info[name] = int(rest.split()[0])  # kB
        except (OSError, ValueError, IndexError):
            return {}
        if "MemTotal" not in info:
            return {}
        total = info["MemTotal"] / 1024
        avail = info.get("MemAvailable", 0) / 1024
        return {"mem_total_mb": round(total, 1), "mem_used_mb": round(total - avail, 1),
                "mem_used_percent": round(100 * (total - avail) / total, 2) if total else None}

    def process(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            for line in (self.proc / "self" / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        except (OSError, ValueError, IndexError):
            pass  # no /proc/self (not Linux): the figure is left out
        now = (time.monotonic(), _process_cpu_s())
        before, self._process = self._process, now
        if now[0] > before[0]:
            out["process_cpu_percent"] = round(100 * (now[1] - before[1]) / (now[0] - before[0]), 2)
        return out

    def temperatures(self) -> dict[str, float]:
        """``/sys/class/thermal/thermal_zone*/{type,temp}`` in °C (millidegrees on disk)."""
        out: dict[str, float] = {}
        for zone in sorted((self.sys / "class" / "thermal").glob("thermal_zone*")):
            try:
                millideg = int((zone / "temp").read_text().strip())
                name = (zone / "type").read_text().strip() or zone.name
            except (OSError, ValueError):
                continue  # a zone that cannot be read right now (sensor off) is left out
            key = name if name not in out else f"{name}-{zone.name}"
            out[key] = round(millideg / 1000, 1)
        return out

    def sample(self) -> dict[str, Any]:
        """The figures since the previous call (a telemetry body fragment)."""
        out: dict[str, Any] = {"cpu_percent": self.cpu_percent(), **self.memory(), **self.process()}
        try:
            out["load1"] = round(os.getloadavg()[0], 2)
        except OSError:
            out["load1"] = None
        out["temperature_c"] = self.temperatures()
        if self._tegra is not None:
            window, self._tegra.samples = self._tegra.samples, []
            summary = jetson.TegraStats(samples=window).summary()
            if window:
                last = window[-1]
                summary.update({k: last[k] for k in ("ram_used_mb", "ram_total_mb", "temperature_c", "power_mw")
                                if k in last})
            out["tegrastats"] = summary
        return out

    def close(self) -> None:
        if self._tegra is not None:
            self._tegra.__exit__(None, None, None)
            self._tegra = None


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
