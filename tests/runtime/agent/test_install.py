"""A/B installs as transactions: refusals keep the old model, kill -9 at any step loses nothing.

Installs here go through ``edgekit-agent install`` with no agent running (the CLI runs
the transaction itself); the MQTT-commanded path is in test_ota_mqtt.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime.agent.cli import main as agent_cli
from edgekit_runtime.agent.install import STEPS
from edgekit_runtime.agent.state import StateDir


def _install(path: Path, bundle: Path, *extra: str, capsys=None) -> tuple[int, dict]:
    rc = agent_cli(["install", str(bundle), "--config", str(path), "--json", *extra])
    out = capsys.readouterr().out if capsys else "{}"
    return rc, json.loads(out)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _served(agent_env, device: str = "dev1"):
    """What an agent starting now would serve: (model name/version/release, slot), after recovery."""
    from edgekit_runtime.agent import Agent

    agent = Agent(agent_env.config(device), system_stats=False)
    try:
        info = agent.core.model_info()
        out = ({"version": info["version"], "release": info["release"], "slot": info.get("slot"),
                "sha256": info.get("sha256")} if info else None, agent.recovered)
        if agent.core.model is not None:  # the model really runs (not just a pointer)
            y = agent.core.model.run(np.ones((1, 4), np.float32))["y"]
            assert np.isfinite(y).all()
    finally:
        agent.core.close()
    return out


def _consistent(sd: StateDir) -> None:
    """The invariants every test checks after a refusal or a crash."""
    assert sd.read_marker() is None, "an install marker was left behind"
    pointer = sd.read_pointer()
    assert pointer is not None
    active = sd.read_slot(pointer["slot"])
    assert active["state"] == "good" and _sha(sd.slot_dir(pointer["slot"]) / "bundle.ekb") == active["sha256"]
    for slot in ("a", "b"):
        assert not (sd.slot_dir(slot) / ".bundle.ekb.tmp").exists()
        rec = sd.read_slot(slot)
        if rec["state"] in ("aborted", "empty"):
            assert not (sd.slot_dir(slot) / "bundle.ekb").exists()


def test_install_switch_and_rollback(agent_env, capsys):
    path = agent_env.config_file()
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    rc, r1 = _install(path, v1, capsys=capsys)
    assert rc == 0 and r1["ok"] and r1["slot"] == "a" and r1["previous_slot"] is None
    assert r1["health"]["ok"] and r1["health"]["latency"]["runs"] == 20 and r1["sha256"] == _sha(v1)
    rc, r2 = _install(path, v2, "--sha256", _sha(v2), capsys=capsys)
    assert rc == 0 and (r2["slot"], r2["previous_slot"]) == ("b", "a") and r2["model"]["release"] == 2
    assert set(r2["timings_s"]) == set(STEPS)
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "b" and sd.read_slot("a")["state"] == "good"
    _consistent(sd)
    # the same bundle again: nothing to do
    rc, again = _install(path, v2, capsys=capsys)
    assert rc == 0 and again["already_active"] and again["slot"] == "b"
    # rollback: back to slot a (release 1), and forward again with a second rollback
    assert agent_cli(["rollback", "--config", str(path), "--json", "--reason", "test"]) == 0
    rb = json.loads(capsys.readouterr().out)
    assert rb["ok"] and (rb["slot"], rb["previous_slot"]) == ("a", "b") and rb["model"]["release"] == 1
    served, _ = _served(agent_env)
    assert served["release"] == 1 and served["slot"] == "a"
    log = [json.loads(line) for line in sd.install_log.read_text().splitlines()]
    assert [e["command"] for e in log] == ["install", "install", "rollback"] and all(e["ok"] for e in log)


def _refused(agent_env, capsys, bundle: Path, *extra: str) -> dict:
    path = agent_env.config_file()
    sd = StateDir(agent_env.tmp / "state-dev1")
    if sd.read_pointer() is None:
        assert _install(path, agent_env.model_bundle("base.ekb", release=5, scale=1.0), capsys=capsys)[0] == 0
    before = sd.active_file.read_bytes()
    rc, reply = _install(path, bundle, *extra, capsys=capsys)
    assert rc == 3 and reply["ok"] is False
    assert sd.active_file.read_bytes() == before  # the pointer was not touched
    _consistent(sd)
    served, _ = _served(agent_env)
    assert served["release"] == 5  # the old model still serves
    return reply["error"]


def test_tampered_bundle_is_refused_and_the_old_model_serves(agent_env, capsys):
    good = agent_env.model_bundle("good.ekb", release=6)
    tampered = agent_env.tmp / "tampered.ekb"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            zout.writestr(info, data)
    err = _refused(agent_env, capsys, tampered)
    assert (err["reason"], err["step"], err["code"]) == ("verify_failed", "verify", 105)


def test_wrong_sha256_is_refused(agent_env, capsys):
    err = _refused(agent_env, capsys, agent_env.model_bundle("v6.ekb", release=6), "--sha256", "0" * 64)
    assert (err["reason"], err["step"], err["code"]) == ("checksum_mismatch", "download", 113)


def test_truncated_bundle_is_refused(agent_env, capsys):
    good = agent_env.model_bundle("v6.ekb", release=6)
    cut = agent_env.tmp / "cut.ekb"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = _refused(agent_env, capsys, cut)
    assert err["step"] == "verify" and err["code"] in (100, 101)


def test_downgrade_needs_allow_downgrade(agent_env, capsys):
    old = agent_env.model_bundle("v3.ekb", release=3)
    err = _refused(agent_env, capsys, old)
    assert (err["reason"], err["code"]) == ("downgrade", 111)
    rc, ok = _install(agent_env.config_file(), old, "--allow-downgrade", capsys=capsys)
    assert rc == 0 and ok["model"]["release"] == 3


# Anti-rollback (install.py, step "verify"; docs/flash.md): a bundle whose release is lower than the
# active one's is refused unless allow_downgrade; an equal release is not older, so another bundle of
# the same release installs; the active bundle itself is never installed again (already_active).
def _release_5(agent_env, capsys) -> tuple[Path, Path, StateDir]:
    path = agent_env.config_file()
    base = agent_env.model_bundle("r5.ekb", release=5, scale=1.0)
    rc, reply = _install(path, base, capsys=capsys)
    assert rc == 0 and reply["slot"] == "a" and reply["model"]["release"] == 5
    return path, base, StateDir(agent_env.tmp / "state-dev1")


def test_a_release_one_below_the_active_is_refused_unless_allowed(agent_env, capsys):
    path, _, sd = _release_5(agent_env, capsys)
    r4 = agent_env.model_bundle("r4.ekb", release=4)
    err = _refused(agent_env, capsys, r4)
    assert (err["reason"], err["step"], err["code"]) == ("downgrade", "verify", 111)
    assert "release 4" in err["message"] and "release 5" in err["message"]
    assert sd.read_slot("b")["state"] != "installing" and not (sd.slot_dir("b") / "bundle.ekb").exists()
    rc, ok = _install(path, r4, "--allow-downgrade", capsys=capsys)
    assert rc == 0 and (ok["slot"], ok["model"]["release"]) == ("b", 4) and not ok.get("already_active")


def test_a_release_one_above_the_active_is_installed(agent_env, capsys):
    path, _, sd = _release_5(agent_env, capsys)
    rc, ok = _install(path, agent_env.model_bundle("r6.ekb", release=6), capsys=capsys)
    assert rc == 0 and (ok["slot"], ok["model"]["release"]) == ("b", 6)
    assert sd.read_pointer()["slot"] == "b"


def test_another_bundle_of_the_same_release_is_installed(agent_env, capsys):
    """Equal is not older: a rebuild that kept its release number replaces the active bundle."""
    path, base, sd = _release_5(agent_env, capsys)
    rebuilt = agent_env.model_bundle("r5-rebuilt.ekb", release=5, scale=3.0)
    assert _sha(rebuilt) != _sha(base)
    rc, ok = _install(path, rebuilt, "--sha256", _sha(rebuilt), capsys=capsys)
    assert rc == 0 and not ok.get("already_active")
    assert (ok["slot"], ok["previous_slot"], ok["model"]["release"], ok["sha256"]) == ("b", "a", 5, _sha(rebuilt))
    served, _ = _served(agent_env)
    assert (served["release"], served["sha256"]) == (5, _sha(rebuilt))
    _consistent(sd)


@pytest.mark.parametrize("pinned", [True, False], ids=["re-pinned", "unpinned"])
def test_the_active_bundle_sent_again_is_not_reinstalled(agent_env, capsys, pinned):
    """The same bundle (same release, same sha256): answered already_active, nothing written to a slot."""
    path, base, sd = _release_5(agent_env, capsys)
    pointer, idle = sd.active_file.read_bytes(), sd.read_slot("b")
    rc, again = _install(path, base, *(["--sha256", _sha(base)] if pinned else []), capsys=capsys)
    assert rc == 0 and again["ok"] and again["already_active"]
    assert (again["slot"], again["sha256"], again["model"]["release"]) == ("a", _sha(base), 5)
    assert sd.active_file.read_bytes() == pointer and sd.read_slot("b") == idle
    assert not (sd.slot_dir("b") / "bundle.ekb").exists()
    _consistent(sd)


def test_failing_health_check_keeps_the_old_model(agent_env, capsys):
    err = _refused(agent_env, capsys, agent_env.model_bundle("bad.ekb", release=6, break_health=True))
    assert (err["reason"], err["step"], err["code"]) == ("health_check_failed", "health_check", 204)
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_slot("b")["state"] == "aborted" and sd.read_slot("b")["failed_step"] == "health_check"


@pytest.mark.parametrize("times_atol", [2.0, 10.0])
def test_an_output_a_few_tolerances_off_is_refused(agent_env, capsys, times_atol):
    """atol is 1e-5 and the first output is exactly 0: 2x and 10x atol off must fail, not just 1.0 off."""
    bundle = agent_env.model_bundle("near.ekb", release=6, health_offset=times_atol * 1e-5)
    err = _refused(agent_env, capsys, bundle)
    assert (err["reason"], err["step"]) == ("health_check_failed", "health_check")
    assert "atol 1e-05" in err["message"]


def test_an_output_within_the_tolerance_installs(agent_env, capsys):
    path = agent_env.config_file()
    assert _install(path, agent_env.model_bundle("base.ekb", release=5, scale=1.0), capsys=capsys)[0] == 0
    rc, reply = _install(path, agent_env.model_bundle("close.ekb", release=6, health_offset=0.5e-5), capsys=capsys)
    assert rc == 0 and reply["ok"] and reply["health"]["ok"]
    assert 0 < reply["health"]["max_abs_diff"] < 1e-5


def test_latency_budget_is_part_of_the_health_check(agent_env, capsys):
    err = _refused(agent_env, capsys, agent_env.model_bundle("slow.ekb", release=6, budget_ms=1e-6))
    assert err["reason"] == "health_check_failed" and "latency" in err["message"]


@pytest.mark.parametrize("step", [*STEPS, "switched"])
def test_kill_9_at_every_install_step(agent_env, capsys, step):
    """The install process is SIGKILLed while paused at ``step``; a restart serves a verified model."""
    path = agent_env.config_file()
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    assert _install(path, v1, capsys=capsys)[0] == 0
    flag = agent_env.tmp / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.agent.cli", "install", str(v2), "--config",
                             str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, EDGEKIT_AGENT_FAULT=f"pause:{step}", EDGEKIT_AGENT_FAULT_FILE=str(flag)))
    try:
        agent_env.wait_until(lambda: flag.exists() or proc.poll() is not None, 60, what=f"pause at {step}")
        if not flag.exists() or flag.read_text() != step:  # stop it before reading its output: a paused child
            proc.kill()                                      # never closes stdout
            pytest.fail(f"the install did not pause at {step}: {proc.communicate()[0].decode()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_marker() is not None  # the crash left the transaction open
    served, recovered = _served(agent_env)
    _consistent(sd)
    if step == "switched":  # the pointer had been switched: the install is finished, not undone
        assert recovered["outcome"] == "completed" and served["release"] == 2 and served["slot"] == "b"
    else:
        assert recovered["outcome"] == "undone" and recovered["step"] == step
        assert served["release"] == 1 and served["slot"] == "a" and served["sha256"] == _sha(v1)
    # and the device can install again afterwards
    rc, reply = _install(path, agent_env.model_bundle("v3.ekb", release=3), capsys=capsys)
    assert rc == 0 and reply["model"]["release"] == 3
    _consistent(sd)


def test_a_workload_follows_the_active_slot(agent_env, capsys):
    """edgekit_runtime.active.ActiveModel (the workload unit's side) reloads after a switch."""
    from edgekit_runtime.active import ActiveModel

    path = agent_env.config_file()
    assert _install(path, agent_env.model_bundle("v1.ekb", release=1, scale=1.0), capsys=capsys)[0] == 0
    active = ActiveModel(agent_env.tmp / "state-dev1", check_every_s=0.0, keyring=agent_env.keys)
    x = np.ones((1, 4), np.float32)
    y1 = active.get().run(x)["y"]
    assert active.slot == "a" and not active.refresh()  # nothing changed: no reload
    assert _install(path, agent_env.model_bundle("v2.ekb", release=2), capsys=capsys)[0] == 0
    y2 = active.get().run(x)["y"]
    assert active.slot == "b" and np.allclose(y2, 2 * y1)
    assert agent_cli(["rollback", "--config", str(path)]) == 0
    assert active.get().manifest.model.release == 1 and active.slot == "a"
    active.close()


def test_a_busy_device_keeps_its_model_at_start(agent_env, capsys):
    """At start the latency budget only warns: a verified model with right outputs is not dropped
    (nor silently rolled back) because the device happens to be slow; installs are gated by it."""
    path = agent_env.config_file()
    assert _install(path, agent_env.model_bundle("v1.ekb", release=1, scale=1.0), capsys=capsys)[0] == 0
    assert _install(path, agent_env.model_bundle("v2.ekb", release=2), capsys=capsys)[0] == 0
    slow = agent_env.config_file(health_latency_budget_ms=1e-6)  # every measurement is "over budget"
    from edgekit_runtime.agent import Agent, AgentConfig

    agent = Agent(AgentConfig.load(slow), system_stats=False)
    try:
        assert agent.core.model is not None and agent.core.model_info()["release"] == 2 and agent.fell_back is None
        assert agent.health["ok"] and agent.health["latency"]["over_budget"] and "budget" in agent.health["warning"]
        assert agent.health["latency"]["first_p90_ms"] > 1e-6  # measured twice before it counted
    finally:
        agent.core.close()


def test_engines_are_cached_in_the_state_directory(agent_env, monkeypatch):
    """Under systemd the agent may write only its state directory (ProtectHome, ProtectSystem=strict):
    TensorRT engines built at install time go there unless EDGEKIT_ENGINE_CACHE says otherwise."""
    from edgekit_runtime.agent.daemon import make_installer
    from edgekit_runtime.engines.tensorrt_engine import CACHE_ENV, EngineCache

    monkeypatch.delenv(CACHE_ENV, raising=False)
    sd = StateDir(agent_env.tmp / "state-x").ensure()
    make_installer(sd, agent_env.config("x"))
    assert EngineCache().directory == sd.root / "engine-cache"
    monkeypatch.setenv(CACHE_ENV, str(agent_env.tmp / "elsewhere"))
    make_installer(sd, agent_env.config("x"))
    assert EngineCache().directory == agent_env.tmp / "elsewhere"


@pytest.mark.parametrize("step", [*STEPS, "switched"])
def test_kill_9_at_every_step_of_a_shadow_install(agent_env, capsys, step):
    """A shadow install SIGKILLed at ``step``: the active model never moves; before the end the candidate is undone
    (no shadow file naming an emptied slot), after it the candidate stays (only the marker removal was lost)."""
    path = agent_env.config_file()
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    assert _install(path, v1, capsys=capsys)[0] == 0
    flag = agent_env.tmp / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.agent.cli", "install", str(v2), "--shadow",
                             "--config", str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, EDGEKIT_AGENT_FAULT=f"pause:{step}", EDGEKIT_AGENT_FAULT_FILE=str(flag)))
    try:
        agent_env.wait_until(lambda: flag.exists() or proc.poll() is not None, 60, what=f"pause at {step}")
        if not flag.exists() or flag.read_text() != step:
            proc.kill()
            pytest.fail(f"the install did not pause at {step}: {proc.communicate()[0].decode()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sd = StateDir(agent_env.tmp / "state-dev1")
    served, recovered = _served(agent_env)
    _consistent(sd)
    assert served["release"] == 1 and served["slot"] == "a"  # the active model, whatever the step
    shadow = sd.read_shadow()
    if step == "switched":
        assert recovered["outcome"] == "completed"
        assert shadow is not None and shadow["slot"] == "b" and sd.read_slot("b")["state"] == "shadow"
        assert _sha(sd.slot_dir("b") / "bundle.ekb") == shadow["sha256"] == _sha(v2)
    else:
        assert recovered["outcome"] == "undone" and shadow is None and sd.read_slot("b").get("state") != "shadow"


def test_a_shadow_install_never_moves_the_pointer_and_a_resent_one_is_not_redone(agent_env, capsys):
    path = agent_env.config_file()
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    v3 = agent_env.model_bundle("v3.ekb", release=3, scale=3.0)
    assert _install(path, v1, capsys=capsys)[0] == 0 and _install(path, v2, capsys=capsys)[0] == 0  # b active
    sd = StateDir(agent_env.tmp / "state-dev1")
    # the active copy is damaged: a normal install of it would fall back and repair; a shadow of it never moves
    # the pointer (and the active bundle cannot be its own shadow)
    (sd.slot_dir("b") / "bundle.ekb").write_bytes(b"damaged")
    rc, reply = _install(path, v2, "--shadow", "--sha256", _sha(v2), capsys=capsys)
    assert rc == 3 and reply["error"]["reason"] == "already_active"
    assert sd.read_pointer()["slot"] == "b" and sd.read_pointer()["previous"] == "a"
    assert _install(path, v2, capsys=capsys)[0] == 0  # (a normal install repairs it: falls back, reinstalls)
    pointer = sd.read_pointer()
    rc, reply = _install(path, v3, "--shadow", capsys=capsys)
    assert rc == 0 and reply["shadow"] and reply["previous_slot"] is None and "no previous model" in reply["note"]
    slot_file = sd.slot_dir(reply["shadow_slot"]) / "bundle.ekb"
    mtime = slot_file.stat().st_mtime_ns
    rc, again = _install(path, v3, "--shadow", "--sha256", _sha(v3), capsys=capsys)  # a re-sent command
    assert rc == 0 and again["already_shadow"] and again["shadow_slot"] == reply["shadow_slot"]
    rc, again = _install(path, v3, "--shadow", capsys=capsys)  # unpinned: known at verify
    assert rc == 0 and again["already_shadow"]
    assert slot_file.stat().st_mtime_ns == mtime and sd.read_pointer()["slot"] == pointer["slot"]
