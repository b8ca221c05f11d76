"""``edgekit-runtime stream --mqtt``: a result per processed frame on the topic, the statistics retained on
TOPIC/stats, through a real Mosquitto broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "tests" / "golden"


def test_stream_publishes_results_and_retained_statistics(broker, tmp_path):
    import cv2
    import paho.mqtt.client as mqtt

    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (96, 64))
    for i in range(20):
        frame = np.full((64, 96, 3), 50, np.uint8)
        cv2.rectangle(frame, (5 + 2 * i, 10), (40 + 2 * i, 50), (255, 255, 255), -1)
        writer.write(frame)
    writer.release()
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "stream",
                           str(GOLDEN / "v1.4-onnxruntime-detector.ekb"), "--keyring", str(GOLDEN / "v1.4-golden.pub"),
                           "--source", str(tmp_path / "clip.avi"), "--pace", "none", "--mqtt", broker.url,
                           "--topic", "site/cam1/det"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the results were QoS 0 to nobody listening; the statistics are retained: a late subscriber gets them
    got: list[dict] = []
    done = threading.Event()

    def on_message(client, userdata, msg):
        got.append(json.loads(msg.payload))
        done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-stream-stats")
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.subscribe("site/cam1/det/stats", qos=1)
    client.loop_start()
    try:
        assert done.wait(10)
    finally:
        client.loop_stop()
        client.disconnect()
    stats = got[0]
    assert stats["type"] == "stream_stats" and stats["final"] and stats["captured"] == 20
    assert stats["processed"] == 20 and stats["dropped"] == 0 and stats["stages"]["inference"]["count"] == 20


def test_stream_results_reach_a_subscriber(broker, tmp_path):
    import cv2
    import paho.mqtt.client as mqtt

    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (96, 64))
    for _ in range(10):
        writer.write(np.full((64, 96, 3), 120, np.uint8))
    writer.release()
    got: list[dict] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-stream-results")
    client.on_message = lambda c, u, msg: got.append(json.loads(msg.payload))
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", broker.port)
    client.subscribe("site/cam2/det", qos=0)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "stream",
                               str(GOLDEN / "v1.4-onnxruntime-detector.ekb"), "--keyring",
                               str(GOLDEN / "v1.4-golden.pub"), "--source", str(tmp_path / "clip.avi"), "--pace",
                               "none", "--mqtt", broker.url, "--topic", "site/cam2/det"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        import time

        deadline = time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    assert [r["frame"] for r in got] == list(range(10))
    assert all(r["image_size"] == [96, 64] and "detections" in r for r in got)
