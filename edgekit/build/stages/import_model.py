"""Import stage: the user's model (torch factory, torch.export program, ONNX) to a checked ONNX file.

An ONNX source is normalised on the way in (:mod:`edgekit.models.onnx_normalize`): every
backend receives the same file with its input shape settled, opset ≥ 13 and shapes
inferred, and the report records what was changed and which tool failed on the way.
"""

from __future__ import annotations

from typing import Any

from ...models.importer import import_model
from ...models.onnx_normalize import check_against_model
from ..backends.base import SourceModel, onnx_signature
from ..state import BuildState


class ImportStage:
    name = "import"

    def run(self, state: BuildState) -> dict[str, Any]:
        cfg = state.cfg
        # an ONNX source reaches a compiler that converts from PyTorch (TFLite) as ONNX only: that
        # compiler converts it to a torch module itself (onnx2torch) and names the ops it cannot take
        export = import_model(cfg.model, state.workdir, state.probe, cfg.export.atol)
        state.sig = onnx_signature(export.onnx_path)
        # the preprocessing must produce what the model takes, before anything is compiled
        check_against_model(cfg, state.sig.input_shape)
        given = cfg.model.input_shape
        shape = [d if isinstance(d, int) else (given[i] if given else 1) for i, d in enumerate(state.sig.input_shape)]
        state.src = SourceModel(export.onnx_path, export.torch_model, shape)
        state.report["steps"]["export"] = export.as_dict()  # kept for readers of 0.1 reports
        return export.as_dict()
