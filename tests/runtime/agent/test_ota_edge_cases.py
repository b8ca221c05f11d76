"""OTA edge cases: redeliveries, replays, expiry, crashes right after a switch, races with the
agent's other work, and what an install leaves on disk. Each was a bug once."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import uuid

import numpy as np
import pytest

from edgekit.flash.server import BundleServer
from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.agent.install import Installer, InstallRequest
from edgekit_runtime.agent.state import StateDir
from edgekit_runtime.command_auth import sign_command
from edgekit_runtime.keyring import Keyring


def _send(sub, command: str, args: dict, key, *, request_id: str | None = None, expires_ts: float | None = None,
          body: dict | None = None) -> dict:
    if body is None:
        body = sign_command("f1", "dev1", {"request_id": request_id or uuid.uuid4().hex, "command": command,
                                           "args": args, "expires_ts": expires_ts or time.time() + 600}, key)
    env = fleet_protocol.envelope("cmd", "f1", "dev1", 0, 0, body)
    sub.publish_raw(fleet_protocol.topic("f1", "dev1", "cmd"), fleet_protocol.encode(env))
    return body


def _acks(sub, rid: str) -> list[dict]:
    return [a["body"] for a in sub.of("ack") if a["body"]["request_id"] == rid]


def _online(sub, boot: int | None = None):
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"
                        and (boot is None or m["boot"] == boot)], timeout=30, what=f"online (boot {boot})")


@pytest.fixture
def server(tmp_path):
    (tmp_path / "served").mkdir()
    s = BundleServer(tmp_path / "served").start()
    yield s
    s.stop()


@pytest.fixture
def two_releases(agent_env):
    """Release 1 installed (slot a); release 2 signed, not installed."""
    path = agent_env.config_file()
    v1 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0)
    agent_env.install(path, v1)
    return path, v1, agent_env.model_bundle("v2.ekb", release=2)


def _install_args(info: dict) -> dict:
    return {"url": info["url"], "sha256": info["sha256"], "size": info["size"]}


def test_a_rollback_redelivered_after_a_crash_does_not_roll_forward(agent_env, broker, subscriber, kit,
                                                                      two_releases):
    sub = subscriber()
    path, v1, v2 = two_releases
    agent_env.install(path, v2)  # active b (release 2), previous a (release 1)
    flag = agent_env.tmp / "paused"
    proc = agent_env.spawn(path, env={"EDGEKIT_AGENT_FAULT": "pause:rollback_switched",
                                      "EDGEKIT_AGENT_FAULT_FILE": str(flag)})
    _online(sub)
    rid = _send(sub, "rollback", {"reason": "bad release"}, kit.key)["request_id"]
    agent_env.wait_until(flag.exists, 30, what="paused right after the rollback's pointer switch")
    proc.kill()
    proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a"  # it had rolled back
    proc2 = agent_env.spawn(path)
    ack = sub.wait(lambda s: _acks(s, rid), timeout=30, what="the redelivered rollback's ack")[0]
    assert ack["ok"] and ack["result"]["changed"] is False and ack["result"]["slot"] == "a"
    assert sd.read_pointer()["slot"] == "a" and sd.read_slot("a")["model"]["release"] == 1
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0


def test_a_redelivery_during_an_install_is_acknowledged_only_when_it_is_done(agent_env, broker, subscriber, kit,
                                                                            two_releases, server):
    """A broker restart while an install runs makes the broker deliver the command again; if the agent then
    dies, the command must still be pending in the broker, so the restarted agent completes it."""
    sub = subscriber()
    path, v1, v2 = two_releases
    info = server.add(v2)
    flag = agent_env.tmp / "paused"
    proc = agent_env.spawn(path, env={"EDGEKIT_AGENT_FAULT": "pause:prepare", "EDGEKIT_AGENT_FAULT_FILE": str(flag)})
    _online(sub)
    rid = _send(sub, "install", _install_args(info), kit.key)["request_id"]
    agent_env.wait_until(flag.exists, 30, what="paused in prepare (a long engine build, say)")
    onlines = len([m for m in sub.of("state") if m["body"]["status"] == "online"])
    broker.restart()
    sub.wait(lambda s: len([m for m in s.of("state") if m["body"]["status"] == "online"]) > onlines, timeout=30,
             what="the agent reconnected")
    agent_env.wait_until(lambda: "delivered again while it runs" in agent_env.log_of(proc), 30,
                         what="the broker delivering the unacknowledged command again")
    proc.kill()
    proc.wait()
    proc2 = agent_env.spawn(path)
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="the install's ack after the restart")[0]
    assert ack["ok"] and ack["result"]["slot"] == "b", agent_env.log_of(proc2)
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0


def test_a_replayed_signed_command_is_answered_not_executed(agent_env, broker, subscriber, kit, two_releases,
                                                            server):
    """Someone with broker access but no key captures a signed rollback and replays it later, after
    flooding the agent with other commands: the device answers as before and changes nothing."""
    sub = subscriber()
    path, v1, v2 = two_releases
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    captured = _send(sub, "rollback", {"reason": "op"}, kit.key, expires_ts=time.time() + 86400)
    first = sub.wait(lambda s: _acks(s, captured["request_id"]), what="first ack")[0]
    assert first["ok"] is False and first["error"]["reason"] == "no_previous"
    ins = _send(sub, "install", _install_args(server.add(v2)), kit.key)
    assert sub.wait(lambda s: _acks(s, ins["request_id"]), timeout=60, what="install")[0]["ok"]
    for _ in range(80):  # more than any in-memory cache holds
        _send(sub, "ping", {}, None, body={"request_id": uuid.uuid4().hex, "command": "ping"})
    _send(sub, "rollback", {}, None, body=captured)  # the replay, byte for byte
    replay = sub.wait(lambda s: _acks(s, captured["request_id"])[1:], timeout=20, what="the replay's ack")[0]
    assert replay["duplicate"] and replay["ok"] is False
    assert agent.core.model_info()["release"] == 2  # nothing was rolled back
    agent_env.stop_agent(agent)


def test_signed_commands_must_expire(agent_env, broker, subscriber, kit, two_releases):
    sub = subscriber()
    agent_env.start_agent(agent_env.config())
    _online(sub)
    body = sign_command("f1", "dev1", {"request_id": "r-never", "command": "rollback", "args": {},
                                       "expires_ts": None}, kit.key)
    _send(sub, "rollback", {}, None, body=body)
    ack = sub.wait(lambda s: _acks(s, "r-never"), what="ack")[0]
    assert ack["ok"] is False and ack["error"]["reason"] == "bad_request" and "expires_ts" in ack["error"]["message"]
    far = _send(sub, "rollback", {}, kit.key, expires_ts=time.time() + 365 * 86400)
    ack = sub.wait(lambda s: _acks(s, far["request_id"]), what="ack")[0]
    assert ack["error"]["reason"] == "bad_request" and "days ahead" in ack["error"]["message"]
    old = _send(sub, "rollback", {}, kit.key, expires_ts=time.time() - 1)
    assert sub.wait(lambda s: _acks(s, old["request_id"]), what="ack")[0]["error"]["reason"] == "expired"


def test_an_install_redelivered_after_its_expiry_still_reports_its_switch(agent_env, broker, subscriber, kit,
                                                                        two_releases, server):
    sub = subscriber()
    path, v1, v2 = two_releases
    info = server.add(v2)
    flag = agent_env.tmp / "paused"
    proc = agent_env.spawn(path, env={"EDGEKIT_AGENT_FAULT": "pause:switched", "EDGEKIT_AGENT_FAULT_FILE": str(flag)})
    _online(sub)
    rid = _send(sub, "install", _install_args(info), kit.key, expires_ts=time.time() + 4)["request_id"]
    agent_env.wait_until(flag.exists, 30, what="paused right after the switch")
    proc.kill()
    proc.wait()
    time.sleep(max(0.0, 4.5 - 0))  # the device stays off past the command's expiry
    proc2 = agent_env.spawn(path)
    ack = sub.wait(lambda s: _acks(s, rid), timeout=30, what="ack")[0]
    assert ack["ok"] and ack["result"]["already_active"] and ack["result"]["slot"] == "b", ack
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0


def test_an_error_after_the_switch_does_not_report_a_failure(agent_env, broker, subscriber, kit, two_releases,
                                                            server, monkeypatch):
    sub = subscriber()
    path, v1, v2 = two_releases
    real = StateDir.log_install

    def full_disk(self, entry):
        if entry.get("ok") and entry.get("command") == "install":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, entry)

    monkeypatch.setattr(StateDir, "log_install", full_disk)
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    rid = _send(sub, "install", _install_args(server.add(v2)), kit.key)["request_id"]
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="ack")[0]
    assert ack["ok"] and ack["result"]["slot"] == "b"
    assert agent.core.model_info()["release"] == 2  # what the pointer names is what serves
    agent_env.stop_agent(agent)


def test_a_local_file_changed_during_the_install_is_not_what_gets_installed(agent_env, tmp_path):
    sd = StateDir(tmp_path / "state").ensure()
    ring = Keyring.from_paths(agent_env.keys)
    v5 = agent_env.model_bundle("v5.ekb", release=5, scale=1.0)
    v6 = agent_env.model_bundle("v6.ekb", release=6, scale=2.0)
    old = agent_env.model_bundle("v1.ekb", release=1, scale=3.0)  # an older signed release
    upload = tmp_path / "upload.ekb"
    Installer(sd, ring, latency_runs=0).install(InstallRequest(str(v5)))
    shutil.copy(v6, upload)
    sha6 = hashlib.sha256(upload.read_bytes()).hexdigest()

    def swap(step, info):
        if step in ("verify", "unpack"):  # after the checks, before the copy into the slot
            shutil.copy(old, upload)

    result, model = Installer(sd, ring, latency_runs=0, on_progress=swap).install(InstallRequest(str(upload), sha6))
    try:
        in_slot = hashlib.sha256((sd.slot_dir(result["slot"]) / "bundle.ekb").read_bytes()).hexdigest()
        assert model.manifest.model.release == 6 and result["model"]["release"] == 6
        assert in_slot == sha6 == sd.read_slot(result["slot"])["sha256"]
    finally:
        model.close()


def test_installs_leave_no_downloads_behind(agent_env, broker, subscriber, kit, two_releases, server):
    sub = subscriber()
    path, v1, v2 = two_releases
    agent_env.start_agent(agent_env.config())
    _online(sub)
    downloads = agent_env.tmp / "state-dev1" / "downloads"
    bad = server.add(agent_env.model_bundle("bad.ekb", release=3, break_health=True))
    for args, ok in ((_install_args(bad), False), (_install_args(server.add(v2)), True),
                     (_install_args(server.add(v2)), True)):  # refused, installed, already active
        rid = _send(sub, "install", args, kit.key)["request_id"]
        assert sub.wait(lambda s: _acks(s, rid), timeout=60, what="ack")[0]["ok"] is ok
        assert list(downloads.iterdir()) == []


def test_reflashing_a_device_that_started_degraded_loads_its_model(agent_env, broker, subscriber, kit, two_releases,
                                                                  server, monkeypatch):
    sub = subscriber()
    path, v1, v2 = two_releases
    real = Installer._load
    fail = {"once": True}

    def flaky(self, bundle, workdir):  # the engine cannot be created on this start (e.g. out of memory)
        if fail.pop("once", False):
            raise RuntimeError("out of memory")
        return real(self, bundle, workdir)

    monkeypatch.setattr(Installer, "_load", flaky)
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    assert agent.core.model is None
    rid = _send(sub, "install", _install_args(server.add(v1)), kit.key)["request_id"]  # the same bundle again
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="ack")[0]
    assert ack["ok"] and ack["result"]["already_active"]
    assert agent.core.model is not None and agent.core.model_info()["release"] == 1
    assert agent.core.state.value == "online"
    agent_env.stop_agent(agent)


def test_a_benchmark_survives_a_model_switch(agent_env, broker, subscriber, kit, two_releases, server):
    sub = subscriber()
    path, v1, v2 = two_releases
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    bench = _send(sub, "bench", {"seconds": 2.0, "queries": 100_000, "warmup": 0}, None,
                  body={"request_id": "bench-1", "command": "bench",
                        "args": {"seconds": 2.0, "queries": 100_000, "warmup": 0}})
    rid = _send(sub, "install", _install_args(server.add(v2)), kit.key)["request_id"]
    assert sub.wait(lambda s: _acks(s, rid), timeout=60, what="install ack")[0]["ok"]
    result = sub.wait(lambda s: _acks(s, bench["request_id"]), timeout=60, what="bench ack")[0]
    assert result["ok"], result
    assert agent.core.model_info()["release"] == 2
    agent_env.stop_agent(agent)


def test_a_fifo_in_the_inbox_does_not_block_the_agent(agent_env, broker, subscriber, two_releases):
    sub = subscriber()
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    os.mkfifo(agent_env.tmp / "state-dev1" / "inbox" / "x.json")
    time.sleep(1.0)
    n = len(sub.of("telemetry"))
    sub.wait(lambda s: len(s.of("telemetry")) >= n + 3, timeout=10, what="telemetry going on")
    agent_env.stop_agent(agent)


def test_recovery_leaves_a_slot_the_install_never_touched(agent_env, two_releases):
    """A crash after the marker said "unpack" but before the idle slot was marked: the previous model
    in that slot is still intact and stays available for a rollback."""
    path, v1, v2 = two_releases
    agent_env.install(path, v2)  # active b, previous a (release 1)
    sd = StateDir(agent_env.tmp / "state-dev1")
    sd.write_marker({"txn": "t-crashed", "slot": "a", "step": "unpack", "request_id": "r1", "sha256": None})
    installer = Installer(sd, Keyring.from_paths(agent_env.keys), latency_runs=0)
    assert installer.recover()["outcome"] == "undone"
    assert sd.read_slot("a")["state"] == "good" and (sd.slot_dir("a") / "bundle.ekb").is_file()
    result, model = installer.rollback("test")
    assert result["slot"] == "a" and model.manifest.model.release == 1
    model.close()


def test_a_workload_follows_every_switch_and_retries_a_failed_load(agent_env, two_releases, capsys, monkeypatch):
    from edgekit_runtime.agent.cli import main as agent_cli
    from edgekit_runtime.active import ActiveModel

    path, v1, v2 = two_releases
    watcher = ActiveModel(agent_env.tmp / "state-dev1", check_every_s=0.0, keyring=agent_env.keys)
    x = np.ones((1, 4), np.float32)
    assert watcher.get().manifest.model.release == 1 and watcher.slot == "a"
    # two installs between two looks: a -> b -> a, the slot name is the same, the model is not
    assert agent_cli(["install", str(v2), "--config", str(path)]) == 0
    assert agent_cli(["install", str(agent_env.model_bundle("v3.ekb", release=3, scale=3.0)), "--config",
                      str(path)]) == 0
    assert watcher.get().manifest.model.release == 3 and watcher.slot == "a"
    np.testing.assert_allclose(watcher.get().run(x)["y"], x @ (agent_env.kit.WEIGHTS * 3), rtol=1e-6)
    # a load that fails (memory, a busy disk) is tried again at the next look
    assert agent_cli(["rollback", "--config", str(path)]) == 0
    capsys.readouterr()
    import edgekit_runtime.api as api
    from edgekit_runtime.contract.errors import ErrorCode, RuntimeErrorBase

    real_load, calls = api.load, []

    def failing_once(*a, **k):
        calls.append(a)
        if len(calls) == 1:
            raise RuntimeErrorBase("cannot load now", code=ErrorCode.ENGINE_LOAD_FAILED)
        return real_load(*a, **k)

    monkeypatch.setattr(api, "load", failing_once)
    assert watcher.get().manifest.model.release == 3 and watcher.last_error is not None  # kept serving
    assert watcher.get().manifest.model.release == 2 and watcher.slot == "b"  # the retry loaded it
    assert len(calls) == 2
    watcher.close()


def test_an_inbox_request_cannot_write_outside_the_outbox(agent_env, broker, subscriber, two_releases):
    """The request id names the reply file: one with a path in it is ignored (it could overwrite slot.json)."""
    import json

    sub = subscriber()
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    sd = StateDir(agent_env.tmp / "state-dev1")
    before = (sd.slot_dir("a") / "slot.json").read_bytes()
    (sd.inbox / "evil.json").write_text(json.dumps({"request_id": "../slots/a/slot", "command": "rollback"}))
    os.mkdir(sd.inbox / "dir.json")  # and a directory with a request's name
    agent_env.wait_until(lambda: not list(sd.inbox.iterdir()), 10, what="the inbox emptied")
    assert (sd.slot_dir("a") / "slot.json").read_bytes() == before
    n = len(sub.of("telemetry"))
    sub.wait(lambda s: len(s.of("telemetry")) >= n + 2, timeout=10, what="the agent going on")
    agent_env.stop_agent(agent)


def test_reflashing_a_damaged_active_bundle_repairs_it(agent_env, broker, subscriber, kit, two_releases, server):
    """The active slot's file was damaged on disk (the agent starts degraded): sending the same bundle again
    is not "already active" — it is installed afresh into the other slot and serves."""
    sub = subscriber()
    path, v1, v2 = two_releases
    bundle = agent_env.tmp / "state-dev1" / "slots" / "a" / "bundle.ekb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    assert agent.core.model is None
    rid = _send(sub, "install", _install_args(server.add(v1)), kit.key)["request_id"]
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="ack")[0]
    assert ack["ok"] and not ack["result"]["already_active"] and ack["result"]["slot"] == "b", ack
    assert agent.core.model is not None and agent.core.model_info()["release"] == 1
    agent_env.stop_agent(agent)


def test_a_full_disk_during_an_install_is_reported_as_such(agent_env, tmp_path, monkeypatch):
    sd = StateDir(tmp_path / "state").ensure()
    ring = Keyring.from_paths(agent_env.keys)
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    Installer(sd, ring, latency_runs=0).install(InstallRequest(str(v1)))[1].close()
    before = sd.active_file.read_bytes()

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StateDir, "place_bundle", no_space)
    with pytest.raises(Exception) as info:
        Installer(sd, ring, latency_runs=0).install(InstallRequest(str(v2)))
    err = info.value
    assert (err.reason, err.step, int(err.code)) == ("storage_error", "unpack", 403) and "df -h" in err.hint
    assert sd.active_file.read_bytes() == before and sd.read_marker() is None
    assert list(sd.downloads.iterdir()) == []  # the full disk gets its space back


def test_the_command_log_survives_a_failed_write(tmp_path, monkeypatch):
    from edgekit_runtime.agent.state import CommandLog

    log = CommandLog(tmp_path / "commands.jsonl")
    log.started("r1", "install", time.time() + 600)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        log.finished("r1", {"request_id": "r1", "ok": True})
    log.started("r2", "rollback", time.time() + 600)
    monkeypatch.setattr(os, "fsync", real_fsync)
    again = CommandLog(tmp_path / "commands.jsonl")
    assert again.get("r2")["command"] == "rollback" and "ack" not in again.get("r1")
    assert all(line.startswith("{") for line in (tmp_path / "commands.jsonl").read_text().splitlines())


def test_a_command_that_cannot_be_recorded_is_refused_not_run(agent_env, broker, subscriber, kit, two_releases,
                                                              monkeypatch):
    from edgekit_runtime.agent.state import CommandLog

    sub = subscriber()
    path, v1, v2 = two_releases
    agent_env.install(path, v2)

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CommandLog, "started", no_space)
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    rid = _send(sub, "rollback", {}, kit.key)["request_id"]
    ack = sub.wait(lambda s: _acks(s, rid), what="ack")[0]
    assert ack["ok"] is False and ack["error"]["reason"] == "storage_error"
    assert agent.core.model_info()["release"] == 2  # not rolled back without a record
    ping = _send(sub, "ping", {}, None, body={"request_id": "p1", "command": "ping"})
    assert sub.wait(lambda s: _acks(s, ping["request_id"]), what="the agent still answering")[0]["ok"]
    agent_env.stop_agent(agent)


def test_a_device_clock_a_little_behind_accepts_the_longest_expiry(agent_env, broker, subscriber, kit, two_releases):
    sub = subscriber()
    agent_env.start_agent(agent_env.config())
    _online(sub)
    limit = _send(sub, "rollback", {}, kit.key, expires_ts=time.time() + 30 * 86400 + 60)  # host clock 1 min ahead
    ack = sub.wait(lambda s: _acks(s, limit["request_id"]), what="ack")[0]
    assert ack["error"]["reason"] == "no_previous"  # judged on its merits, not refused for its expiry


def test_repairing_a_damaged_active_bundle_keeps_the_previous_model(agent_env, two_releases):
    """v1 in slot a (previous, good), v2 active in slot b but damaged on disk: sending v2 again first
    falls back to slot a (health-checked), then installs v2 into slot b as usual; the active slot is never
    written, so a failure or a crash at any point leaves v1 serving."""
    path, v1, v2 = two_releases
    agent_env.install(path, v2)
    sd = StateDir(agent_env.tmp / "state-dev1")
    ring = Keyring.from_paths(agent_env.keys)
    sha2 = hashlib.sha256(v2.read_bytes()).hexdigest()
    good_a = (sd.slot_dir("a") / "bundle.ekb").read_bytes()
    bundle = sd.slot_dir("b") / "bundle.ekb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))

    failing = Installer(sd, ring, latency_runs=0)
    failing.fault = ("fail", "health_check")
    with pytest.raises(Exception, match="fault injected"):
        failing.install(InstallRequest(str(v2), sha2))
    assert sd.read_pointer()["slot"] == "a" and sd.read_slot("a")["state"] == "good"  # v1 serves
    assert (sd.slot_dir("a") / "bundle.ekb").read_bytes() == good_a
    result, model = Installer(sd, ring, latency_runs=0).install(InstallRequest(str(v2), sha2))
    model.close()
    assert (result["slot"], result["previous_slot"], result["already_active"]) == ("b", "a", False)
    assert hashlib.sha256((sd.slot_dir("b") / "bundle.ekb").read_bytes()).hexdigest() == sha2
    assert (sd.slot_dir("a") / "bundle.ekb").read_bytes() == good_a and sd.read_slot("a")["state"] == "good"


def test_a_running_agent_serves_what_the_pointer_names_after_a_failed_repair(agent_env, broker, subscriber, kit,
                                                                            two_releases, server):
    sub = subscriber()
    path, v1, v2 = two_releases
    agent_env.install(path, v2)
    agent = agent_env.start_agent(agent_env.config())
    _online(sub)
    assert agent.core.model_info()["release"] == 2
    bundle = agent_env.tmp / "state-dev1" / "slots" / "b" / "bundle.ekb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))  # damaged on disk while v2 serves from memory
    agent.installer.fault = ("fail", "health_check")
    rid = _send(sub, "install", _install_args(server.add(v2)), kit.key)["request_id"]
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="ack")[0]
    assert ack["ok"] is False and ack["error"]["active_slot"] == "a"
    assert agent.core.model_info()["release"] == 1 and agent.core.model_info()["slot"] == "a"
    agent_env.stop_agent(agent)


def test_a_half_written_command_log_line_is_cut_back(tmp_path, monkeypatch):
    from edgekit_runtime.agent.state import CommandLog

    log = CommandLog(tmp_path / "commands.jsonl")
    log.started("r1", "install", time.time() + 600)
    real_write, calls = os.write, []

    def disk_fills(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # half the line reaches the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(OSError):
        log.finished("r1", {"request_id": "r1", "ok": True})
    monkeypatch.setattr(os, "write", real_write)
    log.started("r2", "rollback", time.time() + 600)
    again = CommandLog(tmp_path / "commands.jsonl")
    assert again.get("r2")["command"] == "rollback" and "ack" not in again.get("r1")
    assert len((tmp_path / "commands.jsonl").read_text().splitlines()) == 2


def test_slots_on_another_filesystem_get_a_copy(agent_env, tmp_path, monkeypatch):
    sd = StateDir(tmp_path / "state").ensure()
    v1 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0)

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    result, model = Installer(sd, Keyring.from_paths(agent_env.keys), latency_runs=0).install(InstallRequest(str(v1)))
    model.close()
    assert hashlib.sha256((sd.slot_dir("a") / "bundle.ekb").read_bytes()).hexdigest() == result["sha256"]
    assert list(sd.downloads.iterdir()) == []


@pytest.mark.parametrize("step", ["unpack", "prepare"])
def test_a_crash_while_repairing_a_damaged_active_slot_leaves_the_previous_model(agent_env, broker, subscriber,
                                                                               kit, two_releases, server, step):
    sub = subscriber()
    path, v1, v2 = two_releases
    agent_env.install(path, v2)
    info = server.add(v2)
    bundle = agent_env.tmp / "state-dev1" / "slots" / "b" / "bundle.ekb"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    flag = agent_env.tmp / "paused"
    proc = agent_env.spawn(path, env={"EDGEKIT_AGENT_FAULT": f"pause:{step}", "EDGEKIT_AGENT_FAULT_FILE": str(flag)})
    _online(sub)
    rid = _send(sub, "install", _install_args(info), kit.key)["request_id"]
    agent_env.wait_until(flag.exists, 30, what=f"paused at {step} of the repair")
    proc.kill()
    proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a"  # it had fallen back before touching slot b
    proc2 = agent_env.spawn(path)
    online = sub.wait(lambda s: [m for m in s.of("state") if m["boot"] == 2 and m["body"]["status"] == "online"],
                      timeout=30, what="boot 2 online")[0]
    assert online["body"]["model"]["release"] == 1  # the previous model serves at once
    ack = sub.wait(lambda s: _acks(s, rid), timeout=60, what="the repair completing after the restart")[0]
    assert ack["ok"] and (ack["result"]["slot"], ack["result"]["previous_slot"]) == ("b", "a")
    assert sd.read_slot("a")["state"] == "good" and sd.read_slot("b")["state"] == "good"
    proc2.terminate()
    assert proc2.wait(timeout=20) == 0
