"""``edgekit-runtime serve`` on an agent's state directory: it follows the active slot across installs and
rollbacks without a failed request, and a slot that does not load never takes it down."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from edgekit_runtime.keyring import Keyring


def test_no_failed_request_across_an_ota_switch_and_a_rollback(agent_env, capsys, serve):
    """2,000 requests from 8 clients while the agent installs v2 and rolls back to v1: every one answered 200,
    and every answer is the output of the version its response names."""
    from edgekit_runtime.agent.cli import main as agent_cli

    config = agent_env.config_file()
    assert agent_cli(["install", str(agent_env.model_bundle("v1.ekb", release=1, scale=1.0)), "--config",
                      str(config)]) == 0
    server = serve(agent_env.tmp / "state-dev1", keyring=Keyring.from_paths(agent_env.keys), check_every_s=0.05)
    assert server.routes["matmul"].current.slot == "a"
    weights = {"1.0.0": agent_env.kit.WEIGHTS, "2.0.0": 2 * agent_env.kit.WEIGHTS}
    seen: list[str] = []
    failures: list[str] = []
    total = 2000
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        c = serve.Client(server)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            x = np.full((1, 4), i % 50, np.float32)
            status, doc, r = c.infer("matmul", x)
            version = doc.get("model_version") if isinstance(doc, dict) else None
            if status != 200 or version not in weights or r.getheader("Edgekit-Model-Version") != version \
                    or not np.array_equal(serve.y_of(doc), x @ weights[version]):
                failures.append(f"{i}: {status} {doc}")
            seen.append(version)
        c.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert agent_cli(["install", str(agent_env.model_bundle("v2.ekb", release=2)), "--config", str(config)]) == 0
    deadline = time.monotonic() + 20
    while "2.0.0" not in seen[-20:] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent_cli(["rollback", "--config", str(config)]) == 0
    for t in threads:
        t.join(120)
    capsys.readouterr()
    assert not failures, failures[:3]
    assert len(seen) == total and "2.0.0" in seen and seen[-1] == "1.0.0"
    first_v2, last_v2 = seen.index("2.0.0"), len(seen) - 1 - seen[::-1].index("2.0.0")
    assert "1.0.0" in seen[:first_v2] and "1.0.0" in seen[last_v2:]
    text = serve.Client(server).request("GET", "/metrics")[1].decode()
    assert 'edgekit_serve_model_switches_total{model="matmul"} 2' in text
    assert 'edgekit_serve_requests_total{model="matmul",code="200"} 2000' in text


def test_a_slot_that_does_not_load_keeps_the_old_model_serving(agent_env, serve, capsys):
    from edgekit_runtime.agent.cli import main as agent_cli
    from edgekit_runtime.agent.state import StateDir

    config = agent_env.config_file()
    assert agent_cli(["install", str(agent_env.model_bundle("v1.ekb", release=1, scale=1.0)), "--config",
                      str(config)]) == 0
    server = serve(agent_env.tmp / "state-dev1", keyring=Keyring.from_paths(agent_env.keys), check_every_s=0.05)
    sd = StateDir(agent_env.tmp / "state-dev1")
    # a switch to a slot whose bundle is damaged on disk (the agent would refuse it; the server must survive it)
    (sd.slot_dir("b")).mkdir(parents=True, exist_ok=True)
    (sd.slot_dir("b") / "bundle.ekb").write_bytes(b"PK\x03\x04 damaged")
    pointer = json.loads(sd.active_file.read_text())
    sd.active_file.write_text(json.dumps({**pointer, "slot": "b", "previous": "a", "at": time.time()}))
    deadline = time.monotonic() + 10
    text = ""
    while "load_failures_total{model=\"matmul\"} 1" not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = serve.Client(server).request("GET", "/metrics")[1].decode()
    assert 'edgekit_serve_model_load_failures_total{model="matmul"} 1' in text
    status, doc, _ = serve.Client(server).infer("matmul", np.ones((1, 4), np.float32))
    assert status == 200 and doc["model_version"] == "1.0.0"
    capsys.readouterr()


def test_a_shadow_install_runs_beside_the_active_model_until_it_is_promoted(agent_env, capsys, serve, tmp_path):
    """`edgekit-agent install --shadow`: the idle slot gets the candidate, the pointer does not move; the server
    on the state directory runs it in shadow and reports; rollback refuses the shadow slot; a plain install of
    the same bundle promotes it, and the shadow ends."""
    from edgekit_runtime.agent.cli import main as agent_cli
    from edgekit_runtime.agent.state import StateDir

    def agent(*args):
        rc = agent_cli([*args, "--config", str(config), "--json"])
        return rc, json.loads(capsys.readouterr().out)

    config = agent_env.config_file()
    v1, v2 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0), agent_env.model_bundle("v2.ekb", release=2)
    v3 = agent_env.model_bundle("v3.ekb", release=3, scale=3.0)
    assert agent("install", str(v1))[0] == 0
    rc, reply = agent("install", str(v2), "--shadow")
    assert rc == 0 and reply["shadow"] and reply["slot"] == "a" and reply["shadow_slot"] == "b"
    sd = StateDir(agent_env.tmp / "state-dev1")
    assert sd.read_pointer()["slot"] == "a" and sd.read_slot("b")["state"] == "shadow"
    assert sd.read_shadow()["sha256"] == reply["sha256"]
    rc, reply = agent("install", str(v1), "--shadow")
    assert rc == 3 and "nothing to shadow" in reply["error"]["message"]  # the active bundle itself
    assert agent("install", str(v2))[0] == 0  # promotes v2 (it was the shadow): slot b active, no shadow left
    assert sd.read_pointer()["slot"] == "b" and sd.read_shadow() is None
    rc, reply = agent("install", str(v3), "--shadow")
    assert rc == 0 and reply["shadow"] and reply["shadow_slot"] == "a" and sd.read_pointer()["slot"] == "b"
    server = serve(agent_env.tmp / "state-dev1", keyring=Keyring.from_paths(agent_env.keys), check_every_s=0.05,
                   shadow_report=tmp_path / "shadow.json")
    c = serve.Client(server)
    x = np.ones((1, 4), np.float32)
    deadline = time.monotonic() + 10
    while server.batchers["matmul"].shadow is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(20):
        status, doc, _ = c.infer("matmul", x)
        assert status == 200 and doc["model_version"] == "2.0.0"
        assert np.allclose(serve.y_of(doc), x @ (2 * agent_env.kit.WEIGHTS))  # never the candidate's answer
    deadline = time.monotonic() + 10
    report = {}
    while report.get("rows", 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        report = c.request("GET", "/v2/models/matmul/shadow")[1]
    assert report["candidate"]["version"] == "3.0.0" and report["served"]["version"] == "2.0.0"
    assert report["agreement"]["cosine"] == pytest.approx(1.0) and report["agreement"]["top1"] == 1.0
    rc, reply = agent("rollback")
    assert rc == 3 and "shadow candidate" in reply["error"]["message"]
    assert agent("install", str(v3))[0] == 0  # promote: the server switches to v3 and the shadow ends
    deadline = time.monotonic() + 10
    while (server.routes["matmul"].current.version != "3.0.0" or server.batchers["matmul"].shadow is not None) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.routes["matmul"].current.version == "3.0.0" and server.batchers["matmul"].shadow is None
    assert c.request("GET", "/v2/models/matmul/shadow")[0] == 404
