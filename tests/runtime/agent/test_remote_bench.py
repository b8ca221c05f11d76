"""`edgekit bench BUNDLE --device D`: the agent runs the benchmark and the host shows it like a local run."""

from __future__ import annotations

import json
import subprocess
import sys


def _shape(value):
    """The structure of a result: keys (recursively) and value types, not the figures."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _bench(agent_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit.cli", "bench", *args, "--queries", "30", "--seconds",
                           "0.2", "--batch", "4"], capture_output=True, text=True, timeout=180, cwd=agent_env.tmp)


def test_remote_bench_matches_a_local_run(agent_env, broker, subscriber):
    sub = subscriber()
    path = agent_env.config_file()
    v1 = agent_env.model_bundle("v1.ekb", release=1, scale=1.0)
    agent_env.install(path, v1)
    proc = agent_env.spawn(path)
    sub.wait(lambda s: [m for m in s.of("state") if m["body"]["status"] == "online"], timeout=30, what="online")

    remote = _bench(agent_env, str(v1), "--device", "dev1", "--fleet", "f1", "--broker", broker.url, "--json")
    assert remote.returncode == 0, remote.stderr
    local = _bench(agent_env, str(v1), "--keyring", str(agent_env.keys), "--json")
    assert local.returncode == 0, local.stderr
    r, l = json.loads(remote.stdout), json.loads(local.stdout)
    assert r.pop("device")["device"] == "dev1"
    assert _shape(r) == _shape(l)  # the same fields, the same kinds of values
    assert r["single_stream"]["inference"]["count"] >= 30 and r["offline"]["batch"] == 4
    assert r["system"]["model"]["model"] == l["system"]["model"]["model"]  # the same model, measured there
    assert r["system"]["model"]["engine"] == l["system"]["model"]["engine"] == "onnxruntime"
    # the device measured its own memory for the bundle it runs (a child process there, as here)
    assert 0 < r["memory"]["baseline_mib"] <= r["memory"]["after_load_mib"] <= r["memory"]["peak_mib"]

    # the human-readable form is the local one's table
    shown = _bench(agent_env, str(v1), "--device", "dev1", "--fleet", "f1", "--broker", broker.url)
    assert shown.returncode == 0 and "p99 ms" in shown.stdout and "measured on f1/dev1" in shown.stdout

    # a bundle the device does not run is refused before anything is sent
    other = agent_env.model_bundle("v2.ekb", release=2)
    wrong = _bench(agent_env, str(other), "--device", "dev1", "--fleet", "f1", "--broker", broker.url)
    assert wrong.returncode != 0 and "flash it first" in wrong.stderr
    proc.terminate()
    assert proc.wait(timeout=20) == 0
