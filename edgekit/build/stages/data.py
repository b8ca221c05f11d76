"""Data stage: labels, calibration (with samples held back for the fidelity gate) and validation sets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.contract import manifest as mf
from edgekit_runtime.contract.errors import BundleError

from ...data.sources import Dataset, load_data
from ...errors import CalibrationError, ConfigError
from ..gates import DENSE_METRICS, REGRESSION_METRICS
from ..state import BuildState

log = logging.getLogger(__name__)


def read_labels(model) -> list[str] | None:
    if model.labels:
        return list(model.labels)
    if model.labels_file:
        try:
            return [line for line in Path(model.labels_file).read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"labels_file {model.labels_file} does not exist") from None
    return None


class DataStage:
    name = "data"

    def run(self, state: BuildState) -> dict[str, Any]:
        from ...models.onnx_normalize import check_against_model, check_data_sources, expected_input_shape

        cfg, q, fid = state.cfg, state.profile.quantize, state.profile.fidelity
        # what the model takes and where the data lies, checked before anything is loaded or compiled
        check_data_sources(cfg)
        shape = expected_input_shape(cfg)
        if shape:
            check_against_model(cfg, shape)
        state.labels = read_labels(cfg.model)
        state.preprocess = cfg.preprocess.model_dump() if cfg.preprocess else None
        if state.preprocess is not None:
            # the device's own rules (mean/std per channel, no zero std, ...), before hours of work, not after
            try:
                mf.Preprocess.from_dict(state.preprocess, "preprocess")
            except BundleError as exc:
                raise ConfigError(f"{exc}; fix the build file's preprocess section") from None
        skip = cfg.skip_bad_images
        # a COCO/YOLO split folder is read for the task the bundle's post-processing does
        task = cfg.postprocess.type if cfg.postprocess else None
        calib = load_data(cfg.calibration, state.preprocess, state.labels, skip_bad_images=skip, task=task) \
            if cfg.calibration else None
        # y holds values (regression), padded boxes or masks (detection, segmentation), not class indices
        targets = state.profile.accuracy.metric in REGRESSION_METRICS | DENSE_METRICS
        val = load_data(cfg.validation, state.preprocess, state.labels, targets, skip_bad_images=skip, task=task) \
            if cfg.validation else None
        budget = state.profile.accuracy.max_accuracy_drop
        if state.quantize and calib is None:
            raise ConfigError("INT8 needs calibration data: add a 'calibration' section (or set quantize.enabled: false)")
        if val is not None and val.y is None:
            raise CalibrationError(f"validation source {val.source!r} has no labels (use class sub-folders or x/y arrays)")
        out: dict[str, Any] = {}
        if state.quantize and task == "detections" and (val is None or budget is None
                                                         or state.profile.accuracy.metric not in ("map50", "map")):
            raise ConfigError("a graph with NMS inside (postprocess.type: detections) is held to an mAP budget, "
                              "not to fidelity: its INT8 needs labelled validation data and accuracy.metric map50",
                              hint="validation: {source: data/val} (a COCO/YOLO split folder), accuracy: {metric: "
                                   "map50, max_accuracy_drop: 1.0}; or quantize.enabled: false to ship FP32")
        if state.quantize and budget is not None and val is None:
            if budget_asked(cfg):
                raise ConfigError(
                    "an accuracy budget needs a labelled 'validation' set; add one, or set "
                    "accuracy.max_accuracy_drop: null (--no-accuracy-check) to ship with the fidelity gate only")
            # the target profile's default budget, and no labels to check it with: the first compile of a
            # model someone else trained (`compile model.onnx --calibration images/`) ships on the fidelity
            # gate, and the report says the accuracy budget was not checked; a budget the user gave is refused
            state.profile = state.profile.model_copy(update={"accuracy": state.profile.accuracy.model_copy(
                update={"max_accuracy_drop": None})})
            state.report["accuracy"]["budget_pts"] = None
            out["accuracy_budget"] = (f"not checked: no labelled validation data for the profile's budget of "
                                      f"{budget:g}; the fidelity gate judges INT8 (give --validation DIR)")
            log.warning("no labelled validation data: the accuracy budget is not checked, the fidelity gate "
                        "judges INT8 (give --validation DIR to hold INT8 to %g pt)", budget)
        if val is not None and calib is not None and val.sha256() == calib.sha256():
            raise ConfigError("validation and calibration data are identical; validate on held-out data")
        if calib is not None:
            # The fidelity gate needs samples the quantizer never saw: the last ones of the set,
            # at most a fifth of it, so small sets still calibrate on most of their samples.
            hold = min(fid.samples, len(calib) // 5) if state.quantize else 0
            if state.quantize and hold < 1:
                raise CalibrationError(
                    f"calibration source {calib.source!r} has {len(calib)} samples; give at least 5 so some can be "
                    f"held back to measure INT8 against FP32")
            x = calib.x[: len(calib) - hold]
            state.holdout = calib.x[len(calib) - hold:] if hold else None
            # hash and statistics describe exactly the samples the quantizer sees
            state.calib = Dataset(x[: q.calibration_count], None, calib.source)
            out["calibration"] = {"source": calib.source, "samples": len(state.calib), "held_back": hold,
                                  "unused": max(0, len(x) - q.calibration_count)}
        state.val = val
        if val is not None:
            out["validation"] = {"source": val.source, "samples": len(val)}
        for name, ds in (("calibration", calib), ("validation", val)):
            if ds is not None and ds.skipped:  # --skip-bad-images: what was left out, by name
                out[name].update(skipped_images=len(ds.skipped), skipped=ds.skipped[:20])
        state.probe = (val or calib).x[:8] if (val or calib) else np.random.default_rng(0).normal(
            size=[8, *_fixed(shape, cfg)[1:]]).astype(np.float32)
        out["labels"] = len(state.labels) if state.labels else None
        return out


def budget_asked(cfg) -> bool:
    """Whether the user set the accuracy budget (build file or --max-accuracy-drop), not the target profile."""
    return cfg.accuracy is not None and "max_accuracy_drop" in cfg.accuracy.model_fields_set


def _fixed(shape: list | None, cfg) -> list[int]:
    """The model input for random probe samples (a build with neither calibration nor validation data)."""
    if shape and all(isinstance(d, int) for d in shape[1:]):
        return [int(d) if isinstance(d, int) else 1 for d in shape]
    if cfg.model.input_shape:
        return list(cfg.model.input_shape)
    raise ConfigError(f"the input shape of {cfg.model.source} is not known before the import: pass --input-shape "
                      f"or give calibration data")
