"""The accuracy budget is enforced: an impossible one fails with a report and writes no bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.build.pipeline import compile_model
from edgekit.errors import AccuracyBudgetError, ConfigError

from .conftest import X86_TARGETS, build_config


@pytest.fixture(scope="module")
def blank_calibration(tmp_path_factory):
    """Calibration on blank frames: a realistic mistake that wrecks every activation range."""
    from edgekit.data import digits

    x = digits.to_tensor(np.zeros((50, 8, 8), dtype=np.uint8))
    path = tmp_path_factory.mktemp("calib") / "blank.npz"
    np.savez(path, x=x)
    return path


@pytest.mark.parametrize("target", X86_TARGETS)
def test_impossible_budget_fails_with_report_and_no_bundle(target, tmp_path, digits_checkpoint, signing_key,
                                                          blank_calibration):
    out = tmp_path / "never.ekb"
    cfg = build_config(digits_checkpoint, target, out, **{"calibration.source": str(blank_calibration)},
                       quantize={"max_excluded_nodes": 1})
    with pytest.raises(AccuracyBudgetError, match="no bundle written") as info:
        compile_model(cfg, signing_key)
    assert not out.exists()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report == json.loads(json.dumps(info.value.report, default=str))
    acc = report["accuracy"]
    assert report["result"] == "failed: accuracy gate"
    assert acc["fp32"] > 90
    # the first attempt was plain PTQ, then the backend's fallback ran, and neither met the budget
    strategies = [a["strategy"] for a in acc["attempts"]]
    assert strategies[0] == "ptq" and len(strategies) >= 2
    assert all(a["drop_pts"] > 0.5 for a in acc["attempts"])


def test_a_budget_the_user_asked_for_without_validation_data_is_refused(tmp_path, digits_checkpoint, signing_key):
    cfg = build_config(digits_checkpoint, "onnxruntime-cpu", tmp_path / "x.ekb", **{"accuracy.max_accuracy_drop": 0.5})
    cfg.validation = None
    with pytest.raises(ConfigError, match="accuracy budget needs a labelled 'validation' set"):
        compile_model(cfg, signing_key)


def test_validating_on_the_calibration_data_is_refused(tmp_path, digits_checkpoint, signing_key):
    from edgekit.data import digits

    x, y = digits.validation()
    path = tmp_path / "same.npz"
    np.savez(path, x=x, y=y)
    cfg = build_config(digits_checkpoint, "onnxruntime-cpu", tmp_path / "x.ekb",
                       **{"calibration.source": str(path), "validation.source": str(path)},
                       quantize={"calibration_count": len(x)})
    with pytest.raises(ConfigError, match="identical"):
        compile_model(cfg, signing_key)
