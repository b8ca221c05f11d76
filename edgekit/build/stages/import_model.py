"""Import stage: the user's model (torch factory, torch.export program, ONNX) to a checked ONNX file.

An ONNX source is normalised on the way in (:mod:`edgekit.models.onnx_normalize`): every
backend receives the same file with its input shape settled, opset ≥ 13 and shapes
inferred, and the report records what was changed and which tool failed on the way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import CalibrationError
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
        state.compiler.check_signature(state.sig)
        for what, x in (("calibration", state.calib.x if state.calib else None),
                        ("validation", state.val.x if state.val else None)):
            check_samples_fit(state.sig.input_names, [state.sig.input_shape, *[d for _, d in state.sig.more_inputs]],
                              x, what)
        given = cfg.model.input_shape
        shape = [d if isinstance(d, int) else (given[i] if given else 1) for i, d in enumerate(state.sig.input_shape)]
        state.src = SourceModel(export.onnx_path, export.torch_model, shape)
        state.report["steps"]["export"] = export.as_dict()  # kept for readers of 0.1 reports
        return export.as_dict()


def check_samples_fit(names: list[str], shapes: list[list], x: np.ndarray | None, what: str) -> None:
    """The data feeds the model: one array for a one-input model; for several inputs, one array per input
    name (a structured array, see ``edgekit.data.sources.per_input``) whose fixed dims agree with the model's."""
    if x is None:
        return
    got = list(x.dtype.names or [])
    if len(names) == 1 and not got:
        return  # a one-input model's samples: preprocess and the engines check their shape
    if len(names) == 1:
        raise CalibrationError(f"the {what} data holds arrays {got}; the model has one input {names[0]!r}",
                               hint="store its samples as 'x' in the .npz (and labels as 'y')")
    if not got:
        raise CalibrationError(f"the model has {len(names)} inputs {names} but the {what} data is one array",
                               hint="give a .npz with one array per input name (or a factory returning a dict "
                                    "of them), the samples along the first axis")
    if set(got) != set(names):
        missing, unknown = [n for n in names if n not in got], [n for n in got if n not in names]
        raise CalibrationError(f"the {what} data holds arrays {got}; the model's inputs are {names}"
                               + (f" (missing: {missing})" if missing else "")
                               + (f" (not an input: {unknown})" if unknown else ""),
                               hint="name the arrays in the .npz after the model's inputs")
    for name, shape in zip(names, shapes):
        sample = list(x[name].shape[1:])
        if len(sample) != len(shape) - 1 or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], sample)):
            raise CalibrationError(f"the {what} data's {name!r} samples have shape {sample}; the model input "
                                   f"{name!r} takes {shape} (batch first)",
                                   hint=f"give {name!r} as an array of shape [samples, "
                                        f"{', '.join(str(d) for d in shape[1:])}]")
