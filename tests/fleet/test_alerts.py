"""Alerts out: webhooks to a real local HTTP server, the MQTT alert topic on a real Mosquitto, and a real monitor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.fleet.alerts import (AlertDispatcher, MqttAlertSink, WebhookSink, alert_filter, alert_id,
                                  alert_topic)
from edgekit.fleet.connection import BrokerSettings
from edgekit.fleet.tracker import FleetTracker, Thresholds
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- a webhook receiver
class Receiver:
    """A real HTTP server in a thread; answers ``statuses`` in turn (then 200) and records every request."""

    def __init__(self, statuses: tuple[int, ...] = ()):
        self.statuses = list(statuses)
        self.requests: list[dict[str, Any]] = []  # every attempt: status answered, headers, body
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append({"status": status, "headers": dict(self.headers),
                                              "body": json.loads(body), "path": self.path})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-path"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies answered with 2xx, in order."""
        with self.lock:
            return [r["body"] for r in self.requests if 200 <= r["status"] < 300]

    def events(self) -> list[tuple[str, str, str]]:
        return [(b["event"], b["device"], b["kind"]) for b in self.delivered()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: tuple[int, ...] = ()) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def dispatchers():
    made: list[AlertDispatcher] = []

    def make(*sinks, monitor: str = "mon-test") -> AlertDispatcher:
        d = AlertDispatcher(sinks, monitor)
        d.start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close(1.0)


# ----------------------------------------------------------------------------- tracker rows
class Rows:
    """Rows as the store's tail gives them to the tracker (store.TAIL_COLUMNS + payload)."""

    def __init__(self):
        self.id = 0
        self.seq: dict[str, int] = {}

    def _row(self, device: str, kind: str, body: dict, boot: int = 1, p99=None, calls=None, errors=None,
             psi=None) -> tuple:
        self.id += 1
        seq = self.seq[device] = self.seq.get(device, 0) + 1
        now = time.time()
        return (self.id, "f1", device, kind, boot, seq, now, now, False, False, p99 and p99 / 2, p99, calls,
                calls, errors, None, None, psi, json.dumps({"body": body}))

    def state(self, device: str, status: str, boot: int = 1) -> tuple:
        return self._row(device, "state", {"status": status}, boot)

    def telemetry(self, device: str, p99: float, calls: int = 50, errors: int = 0, psi: float = 0.01) -> tuple:
        return self._row(device, "telemetry", {"window_s": 1, "inferences": calls}, p99=p99, calls=calls,
                         errors=errors, psi=psi)


def tracked(dispatcher: AlertDispatcher, **thresholds: Any) -> FleetTracker:
    tracker = FleetTracker(Thresholds(**thresholds))
    tracker.listeners.append(dispatcher.listener)
    return tracker


# ----------------------------------------------------------------------------- webhook
def test_webhook_opened_once_and_resolved_once(receiver, dispatchers):
    r = receiver()
    d = dispatchers(WebhookSink(r.url, token="s3cret", backoff_s=0.01))
    tracker, rows = tracked(d, p99_ms=100.0), Rows()
    tracker.consume([rows.state("cam-1", "online"), rows.telemetry("cam-1", p99=150.0)])
    tracker.consume([rows.telemetry("cam-1", p99=180.0), rows.telemetry("cam-1", p99=250.0)])  # still open
    assert d.flush(5)
    assert r.events() == [("opened", "cam-1", "p99")]  # a new value of an open alert is not a new alert
    assert tracker.devices[("f1", "cam-1")].alerts["p99"]["value"] == 250.0
    tracker.consume([rows.telemetry("cam-1", p99=20.0), rows.telemetry("cam-1", p99=30.0)])  # cleared, stays so
    tracker.consume([rows.state("cam-1", "offline"), rows.state("cam-1", "online")])
    assert d.flush(5)
    assert r.events() == [("opened", "cam-1", "p99"), ("resolved", "cam-1", "p99"),
                          ("opened", "cam-1", "offline"), ("resolved", "cam-1", "offline")]
    opened, resolved = r.delivered()[:2]
    assert opened["value"] == 150.0 and opened["threshold"] == 100.0 and opened["closed"] is None
    assert opened["id"] == resolved["id"] == alert_id("f1", "cam-1", "p99", opened["opened"])
    assert resolved["closed"] >= resolved["opened"] and resolved["monitor"] == "mon-test"
    assert "p99 150.0 ms > budget 100 ms" in opened["message"] and opened["schema"] == 1
    first = r.requests[0]
    assert first["headers"]["Authorization"] == "Bearer s3cret" and first["path"] == "/hooks/secret-path"
    assert first["headers"]["Idempotency-Key"] == f"{opened['id']}:opened"
    assert d.stats() == [{"sink": d.sinks[0].name, "delivered": 4, "retries": 0, "failed": 0, "overflow": 0,
                          "abandoned": 0}]
    assert "secret-path" not in d.sinks[0].name  # webhook URLs carry secrets: only scheme and host are shown


