"""AgentCore without a broker: what the simulator reuses (telemetry, drift, spool, commands)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.agent import AgentCore
from edgekit_runtime.agent.state import AgentStateError
from edgekit_runtime.contract.errors import ErrorCode, InputError


def spooled(core) -> list[dict]:
    """Every message waiting in the core's spool, decoded and checked against the contract."""
    return [fleet_protocol.decode(r.topic, r.payload) for r in core.spool.next_unsent(100_000)]


@pytest.fixture
def core_of(agent_env):
    cores = []

    def make(model=None, **overrides):
        core = AgentCore(agent_env.config(**overrides), model, system_stats=False)
        cores.append(core)
        return core

    yield make
    for c in cores:
        c.close()


def test_telemetry_window_from_known_latencies(core_of):
    core = core_of()
    t = [50.0]
    core.window._clock = lambda: t[0]
    core.window.started = 50.0
    for ms in range(1, 201):  # 1..200 ms, 200 inferences over 10 s
        core.record_inference(ms / 1000)
    t[0] = 60.0
    msg = core.tick()
    body = msg["body"]
    assert msg["kind"] == "telemetry" and msg["boot"] == 1 and msg["seq"] == 1 and msg["historical"] is False
    assert body["inferences"] == 200 and body["window_s"] == 10.0 and body["throughput_per_s"] == 20.0
    lat = body["latency_ms"]
    assert lat["count"] == 200 and lat["mean"] == pytest.approx(100.5)
    for name, want in (("p50", 100), ("p95", 190), ("p99", 198)):  # rank q*(n-1) of 1..200
        assert lat[name] == pytest.approx(want, rel=0.011), name
    assert body["errors"] == 0 and body["drift"] == {"available": False, "reason": "no model is loaded"}
    assert body["spool"]["policy"] == "drop_oldest" and body["system"] is None
    assert spooled(core) == [msg]  # spooled before it is sent

    second = core.tick()["body"]
    assert second["inferences"] == 0 and second["totals"]["inferences"] == 200


def test_errors_counted_by_code_with_one_event_per_code_and_window(core_of):
    core = core_of()
    core.record_inference(0.01)
    for _ in range(3):
        core.record_inference(None, error_code=ErrorCode.INPUT_UNREADABLE)
    core.record_inference(None, error_code=202)
    body = core.tick()["body"]
    assert body["errors_by_code"] == {"202": 1, "302": 3} and body["inferences"] == 1
    events = [m["body"] for m in spooled(core) if m["kind"] == "event"]
    assert [(e["type"], e["code"], e["name"]) for e in events] == [
        ("error", 302, "INPUT_UNREADABLE"), ("error", 202, "ENGINE_INFERENCE_FAILED")]
    core.record_inference(None, error_code=302)  # a new window: reported again
    assert [m["body"]["code"] for m in spooled(core) if m["kind"] == "event"][-1] == 302


def test_boot_increments_per_core_and_the_state_dir_is_exclusive(agent_env):
    cfg = agent_env.config()
    a = AgentCore(cfg, system_stats=False)
    with pytest.raises(AgentStateError, match="another agent"):
        AgentCore(cfg, system_stats=False)
    assert a.boot == 1 and a.will_envelope()["seq"] == 0 and a.will_envelope()["body"] == {"status": "offline", "connection": 0}
    a.close()
    b = AgentCore(cfg, system_stats=False)
    assert b.boot == 2 and b.tick()["seq"] == 1
    b.close()


def test_predict_images_and_tensors(agent_env, core_of):
    model = edgekit_runtime.load(agent_env.GOLDEN / "v1.0-onnxruntime-matmul.ekb",
                                 keyring=agent_env.GOLDEN / "golden.pub")
    core = core_of(model)
    img = np.array([[255, 0], [0, 255]], dtype=np.uint8)
    out = core.predict([img, img])
    assert len(out) == 2 and out[0]["top_k"][0]["label"] in {"zero", "one", "two"}
    core.predict(img)
    core.predict(np.zeros((1, 1, 2, 2), np.float32))  # a tensor goes in as is
    with pytest.raises(InputError):
        core.predict(np.zeros((1, 3), np.float32))
    body = core.tick()["body"]
    assert body["inferences"] == 4 and body["calls"] == 4 and body["latency_ms"]["count"] == 3
    assert body["errors_by_code"] == {str(int(ErrorCode.INPUT_BAD_SHAPE)): 1}
    assert body["model"]["name"] == "golden-matmul" and body["model"]["backend"] == "onnxruntime"
    # the golden bundle's input_stats predate histograms: drift is unavailable, and says why
    assert body["drift"]["available"] is False and "has no histogram" in body["drift"]["reason"]
    err = [m["body"] for m in spooled(core) if m["kind"] == "event"][0]
    assert err["type"] == "error" and err["code"] == 300 and "shape" in err["message"]
    state = core.state_envelope("online")["body"]
    assert state["model"]["version"] == "1.0.0" and state["backend"] == "onnxruntime"
    assert state["runtime_version"] == edgekit_runtime.__version__
    model.close()


