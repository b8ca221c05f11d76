"""MQTT publishing for ``edgekit-runtime stream`` (the ``[agent]`` extra: paho-mqtt)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from ..contract.errors import RuntimeConfigError
from ..stream import Sink, jsonable


def stream_publisher(url: str, topic: str, client_id: str | None = None) -> tuple[Sink, Callable[[dict], None],
                                                                          Callable[[], None]]:
    """``edgekit-runtime stream --mqtt``: results to ``topic`` (QoS 0: a late result is worth less than the next),
    statistics to ``topic/stats`` (QoS 1, retained). Here, beside the agent, because only the ``[agent]`` extra
    brings paho-mqtt. Returns (result sink, statistics reporter, close)."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise RuntimeConfigError("--mqtt needs paho-mqtt", hint="pip install 'edgekit-runtime[agent]'") from None
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise RuntimeConfigError(f"--mqtt takes mqtt://HOST[:PORT] or mqtts://...; got {url!r}")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"edgekit-stream-{os.getpid()}")
    if u.username:
        client.username_pw_set(u.username, u.password)
    if u.scheme == "mqtts":
        client.tls_set()
    client.connect(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883), keepalive=30)
    client.loop_start()

    def result(res: dict[str, Any], frame: np.ndarray) -> None:
        client.publish(topic, json.dumps(jsonable(res), separators=(",", ":")), qos=0)

    def stats(doc: dict[str, Any]) -> None:
        client.publish(f"{topic}/stats", json.dumps(doc), qos=1, retain=True).wait_for_publish(5)

    def close() -> None:
        client.disconnect()  # after the packets already queued: the last results are not cut off
        client.loop_stop()
    return result, stats, close
