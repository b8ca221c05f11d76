"""Wrong inputs give clear errors with stable codes; the engine order is explicit, never silent."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime import ErrorCode, InputError
from edgekit_runtime.engines import ENGINES, EngineError, create_engine

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
KEY = GOLDEN / "golden.pub"


@pytest.fixture()
def model():
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        yield m


def code_of(excinfo) -> ErrorCode:
    return excinfo.value.code


def test_wrong_shape(model):
    with pytest.raises(InputError, match=r"shape \(1, 1, 3, 3\).*expects \('batch', 1, 2, 2\)") as e:
        model.run(np.zeros((1, 1, 3, 3), np.float32))
    assert code_of(e) == ErrorCode.INPUT_BAD_SHAPE


def test_wrong_rank(model):
    with pytest.raises(InputError) as e:
        model.run(np.zeros((1, 4), np.float32))
    assert code_of(e) == ErrorCode.INPUT_BAD_SHAPE


def test_wrong_dtype(model):
    with pytest.raises(InputError, match="dtype float64, the model expects float32") as e:
        model.run(np.zeros((1, 1, 2, 2), np.float64))
    assert code_of(e) == ErrorCode.INPUT_BAD_DTYPE


def test_missing_named_input(model):
    with pytest.raises(InputError, match="'x' is missing") as e:
        model.run({"not_x": np.zeros((1, 1, 2, 2), np.float32)})
    assert code_of(e) == ErrorCode.INPUT_MISSING


def test_unreadable_image(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(InputError, match="not a readable image") as e:
        model.predict(bad)
    assert code_of(e) == ErrorCode.INPUT_UNREADABLE


def test_missing_image(model, tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        model.predict(tmp_path / "nope.png")
    assert code_of(e) == ErrorCode.INPUT_MISSING


def test_image_of_another_size_and_colour_is_preprocessed(model, tmp_path):
    import cv2

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:10] = 255  # top half white
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), rgb)
    from_file = model.predict(path)[0]
    from_array = model.predict(rgb)[0]
    assert from_file == from_array
    x = model.preprocess([rgb])
    assert x.shape == (1, 1, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, :, 0], [255 / 256, 0.0])


@pytest.mark.parametrize("color", ["rgb", "bgr", "gray"])
def test_a_file_and_its_rgb_array_preprocess_alike(tmp_path, color):
    import cv2

    from edgekit_runtime.processing import preprocess_batch

    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # strongly red, so a swapped channel order shows
    path = tmp_path / "c.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    spec = {"type": "image", "color": color, "size": [6, 5], "scale": 1.0}
    from_file, from_array = preprocess_batch([path], spec), preprocess_batch([rgb], spec)
    np.testing.assert_array_equal(from_file, from_array)
    if color != "gray":
        red = 0 if color == "rgb" else 2
        assert from_file[0, red].min() == 200 and from_file[0, 2 - red].max() < 255


def test_every_error_carries_a_telemetry_event(model):
    with pytest.raises(InputError) as e:
        model.run(np.zeros((1, 1, 3, 3), np.float32))
    event = e.value.to_event()
    assert event["code"] == 300 and event["name"] == "INPUT_BAD_SHAPE" and "shape" in event["message"]


def test_unknown_engine_is_refused(model, tmp_path):
    manifest = replace(model.manifest, backend=replace(model.manifest.backend, engines=["tensorflow"]))
    with pytest.raises(EngineError) as e:
        create_engine(model.workdir, manifest)
    assert e.value.code == ErrorCode.ENGINE_UNKNOWN_BACKEND


def test_unavailable_engine_falls_back_in_order_and_says_so(model, monkeypatch, caplog):
    from edgekit_runtime.engines.openvino_engine import OpenVINOEngine

    from edgekit_runtime.engines import base

    monkeypatch.setattr(OpenVINOEngine, "unavailable_reason", classmethod(lambda cls: "openvino is not installed"))
    monkeypatch.setattr(base, "_WARNED", set())  # warned once per process: start this test afresh
    manifest = replace(model.manifest, backend=replace(model.manifest.backend, engines=["openvino", "onnxruntime"]))
    with caplog.at_level(logging.WARNING):
        eng = create_engine(model.workdir, manifest)
        create_engine(model.workdir, manifest)  # a second engine does not say it again
    assert eng.name == "onnxruntime"
    assert eng.fallback_from == ["openvino: openvino is not installed"]
    assert eng.describe()["fallback_from"] == eng.fallback_from
    said = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert said == ["running on onnxruntime instead (openvino: openvino is not installed)"]


def test_no_available_engine_is_an_error(model, monkeypatch):
    from edgekit_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    monkeypatch.setattr(OnnxRuntimeEngine, "unavailable_reason", classmethod(lambda cls: "gone"))
    with pytest.raises(EngineError) as e:
        create_engine(model.workdir, model.manifest)
    assert e.value.code == ErrorCode.ENGINE_UNAVAILABLE and "onnxruntime: gone" in str(e.value)


def test_registry_lists_only_real_engines():
    from edgekit_runtime.engines import engine_class

    for name in ENGINES:
        assert engine_class(name).name == name


@pytest.mark.parametrize("spin, expected", [(False, "0"), (True, "1")])
def test_spin_wait_reaches_onnxruntime(spin, expected):
    with edgekit_runtime.load(BUNDLE, keyring=KEY, spin_wait=spin) as m:
        so = m.engine.session.get_session_options()
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == expected
        assert m.engine.describe()["spin_wait"] is spin


def test_spin_wait_default_leaves_the_library_default():
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        so = m.engine.session.get_session_options()
        with pytest.raises(RuntimeError, match="does not have configuration"):
            so.get_session_config_entry("session.intra_op.allow_spinning")


def test_a_fact_about_this_machine_is_warned_once_per_process(caplog, monkeypatch):
    from edgekit_runtime.engines import base
    from edgekit_runtime.engines.base import warn_once

    monkeypatch.setattr(base, "_WARNED", set())
    log = logging.getLogger("edgekit_runtime.test_warn_once")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            warn_once(log, "provider %s missing", "X")
        warn_once(log, "provider %s missing", "Y")
    assert [r.getMessage() for r in caplog.records] == ["provider X missing", "provider Y missing"]
