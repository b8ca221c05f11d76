"""Sequence models end to end with tensor preprocessing: train, compile INT8, feed the device RAW windows.

A 1-D CNN is trained on per-channel normalised synthetic sensor windows (N, 3, 64);
the fitted mean/std go into the build's ``preprocess: {type: tensor}``; calibration and
validation are ``.npz`` files of normalised tensors. On the device, raw windows go
through ``Model.predict``/``preprocess`` and must agree with the FP32 torch model.
"""

from __future__ import annotations

import base64
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, ErrorCode, InputError
from edgekit_runtime.keyring import key_id_of

HERE = Path(__file__).resolve().parent
TARGETS = ("onnxruntime-cpu", "x86-openvino-cpu")
LABELS = ["slow", "medium", "fast"]


@pytest.fixture(scope="module")
def helpers():
    """The helper module, importable by the build as ``tensor_helpers:build``."""
    sys.path.insert(0, str(HERE))
    try:
        import tensor_helpers

        yield tensor_helpers
    finally:
        sys.path.remove(str(HERE))


@pytest.fixture(scope="module")
def trained(helpers, tmp_path_factory):
    """Raw splits, the fitted normalisation, the FP32 model and the .npz files the build reads."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tensor")
    raw, y = helpers.windows(500, seed=0)
    train, val = slice(0, 300), slice(300, 500)
    mean, std = helpers.fit_normalization(raw[train])  # training split only

    def norm(r):
        return ((r - np.array(mean)[None, :, None]) / np.array(std)[None, :, None]).astype(np.float32)

    model = helpers.train(norm(raw[train]), y[train], epochs=8)
    checkpoint = root / "cnn1d.pt"
    torch.save(model.state_dict(), checkpoint)
    np.savez(root / "calib.npz", x=norm(raw[train]))
    np.savez(root / "val.npz", x=norm(raw[val]), y=y[val])
    with torch.no_grad():
        logits = model(torch.from_numpy(norm(raw[val]))).numpy()
    assert (logits.argmax(1) == y[val]).mean() > 0.9, "training the test model failed"
    return {"root": root, "checkpoint": checkpoint, "mean": mean, "std": std, "raw_val": raw[val],
            "y_val": y[val], "norm": norm, "logits": logits}


def tensor_build(trained, target: str, output: Path, **overrides):
    from edgekit.config import load_build

    root = trained["root"]
    settings = {
        "model": {"source": "tensor_helpers:build", "checkpoint": str(trained["checkpoint"]), "name": "cnn1d",
                  "input_shape": [1, 3, 64], "labels": LABELS},
        "target": target,
        "calibration": {"source": str(root / "calib.npz")},
        "validation": {"source": str(root / "val.npz")},
        "preprocess": {"type": "tensor", "mean": trained["mean"], "std": trained["std"]},
        "postprocess": {"type": "classification", "top_k": 3},
        "output": str(output),
        # the subject is the INT8 artifact: this 1-D CNN runs in tens of µs, where INT8 vs FP32 is call overhead
        # and the latency gate's verdict flips with machine load
        "latency": {"on_slower": "keep_int8"},
    }
    settings.update(overrides)
    return load_build(None, settings)


@pytest.fixture(scope="module")
def bundles(helpers, trained, signing_key):
    from edgekit.build.pipeline import compile_model

    return {t: compile_model(tensor_build(trained, t, trained["root"] / f"{t}.ekb"), signing_key) for t in TARGETS}


def test_the_build_config_takes_tensor_preprocessing_with_scale_one(trained, tmp_path):
    cfg = tensor_build(trained, "onnxruntime-cpu", tmp_path / "m.ekb")
    assert cfg.preprocess.type == "tensor" and cfg.preprocess.size is None and cfg.preprocess.scale == 1.0
    from edgekit.errors import ConfigError

    with pytest.raises(ConfigError, match="image preprocessing needs size"):
        tensor_build(trained, "onnxruntime-cpu", tmp_path / "m.ekb", preprocess={"type": "image"})
    with pytest.raises(ConfigError, match="image settings do not apply to type: tensor"):
        tensor_build(trained, "onnxruntime-cpu", tmp_path / "m.ekb", preprocess={"type": "tensor", "size": [3, 64]})


@pytest.mark.parametrize("target", TARGETS)
def test_int8_bundle_takes_raw_windows_and_agrees_with_fp32_torch(bundles, trained, keys, target):
    result = bundles[target]
    raw, logits_fp32 = trained["raw_val"], trained["logits"]
    with edgekit_runtime.load(result.bundle, keyring=keys["public"]) as model:
        m = model.manifest
        assert m.format_version == bundle_spec.FORMAT_VERSION and m.backend.precision == "int8"
        assert (m.preprocess.type, m.preprocess.size, m.preprocess.scale) == ("tensor", None, 1.0)
        np.testing.assert_allclose(m.preprocess.mean, trained["mean"])
        assert model.health_check()["ok"]
        # the device's preprocessing is the host's normalisation
        np.testing.assert_allclose(model.preprocess(raw), trained["norm"](raw), rtol=1e-5, atol=1e-5)
        results = model.predict(raw)
        top1 = np.array([r["top_k"][0]["index"] for r in results])
        assert results[0]["top_k"][0]["label"] in LABELS
        agreement = (top1 == logits_fp32.argmax(1)).mean()
        assert agreement >= 0.9, f"{target}: INT8 on raw windows agrees with FP32 torch on {agreement:.0%}"
        assert (top1 == trained["y_val"]).mean() >= 0.9
        # one raw window, one .npy file, run() on the preprocessed batch: the same answer
        out = model.run(model.preprocess(raw[:4]))[model.outputs[0].name]
        assert list(out.argmax(1)) == list(top1[:4])
        (one,) = model.predict(raw[0])
        assert one["top_k"][0]["index"] == top1[0]
        with pytest.raises(InputError, match=r"one sample of shape \(3, 64\)") as info:
            model.predict(raw[:, :2])
        assert info.value.code == ErrorCode.INPUT_BAD_SHAPE
        # the manifest's normalisation is what makes raw windows work: fed as they are, they are not classified
        unnormalised = model.run(raw.astype(np.float32))[model.outputs[0].name].argmax(1)
        assert (unnormalised == trained["y_val"]).mean() < 0.7
    gates = {g["name"]: g["status"] for g in result.report["gates"]}
    assert gates["accuracy"] == "passed" and gates["fidelity.cosine"] == "passed"
    assert m.inputs[0].shape[1:] == [3, 64] and m.inputs[0].layout is None  # 3-D: no image layout is claimed


def _resign(src: Path, dest: Path, key, change) -> Path:
    """A copy of bundle ``src`` whose manifest ``change`` edits, validly signed by ``key`` (past the writer)."""
    with zipfile.ZipFile(src) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in manifest["files"]}
    change(manifest)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    signature = {"algorithm": "ed25519", "key_id": key_id_of(key.public_key()),
                 "signature": base64.b64encode(key.sign(data)).decode()}
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", data)
        zf.writestr("signature.json", json.dumps(signature))
        for name, blob in members.items():
            zf.writestr(name, blob)
    return dest


def test_a_mean_of_the_wrong_length_is_refused_at_load(bundles, keys, signing_key, tmp_path):
    bad = _resign(bundles["onnxruntime-cpu"].bundle, tmp_path / "bad.ekb", signing_key,
                  lambda m: m["preprocess"].update(mean=[0.0, 1.0]))
    with pytest.raises(BundleError, match=r"preprocess.mean has 2 values but .* has 3 channel") as info:
        edgekit_runtime.load(bad, keyring=keys["public"], workdir=tmp_path / "w")
    assert info.value.code == ErrorCode.BUNDLE_BAD_MANIFEST
    # the same edit with the right length loads: the refusal is the length, not the re-signing
    ok = _resign(bundles["onnxruntime-cpu"].bundle, tmp_path / "ok.ekb", signing_key,
                 lambda m: m["preprocess"].update(mean=[0.0, 1.0, 2.0]))
    with edgekit_runtime.load(ok, keyring=keys["public"]) as model:
        assert model.manifest.preprocess.mean == [0.0, 1.0, 2.0]



def test_an_image_folder_is_refused_for_tensor_preprocessing(tmp_path):
    from edgekit.config import DataSource
    from edgekit.data.sources import load_data
    from edgekit.errors import CalibrationError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    with pytest.raises(CalibrationError, match="image folder, but the build's preprocess is type 'tensor'"):
        load_data(DataSource(source=str(tmp_path)), {"type": "tensor", "mean": [0.0]})