def test_webhook_retries_after_500_then_succeeds_and_does_not_retry_a_refusal(receiver, dispatchers):
    r = receiver(statuses=(500, 503))
    sink = WebhookSink(r.url, backoff_s=0.05, retries=3)
    d = dispatchers(sink)
    tracker, rows = tracked(d), Rows()
    tracker.consume([rows.state("cam-2", "online"), rows.state("cam-2", "offline")])
    assert d.flush(10)
    assert [q["status"] for q in r.requests] == [500, 503, 200]
    assert r.events() == [("opened", "cam-2", "offline")]
    assert len({q["headers"]["Idempotency-Key"] for q in r.requests}) == 1  # the receiver can de-duplicate retries
    assert (sink.stats.delivered, sink.stats.retries, sink.stats.failed) == (1, 2, 0)

    r.statuses = [401]  # a refusal is not retried: another attempt would be refused the same way
    tracker.consume([rows.state("cam-2", "online")])
    assert d.flush(10)
    assert [q["status"] for q in r.requests] == [500, 503, 200, 401]
    assert (sink.stats.delivered, sink.stats.failed) == (1, 1)


def test_receiver_down_overflows_the_queue_without_blocking_the_tracker(dispatchers):
    # "down" the worst way: the port accepts connections (the kernel's backlog) but nobody ever answers
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(1024)
    try:
        sink = WebhookSink(f"http://127.0.0.1:{blackhole.getsockname()[1]}/", timeout=2.0, queue_size=10,
                           retries=0)
        d = dispatchers(sink)
        tracker, rows = tracked(d), Rows()
        batch = [row for i in range(500) for row in (rows.state(f"d{i}", "online"), rows.state(f"d{i}", "offline"))]
        t0 = time.perf_counter()
        tracker.consume(batch)
        took = time.perf_counter() - t0
        # 500 alerts against a 2 s timeout each: blocking would take minutes; queueing takes milliseconds
        assert took < 1.0, took
        assert sum(len(dev.alerts) for dev in tracker.devices.values()) == 500
        assert 500 - 11 <= sink.stats.overflow <= 500 - 10  # (one may already be in flight)
        t0 = time.monotonic()
        d.close(0.2)
        assert time.monotonic() - t0 < 2.0 + 1.0  # the one in flight ends at its timeout; the rest are abandoned
        s = sink.stats
        assert s.delivered == 0 and s.overflow + s.abandoned + s.failed == 500, vars(s)
    finally:
        blackhole.close()


# ----------------------------------------------------------------------------- MQTT
class Subscriber:
    """A paho client recording (topic, payload, retain) of every message, in order."""

    def __init__(self, helper, name: str, filter_: str):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = helper.client(name, connect=False)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(filter_, qos=1)
        self.client.connect(helper.broker.host, helper.broker.port, keepalive=10)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, 10, f"{name} subscribed")

    def wait(self, n: int, what: str) -> list[tuple[str, bytes, bool]]:
        wait_until(lambda: len(self.messages) >= n, 10, what)
        return self.messages[:n]


def nothing_retained(helper, topic: str, name: str) -> bool:
    """True when ``topic`` has no retained message: a new subscriber's first message is a marker sent after it."""
    sub = Subscriber(helper, name, topic)
    helper.raw(topic, b"marker")
    (first,) = sub.wait(1, "the marker")
    sub.client.loop_stop()
    sub.client.disconnect()
    return first == (topic, b"marker", False)


