"""The agent as the process systemd runs: `python -m edgekit_runtime.agent.cli run --config F`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from edgekit_runtime.agent.cli import main as agent_cli


def _states(sub):
    return [m for m in sub.of("state")]


def test_kill_restart_boot_counter_last_will_and_spool_replay(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file(keepalive_s=2, telemetry_interval_s=0.2)
    agent_env.install(path)

    # boot 1: a clean stop (SIGTERM) publishes a retained "offline" itself
    p1 = agent_env.spawn(path)
    sub.wait(lambda s: [m for m in _states(s) if m["boot"] == 1 and m["body"]["status"] == "online"], timeout=20,
             what="boot 1 online")
    p1.send_signal(signal.SIGTERM)
    assert p1.wait(timeout=15) == 0, agent_env.log_of(p1)
    off1 = sub.wait(lambda s: [m for m in _states(s) if m["boot"] == 1 and m["body"]["status"] == "offline"],
                    what="boot 1 offline")[0]
    assert off1["seq"] > 0 and off1["body"]["reason"] == "stopped"

    # boot 2: SIGKILL -> the broker publishes the last will: offline, boot 2, seq 0
    p2 = agent_env.spawn(path)
    online2 = sub.wait(lambda s: [m for m in _states(s) if m["boot"] == 2 and m["body"]["status"] == "online"],
                       timeout=20, what="boot 2 online")[0]
    assert online2["body"]["model"]["name"] == "golden-matmul"
    sub.wait(lambda s: [t for t in s.of("telemetry") if t["boot"] == 2], what="boot 2 telemetry")
    p2.kill()
    killed_at = time.monotonic()
    p2.wait()
    will = sub.wait(lambda s: [m for m in _states(s) if m["boot"] == 2 and m["body"]["status"] == "offline"],
                    timeout=2 * 1.5 + 2, what="last will")[0]
    assert time.monotonic() - killed_at < 2 * 1.5 + 2
    # the will names the connection it was armed for: the one whose "online" came before it
    assert will["seq"] == 0 and will["body"] == {"status": "offline", "connection": online2["body"]["connection"]}
    assert online2["body"]["connection"] == 1
    assert agent_env.fresh_state(broker, "edgekit/v1/f1/dev1/state")["body"]["status"] == "offline"

    # boot 3: the counter survived the kill; the retained state is online again, newer than the will
    out = subprocess.run([sys.executable, "-m", "edgekit_runtime.agent.cli", "status", "--config", str(path), "--json"],
                         capture_output=True, text=True, timeout=30)
    st = json.loads(out.stdout)
    assert st["boot"] == 2 and st["running"] is False and st["model"]["name"] == "golden-matmul"
    p3 = agent_env.spawn(path)
    sub.wait(lambda s: [m for m in _states(s) if m["boot"] == 3 and m["body"]["status"] == "online"], timeout=20,
             what="boot 3 online")
    retained = agent_env.fresh_state(broker, "edgekit/v1/f1/dev1/state")
    assert retained["body"]["status"] == "online" and retained["boot"] == 3
    running = json.loads(subprocess.run([sys.executable, "-m", "edgekit_runtime.agent.cli", "status", "--config",
                                         str(path), "--json"], capture_output=True, text=True, timeout=30).stdout)
    assert running["running"] and running["agent"]["boot"] == 3 and running["agent"]["state"] == "online"
    p3.send_signal(signal.SIGTERM)
    assert p3.wait(timeout=15) == 0, agent_env.log_of(p3)
    # every boot's messages were (boot, seq)-unique and none carried a foreign boot
    assert {m["boot"] for m in sub.of("telemetry")} == {1, 2, 3}


def test_spool_left_by_a_crash_is_sent_by_the_next_boot(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file(broker_url="mqtt://127.0.0.1:9", telemetry_interval_s=0.1)  # nobody there
    p = agent_env.spawn(path)
    agent_env.wait_until(lambda: (agent_env.tmp / "state-dev1" / "agent.json").exists()
                         and json.loads((agent_env.tmp / "state-dev1" / "agent.json").read_text()).get("seq", 0) >= 3,
                         timeout=20, what="telemetry spooled by an agent that cannot connect")
    p.kill()
    p.wait()
    path.write_text(json.dumps(agent_env.settings(telemetry_interval_s=0.1)))  # now the broker is reachable
    p2 = agent_env.spawn(path)
    old = sub.wait(lambda s: [t for t in s.of("telemetry") if t["boot"] == 1], timeout=20, what="boot 1 replay")
    assert all(t["historical"] for t in old)
    sub.wait(lambda s: [t for t in s.of("telemetry") if t["boot"] == 2 and not t["historical"]], what="live boot 2")
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(timeout=15) == 0
    seqs = sorted({t["seq"] for t in sub.of("telemetry") if t["boot"] == 1})
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3


def test_install_verifies_and_refuses(agent_env, kit, key2, capsys):
    path = agent_env.config_file()
    untrusted = kit.write("untrusted.ekb", key=key2)
    assert agent_cli(["install", str(untrusted), "--config", str(path)]) == 3
    assert "E104" in capsys.readouterr().err
    assert not (agent_env.tmp / "state-dev1" / "active").exists()  # nothing was placed

    manifest, members = kit.parts()
    manifest["model"]["release"] = 5
    newer = kit.write("r5.ekb", manifest=manifest, members=members)
    assert agent_cli(["install", str(newer), "--config", str(path), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["slot"] == "a" and done["health"]["ok"] and done["model"]["release"] == 5
    assert agent_cli(["install", str(kit.write("r1.ekb")), "--config", str(path)]) == 3
    assert "--allow-downgrade" in capsys.readouterr().err
    assert agent_cli(["install", str(kit.write("r1.ekb")), "--config", str(path), "--allow-downgrade"]) == 0
    capsys.readouterr()
    assert agent_cli(["status", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "matmul 1.0.0 (slot b)" in text and "running    no" in text  # the downgrade went to the idle slot


def test_the_agent_imports_no_host_package(agent_env):
    # the whole agent, daemon and MQTT side included (the package imports its parts on first use)
    code = ("import sys, edgekit_runtime.agent.cli, edgekit_runtime.agent.daemon, edgekit_runtime.agent as a; "
            "from edgekit_runtime.agent import AgentConfig; "
            f"c = a.AgentCore(AgentConfig.load({str(agent_env.config_file())!r}), system_stats=True); c.tick(); "
            "c.close(); print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=agent_env.tmp)
    assert out.returncode == 0, out.stderr
    modules = out.stdout.split()
    assert "paho.mqtt.client" in modules and "sqlite3" in modules
    assert not [m for m in modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "nncf", "edgekit")]


def test_bad_config_exits_3_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "d"\nfleet = "f"\nbroker_url = "mqtt://h"\nstate_dir = "s"\nspool_polcy = "x"\n')
    assert agent_cli(["run", "--config", str(bad)]) == 3
    assert "did you mean 'spool_policy'" in capsys.readouterr().err