def test_drift_alarm_event_from_shifted_inputs_only(agent_env, core_of):
    bundle = agent_env.stats_bundle()
    model = edgekit_runtime.load(bundle, keyring=agent_env.keys)
    core = core_of(model, drift_min_values=1000)
    rng = np.random.default_rng(3)
    for _ in range(250):
        core.predict(rng.normal(0, 1, size=(1, 4)).astype(np.float32))
    body = core.tick()["body"]
    x = body["drift"]["inputs"]["x"]
    assert body["drift"]["available"] and x["psi"] < 0.2 and x["psi"] < 3 * x["psi_noise"]
    assert not [m for m in spooled(core) if m["kind"] == "event"]
    for _ in range(250):
        core.predict(rng.normal(1.0, 1, size=(1, 4)).astype(np.float32))
    body = core.tick()["body"]
    x = body["drift"]["inputs"]["x"]
    assert x["psi"] > 0.2 and x["alarm"]
    (alarm,) = [m["body"] for m in spooled(core) if m["kind"] == "event"]
    assert alarm["type"] == "drift_alarm" and alarm["input"] == "x" and alarm["psi"] == x["psi"]
    model.close()


def _cmd(core, command=None, request_id="r1", **body):
    body = {"request_id": request_id, "command": command, **body}
    env = fleet_protocol.envelope("cmd", core.config.fleet, core.config.device_id, 0, 0, body)
    return core.handle_command(core.topic("cmd"), fleet_protocol.encode(env))


def test_commands_and_their_acks(core_of):
    core = core_of()
    ping = _cmd(core, "ping", "p1")["body"]
    assert ping["ok"] and ping["request_id"] == "p1" and ping["result"]["boot"] == core.boot
    cfg = _cmd(core, "config", "c1", args={"set": {"telemetry_interval_s": 2}})["body"]
    assert cfg["ok"] and cfg["result"]["changed"] == {"telemetry_interval_s": 2.0}
    assert core.config.telemetry_interval_s == 2.0 and cfg["result"]["persisted"] is False
    bad = _cmd(core, "config", "c2", args={"set": {"telemetry_interval": 2}})["body"]
    assert not bad["ok"] and "did you mean 'telemetry_interval_s'" in bad["error"]["message"]
    nomodel = _cmd(core, "bench", "b1")["body"]
    assert not nomodel["ok"] and nomodel["error"]["reason"] == "no_model"
    again = _cmd(core, "ping", "p1")["body"]  # QoS 1 redelivery: the same answer, marked
    assert again["duplicate"] and again["result"] == ping["result"]


@pytest.mark.parametrize("payload, reason, request_id", [
    (b"not json", "malformed", None),
    (b'{"schema": 1}', "malformed", None),
    (json.dumps({"schema": 1, "kind": "cmd", "fleet": "f1", "device": "dev1", "boot": 0, "seq": 0, "ts": 1.0,
                 "body": {"request_id": "u1", "command": "reboot"}}).encode(), "unknown_command", "u1"),
    (json.dumps({"schema": 1, "kind": "cmd", "fleet": "f1", "device": "dev1", "boot": 0, "seq": 0, "ts": 1.0,
                 "body": {"request_id": "e1", "command": "ping", "expires_ts": 1.0}}).encode(), "expired", "e1"),
    (json.dumps({"schema": 1, "kind": "cmd", "fleet": "f1", "device": "dev1", "boot": 0, "seq": 0, "ts": 1.0,
                 "body": {"request_id": 7, "command": "ping"}}).encode(), "bad_request", None),
    (json.dumps({"schema": 9, "kind": "cmd", "fleet": "f1", "device": "dev1", "boot": 0, "seq": 0, "ts": 1.0,
                 "body": {"request_id": "n1", "command": "ping"}}).encode(), "malformed", "n1"),
])
def test_a_bad_command_gets_an_error_ack_never_a_crash(core_of, payload, reason, request_id):
    core = core_of()
    assert core.handle_command(core.topic("cmd"), payload) is None
    (ack,) = [m["body"] for m in spooled(core) if m["kind"] == "ack"]
    assert ack["ok"] is False and ack["error"]["reason"] == reason and ack["request_id"] == request_id
    assert core.tick()["body"]["bad_commands"] == 1


