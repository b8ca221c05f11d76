"""``edgekit fleet samples pull``: a device's captured samples come over a real sshd into a dataset folder,
once (a second pull fetches nothing new), and --delete clears them from the device."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from edgekit.cli import app

runner = CliRunner()


def capture_some(folder):
    from edgekit_runtime.capture import CaptureSettings, SampleCapture

    cap = SampleCapture(CaptureSettings(folder, sample_rate=1.0, max_per_minute=1e6), seed=0)
    rng = np.random.default_rng(0)
    model = {"name": "m", "version": "1.0.0", "release": 1}
    for label in ("cat", "cat", "dog"):
        cap.offer(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
                  {"top_k": [{"index": 0, "label": label, "score": 0.4}]}, model)
    cap.offer(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
              {"detections": [{"box": [1.0, 2.0, 11.0, 22.0], "class": 0, "label": "star", "score": 0.3}],
               "image_size": [50, 40]}, model)
    (folder / "junk").mkdir()  # not a day folder of samples: nothing in it is a sample


def pull(sshd, remote, out, *extra):
    result = runner.invoke(app, ["fleet", "samples", "pull", "jetson-07", "--host", sshd.target, "--identity",
                                 str(sshd.identity), "--known-hosts", str(sshd.known_hosts), "--remote-dir",
                                 str(remote), "--out", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_pull_writes_a_dataset_folder_once_and_delete_clears_the_device(sshd, tmp_path):
    remote, out = tmp_path / "device" / "samples", tmp_path / "data"
    capture_some(remote)
    first = pull(sshd, remote, out)
    assert first["pulled"] == 4 and first["by_kind"] == {"classification": 3, "detection": 1}
    assert len(list((out / "cat").glob("*.jpg"))) == 2 and len(list((out / "dog").glob("*.jpg"))) == 1
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["star"]
    assert coco["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and coco["images"][0]["width"] == 50
    assert (out / "images" / coco["images"][0]["file_name"]).is_file()
    log = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(e["device"] == "jetson-07" and (out / e["local"]).is_file() for e in log)
    import cv2

    assert cv2.imread(str(out / log[0]["local"])).shape[:2] in ((20, 30), (40, 50))
    again = pull(sshd, remote, out)
    assert again["pulled"] == 0 and again["already_here"] == 4
    gone = pull(sshd, remote, out, "--delete")
    assert gone["pulled"] == 0 and gone["deleted"] == 4
    assert not list(remote.glob("*/*.json")) and not list(remote.glob("*/*.jpg"))
    # edgekit train's loader reads the class folders (the ImageFolder layout) once the COCO part is moved out
    import shutil

    from edgekit.config.train import DataConfig
    from edgekit.train.data import _load_folder

    shutil.move(str(out / "images"), str(tmp_path / "coco-images"))
    loaded = _load_folder(DataConfig(path=out))
    assert loaded.labels == ["cat", "dog"] and sorted(np.unique(loaded.y).tolist()) == [0, 1]


def test_a_missing_capture_folder_says_what_to_do(sshd, tmp_path):
    result = runner.invoke(app, ["fleet", "samples", "pull", "dev", "--host", sshd.target, "--identity",
                                 str(sshd.identity), "--known-hosts", str(sshd.known_hosts), "--remote-dir",
                                 str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code != 0
    assert "--capture-dir" in json.loads(result.stdout)["error"]["message"]


def test_a_sidecar_naming_a_path_is_skipped_never_followed(sshd, tmp_path):
    """A device is not trusted with paths: a sidecar whose image is '../../x' or '/etc/passwd' is skipped; nothing
    is written outside --out and nothing else is read (or deleted) on the device."""
    remote, out = tmp_path / "device" / "samples", tmp_path / "data"
    capture_some(remote)
    day = next(p for p in remote.iterdir() if p.name != "junk")
    victim = tmp_path / "device" / "precious.txt"
    victim.write_text("keep me")
    for i, name in enumerate(("../../precious.txt", str(victim), "..", ".hidden.jpg")):
        (day / f"evil{i}.json").write_text(json.dumps({"image": name, "captured_at": 0, "result": {"top_k": [
            {"index": 0, "label": "../../../escaped", "score": 0.1}]}}))
    result = pull(sshd, remote, out, "--delete")
    assert result["pulled"] == 4 and result["skipped_incomplete"] == 4
    assert victim.read_text() == "keep me"
    assert not any(p for p in tmp_path.rglob("*") if "escaped" in p.name)
    assert all(out in p.parents for p in out.rglob("*.jpg"))
