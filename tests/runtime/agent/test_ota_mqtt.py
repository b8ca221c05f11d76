"""OTA over MQTT: signed install/rollback commands, downloads from `edgekit serve`, live switch.

Real Mosquitto, real HTTP bundle server (edgekit.flash.server), real agents (in-process
threads or `edgekit-agent run` subprocesses that are SIGKILLed).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.flash.server import BundleServer
from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.agent.state import CommandLog, StateDir
from edgekit_runtime.command_auth import sign_command


def _send(sub, device: str, command: str, args: dict, key=None, *, request_id: str | None = None,
          sign_for: str | None = None, expires_ts: float | None = None) -> str:
    request_id = request_id or uuid.uuid4().hex
    body = {"request_id": request_id, "command": command, "args": args,
            "expires_ts": expires_ts if expires_ts is not None else time.time() + 600}
    if key is not None:
        body = sign_command("f1", sign_for or device, body, key)
    env = fleet_protocol.envelope("cmd", "f1", device, 0, 0, body)
    sub.publish_raw(fleet_protocol.topic("f1", device, "cmd"), fleet_protocol.encode(env))
    return request_id


def _running_v1(agent_env, sub):
    """An in-process agent serving release 1 (slot a), online."""
    agent_env.install(agent_env.config_file(), agent_env.model_bundle("v1.ekb", release=1, scale=1.0))
    agent = agent_env.start_agent(agent_env.config())
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"], timeout=20, what="online")
    return agent


def _ack(sub, request_id: str, timeout: float = 30.0) -> dict:
    return sub.wait(lambda s: s.ack(request_id), timeout=timeout, what=f"ack of {request_id}")["body"]


@pytest.fixture
def served(tmp_path):
    servers = []

    def make(**kw) -> BundleServer:
        s = BundleServer(tmp_path / "served", **kw).start()
        servers.append(s)
        return s

    (tmp_path / "served").mkdir()
    yield make
    for s in servers:
        s.stop()


def test_signed_install_switches_live_then_rolls_back(agent_env, broker, subscriber, kit, served):
    sub = subscriber()
    agent = _running_v1(agent_env, sub)
    server = served()
    v2 = server.add(agent_env.model_bundle("v2.ekb", release=2))
    args = {"url": v2["url"], "sha256": v2["sha256"], "size": v2["size"]}

    # not signed / signed for another device / signed by a key the device does not trust: refused
    for key, sign_for in ((None, None), (kit.key, "dev2"), (Ed25519PrivateKey.generate(), None)):
        body = _ack(sub, _send(sub, "dev1", "install", args, key, sign_for=sign_for))
        assert body["ok"] is False and body["error"]["reason"] == "unauthorized"
    # a wrong pinned sha256: refused at download, before anything is written
    bad = _ack(sub, _send(sub, "dev1", "install", {**args, "sha256": "f" * 64}, kit.key))
    assert bad["error"]["reason"] == "checksum_mismatch" and bad["error"]["code"] == 113
    assert agent.core.model_info()["release"] == 1

    rid = _send(sub, "dev1", "install", args, kit.key)
    body = _ack(sub, rid)
    assert body["ok"], body
    assert (body["result"]["slot"], body["result"]["previous_slot"]) == ("b", "a")
    steps = [e["body"]["step"] for e in sub.events("install_progress") if e["body"]["request_id"] == rid]
    assert steps == ["download", "verify", "unpack", "prepare", "health_check", "switch"]
    # the running agent serves the new weights, and says so in its retained state
    y = agent.core.model.run(kit.SAMPLE)["y"]
    np.testing.assert_allclose(y, kit.SAMPLE @ (kit.WEIGHTS * 2), rtol=1e-6)
    state = agent_env.wait_until(lambda: (lambda st: st if st["body"]["model"]["sha256"] == v2["sha256"] else None)(
        agent_env.fresh_state(broker, "edgekit/v1/f1/dev1/state")), 10, what="retained state with v2")
    assert state["body"]["active_slot"] == "b" and state["body"]["model"]["release"] == 2
    assert [e for e in sub.events("model_installed") if e["body"]["request_id"] == rid]

    # QoS 1 may deliver a command twice: the same answer, no second install
    _send(sub, "dev1", "install", args, kit.key, request_id=rid)
    dup = sub.wait(lambda s: [a for a in s.of("ack") if a["body"]["request_id"] == rid and a["body"].get("duplicate")],
                   what="duplicate ack")[0]["body"]
    assert dup["ok"] and dup["result"]["slot"] == "b"

    rb = _ack(sub, _send(sub, "dev1", "rollback", {"reason": "canary failed"}, kit.key))
    assert rb["ok"] and (rb["result"]["slot"], rb["result"]["previous_slot"]) == ("a", "b")
    np.testing.assert_allclose(agent.core.model.run(kit.SAMPLE)["y"], kit.SAMPLE @ kit.WEIGHTS, rtol=1e-6)
    assert sub.events("rolled_back")[-1]["body"]["reason"] == "canary failed"
    agent_env.stop_agent(agent)


def test_local_install_is_handed_to_the_running_agent(agent_env, broker, subscriber, capsys):
    from edgekit_runtime.agent.cli import main as agent_cli

    sub = subscriber()
    agent = _running_v1(agent_env, sub)
    path = agent_env.config_file()
    capsys.readouterr()
    assert agent_cli(["install", str(agent_env.model_bundle("v2.ekb", release=2)), "--config", str(path),
                      "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["ok"] and reply["agent_running"] is True and reply["slot"] == "b"
    assert agent.core.model_info()["release"] == 2  # switched in the running agent, no restart
    assert agent_cli(["install", str(agent_env.model_bundle("bad.ekb", release=3, break_health=True)), "--config",
                      str(path), "--json"]) == 3
    refused = json.loads(capsys.readouterr().out)
    assert refused["error"]["reason"] == "health_check_failed" and refused["error"]["active_slot"] == "b"
    assert agent.core.model_info()["release"] == 2
    assert sub.wait(lambda s: s.events("install_failed"), what="install_failed event")
    agent_env.stop_agent(agent)


def test_kill_9_during_a_download_resumes_after_the_restart(agent_env, broker, subscriber, kit, served):
    """The agent dies mid-download; the broker delivers the command again; the download resumes (Range)."""
    sub = subscriber()
    path = agent_env.config_file()
    agent_env.install(path, agent_env.model_bundle("v1.ekb", release=1, scale=1.0))
    big = agent_env.model_bundle("v2-big.ekb", release=2, padding=600_000)  # so the download takes a while
    server = served(rate_limit_bps=400_000)
    v2 = server.add(big)

    proc = agent_env.spawn(path)
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"], timeout=30, what="online")
    rid = _send(sub, "dev1", "install", {"url": v2["url"], "sha256": v2["sha256"], "size": v2["size"]}, kit.key)
    part = agent_env.tmp / "state-dev1" / "downloads" / f"{v2['sha256']}.part"
    agent_env.wait_until(lambda: part.exists() and part.stat().st_size > 100_000, 30, what="a partial download")
    proc.kill()
    proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a" and sd.read_marker()["step"] == "download"
    had = part.stat().st_size

    proc2 = agent_env.spawn(path)
    body = _ack(sub, rid, timeout=60)
    assert body["ok"], (body, agent_env.log_of(proc2))
    assert body["result"]["slot"] == "b" and body["result"]["sha256"] == v2["sha256"]
    ranged = [r for r in server.requests if r.range]
    assert ranged and ranged[-1].status == 206 and ranged[-1].range == f"bytes={had}-"
    # every byte was sent about once: the restart did not download from zero
    assert server.bytes_sent < v2["size"] + 200_000
    assert sub.events("install_recovered")[0]["body"]["outcome"] == "undone"
    assert hashlib.sha256((sd.slot_dir("b") / "bundle.ekb").read_bytes()).hexdigest() == v2["sha256"]
    assert not part.exists()
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0


def test_an_install_cut_short_by_a_stop_is_retried_after_the_restart(agent_env, broker, subscriber, kit, served):
    """SIGTERM-style stop mid-download: no failure is recorded or acked; the next start finishes the install."""
    sub = subscriber()
    path = agent_env.config_file()
    agent_env.install(path, agent_env.model_bundle("v1.ekb", release=1, scale=1.0))
    server = served(rate_limit_bps=300_000)
    v2 = server.add(agent_env.model_bundle("v2-big.ekb", release=2, padding=500_000))

    agent = agent_env.start_agent(agent_env.config())
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"], timeout=20, what="online")
    rid = _send(sub, "dev1", "install", {"url": v2["url"], "sha256": v2["sha256"], "size": v2["size"]}, kit.key)
    part = agent_env.tmp / "state-dev1" / "downloads" / f"{v2['sha256']}.part"
    agent_env.wait_until(lambda: part.exists() and part.stat().st_size > 50_000, 20, what="a partial download")
    agent_env.stop_agent(agent)
    assert sub.ack(rid) is None  # no answer: the command was not handled
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a"
    assert rid not in sd.install_log.read_text()  # no outcome recorded for it
    assert "ack" not in CommandLog(sd.command_log).get(rid)  # started, never answered: it runs again

    agent2 = agent_env.start_agent(agent_env.config())
    body = _ack(sub, rid, timeout=30)
    assert body["ok"] and body["result"]["slot"] == "b", body
    assert agent2.core.model_info()["release"] == 2
    agent_env.stop_agent(agent2)


@pytest.mark.parametrize("step", ["download", "verify", "unpack", "prepare", "health_check", "switch", "switched"])
def test_kill_9_of_the_agent_at_each_step_of_an_mqtt_install(agent_env, broker, subscriber, kit, served, step):
    """The running agent is SIGKILLed at ``step`` of a commanded install. Restarted, it serves a verified
    model at once, and the command (never acknowledged to the broker) is delivered again and completes."""
    sub = subscriber()
    path = agent_env.config_file()
    v1 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0)
    agent_env.install(path, v1)
    server = served()
    v2 = server.add(agent_env.model_bundle("v2.ekb", release=2))
    flag = agent_env.tmp / "paused"
    proc = agent_env.spawn(path, env={"EDGEKIT_AGENT_FAULT": f"pause:{step}", "EDGEKIT_AGENT_FAULT_FILE": str(flag)})
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"], timeout=30, what="online")
    rid = _send(sub, "dev1", "install", {"url": v2["url"], "sha256": v2["sha256"], "size": v2["size"]}, kit.key)
    agent_env.wait_until(lambda: flag.exists(), 30, what=f"the agent paused at {step}")
    proc.kill()
    proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    marked = "switch" if step == "switched" else step  # "switched": after the pointer rename, same marker step
    assert sd.read_marker()["step"] == marked

    proc2 = agent_env.spawn(path)
    online = sub.wait(lambda s: [m for m in s.of("state") if m["boot"] == 2 and m["body"]["status"] == "online"],
                      timeout=30, what="boot 2 online")[0]
    # what it serves right after the restart: the old model, or the new one if the pointer had switched
    expected = 2 if step == "switched" else 1
    assert online["body"]["model"]["release"] == expected
    recovered = sub.wait(lambda s: s.events("install_recovered"), what="install_recovered")[0]["body"]
    assert recovered["outcome"] == ("completed" if step == "switched" else "undone") and recovered["step"] == marked
    body = _ack(sub, rid, timeout=60)  # the broker delivers the command again; the install completes
    assert body["ok"], (body, agent_env.log_of(proc2))
    assert body["result"]["slot"] == "b" and body["result"]["sha256"] == v2["sha256"]
    assert body["result"]["already_active"] is (step == "switched")
    assert server.bytes_sent == v2["size"]  # the bundle was downloaded once: the crash kept what had arrived
    assert sd.read_marker() is None and sd.read_pointer()["slot"] == "b" and sd.read_slot("b")["state"] == "good"
    assert hashlib.sha256((sd.slot_dir("a") / "bundle.ekb").read_bytes()).hexdigest() == \
        hashlib.sha256(v1.read_bytes()).hexdigest()  # the previous model is intact for a rollback
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0


def test_tampered_and_truncated_downloads_are_refused(agent_env, broker, subscriber, kit, served):
    """Over HTTP: a truncated file behind the URL, and a tampered bundle whose (new) sha256 was pinned:
    refused with the runtime's codes, the old model keeps serving, nothing is left in downloads/."""
    import zipfile

    sub = subscriber()
    agent = _running_v1(agent_env, sub)
    server = served()
    good = agent_env.model_bundle("v2.ekb", release=2)
    sha, size = hashlib.sha256(good.read_bytes()).hexdigest(), good.stat().st_size
    (server.root / "cut.ekb").write_bytes(good.read_bytes()[: size // 2])  # the server holds half of it
    cut = _ack(sub, _send(sub, "dev1", "install", {"url": f"{server.url}/bundles/cut.ekb", "sha256": sha,
                                                   "size": size}, kit.key))
    assert cut["ok"] is False and cut["error"]["code"] in (112, 113) and cut["error"]["step"] == "download"

    tampered = agent_env.tmp / "tampered.ekb"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == "model.onnx" else data)
    t = server.add(tampered)
    bad = _ack(sub, _send(sub, "dev1", "install", {"url": t["url"], "sha256": t["sha256"], "size": t["size"]},
                          kit.key))
    assert bad["ok"] is False and (bad["error"]["reason"], bad["error"]["code"]) == ("verify_failed", 105)
    assert agent.core.model_info()["release"] == 1
    np.testing.assert_allclose(agent.core.model.run(kit.SAMPLE)["y"], kit.SAMPLE @ kit.WEIGHTS, rtol=1e-6)
    assert list((agent_env.tmp / "state-dev1" / "downloads").iterdir()) == []
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a" and sd.read_marker() is None
    agent_env.stop_agent(agent)


def test_a_shadow_install_over_mqtt_leaves_the_active_model_serving(agent_env, broker, subscriber, kit, served):
    """`install` with args.shadow: the idle slot gets the candidate, health-checked; the agent keeps serving v1,
    answers with the shadow slot, and says `shadow_installed`."""
    sub = subscriber()
    agent = _running_v1(agent_env, sub)
    server = served()
    v2 = server.add(agent_env.model_bundle("v2.ekb", release=2))
    bad = _ack(sub, _send(sub, "dev1", "install", {"url": v2["url"], "sha256": v2["sha256"], "shadow": "yes"},
                          kit.key))
    assert bad["ok"] is False and "shadow" in bad["error"]["message"]
    rid = _send(sub, "dev1", "install", {"url": v2["url"], "sha256": v2["sha256"], "size": v2["size"],
                                         "shadow": True}, kit.key)
    body = _ack(sub, rid)
    assert body["ok"], body
    assert body["result"]["shadow"] is True and body["result"]["shadow_slot"] == "b" and body["result"]["slot"] == "a"
    np.testing.assert_allclose(agent.core.model.run(kit.SAMPLE)["y"], kit.SAMPLE @ kit.WEIGHTS, rtol=1e-6)
    events = sub.wait(lambda s: [e for e in s.events("shadow_installed") if e["body"]["request_id"] == rid],
                      what="shadow_installed")
    assert events[0]["body"]["slot"] == "b" and events[0]["body"]["model"]["release"] == 2
    assert not [e for e in sub.events("model_installed") if e["body"]["request_id"] == rid]