def test_spool_drops_are_counted_and_reported(core_of):
    core = core_of(spool_max_bytes=4096, spool_policy="drop_oldest")
    for _ in range(8):
        core.tick()  # each telemetry message is ~1 kB
    stats = core.spool.stats()
    assert stats["dropped_oldest_total"] > 0 and stats["bytes"] <= 4096
    drops = [m["body"] for m in spooled(core) if m["kind"] == "event" and m["body"]["type"] == "spool_drop"]
    assert drops and drops[-1]["dropped_oldest_total"] <= stats["dropped_oldest_total"]
    assert sum(d["dropped_oldest"] for d in drops) == drops[-1]["dropped_oldest_total"]


def test_reject_new_policy_is_counted_in_telemetry(core_of):
    core = core_of(spool_max_bytes=4096, spool_policy="reject_new")
    for _ in range(8):
        core.tick()
    stats = core.spool.stats()
    assert stats["rejected_new_total"] > 0 and stats["dropped_oldest_total"] == 0
    seqs = [m["seq"] for m in spooled(core)]
    assert seqs == sorted(seqs) and seqs[0] == 1  # the oldest are kept


def test_a_simulated_device_reports_a_manifest_and_judges_drift_without_an_engine(agent_env):
    from edgekit_runtime import read_manifest_unverified

    manifest = read_manifest_unverified(agent_env.stats_bundle())
    core = AgentCore(agent_env.config(drift_min_values=1000), model_manifest=manifest, system_stats=False, lock=False)
    try:
        state = core.state_envelope("online")["body"]
        assert state["agent_state"] == "online" and state["model"]["name"] == "matmul"
        assert state["model"]["simulated"] is True
        rng = np.random.default_rng(5)
        for _ in range(300):
            core.record_inference(0.002, inputs=rng.normal(2.0, 1.0, size=(1, 4)).astype(np.float32))
        body = core.tick()["body"]
        assert body["inferences"] == 300 and body["drift"]["inputs"]["x"]["alarm"]
        assert [m["body"]["type"] for m in spooled(core) if m["kind"] == "event"] == ["drift_alarm"]
    finally:
        core.close()


def test_a_tensor_bundle_normalizes_raw_float_rows(core_of, kit):
    """Raw float rows to a ``tensor`` bundle go through the manifest's normalization, as Model.predict does."""
    mean, std = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.0, 4.0]
    manifest, members = kit.parts()
    manifest["preprocess"] = {"type": "tensor", "scale": 1.0, "mean": mean, "std": std}
    manifest["postprocess"] = {"type": "classification", "softmax": False, "top_k": 4}
    path = kit.write("tensor.ekb", manifest=manifest, members=members)
    raw = np.array([[2.0, 4.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    with edgekit_runtime.load(path, keyring=kit.ring_of(kit.key)) as model:
        core = core_of(model)
        got = core.predict(raw)
        assert got == model.predict(raw)
        logits = ((raw - mean) / std) @ kit.WEIGHTS
        assert [t["index"] for t in got[0]["top_k"]] == list(np.argsort(-logits[0], kind="stable"))


def test_fresh_workload_reports_ride_in_the_telemetry(core_of, tmp_path):
    """reports_dir: what serve/stream --report-dir leave there comes along in body["workloads"], when fresh."""
    import os

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "stream.json").write_text(json.dumps({"type": "stream_stats", "dropped": 7, "drop_rate": 0.5}))
    (reports / "serve-det.json").write_text(json.dumps({"type": "serve", "shadow": {"agreement": {"top1": 0.9}}}))
    old = reports / "serve-old.json"
    old.write_text("{}")
    os.utime(old, (1, 1))  # a workload that stopped long ago: not reported as current
    (reports / "big.json").write_text(json.dumps({"x": "y" * 40_000}))
    (reports / "broken.json").write_text("{not json")
    core = core_of(reports_dir=str(reports), telemetry_interval_s=10.0)
    body = core.tick()["body"]
    w = body["workloads"]
    assert w["stream"]["dropped"] == 7 and w["serve-det"]["shadow"]["agreement"]["top1"] == 0.9
    assert "serve-old" not in w and "left out" in w["big"]["error"] and "unreadable" in w["broken"]["error"]
    assert "workloads" not in core_of(device="dev2").tick()["body"]  # no reports_dir: nothing read
