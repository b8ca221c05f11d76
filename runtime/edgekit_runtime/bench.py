"""MLPerf-style latency and throughput measurement, on the host or the device.

* warm-up queries that are not counted;
* **single-stream**: one query at a time, at least ``min_queries`` *and*
  ``min_duration_s`` (capped by ``max_duration_s``), samples taken in a seeded
  random order; p50/p90/p99, mean and QPS of the inference itself, with
  pre- and post-processing timed separately when images are given;
* **offline**: batches of ``offline_batch`` back to back, throughput in items/s;
* every result carries a system description (CPU, cores, engine, version,
  threads, precision) so a figure never travels without its conditions.

The single-stream result also carries ``inference_quantiles_ms``: the 0th…100th
percentiles of the inference latency (101 values), enough to draw its CDF without
shipping every query's time (a device's result travels over MQTT).

``compare`` runs several models *interleaved* in one process (A, B, B, A, ...),
single-stream queries and offline batches alike, so that drift in clock speed or
machine load hits both alike. Load ONNX Runtime models for it with
``spin_wait=False``: otherwise each session's idle threads spin while the other
runs and both latencies inflate.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import jetson
from .api import Model
from .contract.manifest import InputStats

# The result's shape. 1: the first. 2: ``single_stream.inference_quantiles_ms`` added (and, from the
# command lines, ``memory`` and ``profile`` per model); readers that need them check for >= 2.
SCHEMA_VERSION = 2
QUANTILES = 101  # 0th..100th percentile


def latency_quantiles(latencies_ns: Sequence[int], count: int = QUANTILES) -> list[float]:
    """``count`` evenly spaced percentiles (0 … 100) of the latencies, in ms rounded to 0.1 µs (small JSON)."""
    a = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    return [round(float(v), 4) for v in np.percentile(a, np.linspace(0, 100, count))]


@dataclass
class BenchSettings:
    warmup: int = 20
    min_queries: int = 200
    min_duration_s: float = 2.0
    max_duration_s: float = 120.0
    offline_batch: int | None = 8
    offline_min_batches: int = 20
    seed: int = 0


def percentiles(latencies_ns: Sequence[int]) -> dict[str, float]:
    a = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    return {
        "count": int(a.size),
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"})
    except OSError:
        pass
    return []


def system_description(model: Model | None = None) -> dict[str, Any]:
    desc: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    board = jetson.describe()
    if board is not None:
        desc["jetson"] = board
    if model is not None:
        desc["model"] = model.describe()
    return desc


def _mean_std(stats: InputStats | None) -> tuple[float, float]:
    """Where synthetic inputs are drawn: the calibration mean and std, or N(0, 1) when the bundle has none."""
    if stats is None:
        return 0.0, 1.0
    return (stats.mean if stats.mean is not None else 0.0), (stats.std if stats.std is not None else 1.0)


def synthetic_inputs(model: Model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs with the model's signature (batch 1), drawn around the calibration statistics."""
    rng = np.random.default_rng(seed)
    stats = model.manifest.input_stats
    samples = []
    for _ in range(count):
        feeds = {}
        for spec in model.inputs:
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            mean, std = _mean_std(stats.get(spec.name))
            x = rng.normal(mean, std, size=shape)
            feeds[spec.name] = x.astype(spec.dtype)
        samples.append(feeds)
    return samples


class _Runner:
    """Times one query of one model: preprocess, inference, postprocess."""

    def __init__(self, model: Model, samples: Sequence[Any]):
        self.model = model
        self.samples = samples
        self.images = not isinstance(samples[0], dict)
        self.pre: list[int] = []
        self.inf: list[int] = []
        self.post: list[int] = []

    def query(self, index: int, record: bool = True) -> None:
        meta: list = []  # where each image went: detection boxes and masks are mapped back onto the photo
        t0 = time.perf_counter_ns()
        if self.images:
            feeds = {self.model.inputs[0].name: self.model.preprocess([self.samples[index]], meta=meta)}
        else:
            feeds = self.samples[index]
        t1 = time.perf_counter_ns()
        outputs = self.model.engine.run(feeds)
        t2 = time.perf_counter_ns()
        if self.images:
            self.model.postprocess(outputs, meta=meta or None)
        t3 = time.perf_counter_ns()
        if record:
            self.pre.append(t1 - t0)
            self.inf.append(t2 - t1)
            self.post.append(t3 - t2)

    def single_stream(self, elapsed_s: float) -> dict[str, Any]:
        out = {"inference": percentiles(self.inf), "inference_quantiles_ms": latency_quantiles(self.inf),
               "elapsed_s": elapsed_s}
        out["qps"] = len(self.inf) / (sum(self.inf) / 1e9)
        if self.images:
            out["preprocess"] = percentiles(self.pre)
            out["postprocess"] = percentiles(self.post)
            e2e = np.add(np.add(self.pre, self.inf), self.post)
            out["end_to_end"] = percentiles(e2e.tolist())
        return out


def _batch_feeds(model: Model, samples: Sequence[Any], batch: int) -> dict[str, np.ndarray]:
    picks = [samples[i % len(samples)] for i in range(batch)]
    if not isinstance(picks[0], dict):
        return {model.inputs[0].name: model.preprocess(picks)}
    return {name: np.concatenate([p[name] for p in picks]) for name in picks[0]}


