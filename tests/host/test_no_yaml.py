"""Bringing a model without writing YAML: preprocessing presets and flags, ``edgekit init``, and data folders
with a corrupt image (named, or skipped and counted with ``--skip-bad-images``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import edgekit_runtime
from edgekit.cli import app
from edgekit.errors import ConfigError, ExitCode

from .test_onnx_import import classifier, save

runner = CliRunner()


def cli(*args) -> tuple[int, dict]:
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, json.loads(result.stdout)


def fixed(model, dims: list[int]):
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, dims):
        d.Clear()
        d.dim_value = v
    return model


def image_folder(folder: Path, n: int = 24, side: int = 40, corrupt: int = 0) -> Path:
    """``n`` real PNG files (smooth random colour fields, another size than the model's), ``corrupt`` broken JPEGs."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC))
    for i in range(corrupt):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("no_yaml")
    return {"fixed": save(fixed(classifier("paddle"), [1, 3, 32, 32]), root / "fixed.onnx"),
            "open": save(classifier("paddle"), root / "open.onnx")}


def test_compile_with_a_preset_and_an_image_folder_needs_no_build_file(onnx_files, tmp_path, keys):
    images = image_folder(tmp_path / "images")
    code, doc = cli("compile", onnx_files["fixed"], "--preprocess", "imagenet", "--calibration", images,
                    "--target", "onnxruntime-cpu", "--no-accuracy-check", "--key", keys["private"],
                    "-o", tmp_path / "m.ekb")
    assert code == ExitCode.OK, doc
    with edgekit_runtime.load(tmp_path / "m.ekb", keyring=keys["public"]) as model:
        pre = model.manifest.preprocess
        # the preset's normalisation, the size and layout read from the model's fixed input
        assert pre.mean == [0.485, 0.456, 0.406] and pre.std == [0.229, 0.224, 0.225]
        assert (pre.size, pre.layout, pre.color, pre.resize) == ([32, 32], "NCHW", "rgb", "shorter_center_crop")
        assert len(model.predict(str(images / "img000.png"))[0]["top_k"]) > 0


def test_size_flag_settles_a_model_with_open_height_and_width(onnx_files, tmp_path, keys):
    images = image_folder(tmp_path / "images")
    code, doc = cli("compile", onnx_files["open"], "--preprocess", "unit", "--size", "32", "--mean", "0.5,0.5,0.5",
                    "--calibration", images, "--target", "onnxruntime-cpu", "--no-accuracy-check",
                    "--key", keys["private"], "-o", tmp_path / "m.ekb")
    assert code == ExitCode.OK, doc
    assert doc["steps"]["export"]["normalize"]["input_shape_after"] == ["batch", 3, 32, 32]
    with edgekit_runtime.load(tmp_path / "m.ekb", keyring=keys["public"]) as model:
        assert model.manifest.preprocess.size == [32, 32] and model.manifest.preprocess.mean == [0.5, 0.5, 0.5]


def test_a_preset_without_a_size_for_an_open_model_says_what_to_add(onnx_files, tmp_path, keys):
    code, doc = cli("compile", onnx_files["open"], "--preprocess", "imagenet", "--calibration", tmp_path,
                    "--target", "onnxruntime-cpu", "--key", keys["private"])
    assert code == ExitCode.USAGE and "--size" in doc["error"]["hint"]
    code, doc = cli("compile", onnx_files["fixed"], "--preprocess", "vgg", "--target", "onnxruntime-cpu")
    assert code == ExitCode.USAGE and "imagenet" in doc["error"]["hint"]
    code, doc = cli("compile", onnx_files["fixed"], "--size", "big", "--target", "onnxruntime-cpu")
    assert code == ExitCode.USAGE and "--size takes" in doc["error"]["message"]


def test_a_size_that_does_not_fit_the_model_names_both_before_any_work(onnx_files, tmp_path, keys):
    images = image_folder(tmp_path / "images", n=6)
    code, doc = cli("compile", onnx_files["fixed"], "--preprocess", "imagenet", "--size", "64",
                    "--calibration", images, "--target", "onnxruntime-cpu", "--no-accuracy-check",
                    "--key", keys["private"], "-o", tmp_path / "m.ekb")
    assert code == ExitCode.USAGE
    assert "[64, 64]" in doc["error"]["message"] and "[1, 3, 32, 32]" in doc["error"]["message"]
    assert not (tmp_path / "m.ekb").exists()


def test_a_corrupt_image_is_named_or_skipped_and_counted(onnx_files, tmp_path, keys):
    images = image_folder(tmp_path / "images", corrupt=1)
    common = ["--preprocess", "imagenet", "--calibration", images, "--target", "onnxruntime-cpu",
              "--no-accuracy-check", "--key", keys["private"], "-o", tmp_path / "m.ekb"]
    code, doc = cli("compile", onnx_files["fixed"], *common)
    assert code != ExitCode.OK and "broken0.jpg" in doc["error"]["message"]
    assert not (tmp_path / "m.ekb").exists()
    code, doc = cli("compile", onnx_files["fixed"], *common, "--skip-bad-images")
    assert code == ExitCode.OK, doc
    data = next(s for s in doc["stages"] if s["name"] == "data")["calibration"]
    assert data["skipped_images"] == 1 and data["skipped"][0]["file"].endswith("broken0.jpg")
    assert data["samples"] + data["held_back"] == 24


def test_init_writes_a_commented_build_file_that_compiles(onnx_files, tmp_path, keys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = image_folder(tmp_path / "images")
    code, doc = cli("init", onnx_files["open"], "--target", "onnxruntime-cpu", "--calibration", "images",
                    "-o", "open.yaml")
    assert code == ExitCode.OK, doc
    assert doc["preprocess"] == "imagenet" and doc["input_shape"] == [1, 3, 224, 224]
    text = Path("open.yaml").read_text()
    assert "# " in text and "leaves height and width open" in text  # it says what it had to choose
    data = yaml.safe_load(text)
    assert data["preprocess"]["size"] == [224, 224] and data["accuracy"]["max_accuracy_drop"] is None
    # the user sets the size they deploy at, then compiles the file as it is
    Path("open.yaml").write_text(text.replace("[1, 3, 224, 224]", "[1, 3, 32, 32]").replace("[224, 224]", "[32, 32]"))
    code, doc = cli("compile", "open.yaml", "--key", keys["private"])
    assert code == ExitCode.OK, doc
    assert Path(doc["bundle"]).is_file() and images.is_dir()
    code, doc = cli("init", onnx_files["open"], "-o", "open.yaml")
    assert code == ExitCode.USAGE and "--force" in doc["error"]["message"]


def test_init_refuses_a_preset_that_does_not_fit_the_channels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gray = classifier("paddle")
    save(fixed(gray, [1, 3, 32, 32]), tmp_path / "m.onnx")
    with pytest.raises(ConfigError):
        from edgekit.config.presets import preset

        preset("nope")
    code, doc = cli("init", tmp_path / "m.onnx", "--preprocess", "gray", "-o", "m.yaml")
    assert code == ExitCode.USAGE and not Path("m.yaml").exists()


def test_several_targets_build_side_by_side_into_one_matrix(onnx_files, tmp_path, keys):
    images = image_folder(tmp_path / "images")
    # a profile whose size gate no model meets: a target that fails, beside ones that build
    strict = tmp_path / "tiny-onnxruntime.yaml"
    profile = yaml.safe_load((Path(__file__).resolve().parents[2] / "targets" / "onnxruntime-cpu.yaml").read_text())
    profile.update(name="tiny-onnxruntime", limits={"max_model_mb": 0.000001})
    strict.write_text(yaml.safe_dump(profile))
    code, doc = cli("compile", onnx_files["fixed"], "--preprocess", "imagenet", "--calibration", images,
                    "--target", f"onnxruntime-cpu,jetson-orin-nano,android-arm64-tflite,{strict}",
                    "--no-accuracy-check", "--key", keys["private"], "-o", tmp_path / "out")
    rows = {r["target"]: r for r in doc["targets"]}
    assert list(rows) == ["onnxruntime-cpu", "jetson-orin-nano", "android-arm64-tflite", str(strict)]
    ort, trt, tfl, bad = rows.values()
    assert ort["result"] == trt["result"] == tfl["result"] == "ok" and doc["built"] == 3, doc
    assert Path(ort["bundle"]) == tmp_path / "out" / "fixed-onnxruntime-cpu.ekb" and Path(ort["bundle"]).is_file()
    assert ort["p50_ms"] > 0 and ort["note"] is None
    assert trt["note"] and tfl["note"]  # a Jetson's or a phone's speed is not this host's: the rows say so
    # a target that fails is a row with its reason; the others still built, and the exit status is its code
    assert bad["result"] == "failed" and "size" in bad["error"] and code == bad["exit_code"] == ExitCode.GATE
