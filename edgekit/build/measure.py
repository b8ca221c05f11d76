"""Measure artifacts the way a device runs them: outputs through the runtime's engines, and latency.

Every figure a gate compares comes from here, so the FP32 reference and the deployed
artifact are measured by the same code, and an artifact is run on a data set once
(outputs are cached per artifact, role and data set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgekit_runtime.bench import BenchSettings, compare

from .backends.base import Artifact, BackendCompiler, Signature, feeds, make_engine, predict_outputs

log = logging.getLogger(__name__)


class _EngineModel:
    """Just enough of ``edgekit_runtime.Model`` for the benchmark loop."""

    def __init__(self, engine):
        self.engine = engine
        self.inputs = engine.inputs
        # the loop reads input statistics only to make synthetic inputs; the build always passes samples
        self.manifest = SimpleNamespace(input_stats={})

    def describe(self) -> dict:
        return self.engine.describe()


@dataclass
class Measurer:
    """Runs artifacts through one device engine with the options the device will use.

    ``reference`` artifacts (the FP32 baseline) run with the backend's reference options
    (OpenVINO: f32 inference precision even on bf16 CPUs), all others with the options
    written into the bundle.
    """

    compiler: BackendCompiler
    sig: Signature
    engine: str
    reference_options: dict[str, Any]
    deploy_options: dict[str, Any]
    _outputs: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def options(self, reference: bool) -> dict[str, Any]:
        return self.reference_options if reference else self.deploy_options

    def make(self, art: Artifact, reference: bool, spin_wait: bool | None = None):
        opts = dict(self.options(reference))
        if spin_wait is not None:
            opts["spin_wait"] = spin_wait
        return make_engine(art, self.engine, self.compiler.signature(art, self.sig), opts)

    def outputs(self, art: Artifact, x: np.ndarray, data: str, reference: bool = False,
                output: str | None = None) -> np.ndarray:
        """The artifact's first output (or ``output``) on ``x`` (named ``data`` for the cache); every output
        is kept from the one run."""
        key = (str(art.directory), art.main, reference, data, len(x))
        sig = self.compiler.signature(art, self.sig)
        if key not in self._outputs:
            self._outputs[key] = predict_outputs(self.make(art, reference), sig, x)
        return self._outputs[key][output or sig.output_name]

    def latency(self, arts: dict[str, tuple[Artifact, bool]], x: np.ndarray, queries: int = 100) -> dict[str, Any]:
        """Single-stream latency of each (artifact, reference) pair, interleaved in one run so ratios are fair."""
        samples = [feeds(self.sig, x[i : i + 1]) for i in range(min(32, len(x)))]
        s = BenchSettings(warmup=10, min_queries=queries, min_duration_s=0.5, max_duration_s=20, offline_batch=None)
        models = {name: _EngineModel(self.make(art, ref, spin_wait=False)) for name, (art, ref) in arts.items()}
        res = compare(models, samples, s)
        return {name: {k: r["single_stream"]["inference"][k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "count")}
                for name, r in res["models"].items()}