def _offline(models: Sequence[Model], samples: Sequence[Any], s: BenchSettings) -> list[dict[str, Any] | None]:
    """Offline throughput of each model; with several, batches alternate between them."""
    if not s.offline_batch:
        return [None] * len(models)
    results: list[dict[str, Any] | None] = [None] * len(models)
    active: list[tuple[int, Model, dict[str, np.ndarray]]] = []
    for i, model in enumerate(models):
        batch_dim = model.inputs[0].shape[0] if model.inputs[0].shape else 1
        if isinstance(batch_dim, int) and batch_dim != s.offline_batch:
            results[i] = {"skipped": f"the model's batch size is fixed at {batch_dim}"}
            continue
        feeds = _batch_feeds(model, samples, s.offline_batch)
        for _ in range(3):
            model.engine.run(feeds)
        active.append((i, model, feeds))
    times: dict[int, list[int]] = {i: [] for i, _, _ in active}
    start = time.perf_counter()
    n = 0
    while active and (n < s.offline_min_batches or time.perf_counter() - start < s.min_duration_s):
        for i, model, feeds in (active if n % 2 == 0 else list(reversed(active))):
            t0 = time.perf_counter_ns()
            model.engine.run(feeds)
            times[i].append(time.perf_counter_ns() - t0)
        n += 1
        if time.perf_counter() - start > s.max_duration_s:
            break
    for i, t in times.items():
        results[i] = {"batch": s.offline_batch, "batches": len(t),
                      "items_per_s": s.offline_batch * len(t) / (sum(t) / 1e9), "batch_latency": percentiles(t)}
    return results


def _loop(runners: Sequence[_Runner], s: BenchSettings, on_progress: Callable[[int], None] | None) -> float:
    n = len(runners[0].samples)
    order = np.random.default_rng(s.seed).permutation(n)
    for i in range(s.warmup):
        for r in runners:
            r.query(int(order[i % n]), record=False)
    start = time.perf_counter()
    q = 0
    while True:
        elapsed = time.perf_counter() - start
        if (q >= s.min_queries and elapsed >= s.min_duration_s) or elapsed >= s.max_duration_s:
            return elapsed
        idx = int(order[q % n])
        # Alternate who goes first so neither model always runs on a warmer cache.
        seq = runners if q % 2 == 0 else list(reversed(runners))
        for r in seq:
            r.query(idx)
        q += 1
        if on_progress:
            on_progress(q)


def exercise(model: Model, samples: Sequence[Any], settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark's workload once (warm-up, single-stream queries, offline batches) and say what ran.

    For measurements other than latency (the memory probe): the same code paths and buffer
    sizes as :func:`run_benchmark`, without its system description or board statistics.
    """
    runner = _Runner(model, samples)
    _loop([runner], settings, None)
    offline = _offline([model], samples, settings)[0]
    return {"warmup": settings.warmup, "queries": len(runner.inf),
            "offline_batch": settings.offline_batch if offline and "batches" in offline else None,
            "offline_batches": offline.get("batches", 0) if offline else 0,
            "inputs": "images" if runner.images else "tensors"}


def run_benchmark(
    model: Model,
    samples: Sequence[Any] | None = None,
    settings: BenchSettings | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Benchmark one model. ``samples``: image paths/arrays or feed dicts; default synthetic."""
    s = settings or BenchSettings()
    samples = list(samples) if samples is not None else synthetic_inputs(model, 64, s.seed)
    runner = _Runner(model, samples)
    board_stats = None
    if jetson.is_jetson():
        with jetson.TegraStats() as ts:
            elapsed = _loop([runner], s, on_progress)
        board_stats = ts.summary()
    else:
        elapsed = _loop([runner], s, on_progress)
    return {
        "tegrastats": board_stats,
        "schema_version": SCHEMA_VERSION,
        "kind": "single",
        "settings": asdict(s),
        "inputs": "images" if runner.images else "tensors",
        "single_stream": runner.single_stream(elapsed),
        "offline": _offline([model], samples, s)[0],
        "system": system_description(model),
    }


def compare(
    models: dict[str, Model],
    samples: Sequence[Any] | None = None,
    settings: BenchSettings | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Benchmark several models interleaved; ratios are against the first one."""
    s = settings or BenchSettings()
    first = next(iter(models.values()))
    samples = list(samples) if samples is not None else synthetic_inputs(first, 64, s.seed)
    runners = {name: _Runner(m, samples) for name, m in models.items()}
    elapsed = _loop(list(runners.values()), s, on_progress)
    offline = dict(zip(models, _offline(list(models.values()), samples, s)))
    results = {name: {"single_stream": r.single_stream(elapsed), "offline": offline[name],
                      "system": system_description(models[name])} for name, r in runners.items()}
    base_name = next(iter(models))
    base = results[base_name]["single_stream"]["inference"]["p50_ms"]
    ratios = {}
    for name, res in results.items():
        p50 = res["single_stream"]["inference"]["p50_ms"]
        entry = {"p50_speedup_vs_" + base_name: base / p50}
        off, off_base = res["offline"], results[base_name]["offline"]
        if off and off_base and "items_per_s" in off and "items_per_s" in off_base:
            entry["offline_throughput_ratio_vs_" + base_name] = off["items_per_s"] / off_base["items_per_s"]
        ratios[name] = entry
    return {"schema_version": SCHEMA_VERSION, "kind": "compare", "settings": asdict(s),
            "models": results, "ratios": ratios, "interleaved": True}
