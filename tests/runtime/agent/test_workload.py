"""The daemon's own workload (demos): images from a folder, or tensors drawn from the reference."""

from __future__ import annotations

import json

import numpy as np

from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.agent import Spool

OFFLINE = "mqtt://127.0.0.1:9"  # nothing listens: everything stays in the spool, where the test reads it


def _spooled(agent):
    """What the agent's spool holds (read through a second connection once the agent closed its own)."""
    spool = agent.core.spool
    if agent._closed:
        spool = Spool(agent.core.state_dir.spool_path, 1 << 30)
    try:
        return [fleet_protocol.decode(r.topic, r.payload) for r in spool.next_unsent(100_000)]
    finally:
        if spool is not agent.core.spool:
            spool.close()


def test_image_folder_workload(agent_env, tmp_path):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((8, 8), 80 * i, np.uint8))
    path = agent_env.config_file(broker_url=OFFLINE, workload={"images": str(images), "rate_hz": 100})
    agent_env.install(path)
    cfg = agent_env.config(broker_url=OFFLINE, workload={"images": str(images), "rate_hz": 100})
    agent = agent_env.start_agent(cfg)
    agent_env.wait_until(lambda: agent.core.window.totals["inferences"] >= 20, what="workload inferences")
    agent_env.stop_agent(agent)
    tel = [m["body"] for m in _spooled(agent) if m["kind"] == "telemetry"]
    assert sum(t["inferences"] for t in tel) == agent.core.window.totals["inferences"]
    assert all(t["errors"] == 0 for t in tel)
    assert json.loads((agent_env.tmp / "state-dev1" / "agent.json").read_text())["state"] == "stopped"


def test_synthetic_workload_shifted_raises_a_drift_alarm(agent_env):
    overrides = dict(broker_url=OFFLINE, drift_min_values=1000)
    bundle = agent_env.stats_bundle()
    agent_env.install(agent_env.config_file(**overrides), bundle)
    for shift, alarmed in ((0.0, False), (2.0, True)):
        cfg = agent_env.config(**overrides, workload={"synthetic": True, "rate_hz": 1000, "synthetic_shift": shift})
        agent = agent_env.start_agent(cfg)
        agent_env.wait_until(lambda agent=agent: [m for m in _spooled(agent) if m["kind"] == "telemetry"
                                                  and m["boot"] == agent.core.boot
                                                  and m["body"]["drift"]["inputs"]["x"].get("judged")],
                             what="a judged drift window")
        agent_env.stop_agent(agent)
        alarms = [m for m in _spooled(agent) if m["kind"] == "event" and m["boot"] == agent.core.boot
                  and m["body"]["type"] == "drift_alarm"]
        assert bool(alarms) is alarmed, shift
