"""The `edgekit` command line, driven as a user would (typer's CliRunner, real files)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekit.cli import app

runner = CliRunner()


def invoke(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_targets_list_and_show_json():
    rows = json.loads(invoke("targets", "list", "--json").stdout)
    assert {r["name"] for r in rows} >= {"x86-openvino-cpu", "onnxruntime-cpu"}
    shown = json.loads(invoke("targets", "show", "x86-openvino-cpu", "--json").stdout)
    assert shown["backend"] == "openvino" and shown["runtime"]["inference_precision"] == "f32"


def test_keys_generate_refuses_to_overwrite(tmp_path):
    out = json.loads(invoke("keys", "generate", "--out", tmp_path, "--json").stdout)
    assert (tmp_path / "edgekit.key").stat().st_mode & 0o777 == 0o600
    assert len(out["key_id"]) == 16
    again = invoke("keys", "generate", "--out", tmp_path, ok=False)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_compile_from_onnx_file_with_flags(tmp_path, digits_checkpoint, keys):
    """`edgekit compile model.onnx --target ...`: an ONNX import with every setting from flags."""
    import torch

    from edgekit.models.digits_cnn import build

    model = build(width=16)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    onnx_path = tmp_path / "digits.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), str(onnx_path), dynamo=True,
                      external_data=False, input_names=["image"], output_names=["scores"])
    out = tmp_path / "from-onnx.ekb"
    res = invoke("compile", onnx_path, "--target", "onnxruntime-cpu", "--input-shape", "1,1,8,8",
                 "--calibration", "calibration/digits/calib.npz", "--validation", "edgekit.data.digits:validation",
                 "--output", out, "--key", keys["private"], "--version", "3.1.0", "--release", "42", "--json")
    report = json.loads(res.stdout)
    assert report["result"] == "ok" and report["steps"]["export"]["source"] == "onnx"
    assert report["manifest"]["model"] == {"name": "digits", "version": "3.1.0", "release": 42}
    assert report["accuracy"]["drop_pts"] <= 0.5
    inspected = json.loads(invoke("bundle", "inspect", out, "--json").stdout)
    assert inspected["inputs"][0]["name"] == "image" and inspected["outputs"][0]["name"] == "scores"
    assert inspected["inputs"][0]["shape"] == [1, 1, 8, 8]  # a fixed-batch ONNX keeps its batch


def test_compile_without_key_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEKIT_SIGNING_KEY", raising=False)
    res = invoke("compile", "examples/digits.yaml", "--output", tmp_path / "x.ekb", ok=False)
    assert res.exit_code == 2 and "edgekit keys generate" in res.output


def test_bundle_verify_run_and_bench(int8_bundles, fp32_bundles, keys, tmp_path):
    import cv2

    from edgekit.data import digits

    bundle = int8_bundles["onnxruntime-cpu"].bundle
    v = json.loads(invoke("bundle", "verify", bundle, "--keyring", keys["public"], "--json").stdout)
    assert v["ok"] and v["health_check"]["ok"] and v["key_id"] == keys["key_id"]

    test = digits.splits()["test"]
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), test.images[i])
    rows = json.loads(invoke("run", bundle, tmp_path, "--keyring", keys["public"], "--json").stdout)
    assert len(rows) == 5 and all(len(r["top_k"]) == 3 for r in rows)
    assert sum(int(r["top_k"][0]["label"]) == int(y) for r, y in zip(rows, test.labels[:5])) >= 4

    out = tmp_path / "bench.json"
    res = invoke("bench", fp32_bundles["onnxruntime-cpu"].bundle, "--compare", bundle, "--keyring", keys["public"],
                 "--queries", "50", "--seconds", "0.2", "--batch", "4", "--json-out", out)
    assert "speed-up" in res.stdout
    result = json.loads(out.read_text())
    assert result["kind"] == "compare" and result["interleaved"]
    names = list(result["models"])
    assert len(names) == 2
    for r in result["models"].values():
        assert r["single_stream"]["inference"]["count"] >= 50
        assert r["offline"]["batch"] == 4 and r["offline"]["items_per_s"] > 0
        assert r["system"]["model"]["engine"] == "onnxruntime" and r["system"]["cpu"]
    ratio = result["ratios"][names[1]][f"p50_speedup_vs_{names[0]}"]
    a, b = (result["models"][n]["single_stream"]["inference"]["p50_ms"] for n in names)
    assert ratio == pytest.approx(a / b)


def test_bench_with_images_times_pre_and_post_processing(int8_bundles, keys, tmp_path):
    import cv2

    from edgekit.data import digits

    for i, img in enumerate(digits.splits()["test"].images[:8]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
    res = invoke("bench", int8_bundles["x86-openvino-cpu"].bundle, "--images", tmp_path, "--keyring",
                 keys["public"], "--queries", "30", "--seconds", "0.1", "--batch", "0", "--json")
    r = json.loads(res.stdout)
    ss = r["single_stream"]
    assert r["inputs"] == "images" and r["offline"] is None
    assert ss["preprocess"]["p50_ms"] > 0 and ss["postprocess"]["count"] == ss["inference"]["count"]
    assert ss["end_to_end"]["p50_ms"] >= ss["inference"]["p50_ms"]


def test_tampered_bundle_is_refused_by_verify(int8_bundles, keys, tmp_path):
    import zipfile

    src = int8_bundles["onnxruntime-cpu"].bundle
    bad = tmp_path / "bad.ekb"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "labels.txt":
                data = data.replace(b"7", b"1")
            zout.writestr(info, data)
    res = invoke("bundle", "verify", bad, "--keyring", keys["public"], ok=False)
    assert res.exit_code == 4 and "E105" in res.output and "labels.txt" in res.output


def test_bundle_sign_rotates_the_key(int8_bundles, keys, tmp_path):
    invoke("keys", "generate", "--out", tmp_path, "--name", "new")
    out = tmp_path / "resigned.ekb"
    src = int8_bundles["onnxruntime-cpu"].bundle
    # the old signature must verify against the given keyring before re-signing
    refused = invoke("bundle", "sign", src, "--key", tmp_path / "new.key", "--out", out,
                     "--keyring", tmp_path / "new.pub", ok=False)
    assert refused.exit_code == 4 and "E104" in refused.output and not out.exists()
    invoke("bundle", "sign", src, "--key", tmp_path / "new.key", "--out", out, "--keyring", keys["public"])
    assert out.stat().st_mode & 0o777 == 0o644
    v = json.loads(invoke("bundle", "verify", out, "--keyring", tmp_path / "new.pub", "--json").stdout)
    assert v["ok"]


def test_compile_without_labels_ships_on_the_fidelity_gate_unless_a_budget_was_asked_for(tmp_path, digits_checkpoint,
                                                                                         keys):
    build = tmp_path / "b.yaml"
    build.write_text(
        "model: {source: 'edgekit.models.digits_cnn:build', kwargs: {width: 16}, name: d, input_shape: [1, 1, 8, 8]}\n"
        "target: onnxruntime-cpu\ncalibration: {source: calibration/digits/calib.npz}\n"
        "latency: {on_slower: keep_int8}\n")  # INT8 and FP32 run at parity at 8×8: the subject is INT8
    base = ["compile", build, "--checkpoint", digits_checkpoint, "--key", keys["private"],
            "--output", tmp_path / "nolabels.ekb"]
    # the profile's default budget and no labels: INT8 ships on the fidelity gate, and the report says so
    report = json.loads(invoke(*base, "--json").stdout)
    assert report["result"] == "ok" and report["precision"] == "int8"
    assert report["accuracy"]["budget_pts"] is None and "fp32" not in report["accuracy"]
    assert "no labelled validation data" in report["accuracy_not_checked"]
    assert report["fidelity"]["cosine"] >= 0.99
    data = next(s for s in report["stages"] if s["name"] == "data")
    assert data["accuracy_budget"].startswith("not checked")
    # a budget the user gave cannot be checked without labels: refused, not ignored
    asked = invoke(*base, "--max-accuracy-drop", "1", ok=False)
    assert asked.exit_code == 2 and "accuracy budget needs a labelled 'validation' set" in asked.output
    report = json.loads(invoke(*base, "--no-accuracy-check", "--json").stdout)
    assert report["result"] == "ok" and report["accuracy"]["budget_pts"] is None
    assert "fp32" not in report["accuracy"] and report["precision"] == "int8"
    both = invoke(*base, "--no-accuracy-check", "--max-accuracy-drop", "1", ok=False)
    assert both.exit_code == 2 and "not both" in both.output