def test_mqtt_open_alert_is_retained_and_the_resolution_clears_it(fleet, dispatchers):
    sink = MqttAlertSink(fleet.settings, "alerts-test", fleet="f1")
    d = dispatchers(sink)
    tracker, rows = tracked(d, drift_psi=0.2), Rows()
    tracker.consume([rows.state("cam-3", "online"), rows.telemetry("cam-3", p99=5.0, psi=0.5)])
    tracker.consume([rows.telemetry("cam-3", p99=5.0, psi=0.7)])  # still open: nothing new on the topic
    assert d.flush(10)
    topic = alert_topic("f1", "cam-3", "drift")
    assert topic == "edgekit/v1/f1/alerts/cam-3/drift"
    late = Subscriber(fleet, "late-subscriber", alert_filter("f1"))  # subscribed after the alert opened
    (retained,) = late.wait(1, "the retained open alert")
    assert retained[0] == topic and retained[2] is True
    opened = json.loads(retained[1])
    assert (opened["event"], opened["kind"], opened["value"], opened["threshold"]) == ("opened", "drift", 0.5, 0.2)

    tracker.consume([rows.telemetry("cam-3", p99=5.0, psi=0.05)])
    assert d.flush(10)
    _, resolved, cleared = late.wait(3, "the resolution and the cleared retained copy")
    assert resolved[2] is False and json.loads(resolved[1])["event"] == "resolved"
    assert json.loads(resolved[1])["id"] == opened["id"]
    assert cleared == (topic, b"", False)  # the empty retained message, as a live subscriber receives it
    assert nothing_retained(fleet, topic, "later-subscriber")
    assert [m for m in late.messages if m[1] != b"marker"] == late.messages[:3]  # nothing else was published
    assert sink.stats.delivered == 2 and sink.stats.failed == 0


def test_restart_sends_nothing_new_and_reconciles_the_retained_alerts(fleet, receiver, dispatchers):
    """After a restart: open alerts from the store are not sent again; the broker's retained copies are made
    to match them (a stale one cleared, a missing one restored); closing a restored alert is sent once."""
    stale = alert_topic("f1", "gone", "p99")
    fleet.raw(stale, json.dumps({"event": "opened", "id": "f1/gone/p99/1"}).encode(), retain=True)
    r = receiver()
    d = dispatchers(WebhookSink(r.url, backoff_s=0.01), MqttAlertSink(fleet.settings, "alerts-restart", fleet="f1"))
    restored = {"fleet": "f1", "device": "cam-4", "kind": "offline", "value": None, "threshold": None,
                "message": "cam-4 went offline (last will), boot 1", "opened": 1_764_000_000.25, "closed": None}
    d.restored([restored])
    assert d.flush(15)
    assert nothing_retained(fleet, stale, "check-stale")
    sub = Subscriber(fleet, "check-restored", alert_filter("f1"))
    (copy,) = sub.wait(1, "the restored retained alert")
    assert copy[0] == alert_topic("f1", "cam-4", "offline") and copy[2] is True
    assert json.loads(copy[1])["id"] == alert_id("f1", "cam-4", "offline", restored["opened"])
    d.listener({"event": "opened", **restored})  # e.g. upstream reports it again: known, dropped
    d.listener({"event": "closed", **restored, "closed": restored["opened"] + 60})
    assert d.flush(10)
    assert r.events() == [("resolved", "cam-4", "offline")] and d.duplicates == 1
    assert r.delivered()[0]["id"] == json.loads(copy[1])["id"]


# ----------------------------------------------------------------------------- end to end
SIMULATED_DEVICE = """
import sys
from pathlib import Path
from edgekit.fleet.simulate import SimulatedFleet, SimulationPlan
from edgekit.fleet.connection import BrokerSettings
sim = SimulatedFleet(BrokerSettings(host=sys.argv[1], port=int(sys.argv[2])),
                     SimulationPlan(fleet="f1", devices=1, rate=4, duration_s=120, device_prefix="cam",
                                    state_dir=Path(sys.argv[3]), keepalive_s=2))
sim.start()
print("up", flush=True)
sim.run()
"""


