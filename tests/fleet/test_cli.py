"""`edgekit fleet ...` and `edgekit broker` from the command line, on real outputs."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(90)
runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def populated(fleet, fleet_tools):
    """A store with cam-1 (online, telemetry incl. one replayed window, an alert) and cam-2 (offline)."""
    body = fleet_tools.telemetry_body
    run = fleet.start_monitor()
    now = time.time()
    fleet.online("cam-1", seq=1, version="3.0")
    for seq in range(2, 8):
        fleet.publish("telemetry", "cam-1", seq, body(p99=4.0 + seq, psi=0.05 * seq), ts=now - 60 + seq)
    fleet.publish("telemetry", "cam-1", 9, body(p99=6.0, psi=0.1), ts=now - 50)
    fleet.publish("telemetry", "cam-1", 8, body(p99=7.0, psi=0.1), ts=now - 51, historical=True)
    fleet.publish("event", "cam-1", 10, {"type": "drift_alarm", "input": "x"}, ts=now - 49)
    fleet.online("cam-2", seq=1)
    fleet.publish("state", "cam-2", 2, {"status": "offline", "reason": "stopped"}, retain=True)
    fleet.wait_device("cam-1", lambda d: d["seq"] == 10)
    fleet.wait_device("cam-2", lambda d: d["status"] == "offline")
    run.stop()
    return fleet


def test_ls_show_history_json(populated):
    db = str(populated.db)
    devices = json.loads(_invoke("fleet", "ls", "--db", db, "--json"))
    assert [(d["device"], d["status"], d["model"]) for d in devices] == [("cam-1", "online", "digits 3.0"),
                                                                           ("cam-2", "offline", "digits 1.0")]
    assert devices[0]["figures"]["p99_ms"] == 6.0 and devices[0]["alerts"] == []  # drift came and went
    shown = json.loads(_invoke("fleet", "show", "cam-1", "--db", db, "--json"))
    assert shown["device"]["boot"] == 1 and shown["messages"] == {"state": 1, "telemetry": 8, "event": 1}
    assert [(a["kind"], a["closed"] is not None) for a in shown["alerts"]] == [("drift", True)]
    assert shown["gaps"] == []
    hist = json.loads(_invoke("fleet", "history", "cam-1", "--db", db, "--json", "--kind", "telemetry"))
    assert [r["seq"] for r in hist] == [2, 3, 4, 5, 6, 7, 8, 9]  # by device time: the replayed 8 before 9
    assert [r["historical"] for r in hist].count(True) == 1
    assert hist[0]["body"]["latency_ms"]["p99"] == 6.0
    recent = json.loads(_invoke("fleet", "history", "cam-1", "--db", db, "--json", "--since", "52s", "--kind",
                                "telemetry", "--kind", "event"))
    assert [(r["kind"], r["seq"]) for r in recent] == [("telemetry", 8), ("telemetry", 9), ("event", 10)]
    # the tables render too
    assert "cam-2" in _invoke("fleet", "ls", "--db", db)
    assert "drift" in _invoke("fleet", "show", "cam-1", "--db", db)
    assert "historical" in _invoke("fleet", "history", "cam-1", "--db", db)


def test_unknown_device_and_missing_store_are_clear_errors(populated, tmp_path):
    result = runner.invoke(app, ["fleet", "show", "cam1", "--db", str(populated.db)])
    assert result.exit_code == 2 and "not in" in result.output and "did you mean" in result.output and "'cam-1'" in result.output
    result = runner.invoke(app, ["fleet", "ls", "--db", str(tmp_path / "nope.db")])
    assert result.exit_code == 2 and "no fleet store" in result.output
    result = runner.invoke(app, ["fleet", "history", "cam-1", "--db", str(populated.db), "--since", "yesterday"])
    assert result.exit_code == 2 and "--since" in result.output


def test_plot_writes_a_png(populated, tmp_path):
    out = tmp_path / "plots" / "cam-1.png"
    result = json.loads(_invoke("fleet", "plot", "cam-1", "--db", str(populated.db), "--out", str(out), "--json",
                                "--p99-ms", "10"))
    assert result["windows"] == 8 and result["historical"] == 1 and result["with_drift"] == 8
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    result = runner.invoke(app, ["fleet", "plot", "cam-2", "--db", str(populated.db), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no telemetry" in result.output


def test_monitor_command_headless_with_bounds(fleet):
    """`edgekit fleet monitor` as a user runs it: its own process, bounded by message count."""
    fleet.online("cam-5", seq=1)  # retained: the monitor's first message
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "fleet", "monitor", "--broker", fleet.broker.url,
                             "--fleet", "f1", "--db", str(fleet.db), "--max-messages", "3", "--duration", "30",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def stored() -> bool:
            try:
                return fleet.db.exists() and bool(fleet.device("cam-5"))
            except sqlite3.OperationalError:  # the file exists a moment before the monitor creates its tables
                return False

        fleet.wait(stored, timeout=30, what="the monitor running")
        fleet.publish("telemetry", "cam-5", 2, {"window_s": 1, "inferences": 1})
        fleet.publish("telemetry", "cam-5", 3, {"window_s": 1, "inferences": 1})
        stdout, stderr = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["stored"] == 3 and summary["devices"] == 1 and summary["online"] == 1


def test_broker_print_config_has_raised_limits(tmp_path):
    text = _invoke("broker", "--port", "18999", "--dir", str(tmp_path / "b"), "--print-config")
    assert "max_queued_messages 1000000" in text and "max_inflight_messages 1000" in text
    assert "listener 18999 127.0.0.1" in text
    assert "listener 18999 127.0.0.1" in (tmp_path / "b" / "mosquitto.conf").read_text()


def test_broker_command_runs_mosquitto_in_the_foreground(tmp_path, mqtt_broker):
    # (mqtt_broker: skips where mosquitto is not installed)
    from edgekit.fleet.broker import free_port, port_open

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "broker", "--port", str(port), "--dir",
                             str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or port_open("127.0.0.1", port), 15, "mosquitto listening")
        assert proc.poll() is None, proc.stdout.read().decode()
        # the command became mosquitto (exec): a signal to it stops the broker itself
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not port_open("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait()


def test_show_says_what_the_devices_workloads_reported(fleet, fleet_tools):
    """serve/stream --report-dir → the agent's telemetry → the store → `fleet show`: a shadow candidate's
    agreement and a stream's dropped frames, from the latest telemetry."""
    workloads = {
        "serve-det": {"type": "serve", "route": "det", "model": {"version": "1.0.0"}, "requests": {"200": 120},
                      "stages": {"total": {"p50_ms": 4.0, "p99_ms": 9.5}},
                      "shadow": {"candidate": {"version": "2.0.0"}, "rows": 118,
                                 "agreement": {"top1": 0.975, "cosine": 0.998}, "latency_ms": {"ratio": 0.8}}},
        "stream": {"type": "stream_stats", "processed": 300, "dropped": 290, "drop_rate": 0.49,
                   "processed_fps": 15.2, "stages": {"inference": {"p50_ms": 61.0}}},
    }
    run = fleet.start_monitor()
    now = time.time()
    fleet.online("cam-9", seq=1)
    fleet.publish("telemetry", "cam-9", 2, fleet_tools.telemetry_body(), ts=now - 20)
    fleet.publish("telemetry", "cam-9", 3, fleet_tools.telemetry_body(workloads=workloads), ts=now - 10)
    fleet.wait_device("cam-9", lambda d: d["seq"] == 3)
    run.stop()
    db = str(fleet.db)
    shown = json.loads(_invoke("fleet", "show", "cam-9", "--db", db, "--json"))
    assert shown["workloads"]["serve-det"]["shadow"]["agreement"]["top1"] == 0.975
    text = _invoke("fleet", "show", "cam-9", "--db", db)
    assert "shadow 2.0.0 on 118 rows: top1 0.975" in text and "290 dropped (49%)" in text
