"""Model import: factory + checkpoint, torch.export programs, ONNX files, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.config import ModelSource
from edgekit.errors import ModelImportError
from edgekit.models.digits_cnn import build
from edgekit.models.importer import compare_with_torch, export_onnx, import_model


def source(**kw) -> ModelSource:
    base = {"source": "edgekit.models.digits_cnn:build", "name": "d", "input_shape": [1, 1, 8, 8],
            "kwargs": {"width": 8}}
    base.update(kw)
    return ModelSource(**base)


def samples(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 1, 8, 8)).astype(np.float32)


def test_factory_export_is_checked_against_torch(tmp_path):
    rep = import_model(source(), tmp_path, samples(), atol=1e-4)
    assert rep.source_kind == "factory" and rep.opset >= 17
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4 and rep.checked_samples == 4


def test_exported_program_file(tmp_path):
    model = build(width=8).eval()
    ep = torch.export.export(model, (torch.zeros(1, 1, 8, 8),))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    rep = import_model(source(source=str(path)), tmp_path, samples(1), atol=1e-4)
    assert rep.source_kind == "exported_program" and rep.max_abs_diff < 1e-4


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    ckpt = tmp_path / "wrong.pt"
    torch.save(build(width=4).state_dict(), ckpt)
    with pytest.raises(ModelImportError, match="does not fit"):
        import_model(source(checkpoint=ckpt), tmp_path, samples(), atol=1e-4)


def test_wrapped_checkpoint_is_accepted(tmp_path):
    model = build(width=8)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)
    rep = import_model(source(checkpoint=ckpt), tmp_path, samples(), atol=1e-4)
    assert rep.max_abs_diff < 1e-4


def test_export_that_differs_from_torch_is_caught(tmp_path):
    src = source()
    out = tmp_path / "a.onnx"
    export_onnx(build(width=8).eval(), src, out)
    other = build(width=8).eval()  # different random weights
    with pytest.raises(ModelImportError, match="differs from torch"):
        compare_with_torch(other, out, samples(), atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    ("no_colon_here", "not 'package.module:function'"),
    ("edgekit.models.nope:build", "cannot import"),
    ("edgekit.models.digits_cnn:nope", "has no attribute"),
    ("missing.onnx", "does not exist"),
])
def test_bad_sources_say_what_is_wrong(tmp_path, bad, message):
    with pytest.raises(ModelImportError, match=message):
        import_model(source(source=bad), tmp_path, samples(), atol=1e-4)


def test_corrupt_onnx_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelImportError):
        import_model(source(source=str(bad)), tmp_path, samples(), atol=1e-4)
