"""``edgekit-runtime stream``: a 30 fps video through a model slower than a frame drops frames (never queues
them), says how many, holds at most two frames, and writes results as JSON lines and an annotated video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE = 160


def slow_onnx(channels: int = 128, layers: int = 3) -> bytes:
    """Three 3×3 convolutions of 128 channels at 160×160: ~2.5 GFLOP, far over one 33 ms frame on one thread."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(layers):
        w = (rng.normal(size=(channels, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", channels
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          ["batch", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def slow_bundle(kit) -> Path:
    import onnxruntime as ort

    model = slow_onnx()
    manifest, members = kit.parts()
    x = np.random.default_rng(1).random((1, 3, SIZE, SIZE), dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    members.update({"model.onnx": model, "health/input.npy": kit.npy(x), "health/expected_output.npy": kit.npy(y)})
    manifest["model"]["name"] = "slow"
    manifest["inputs"] = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE], "layout": "NCHW",
                           "quantization": None}]
    manifest["outputs"] = [{"name": "y", "dtype": "float32", "shape": ["batch", 128], "layout": None,
                            "quantization": None}]
    manifest["preprocess"] = {"type": "image", "color": "rgb", "size": [SIZE, SIZE], "resize": "stretch",
                              "interpolation": "linear", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "layout": "NCHW", "dtype": "float32"}
    manifest["postprocess"] = {"type": "classification", "top_k": 2, "softmax": True}
    manifest["health_check"]["atol"] = manifest["health_check"]["rtol"] = 1e-4
    return kit.write("slow.ekb", manifest=manifest, members=members)


def video(path: Path, frames: int, fps: float = 30.0, size: tuple[int, int] = (320, 240)) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 40, np.uint8)
        cv2.rectangle(frame, (10 + 3 * i, 60), (70 + 3 * i, 140), (0, 200, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def stream(bundle: Path, kit, tmp_path: Path, *args: str) -> tuple[list[dict], dict, str]:
    (tmp_path / "k.pub").write_bytes(kit.public_pem(kit.key))
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "stream", str(bundle), "--keyring",
                           str(tmp_path / "k.pub"), "--threads", "1", "--jsonl", "-", "--stats-json",
                           str(tmp_path / "stats.json"), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return rows, json.loads((tmp_path / "stats.json").read_text()), proc.stderr


def test_a_30_fps_file_through_a_slow_model_drops_frames_and_says_how_many(slow_bundle, kit, tmp_path):
    clip = video(tmp_path / "clip.avi", 60)
    rows, stats, err = stream(slow_bundle, kit, tmp_path, "--source", str(clip), "--stats-every", "0.5")
    assert stats["final"] and stats["source_fps"] == pytest.approx(30.0)
    assert stats["captured"] == 60 and stats["elapsed_s"] >= 1.9  # paced at the file's 30 fps, as a camera
    assert stats["stages"]["inference"]["p50_ms"] > 1000 / 30  # the model is slower than a frame ...
    assert stats["dropped"] > 0 and stats["processed"] == len(rows)  # ... so frames were dropped, not queued
    assert stats["processed"] + stats["dropped"] + stats["failed"] == 60
    assert stats["drop_rate"] == pytest.approx(stats["dropped"] / 60)
    assert stats["frames_held_max"] <= 2
    frames = [r["frame"] for r in rows]
    assert frames == sorted(frames) and len(set(frames)) == len(frames) and frames[-1] >= 50  # the newest frames
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in rows)
    assert "dropped" in err and "stream:" in err  # periodic statistics lines on stderr


def test_pace_none_processes_every_frame_of_a_file(slow_bundle, kit, tmp_path):
    clip = video(tmp_path / "clip.avi", 12)
    rows, stats, _ = stream(slow_bundle, kit, tmp_path, "--source", str(clip), "--pace", "none", "--video-out",
                            str(tmp_path / "out.avi"), "--report-dir", str(tmp_path / "reports"))
    assert [r["frame"] for r in rows] == list(range(12)) and stats["dropped"] == 0
    report = json.loads((tmp_path / "reports" / "stream.json").read_text())  # for the agent's telemetry
    assert report["final"] and report["processed"] == 12 and report["source"] == str(clip)
    import cv2

    cap = cv2.VideoCapture(str(tmp_path / "out.avi"))
    count, first = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        first = frame if first is None else first
        count += 1
    assert count == 12 and first.shape == (240, 320, 3)
    assert (np.abs(first.astype(int) - 40) > 60).any()  # the top-1 label was drawn over the grey frame


def test_memory_stays_flat_over_a_long_stream(slow_bundle, ring):
    """In-process, 150 frames at 30 fps through the slow model: resident memory after the first second does
    not grow with the frames seen (one frame in the slot, one in flight)."""
    import tempfile

    import edgekit_runtime
    from edgekit_runtime.stream import StreamSettings, run_stream

    with tempfile.TemporaryDirectory() as d, edgekit_runtime.load(slow_bundle, keyring=ring, threads=1) as model:
        clip = video(Path(d) / "long.avi", 150, size=(640, 480))
        reports: list[dict] = []
        final = run_stream(model, StreamSettings(source=str(clip), stats_every_s=1.0), [], on_stats=reports.append)
    assert final["captured"] == 150 and final["dropped"] > 75 and final["frames_held_max"] <= 2
    after_first_second = reports[0]["rss_mib"]["max"]
    assert final["rss_mib"]["max"] - after_first_second < 15, [r["rss_mib"] for r in reports]


def test_bad_sources_and_bundles_are_refused_with_the_runtime_code(kit, tmp_path):
    (tmp_path / "k.pub").write_bytes(kit.public_pem(kit.key))
    base = [sys.executable, "-m", "edgekit_runtime.cli", "stream", "--keyring", str(tmp_path / "k.pub"), "--json"]
    missing = subprocess.run([*base, str(kit.write("m.ekb")), "--source", str(tmp_path / "none.mp4")],
                             capture_output=True, text=True, timeout=120)
    # a tensor bundle (no image pre-processing) is refused before the source is opened
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"]["code"] == 401
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    from edgekit_runtime.stream import open_source
    from edgekit_runtime.contract.errors import ErrorCode, InputError

    with pytest.raises(InputError) as info:
        open_source(str(tmp_path / "nothing.avi"))
    assert info.value.code == ErrorCode.INPUT_MISSING
    with pytest.raises(InputError) as info:
        open_source(str(tmp_path / "junk.avi"))
    assert info.value.code == ErrorCode.INPUT_UNREADABLE


def test_a_stream_url_is_written_down_without_its_password():
    from edgekit_runtime.stream import redact

    assert redact("rtsp://admin:s3cret@cam.local:554/live") == "rtsp://cam.local:554/live"
    assert redact("rtsp://cam.local/live") == "rtsp://cam.local/live" and redact("0") == "0"
    assert redact("/videos/a.mp4") == "/videos/a.mp4"
