"""Inference engines, one module per backend, chosen by the bundle's manifest.

The registry below is a plain dict from the manifest's engine name to the class
that runs it, imported lazily so that a device only needs the one inference
library it uses. Adding a backend means one module here and one entry below.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import Manifest, TensorSpec
from .base import Engine, EngineOptions, check_input, warn_once

log = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "onnxruntime": "edgekit_runtime.engines.onnxruntime_engine:OnnxRuntimeEngine",
    "openvino": "edgekit_runtime.engines.openvino_engine:OpenVINOEngine",
    "tensorrt": "edgekit_runtime.engines.tensorrt_engine:TensorRTEngine",
    "tflite": "edgekit_runtime.engines.tflite_engine:TFLiteEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name`` (imports its module)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise EngineError(
            f"no engine named {name!r}; this runtime has {', '.join(sorted(ENGINES))}",
            code=ErrorCode.ENGINE_UNKNOWN_BACKEND,
            hint="upgrade edgekit-runtime or compile the model for a supported target",
        ) from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_engine(
    model_dir: Path,
    manifest: Manifest,
    options: EngineOptions | None = None,
    order: list[str] | None = None,
) -> Engine:
    """Load the bundle's artifact with the first engine of ``order`` that works.

    ``order`` defaults to the manifest's ``backend.engines``. An engine whose
    library is missing is skipped *with a logged warning* and the reason is
    kept on the returned engine (``engine.fallback_from``); a model that fails to
    load in an available engine is an error, not a reason to fall back.
    """
    order = list(order or manifest.backend.engines)
    if options is None:
        options = EngineOptions.from_backend(manifest.backend.options)
    skipped: list[str] = []
    for name in order:
        cls = engine_class(name)
        reason = cls.unavailable_reason()
        if reason:
            log.debug("engine %s unavailable: %s", name, reason)  # said once below, with the engine used instead
            skipped.append(f"{name}: {reason}")
            continue
        engine = cls(model_dir, manifest.backend.artifact, manifest.inputs, manifest.outputs, options,
                     model=manifest.model)
        engine.fallback_from = skipped
        if skipped:
            warn_once(log, "running on %s instead (%s)", name, "; ".join(skipped))
        return engine
    raise EngineError(
        "no engine of this bundle can run here: " + "; ".join(skipped),
        code=ErrorCode.ENGINE_UNAVAILABLE,
        hint="install one of the listed inference libraries on the device",
    )


__all__ = ["ENGINES", "Engine", "EngineOptions", "TensorSpec", "check_input", "create_engine", "engine_class"]
