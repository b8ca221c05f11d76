"""Bring a user's model in: a torch factory (+ checkpoint), a torch.export program, or ONNX.

Every torch model is exported to ONNX with the dynamo exporter, then checked
(``onnx.checker`` with full shape inference) and its outputs compared with
torch on real inputs before anything else happens: a silently wrong export is
the most expensive bug in a deployment pipeline.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import ModelSource
from ..errors import ModelImportError
from .onnx_normalize import NormalizeReport, describe, node_in, normalize_onnx

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    onnx_path: Path
    source_kind: str  # "factory" | "exported_program" | "onnx"
    opset: int
    max_abs_diff: float | None  # vs torch, None for an ONNX source
    checked_samples: int
    torch_model: Any = None  # the eval-mode module (or ExportedProgram), None for an ONNX source
    normalize: NormalizeReport | None = None  # what the import changed in an ONNX source, and its fallbacks

    def as_dict(self) -> dict[str, Any]:
        out = {"onnx": self.onnx_path.name, "source": self.source_kind, "opset": self.opset,
               "max_abs_diff_vs_torch": self.max_abs_diff, "checked_samples": self.checked_samples}
        if self.normalize is not None:
            out["normalize"] = self.normalize.as_dict()
        return out


def resolve_callable(spec: str) -> Callable[..., Any]:
    """``'package.module:attr'`` → the attribute; the current directory is importable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelImportError(f"{spec!r} is not 'package.module:function'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelImportError(f"cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelImportError(f"{module_name!r} has no attribute {attr!r}") from None


def load_state_dict_file(path: Path) -> dict:
    """The state dict in ``path``: a bare one, or under "model"/"state_dict"/"model_state_dict"."""
    import torch

    if not path.is_file():
        raise ModelImportError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelImportError(f"cannot read checkpoint {path}: {exc}") from None
    # Accept a bare state dict or the common {"model": sd} / {"state_dict": sd} checkpoint shapes.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if not isinstance(obj, dict):
        raise ModelImportError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_torch_model(src: ModelSource):
    """Build the torch module from a factory (and checkpoint) or a .pt2 program."""
    import torch

    source = src.source
    if source.endswith(".pt2"):
        if not Path(source).is_file():
            raise ModelImportError(f"{source} does not exist")
        return torch.export.load(source), "exported_program"
    factory = resolve_callable(source)
    model = factory(**src.kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ModelImportError(f"{source} returned a {type(model).__name__}, not a torch.nn.Module")
    if src.checkpoint:
        sd = load_state_dict_file(Path(src.checkpoint))
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even with strict=False
            raise ModelImportError(f"checkpoint {src.checkpoint} does not fit {source}: {exc}") from None
        if missing or unexpected:
            raise ModelImportError(
                f"checkpoint {src.checkpoint} does not fit {source}: missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
    return model.eval(), "factory"


def export_onnx(model, src: ModelSource, out: Path) -> None:
    import torch

    example = torch.zeros(src.input_shape, dtype=torch.float32)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if src.dynamic_batch else None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            model, (example,), str(out), dynamo=True, external_data=False, verbose=False,
            input_names=[src.input_name], output_names=[src.output_name], dynamic_shapes=dynamic,
        )
    except Exception as exc:
        raise ModelImportError(
            f"ONNX export failed: {exc}. If the model has data-dependent control flow, export it "
            f"with torch.export yourself and pass the .pt2 or .onnx file"
        ) from exc


def check_onnx(path: Path) -> int:
    """Run onnx.checker with full shape inference; returns the default-domain opset."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        node = node_in(str(exc))
        raise ModelImportError(f"{path.name} fails the ONNX checker{f' at {node}' if node else ''}: {describe(exc)}",
                               hint="the export is not valid ONNX; re-export it (a newer exporter or opset)") from None
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def onnx_io_names(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def onnx_first_output(onnx_path: Path, samples: np.ndarray) -> np.ndarray | None:
    """The ONNX file's first output on ``samples``, one at a time, by ONNX Runtime on the CPU: what the source
    model computes. None for a graph with several inputs or one ONNX Runtime cannot run sample by sample."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    if len(sess.get_inputs()) != 1:
        return None
    name = sess.get_inputs()[0].name
    try:
        return np.concatenate([sess.run(None, {name: samples[i : i + 1]})[0] for i in range(len(samples))])
    except Exception as exc:  # noqa: BLE001 - the callers check what they can; this one is not checked
        log.info("%s not run by ONNX Runtime one sample at a time: %s", onnx_path.name, exc)
        return None


def compare_with_torch(model, onnx_path: Path, samples: np.ndarray, atol: float) -> float:
    """Max |torch - ORT| over ``samples``; raises if over ``atol`` (plus a relative 1e-3)."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    module = model.module() if hasattr(model, "module") and not isinstance(model, torch.nn.Module) else model
    with torch.no_grad():
        ref = module(torch.from_numpy(samples)).numpy()
    # The exporter may fix the batch dimension (torchvision's ViT, asked for a dynamic one): run the
    # samples in batches of that size, so the check compares values rather than failing on shapes.
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else len(samples)
    chunks = [samples[i : i + step] for i in range(0, len(samples) - len(samples) % step, step)] or [samples[:step]]
    got = np.concatenate([sess.run(None, {name: c})[0] for c in chunks])
    ref = ref[: len(got)]
    diff = float(np.max(np.abs(ref - got)))
    bound = atol + 1e-3 * float(np.max(np.abs(ref)))
    if not np.isfinite(got).all() or diff > bound:
        raise ModelImportError(
            f"the exported ONNX differs from torch by {diff:.3g} (allowed {bound:.3g}); "
            f"the export is wrong, raise export_atol only if you understand why"
        )
    return diff


def import_model(src: ModelSource, workdir: Path, check_samples: np.ndarray, atol: float) -> ExportReport:
    """Produce ``workdir/model_fp32.onnx`` from any supported source, checked."""
    out = workdir / "model_fp32.onnx"
    if src.source.endswith(".onnx"):
        path = Path(src.source)
        if not path.is_file():
            raise ModelImportError(f"{path} does not exist", hint="check the path to the .onnx file")
        # exporters' −1/0/symbolic dims, old opsets and graphs ORT's shape inference trips on, fixed once here
        rep = normalize_onnx(path, out, list(src.input_shape) if src.input_shape else None, src.dynamic_batch)
        return ExportReport(out, "onnx", rep.opset_after, None, 0, normalize=rep)
    model, kind = load_torch_model(src)
    log.info("exporting %s to ONNX", src.source)
    export_onnx(model, src, out)
    opset = check_onnx(out)
    diff = compare_with_torch(model, out, check_samples, atol)
    return ExportReport(out, kind, opset, diff, len(check_samples), model)
