"""Calibration/validation sources: image folders, .npy/.npz, factories, and their hash."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.config import DataSource
from edgekit.data import digits
from edgekit.data.sources import load_data, tensor_sha256
from edgekit.errors import CalibrationError

PRE = digits.preprocess_spec()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("imgs")
    test = digits.splits()["test"]
    for i, (img, label) in enumerate(zip(test.images[:30], test.labels[:30])):
        (root / str(label)).mkdir(exist_ok=True)
        cv2.imwrite(str(root / str(label) / f"{i:03d}.png"), img)
    return root, test


def test_image_folder_with_class_subfolders_gives_labels(image_folder):
    root, test = image_folder
    ds = load_data(DataSource(source=str(root)), PRE, digits.LABELS)
    assert ds.x.shape == (30, 1, 8, 8) and ds.x.dtype == np.float32
    # files are read in sorted path order: rebuild that order to compare
    files = sorted(root.rglob("*.png"))
    expected = np.array([int(f.parent.name) for f in files])
    np.testing.assert_array_equal(ds.y, expected)
    idx = [int(f.stem) for f in files]
    np.testing.assert_allclose(ds.x, digits.to_tensor(test.images[idx]), atol=1e-6)


def test_folder_class_not_in_labels_is_refused(image_folder):
    root, _ = image_folder
    with pytest.raises(CalibrationError, match="not among the model's labels"):
        load_data(DataSource(source=str(root)), PRE, ["cat", "dog"])


def test_folder_needs_preprocessing(image_folder):
    root, _ = image_folder
    with pytest.raises(CalibrationError, match="no 'preprocess' section"):
        load_data(DataSource(source=str(root)), None)


def test_npy_npz_and_factory_give_the_same_hash(tmp_path):
    x = digits.calibration(count=50)
    np.save(tmp_path / "c.npy", x)
    np.savez(tmp_path / "c.npz", x=x)
    hashes = {
        load_data(DataSource(source=str(tmp_path / "c.npy"))).sha256(),
        load_data(DataSource(source=str(tmp_path / "c.npz"))).sha256(),
        load_data(DataSource(source="edgekit.data.digits:calibration", kwargs={"count": 50})).sha256(),
    }
    assert hashes == {tensor_sha256(x)}
    assert tensor_sha256(x[:49]) not in hashes


def test_count_limits_samples_and_labels(tmp_path):
    x, y = digits.validation()
    np.savez(tmp_path / "v.npz", x=x, y=y)
    ds = load_data(DataSource(source=str(tmp_path / "v.npz"), count=10))
    assert len(ds) == 10 and ds.y.tolist() == y[:10].tolist()


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "a.npz", y=np.zeros(2, np.int64)), "expected 'x'"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 1, 8, 8), np.uint8)), "give preprocessed float tensors"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(3)), "y has shape"),
])
def test_malformed_arrays_are_explained(tmp_path, make, message):
    make(tmp_path)
    path = next(tmp_path.glob("a.*"))
    with pytest.raises(CalibrationError, match=message):
        load_data(DataSource(source=str(path)))


def test_unknown_source_kind(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationError, match="neither an image folder"):
        load_data(DataSource(source=str(tmp_path / "data.csv")))


def test_empty_folder(tmp_path):
    with pytest.raises(CalibrationError, match="holds no images"):
        load_data(DataSource(source=str(tmp_path)), PRE)


def test_a_named_array_for_a_one_input_model_is_explained_before_any_work(tmp_path):
    from edgekit.build.stages.import_model import check_samples_fit

    np.savez(tmp_path / "a.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    x = load_data(DataSource(source=str(tmp_path / "a.npz"))).x  # one array per name: a structured array
    assert x.dtype.names == ("images",)
    with pytest.raises(CalibrationError, match=r"holds arrays \['images'\]; the model has one input 'input'") as err:
        check_samples_fit(["input"], [[1, 1, 8, 8]], x, "calibration")
    assert "'x'" in err.value.hint
