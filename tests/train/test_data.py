"""Training data: real sets (sklearn digits, aeon BasicMotions and Airline), splits, normalization, run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgekit.config.train import DataConfig, SplitConfig, TrainConfig
from edgekit.errors import CalibrationError, ConfigError
from edgekit.train.data import Normalizer, load_run_data, prepare, split_arrays


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x, y=d.target)
    return path


def test_digits_npz_stratified_split_and_manifest(digits_npz):
    p = prepare(DataConfig(path=digits_npz), SplitConfig(), seed=0)
    assert p.kind == "image" and p.task == "classification"
    assert p.input_shape == [1, 8, 8] and p.labels == [str(i) for i in range(10)]
    assert p.split_report["method"] == "stratified"
    sizes = p.split_report["sizes"]
    assert sum(sizes.values()) == 1797 and abs(sizes["test"] - 0.15 * 1797) <= 1
    # stratified: every class in every split, in about the same proportion
    for split in ("train", "val", "test"):
        counts = np.array(list(p.split_report["class_counts"][split].values()))
        assert counts.min() > 0 and counts.max() - counts.min() <= max(3, counts.max() // 5)
    man = p.preprocess_manifest()
    assert man["type"] == "image" and man["color"] == "gray" and man["size"] == [8, 8]
    assert man["scale"] == pytest.approx(1 / 255) and len(man["mean"]) == 1
    # the manifest formula reproduces normalized()
    raw = p.x["val"][:4].astype(np.float32)
    expect = (raw * man["scale"] - man["mean"][0]) / man["std"][0]
    np.testing.assert_allclose(p.normalized("val")[:4], expect, rtol=1e-5, atol=1e-5)
    assert p.source["format"] == "npz" and len(p.source["sha256"]) == 64
    # same seed, same split; another seed, another
    again = prepare(DataConfig(path=digits_npz), SplitConfig(), seed=0)
    other = prepare(DataConfig(path=digits_npz), SplitConfig(), seed=1)
    np.testing.assert_array_equal(again.x["train"], p.x["train"])
    assert not np.array_equal(other.x["val"], p.x["val"])


def test_normalizer_fitted_on_train_only(digits_npz):
    p = prepare(DataConfig(path=digits_npz), SplitConfig(val=0.3, test=0.3), seed=0)
    train = p.x["train"].astype(np.float64) / 255
    everything = np.concatenate([p.x[s] for s in ("train", "val", "test")]).astype(np.float64) / 255
    assert p.norm.mean[0] == pytest.approx(train.mean()) and p.norm.std[0] == pytest.approx(train.std())
    assert p.norm.mean[0] != pytest.approx(everything.mean(), abs=1e-6)
    z = p.normalized("train")
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3


def test_normalizer_constant_channel_gets_std_one():
    x = np.ones((5, 2, 3), dtype=np.float32)
    x[:, 1] = np.arange(15).reshape(5, 3)
    norm = Normalizer.fit(x, 1.0)
    assert norm.std[0] == 1.0 and norm.std[1] == pytest.approx(np.arange(15).std())
    assert np.isfinite(norm.apply(np.ones((1, 2, 3)))).all()


def test_string_labels_and_grouped_split(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    groups = np.repeat(np.arange(24), n // 24)  # e.g. 24 subjects with 10 windows each
    y = np.array(["low", "high", "mid"])[rng.integers(0, 3, n)]
    x = rng.normal(size=(n, 3, 20)).astype(np.float32)
    np.savez(tmp_path / "g.npz", x=x, y=y, subject=groups, meta=groups % 2)
    p = prepare(DataConfig(path=tmp_path / "g.npz", group="subject"), SplitConfig(), seed=0)
    assert p.kind == "sequence" and p.labels == ["high", "low", "mid"]
    assert p.split_report["method"] == "grouped" and p.split_report["group_overlap"] == []
    # recover each split's groups through the data itself: no subject in two splits
    lookup = {x[i].tobytes(): groups[i] for i in range(n)}
    seen = {s: {lookup[row.tobytes()] for row in p.x[s]} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert all(len(seen[s]) == p.split_report["groups"][s] for s in seen)
    assert p.meta["val"] is not None and len(p.meta["val"]) == len(p.x["val"])  # default "meta" array picked up
    assert p.preprocess_manifest()["type"] == "tensor" and len(p.preprocess_manifest()["mean"]) == 3


def test_basic_motions_own_test_split(tmp_path):
    datasets = pytest.importorskip("aeon.datasets")
    x, y = datasets.load_basic_motions(split="train")
    x_test, y_test = datasets.load_basic_motions(split="test")
    np.savez(tmp_path / "bm.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    p = prepare(DataConfig(path=tmp_path / "bm.npz"), SplitConfig(), seed=0)
    assert p.kind == "sequence" and p.input_shape == [6, 100] and len(p.labels) == 4
    assert p.split_report["test_from"] == "data"
    np.testing.assert_allclose(p.x["test"], x_test.astype(np.float32))
    assert [p.labels[i] for i in p.y["test"]] == [str(v) for v in y_test]
    assert len(p.x["train"]) + len(p.x["val"]) == len(x)
    test_rows = {r.tobytes() for r in p.x["test"]}
    assert not any(r.tobytes() in test_rows for s in ("train", "val") for r in p.x[s])
    train_rows = {r.tobytes() for r in p.x["train"]}
    assert not any(r.tobytes() in train_rows for r in p.x["val"])


def test_airline_forecast_temporal_split(tmp_path):
    datasets = pytest.importorskip("aeon.datasets")
    pd = pytest.importorskip("pandas")
    series = datasets.load_airline(return_array=False)
    pd.DataFrame({"date": series.index.astype(str), "passengers": series.to_numpy()}).to_csv(
        tmp_path / "air.csv", index=False)
    p = prepare(DataConfig(path=tmp_path / "air.csv", task="forecast", time="date"), SplitConfig(), seed=0)
    assert p.kind == "forecast" and p.season == 12 and p.input_shape == [1, 24]
    assert p.y["train"].shape[1] == 6 and p.split_report["method"] == "temporal"
    ranges = p.split_report["time_ranges"]
    assert ranges["train"][1] < ranges["val"][0] <= ranges["val"][1] < ranges["test"][0]
    values = series.to_numpy().astype(np.float32)
    # windows are the series itself: inputs then the horizon right after
    np.testing.assert_array_equal(p.x["train"][0, 0], values[:24])
    np.testing.assert_array_equal(p.y["train"][0], values[24:30])
    # every val/test target step lies strictly after every train target step
    horizons = np.lib.stride_tricks.sliding_window_view(values, 6)
    starts = {s: [int(np.flatnonzero((horizons == row).all(1))[0]) for row in p.y[s]]
              for s in ("train", "val", "test")}
    assert max(starts["train"]) + 5 < min(starts["val"]) and max(starts["val"]) + 5 < min(starts["test"])
    assert p.y_stats is not None and len(p.y_stats[0]) == 6
    assert p.y_stats[0][0] == pytest.approx(float(p.y["train"][:, 0].mean()), rel=1e-5)
    assert p.preprocess_manifest() == {"type": "tensor", "scale": 1.0, "mean": p.norm.mean, "std": p.norm.std,
                                       "dtype": "float32"}


def test_tabular_csv_regression(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"a": rng.normal(size=200), "b": rng.normal(size=200) * 5, "site": rng.integers(0, 3, 200)})
    df["target"] = 2 * df["a"] - df["b"]
    df.to_csv(tmp_path / "t.csv", index=False)
    p = prepare(DataConfig(path=tmp_path / "t.csv", task="regression", meta="site"), SplitConfig(), seed=0)
    assert p.kind == "tabular" and p.input_shape == [2] and p.extra["features"] == ["a", "b"]
    assert p.split_report["method"] == "random" and p.y["train"].dtype == np.float32
    assert len(p.meta["test"]) == len(p.x["test"])
    assert p.y_stats[1][0] == pytest.approx(float(p.y["train"].std()), rel=1e-4)


def test_image_folder(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            size = (10, 12) if i % 2 else (14, 12)  # median size: 12 x 12
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"{i}.png"), rng.integers(0, 256, size, dtype=np.uint8))
    p = prepare(DataConfig(path=tmp_path / "imgs"), SplitConfig(val=0.25, test=0.25), seed=0)
    assert p.kind == "image" and p.labels == ["cat", "dog"] and p.color == "gray"
    assert p.input_shape == [1, 12, 12] and p.x["train"].dtype == np.uint8
    assert p.source["format"] == "image_folder" and p.source["files"] == 12
    # resized exactly as the device resizes (the runtime's preprocessing)
    from edgekit_runtime.processing import preprocess_batch
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    man = p.preprocess_manifest()
    device = preprocess_batch(files, man)
    ours = np.concatenate([p.normalized(s) for s in ("train", "val", "test")])
    assert {r.round(4).tobytes() for r in device} == {r.round(4).tobytes() for r in ours}
    # a colour image makes the folder rgb
    cv2.imwrite(str(tmp_path / "imgs" / "dog" / "c.png"), rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    p2 = prepare(DataConfig(path=tmp_path / "imgs"), SplitConfig(val=0.25, test=0.25), seed=0)
    assert p2.color == "rgb" and p2.input_shape == [3, 12, 12] and p2.source["sha256"] != p.source["sha256"]


def test_refuses_bad_splits(tmp_path, digits_npz):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.array([0] * 29 + [1])
    np.savez(tmp_path / "rare.npz", x=x, y=y)
    with pytest.raises(CalibrationError, match="split"):
        prepare(DataConfig(path=tmp_path / "rare.npz"), SplitConfig(), seed=0)
    with pytest.raises(ConfigError, match="group"):
        prepare(DataConfig(path=digits_npz), SplitConfig(method="grouped"), seed=0)
    # in file order, the only two samples of class 1 land in test: nothing to learn it from
    np.savez(tmp_path / "late.npz", x=x, y=np.array([0] * 28 + [1, 1]))
    with pytest.raises(CalibrationError, match=r"class\(es\) \['1'\] out of the training split"):
        prepare(DataConfig(path=tmp_path / "late.npz"), SplitConfig(method="temporal"), seed=0)
    np.savez(tmp_path / "tiny.npz", x=x[:3], y=np.zeros(3))
    with pytest.raises(CalibrationError, match="empty"):
        prepare(DataConfig(path=tmp_path / "tiny.npz", task="regression"),
                SplitConfig(method="temporal", val=0.1, test=0.1), seed=0)


def _fake_run(run: Path, data: Path, sha: str | None) -> None:
    run.mkdir()
    cfg = TrainConfig(data=DataConfig(path=data), out=run, train={"seed": 3})
    (run / "train.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "metrics.json").write_text(json.dumps({"data_sha256": sha}))


def test_run_folder_round_trip(tmp_path, digits_npz):
    reference = prepare(DataConfig(path=digits_npz), SplitConfig(), seed=3)
    _fake_run(tmp_path / "run", digits_npz, reference.source["sha256"])
    again = load_run_data(tmp_path / "run")
    np.testing.assert_array_equal(again.x["val"], reference.x["val"])
    x, y = split_arrays(str(tmp_path / "run"), "val")
    np.testing.assert_array_equal(x, reference.normalized("val"))
    assert x.dtype == np.float32 and y.dtype == np.int64 and (y == reference.y["val"]).all()
    x16 = split_arrays(str(tmp_path / "run"), "train", count=16, labels=False)
    assert isinstance(x16, np.ndarray) and x16.shape == (16, 1, 8, 8)
    # the data changed since training: refused, with what to do
    _fake_run(tmp_path / "stale", digits_npz, "0" * 64)
    with pytest.raises(CalibrationError, match="changed since training.*--calibration"):
        load_run_data(tmp_path / "stale")


def test_float_images_get_tensor_preprocessing_uint8_images_image(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(80, 3, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(4), 20)
    np.savez(tmp_path / "f.npz", x=u8.astype(np.float32) / 255, y=y)
    np.savez(tmp_path / "u.npz", x=u8, y=y)
    man = prepare(DataConfig(path=tmp_path / "f.npz"), SplitConfig(), 0).preprocess_manifest()
    assert man["type"] == "tensor" and man["scale"] == 1.0 and len(man["mean"]) == 3
    man = prepare(DataConfig(path=tmp_path / "u.npz"), SplitConfig(), 0).preprocess_manifest()
    assert man["type"] == "image" and man["scale"] == pytest.approx(1 / 255) and man["size"] == [8, 8]


def test_constant_regression_target_gets_std_one(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.stack([np.full(60, 3.0), rng.normal(size=60)], axis=1))
    p = prepare(DataConfig(path=tmp_path / "c.npz", task="regression"), SplitConfig(method="random"), 0)
    assert p.y_stats[1][0] == 1.0 and p.y_stats[1][1] > 0.5


def test_gray_image_folder_is_decoded_as_the_device_decodes(tmp_path):
    import cv2
    from edgekit_runtime.processing import preprocess_batch

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            size = (16, 20) if i % 2 else (24, 20)  # median: 20 x 20
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"{i}.png"), rng.integers(0, 256, size + (3,), dtype=np.uint8))
    p = prepare(DataConfig(path=tmp_path / "imgs", color="gray"), SplitConfig(val=0.2, test=0.2), seed=0)
    assert p.color == "gray" and p.input_shape == [1, 20, 20]
    spec = {**p.preprocess_manifest(), "scale": 1.0, "mean": None, "std": None}
    device = preprocess_batch(sorted((tmp_path / "imgs").rglob("*.png")), spec)
    ours = np.concatenate([p.x[s] for s in ("train", "val", "test")]).astype(np.float32)
    assert sorted(r.tobytes() for r in device) == sorted(r.tobytes() for r in ours)
