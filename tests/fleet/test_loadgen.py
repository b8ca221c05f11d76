"""The benchmark's load generator: valid envelopes at QoS 1, PUBACKs counted, all stored by an ingest process."""

from __future__ import annotations

import pytest

from edgekit.fleet.loadgen import LoadGenerator, LoadPlan, agent_bodies

pytestmark = pytest.mark.timeout(60)


def test_bodies_are_the_agents_telemetry():
    import json

    body = json.loads(agent_bodies(1)[0])
    assert {"window_s", "inferences", "latency_ms", "drift", "spool"} <= set(body)
    assert body["latency_ms"]["count"] == 50 and "sketch" in body["latency_ms"]


def test_every_acknowledged_message_is_stored(fleet):
    fleet.start_monitor(fleet="bench", workers=1)
    plan = LoadPlan(fleet="bench", devices=20, messages_per_device=30, processes=1, window=8, timeout_s=30)
    load = LoadGenerator(fleet.settings, plan)
    load.ready(timeout=30)
    load.go()
    result = load.wait(45)
    assert (result.published, result.acked, result.refused, result.connections) == (620, 620, 0, 20)
    fleet.wait(lambda: fleet.query(lambda s: s.message_count()) == 620, timeout=20, what="620 rows")
    assert fleet.query(lambda s: s.malformed()) == {}
    assert fleet.query(lambda s: s.counters()).get("duplicates", 0) == 0
    dev = fleet.wait_device("dev00007", lambda d: d["seq"] == 31, fleet="bench")
    assert dev["status"] == "online" and dev["missing"] == 0