def _device(fleet, state_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SIMULATED_DEVICE, fleet.broker.host, str(fleet.broker.port),
                             str(state_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_monitor_sends_a_killed_devices_offline_alert_to_both_sinks_and_resolves_it(fleet, receiver, dispatchers,
                                                                                    tmp_path):
    r = receiver()
    d = dispatchers(WebhookSink(r.url, backoff_s=0.05), MqttAlertSink(fleet.settings, "alerts-e2e", fleet="f1"))
    sub = Subscriber(fleet, "alert-watcher", alert_filter("f1"))
    fleet.start_monitor(alert_listeners=[d.listener])
    state = tmp_path / "device-state"
    proc = _device(fleet, state)
    try:
        first = fleet.wait_device("cam0000", lambda x: x["status"] == "online" and x["seq"] > 2, timeout=20,
                                  what="cam0000 online and reporting")
        os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker publishes the device's last will
        proc.wait(10)
        wait_until(lambda: r.events(), 15, "the offline alert at the webhook")
        assert r.events() == [("opened", "cam0000", "offline")]
        opened = r.delivered()[0]
        assert "last will" in opened["message"] and opened["monitor"] == "mon-test"
        (live,) = sub.wait(1, "the offline alert on the alert topic")
        assert live[0] == alert_topic("f1", "cam0000", "offline") and json.loads(live[1])["id"] == opened["id"]

        proc = _device(fleet, state)  # the device comes back (its next boot)
        fleet.wait_device("cam0000", lambda x: x["status"] == "online" and x["boot"] > first["boot"], timeout=20,
                          what="cam0000 back online")
        wait_until(lambda: len(r.events()) == 2, 15, "the resolution at the webhook")
        # (checked while the device runs: killing it at the end opens the next offline alert)
        assert r.events() == [("opened", "cam0000", "offline"), ("resolved", "cam0000", "offline")]
        assert r.delivered()[1]["id"] == opened["id"]
        _, resolved, cleared = sub.wait(3, "the resolution on the alert topic")
        assert json.loads(resolved[1])["event"] == "resolved" and cleared[1] == b""
        fleet.wait(lambda: fleet.query(lambda s: [(a["kind"], a["closed"] is not None)
                                                  for a in s.alerts("f1", "cam0000")]) == [("offline", True)],
                   what="the store's alert closed too")
    finally:
        proc.kill()
        proc.wait(10)


def test_monitor_command_alert_flags(fleet, receiver):
    """`edgekit fleet monitor --alert-webhook URL --alert-topic` as a user runs it (bounded, --json)."""
    r = receiver()
    fleet.online("cam-6", seq=1)
    fleet.publish("state", "cam-6", 2, {"status": "offline", "reason": "stopped"}, retain=True)
    env = {**os.environ, "EDGEKIT_ALERT_TOKEN": "from-env"}
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "fleet", "monitor", "--broker", fleet.broker.url,
                           "--fleet", "f1", "--db", str(fleet.db), "--duration", "2", "--json",
                           "--alert-webhook", r.url, "--alert-webhook", r.url + "-2", "--alert-topic"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [a["kind"] for a in summary["alerts_open"]] == ["offline"]
    assert sorted(r["path"] for r in r.requests) == ["/hooks/secret-path", "/hooks/secret-path-2"]
    assert {q["headers"]["Authorization"] for q in r.requests} == {"Bearer from-env"}
    sinks = summary["alert_sinks"]
    assert [s["sink"].split()[0] for s in sinks] == ["webhook", "webhook", "mqtt"]
    assert all(s["delivered"] == 1 and s["failed"] == 0 and s["abandoned"] == 0 for s in sinks), sinks
    assert not nothing_retained(fleet, alert_topic("f1", "cam-6", "offline"), "check-cli")
    # headless, each alert is also said on stderr as it opens (the JSON on stdout stays one document)
    assert "alert opened: cam-6 went offline (stopped)" in proc.stderr, proc.stderr


def test_alert_flags_refuse_what_cannot_work():
    runner = CliRunner()
    bad = runner.invoke(app, ["fleet", "monitor", "--alert-webhook", "ftp://example.org/x", "--duration", "1"])
    assert bad.exit_code == 2 and "http:// or https://" in bad.output
    lone = runner.invoke(app, ["fleet", "monitor", "--alert-webhook-token", "t", "--duration", "1"])
    assert lone.exit_code == 2 and "--alert-webhook" in lone.output


def _publish_one_alert(settings: BrokerSettings, client_id: str) -> MqttAlertSink:
    sink = MqttAlertSink(settings, client_id, fleet="f1", backoff_s=0.01)
    d = AlertDispatcher([sink], client_id)
    d.start()
    try:
        d.listener({"event": "opened", "fleet": "f1", "device": "dev-a", "kind": "offline", "value": None,
                    "threshold": None, "message": "dev-a went offline", "opened": time.time(), "closed": None})
        assert d.flush(15)
    finally:
        d.close(1.0)
    return sink


def test_the_shipped_acl_lets_the_monitor_publish_alerts_and_refuses_devices(firmware_broker, caplog):
    """firmware/mosquitto's ACL lets the monitor account write alerts; a device account may not forge one: the
    refusal (PUBACK 0x87) is reported with the ACL line that grants it, and never retried."""
    monitor = _publish_one_alert(BrokerSettings(host=firmware_broker.host, port=firmware_broker.port,
                                                username="edgekit-monitor",
                                                password=firmware_broker.users["edgekit-monitor"]), "alerts-acl-mon")
    assert (monitor.stats.delivered, monitor.stats.failed) == (1, 0)
    device = _publish_one_alert(BrokerSettings(host=firmware_broker.host, port=firmware_broker.port,
                                               username="dev-a", password=firmware_broker.users["dev-a"]),
                                "alerts-acl-dev")
    assert (device.stats.delivered, device.stats.failed, device.stats.retries) == (0, 1, 0)
    assert "topic write edgekit/v1/+/alerts/#" in caplog.text and "not authorized" in caplog.text.lower()
