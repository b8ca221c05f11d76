"""The build state the stages read and extend, and the stage interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config import BuildConfig, TargetProfile
from ..data.sources import Dataset
from .backends.base import Artifact, BackendCompiler, Signature, SourceModel
from .backends.registry import Backend
from .gates import Attempt, GateResult
from .measure import Measurer

Progress = Callable[[str], None]


@dataclass
class BuildState:
    """Everything one build knows; each stage fills in its part."""

    cfg: BuildConfig
    profile: TargetProfile
    backend: Backend
    compiler: BackendCompiler
    workdir: Path
    key: Ed25519PrivateKey
    progress: Progress
    report: dict[str, Any]
    # data stage
    labels: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    calib: Dataset | None = None  # exactly what the quantizer sees
    holdout: np.ndarray | None = None  # calibration samples held back for the fidelity gate
    val: Dataset | None = None
    probe: np.ndarray | None = None  # a few real inputs to check the export with
    # import stage
    src: SourceModel | None = None
    sig: Signature | None = None
    # export stage
    measurer: Measurer | None = None
    fp32: Artifact | None = None
    reference: dict[str, Any] = field(default_factory=dict)  # FP32 figures the gates compare with
    # quantize stage
    attempts: list[Attempt] = field(default_factory=list)
    # evaluate stage: what ships and the verdicts that let it
    chosen: Artifact | None = None
    gates: list[GateResult] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    # package stage
    manifest: dict[str, Any] | None = None
    bundle_tmp: Path | None = None

    @property
    def quantize(self) -> bool:
        return self.profile.quantize.enabled

    def metric_context(self) -> dict[str, Any]:
        """What a detection/segmentation metric decodes outputs with: the postprocess section and input size."""
        pre = self.cfg.preprocess
        if pre is not None and pre.size:  # what the device feeds the model (a symbolic H, W is fixed by it)
            hw = [int(d) for d in pre.size]
        else:
            shape = self.sig.input_shape if self.sig is not None else (self.cfg.model.input_shape or [])
            dims = (shape[1:3] if pre is not None and pre.layout == "NHWC" else shape[2:4]) if len(shape) == 4 else []
            hw = [int(d) if isinstance(d, int) else 0 for d in dims] or None
        return {"postprocess": self.cfg.postprocess.model_dump() if self.cfg.postprocess else None, "input_hw": hw}


class Stage(Protocol):
    """A build step: reads and extends the state, returns what it did for the report."""

    name: str

    def run(self, state: BuildState) -> dict[str, Any]: ...
