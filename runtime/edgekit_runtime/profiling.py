"""Per-layer timings of a loaded model, from the engine's own profiler, to find the layer that is slow.

``profile_model`` asks the engine (:meth:`~.engines.base.Engine.profile`) for a separate
profiling pass after the timed benchmark, so the benchmark's figures are never taken with
a profiler on, then sums each layer's time over the profiled queries and ranks them. Each
row says what the engine reports about the layer: op type, precision and kernel (an
OpenVINO ``brgconv_avx512_f32`` among ``…_I8`` convolutions is an INT8 model's layer that
did not run in INT8). Engines without a profiler readable from Python (LiteRT, TensorRT
here) are refused up front with the reason and the tool that does it on the device.

Profilers add their own cost per layer, so the times are for ranking layers against each
other; ``coverage`` (layer sum / query wall time in the same pass) says how much of a
query the layers account for: the rest is the engine's per-call overhead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .api import Model
from .bench import synthetic_inputs
from .contract.errors import ErrorCode, RuntimeConfigError
from .engines.base import LayerTime, ProfiledRun


@dataclass
class ProfileSettings:
    """How many queries the profiling pass runs and how many layers the result keeps."""

    queries: int = 50
    warmup: int = 10
    top: int = 15
    seed: int = 0


def profiling_unavailable_reason(model: Model) -> str | None:
    """``None`` if ``model``'s engine can be profiled, else why not (before any work is done)."""
    return type(model.engine).profiling_unavailable_reason()


def _feeds(model: Model, samples: Sequence[Any] | None, s: ProfileSettings) -> list[dict[str, np.ndarray]]:
    """The profiled queries as feed dicts (images are preprocessed here, outside the profiled call)."""
    if samples is None:
        samples = synthetic_inputs(model, min(s.queries, 64), s.seed)
    order = np.random.default_rng(s.seed).permutation(len(samples))
    picks = [samples[int(order[i % len(samples)])] for i in range(s.queries)]
    if picks and not isinstance(picks[0], dict):
        return [{model.inputs[0].name: model.preprocess([p])} for p in picks]
    return list(picks)


def summarize(run: ProfiledRun, top: int) -> dict[str, Any]:
    """Sum each layer's time over the profiled queries; rank; share of the layer total and of the query time."""
    queries = len(run.layers)
    if not queries:
        raise RuntimeConfigError("the profiling pass recorded no query", code=ErrorCode.CONFIG_INVALID,
                                 hint="give --profile-queries of at least 1")
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    first: dict[str, LayerTime] = {}
    for layers in run.layers:
        for layer in layers:
            total[layer.name] += layer.time_us
            calls[layer.name] += 1
            first.setdefault(layer.name, layer)
    layer_sum = sum(total.values())
    ranked = sorted(total, key=lambda n: total[n], reverse=True)
    rows = [{"name": n, "node": first[n].node, "op_type": first[n].op_type, "precision": first[n].precision,
             "kernel": first[n].kernel,
             "total_ms": total[n] / 1e3, "mean_us": total[n] / queries, "calls": calls[n],
             "share": total[n] / layer_sum if layer_sum else 0.0} for n in ranked[:top]]
    by_type: dict[tuple[str, str | None], float] = defaultdict(float)
    for n, t in total.items():
        by_type[(first[n].op_type, first[n].precision)] += t
    latency_ms = float(np.mean(run.latency_ns)) / 1e6
    per_query_ms = layer_sum / queries / 1e3
    out: dict[str, Any] = {
        "queries": queries,
        "layers_seen": len(total),
        "latency_ms": {"mean": latency_ms, "p50": float(np.percentile(run.latency_ns, 50)) / 1e6},
        "layer_sum_ms_per_query": per_query_ms,
        "coverage": per_query_ms / latency_ms if latency_ms else None,
        "layers": rows,
        "by_op_type": [{"op_type": k[0], "precision": k[1], "total_ms": v / 1e3,
                        "share": v / layer_sum if layer_sum else 0.0}
                       for k, v in sorted(by_type.items(), key=lambda kv: kv[1], reverse=True)],
    }
    if run.engine_total_us:
        out["engine_run_ms_per_query"] = float(np.mean(run.engine_total_us)) / 1e3
    return out


def profile_model(model: Model, samples: Sequence[Any] | None = None,
                  settings: ProfileSettings | None = None) -> dict[str, Any]:
    """Profile ``model`` layer by layer in a separate pass (see the module docstring); JSON-ready.

    Raises :class:`~.contract.errors.RuntimeConfigError` where the engine has no readable profiler.
    """
    s = settings or ProfileSettings()
    reason = profiling_unavailable_reason(model)
    if reason is not None:
        raise RuntimeConfigError(f"per-layer profiling is not available: {reason}", code=ErrorCode.CONFIG_INVALID,
                                 hint="benchmark without --profile")
    if s.queries < 1:
        raise RuntimeConfigError(f"--profile-queries must be at least 1, not {s.queries}",
                                 code=ErrorCode.CONFIG_INVALID)
    run = model.engine.profile(_feeds(model, samples, s), s.warmup)
    return {"engine": model.engine.name, "separate_pass": True, "warmup": s.warmup, **summarize(run, s.top)}
