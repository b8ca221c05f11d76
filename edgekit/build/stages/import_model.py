"""Import stage: the user's model (torch factory, torch.export program, ONNX) to a checked ONNX file."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from ...models.importer import import_model
from ..backends.base import SourceModel, onnx_signature
from ..state import BuildState


class ImportStage:
    name = "import"

    def run(self, state: BuildState) -> dict[str, Any]:
        cfg = state.cfg
        export = import_model(cfg.model, state.workdir, state.probe, cfg.export.atol)
        state.sig = onnx_signature(export.onnx_path)
        if state.compiler.needs_torch and export.torch_model is None:
            raise ConfigError(
                f"target {state.profile.name} converts from PyTorch ({state.backend.name}); give a torch model "
                f"(module:factory or .pt2) instead of an ONNX file"
            )
        state.src = SourceModel(export.onnx_path, export.torch_model, list(cfg.model.input_shape))
        state.report["steps"]["export"] = export.as_dict()  # kept for readers of 0.1 reports
        return export.as_dict()
