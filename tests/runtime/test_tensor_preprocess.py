"""The ``tensor`` preprocessing kind (format 1.2): raw arrays → ``(x * scale - mean) / std`` per channel on axis 1.

The bundle is the ``kit`` fixture's MatMul (``x: [batch, 4]``, a tabular row of four
features), so preprocessed inputs and outputs can be worked out in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, ErrorCode, InputError
from edgekit_runtime.contract.manifest import Manifest, Preprocess, TensorSpec
from edgekit_runtime.processing import preprocess_batch, preprocess_tensor

MEAN = [1.0, 2.0, 3.0, 4.0]
STD = [0.5, 1.0, 2.0, 4.0]
TENSOR = {"type": "tensor", "scale": 1.0, "mean": MEAN, "std": STD}


def tensor_bundle(kit, pre: dict | None = None, *, crafted: bool = False, version: str | None = None):
    manifest, members = kit.parts()
    manifest["preprocess"] = pre if pre is not None else TENSOR
    manifest["postprocess"] = {"type": "classification", "softmax": False, "top_k": 3}
    if version:
        manifest["format_version"] = version
    if crafted:  # past the writer's own validation, as a tampering or buggy host could
        return kit.craft_signed("bad.ekb", manifest=manifest, entries=list(members.items()))
    return kit.write("tensor.ekb", manifest=manifest, members=members)


# ----------------------------------------------------------------------------- the format
def test_tensor_specs_came_with_1_2_and_need_no_size():
    assert bundle_spec.parse_version(bundle_spec.FORMAT_VERSION) >= (1, 2)
    pre = Preprocess.from_dict({"type": "tensor", "mean": [0.5, 1.5, 2.5], "std": [1.0]})
    assert pre.size is None and pre.mean == [0.5, 1.5, 2.5]


def test_an_image_spec_still_needs_its_size():
    with pytest.raises(BundleError, match=r"manifest.preprocess.size is missing; image preprocessing needs size") as info:
        Preprocess.from_dict({"type": "image"})
    assert info.value.code == ErrorCode.BUNDLE_BAD_MANIFEST
    # the image kind still counts its channels from the colour
    with pytest.raises(BundleError, match="rgb images have 3"):
        Preprocess.from_dict({"size": [8, 8], "mean": [0.1, 0.2]})


def _manifest(kit, pre: dict, shape: list) -> dict:
    d, members = kit.parts()
    d["preprocess"] = pre
    d["inputs"][0]["shape"] = shape
    d["files"] = {n: {"sha256": "0" * 64, "size": 0} for n in members}
    d["signing"] = {"algorithm": "ed25519", "key_id": "k"}
    return d


@pytest.mark.parametrize("shape, values, ok", [
    (["batch", 4], MEAN, True),
    (["batch", 4], [1.0], True),
    (["batch", 3, 64], [0.5, 1.0, 2.0], True),
    (["batch", 3, 64], MEAN, False),
    (["batch", "features"], MEAN, False),  # no fixed channel count to hold four values to
    (["batch"], [1.0], False),  # no axis 1 to normalise
])
def test_mean_and_std_must_fit_the_first_inputs_channels(kit, shape, values, ok):
    d = _manifest(kit, {"type": "tensor", "mean": values, "std": values}, shape)
    if ok:
        assert Manifest.from_dict(d).preprocess.mean == values
        return
    with pytest.raises(BundleError, match=r"manifest.(preprocess.mean|inputs\[0\].shape)") as info:
        Manifest.from_dict(d)
    assert info.value.code == ErrorCode.BUNDLE_BAD_MANIFEST


def test_an_unknown_kind_loads_but_is_not_preprocessed(kit):
    # a later 1.x may add kinds: the bundle still loads and run() works; preprocess refuses clearly
    path = tensor_bundle(kit, {"type": "spectrogram", "hop": 128})
    with edgekit_runtime.load(path, keyring=kit.ring_of(kit.key)) as model:
        assert model.run(kit.SAMPLE)["y"].shape == (1, 3)
        with pytest.raises(InputError, match="does not know preprocessing of type 'spectrogram'") as info:
            model.preprocess([np.zeros(4)])
    assert info.value.code == ErrorCode.INPUT_UNSUPPORTED


# ----------------------------------------------------------------------------- the arithmetic
def test_preprocess_tensor_normalises_axis_1_then_casts():
    x = np.arange(2 * 3 * 5, dtype=np.int16).reshape(2, 3, 5)  # e.g. raw ADC counts
    spec = {"type": "tensor", "scale": 0.5, "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]}
    got = preprocess_tensor(x, spec)
    want = (x * 0.5 - np.array([1, 2, 3])[None, :, None]) / np.array([2, 4, 8])[None, :, None]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # one value for all channels (no scale: 1.0 for tensors); no mean/std: only scale
    np.testing.assert_allclose(preprocess_tensor(x, {"type": "tensor", "mean": [1.0], "std": [2.0]}),
                               (x - 1) / 2, rtol=1e-6)
    np.testing.assert_array_equal(preprocess_tensor(x, {"type": "tensor", "scale": 1.0}), x.astype(np.float32))


def test_samples_batches_and_npy_files_give_the_same_batch(tmp_path):
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 4))
    shape = ["batch", 4]
    np.save(tmp_path / "row.npy", batch[2])
    from_batch = preprocess_batch(batch, TENSOR, shape)
    from_rows = preprocess_batch([batch[0], batch[1], tmp_path / "row.npy"], TENSOR, shape)
    from_mixed = preprocess_batch([batch[:2], str(tmp_path / "row.npy")], TENSOR, shape)
    want = (batch - MEAN) / STD
    for got in (from_batch, from_rows, from_mixed):
        assert got.shape == (3, 4)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert preprocess_batch(batch[0], TENSOR, shape).shape == (1, 4)  # one sample, by its rank


@pytest.mark.parametrize("items, match", [
    (np.zeros((2, 5)), r"shape \(2, 5\); the model takes one sample of shape \(4,\) or a batch of shape \(batch, 4\)"),
    ([np.zeros(4), np.zeros(5)], r"input 1 has shape \(5,\)"),
    (np.zeros((2, 4, 1)), r"shape \(2, 4, 1\)"),
])
def test_a_wrong_shape_names_the_shape_the_model_takes(items, match):
    with pytest.raises(InputError, match=match) as info:
        preprocess_batch(items, TENSOR, ["batch", 4])
    assert info.value.code == ErrorCode.INPUT_BAD_SHAPE


def test_bad_tensor_items_are_refused_with_their_codes(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    for items, code in (([], ErrorCode.INPUT_MISSING), ([tmp_path / "x.png"], ErrorCode.INPUT_UNSUPPORTED),
                        ([tmp_path / "none.npy"], ErrorCode.INPUT_MISSING),
                        ([tmp_path / "broken.npy"], ErrorCode.INPUT_UNREADABLE),
                        ([np.array(["a", "b", "c", "d"])], ErrorCode.INPUT_BAD_DTYPE)):
        with pytest.raises(InputError) as info:
            preprocess_batch(items, TENSOR, ["batch", 4])
        assert info.value.code == code, items


# ----------------------------------------------------------------------------- through a bundle
def test_a_tensor_bundle_predicts_from_raw_rows(kit):
    path = tensor_bundle(kit)
    raw = np.array([[2.0, 4.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    x = (raw - MEAN) / STD  # [[2, 2, 2, 1], [0, 0, 0, 0]]
    with edgekit_runtime.load(path, keyring=kit.ring_of(kit.key)) as model:
        assert model.manifest.format_version == bundle_spec.FORMAT_VERSION and model.manifest.preprocess.size is None
        np.testing.assert_allclose(model.preprocess(raw), x, rtol=1e-6)
        results = model.predict(raw)
        assert len(results) == 2
        logits = x @ kit.WEIGHTS
        assert [t["index"] for t in results[0]["top_k"]] == list(np.argsort(-logits[0], kind="stable"))
        np.testing.assert_allclose([t["score"] for t in results[0]["top_k"]], np.sort(logits[0])[::-1], rtol=1e-6)
        (one,) = model.predict(raw[0])  # a single sample by its rank
        assert one == results[0]
        with pytest.raises(InputError, match=r"the model takes one sample of shape \(4,\)"):
            model.predict(np.zeros((2, 3)))


def test_a_tensor_bundle_with_a_mean_of_the_wrong_length_is_refused_at_load(kit, tmp_path):
    path = tensor_bundle(kit, {**TENSOR, "mean": [1.0, 2.0, 3.0]}, crafted=True)
    with pytest.raises(BundleError, match=r"preprocess.mean has 3 values but .*has 4 channel") as info:
        edgekit_runtime.load(path, keyring=kit.ring_of(kit.key), workdir=tmp_path / "w")
    assert info.value.code == ErrorCode.BUNDLE_BAD_MANIFEST
    assert not (tmp_path / "w").exists()


def test_the_writer_refuses_it_before_signing(kit):
    with pytest.raises(BundleError, match="preprocess.std has 2 values"):
        tensor_bundle(kit, {**TENSOR, "std": [1.0, 2.0]})


def test_tensor_spec_shape_in_messages_keeps_symbolic_dims():
    spec = TensorSpec(name="x", dtype="float32", shape=["batch", 3, "time"])
    with pytest.raises(InputError, match=r"one sample of shape \(3, time\) or a batch of shape \(batch, 3, time\)"):
        preprocess_batch(np.zeros((2, 4, 10)), TENSOR | {"mean": None, "std": None}, spec.shape)
    # a symbolic length takes any length
    assert preprocess_batch(np.zeros((3, 17)), {"type": "tensor"}, spec.shape).shape == (1, 3, 17)
