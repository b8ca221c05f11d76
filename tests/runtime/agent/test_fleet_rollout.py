"""Fleet OTA end to end: 10 `edgekit-agent run` processes, real Mosquitto, `edgekit serve`, `edgekit flash`.

Each agent has its own state directory and serves release 1 (slot a) before the rollout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgekit.errors import ExitCode
from edgekit_runtime.agent.state import StateDir

N = 10
pytestmark = pytest.mark.timeout(300)


def _fleet(agent_env, faults: dict[str, str] | None = None, offline: tuple[str, ...] = ()):
    """N agents serving release 1; ``faults`` per device (EDGEKIT_AGENT_FAULT), ``offline`` not running."""
    names = [f"dev{i:02d}" for i in range(N)]
    v1 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0)
    paths = {}
    for name in names:
        paths[name] = agent_env.config_file(name, telemetry_interval_s=1.0)
        agent_env.install(paths[name], v1)
    procs = {}
    for name in names:
        env = {"EDGEKIT_AGENT_FAULT": faults[name]} if faults and name in faults else None
        procs[name] = agent_env.spawn(paths[name], env=env)
    return names, paths, procs


def _wait_online(agent_env, sub, names, boots=None):
    def online(s):
        latest = {}
        for m in s.of("state"):
            latest[m["device"]] = m
        return all(n in latest and latest[n]["body"]["status"] == "online" for n in names)

    sub.wait(online, timeout=90, what=f"{len(names)} agents online")


def _key_file(agent_env) -> Path:
    path = agent_env.tmp / "signing.key"
    path.write_bytes(agent_env.kit.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return path


def _flash(agent_env, bundle: Path, *args: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "edgekit.cli", "flash", str(bundle), "--fleet", "f1", "--broker",
           agent_env.broker.url, "--key", str(_key_file(agent_env)), "--record-dir", str(agent_env.tmp / "records"),
           "--serve", "127.0.0.1:0", "--device-timeout", "60", "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=agent_env.tmp)
    try:
        return out.returncode, json.loads(out.stdout)
    except ValueError:
        raise AssertionError(f"flash printed no JSON (rc {out.returncode}): {out.stdout}\n{out.stderr}") from None


def _serving(agent_env, name: str) -> tuple[str, int]:
    """(active slot, release) an agent serves, from its status file (what it reports about itself)."""
    st = json.loads((agent_env.tmp / f"state-{name}" / "agent.json").read_text())
    return StateDir(agent_env.tmp / f"state-{name}").active_slot(), st["model"]["release"]


def test_canary_failure_halts_the_rollout_and_rolls_the_canaries_back(agent_env, broker, subscriber):
    sub = subscriber()
    # dev01, one of the 3 canaries (30 %), fails the health check of the new bundle on purpose
    names, paths, procs = _fleet(agent_env, faults={"dev01": "fail:health_check"})
    _wait_online(agent_env, sub, names)
    v2 = agent_env.model_bundle("v2.ekb", release=2)
    t0 = time.monotonic()
    rc, summary = _flash(agent_env, v2, "--canary", "30%", "--max-failures", "0")
    assert rc == ExitCode.DEVICE and summary["halted"], summary
    record = json.loads(Path(summary["record"]).read_text())
    from edgekit.flash.rollout import device_status

    status = {d: device_status(e) for d, e in record["devices"].items()}
    assert summary["failures"] == 1 and status["dev01"] == "failed"
    err = record["devices"]["dev01"]["install"]["error"]
    assert err["reason"] == "health_check_failed" and err["step"] == "health_check" and err["code"] == 204
    assert summary["counts"]["rolled_back"] == 2 and summary["rolled_back"] == ["dev00", "dev02"]
    assert summary["counts"]["pending"] == 7  # the rest never got the command
    # the device side agrees: the failing device never left release 1, the canaries are back on it,
    # and nobody else was touched; every agent serves a verified model (0 models lost)
    agent_env.wait_until(lambda: all(_serving(agent_env, n)[1] == 1 for n in names), 30,
                         what="every agent reporting release 1")
    for n in names:
        slot, release = _serving(agent_env, n)
        log = StateDir(agent_env.tmp / f"state-{n}").install_log.read_text().splitlines()
        commands = [json.loads(line)["command"] for line in log]
        if n in ("dev00", "dev02"):
            assert (slot, commands) == ("a", ["install", "install", "rollback"])
        elif n == "dev01":
            assert slot == "a" and commands == ["install", "install"] and not json.loads(log[-1])["ok"]
        else:
            assert slot == "a" and commands == ["install"], (n, commands)  # only the initial install
    for p in procs.values():
        assert p.poll() is None, "an agent died"
    print(f"\nhalted rollout: {time.monotonic() - t0:.1f} s from the command to the canaries rolled back")


def test_rollout_to_ten_agents_and_an_offline_device_catches_up(agent_env, broker, subscriber):
    sub = subscriber()
    names, paths, procs = _fleet(agent_env)
    _wait_online(agent_env, sub, names)
    # dev09 goes away (its broker session keeps commands for it); the rollout goes on without it
    procs["dev09"].terminate()
    assert procs["dev09"].wait(timeout=20) == 0
    sub.wait(lambda s: [m for m in s.of("state", "dev09") if m["body"]["status"] == "offline"], what="dev09 offline")
    v2 = agent_env.model_bundle("v2.ekb", release=2)
    from edgekit.flash.server import BundleServer

    served = agent_env.tmp / "served"
    served.mkdir()
    with BundleServer(served).start() as server:  # outlives the flash command, as `edgekit serve` would
        info = server.add(v2)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "edgekit.cli", "flash", str(v2), "--fleet", "f1", "--broker", agent_env.broker.url,
               "--key", str(_key_file(agent_env)), "--record-dir", str(agent_env.tmp / "records"), "--url",
               info["url"], "--canary", "10%", "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=agent_env.tmp)
        wall = time.monotonic() - t0
        summary = json.loads(out.stdout)
        assert out.returncode == 0 and not summary["halted"], (out.stdout, out.stderr)
        assert summary["counts"]["succeeded"] == 9 and summary["pending_offline"] == ["dev09"]
        assert summary["fleet_switch_s"] is not None and summary["fleet_switch_s"] < wall
        print(f"\n9 online agents switched in {summary['fleet_switch_s']:.2f} s (flash command: {wall:.1f} s)")
        for n in names[:-1]:
            assert _serving(agent_env, n) == ("b", 2)

        # dev09 comes back: the queued command is delivered, it installs; resuming the rollout records it
        procs["dev09"] = agent_env.spawn(paths["dev09"])
        resume = [sys.executable, "-m", "edgekit.cli", "flash", "--resume", summary["record"], "--broker",
                  agent_env.broker.url, "--key", str(_key_file(agent_env))]  # the human-readable live table
        out = subprocess.run(resume, capture_output=True, text=True, timeout=240, cwd=agent_env.tmp)
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "done: 10 succeeded" in out.stdout and "dev09" in out.stdout, out.stdout
        from edgekit.flash.rollout import counts

        assert counts(json.loads(Path(summary["record"]).read_text()))["succeeded"] == 10
        agent_env.wait_until(lambda: _serving(agent_env, "dev09") == ("b", 2), 30, what="dev09 on release 2")
        # each device downloaded the bundle once
        gets = [r for r in server.requests if r.method == "GET" and r.status in (200, 206)]
        assert len(gets) == N


def test_edgekit_rollback_from_a_bundle_is_safe_to_repeat(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file("dev1")
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    agent_env.install(path, v1)
    agent_env.install(path, v2)
    proc = agent_env.spawn(path)
    _wait_online(agent_env, sub, ["dev1"])
    cmd = [sys.executable, "-m", "edgekit.cli", "rollback", "--fleet", "f1", "--devices", "dev1", "--from", str(v2),
           "--broker", agent_env.broker.url, "--key", str(_key_file(agent_env)), "--reason", "bad v2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=agent_env.tmp)
    assert first.returncode == 0 and "rolled back to slot a" in first.stdout, (first.stdout, first.stderr)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=agent_env.tmp)
    assert again.returncode == 0 and "nothing to undo" in again.stdout, (again.stdout, again.stderr)
    agent_env.wait_until(lambda: _serving(agent_env, "dev1") == ("a", 1), 20, what="dev1 on release 1")
    proc.terminate()
    assert proc.wait(timeout=20) == 0


def test_a_bundle_that_fails_its_health_check_stops_at_the_canary(agent_env, broker, subscriber):
    """The bundle itself is bad (its expected output does not match its model): the one canary (10 %)
    refuses it, the rollout halts, and the other 9 devices never receive it."""
    sub = subscriber()
    names, paths, procs = _fleet(agent_env)
    _wait_online(agent_env, sub, names)
    bad = agent_env.model_bundle("bad.ekb", release=2, break_health=True)
    rc, summary = _flash(agent_env, bad, "--canary", "10%")
    assert rc == ExitCode.DEVICE and summary["halted"] and summary["counts"]["failed"] == 1 and summary["counts"]["pending"] == 9
    record = json.loads(Path(summary["record"]).read_text())
    err = record["devices"]["dev00"]["install"]["error"]
    assert (err["reason"], err["code"]) == ("health_check_failed", 204) and "differs" in err["message"]
    for n in names:
        assert _serving(agent_env, n) == ("a", 1)
    assert StateDir(agent_env.tmp / "state-dev00").read_slot("b")["state"] == "aborted"
