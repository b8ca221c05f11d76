"""Helpers for the fleet tests: a publisher of envelopes, a monitor running in the background, polling.

pytest runs with ``--import-mode=importlib``: tests reach these through the
``fleet`` fixture (``fleet.publish``, ``fleet.start_monitor``, ``fleet.wait``...).
Every wait polls with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from edgekit.fleet.connection import BrokerSettings
from edgekit.fleet.monitor import Monitor, MonitorOptions
from edgekit.fleet.store import FleetStore
from edgekit.fleet.tracker import Thresholds
from edgekit_runtime.contract import fleet_protocol as fp

from tests.polling import wait_until

REPO = Path(__file__).resolve().parents[2]


def telemetry_body(p99: float = 5.0, psi: Optional[float] = 0.01, errors: int = 0, calls: int = 50,
                   **extra: Any) -> dict[str, Any]:
    """A telemetry body in the agent's layout (latency_ms, errors, drift.inputs.<name>.psi, system)."""
    body: dict[str, Any] = {"window_s": 1.0, "inferences": calls - errors, "calls": calls, "errors": errors,
                            "latency_ms": {"count": calls - errors, "p50": p99 / 2, "p99": p99},
                            "system": {"cpu_percent": 12.5, "temperature_c": {"cpu-thermal": 48.0, "gpu": 51.5}}}
    if psi is not None:
        body["drift"] = {"available": True, "inputs": {"x": {"psi": psi, "judged": True}}}
    body.update(extra)
    return body


class RunningMonitor:
    """A :class:`Monitor` whose ``run()`` loop is in a background thread."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.summary: Optional[dict] = None
        self.error: Optional[BaseException] = None
        monitor.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.monitor.run()
        except BaseException as exc:  # re-raised in the test thread by stop()/check()
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> dict:
        self.monitor.stop()
        self.thread.join(30)
        self.check()
        return self.summary


class FleetHelper:
    def __init__(self, broker, tmp_path: Path):
        self.broker = broker
        self.tmp_path = tmp_path
        self.db = tmp_path / "fleet.db"
        self.settings = BrokerSettings(host=broker.host, port=broker.port, keepalive=10)
        self._monitors: list[RunningMonitor] = []
        self._clients: list[Any] = []
        self._pub = None

    # -- publishing ----------------------------------------------------------------------
    def client(self, client_id: str, username: Optional[str] = None, password: Optional[str] = None,
               port: Optional[int] = None, will: Optional[tuple[str, bytes]] = None, tls=None, connect=True):
        """A connected paho v5 client (loop running)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        if connect:
            c.connect(self.broker.host, port or self.broker.port, keepalive=10)
            c.loop_start()
            wait_until(connected.is_set, 10, f"{client_id} to connect")
        self._clients.append(c)
        return c

    def publish(self, kind: str, device: str, seq: int, body: dict, *, boot: int = 1, fleet: str = "f1",
                retain: bool = False, historical: bool = False, ts: Optional[float] = None) -> dict:
        msg = fp.envelope(kind, fleet, device, boot, seq, body, ts=ts, historical=historical)
        self.raw(fp.topic(fleet, device, kind), fp.encode(msg), retain=retain)
        return msg

    def raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self._pub is None:
            self._pub = self.client("test-publisher")
        info = self._pub.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def online(self, device: str, *, boot: int = 1, seq: int = 1, fleet: str = "f1", version: str = "1.0") -> dict:
        return self.publish("state", device, seq, {"status": "online", "model": {"name": "digits",
                                                                              "version": version}},
                            boot=boot, fleet=fleet, retain=True)

    # -- monitor -------------------------------------------------------------------------
    def start_monitor(self, *, fleet: str = "f1", workers: int = 0, thresholds: Optional[Thresholds] = None,
                      **options: Any) -> RunningMonitor:
        opts = MonitorOptions(fleet=fleet, workers=workers, tick_s=0.05, persist_every_s=0.05,
                              thresholds=thresholds or Thresholds(gap_grace_s=0.3), **options)
        m = RunningMonitor(Monitor(self.settings, self.db, opts))
        self._monitors.append(m)
        return m

    def store(self) -> FleetStore:
        return FleetStore(self.db, create=False, readonly=True)

    def query(self, fn: Callable[[FleetStore], Any]) -> Any:
        with self.store() as s:
            return fn(s)

    def device(self, name: str, fleet: str = "f1") -> Optional[dict]:
        return self.query(lambda s: next((d for d in s.devices(fleet) if d["device"] == name), None))

    def wait_device(self, name: str, predicate: Callable[[dict], Any], timeout: float = 10.0, what: str = "",
                    fleet: str = "f1") -> dict:
        return self.wait(lambda: (lambda d: d if d and predicate(d) else None)(self.device(name, fleet)), timeout,
                         what or f"device {name}")

    def wait(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        def check():
            for m in self._monitors:
                m.check()
            return predicate()

        return wait_until(check, timeout, what)

    def close(self) -> None:
        for m in self._monitors:
            m.monitor.stop()
        for m in self._monitors:
            m.thread.join(30)
        for c in self._clients:
            c.loop_stop()
            c.disconnect()


@pytest.fixture
def fleet(mqtt_broker, tmp_path):
    helper = FleetHelper(mqtt_broker, tmp_path)
    yield helper
    helper.close()


@pytest.fixture
def fleet_tools():
    """The module-level helpers (for tests that need a broker of their own)."""

    class Tools:
        REPO = REPO
        FleetHelper = FleetHelper
        telemetry_body = staticmethod(telemetry_body)
        wait_until = staticmethod(wait_until)

    return Tools


FIRMWARE = REPO / "firmware" / "mosquitto"
USERS = {"edgekit-monitor": "monitor-pw", "dev-a": "a-pw", "dev-b": "b-pw"}


def production_config(passwd: Path, certs: Path) -> list[str]:
    """firmware/mosquitto/edgekit.conf as shipped, with its files and ports moved into the test's folder."""
    lines = []
    for line in (FIRMWARE / "edgekit.conf").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = (line.replace("/etc/mosquitto/edgekit.passwd", str(passwd))
                .replace("/etc/mosquitto/edgekit.acl", str(FIRMWARE / "edgekit.acl"))
                .replace("/etc/mosquitto/certs/", f"{certs}/"))
        if line == "listener 1883 127.0.0.1":
            line = "listener {port} 127.0.0.1"
        elif line == "listener 8883":
            line = "listener {tls_port} 127.0.0.1"
        lines.append(line)
    return lines


@pytest.fixture
def firmware_broker(mosquitto, tmp_path):
    """Mosquitto running firmware/mosquitto's config, ACL, a password file made by add-user.sh,
    and TLS material made by make-certs.sh (CA, server, client certs for dev-a, dev-b, edgekit-monitor)."""
    import subprocess

    passwd = tmp_path / "edgekit.passwd"
    for user, password in USERS.items():
        out = subprocess.run([str(FIRMWARE / "add-user.sh"), str(passwd), user, password], capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == password
    certs = tmp_path / "certs"
    subprocess.run([str(FIRMWARE / "make-certs.sh"), str(certs), "dev-a", "dev-b", "edgekit-monitor"],
                   capture_output=True, text=True, check=True)
    broker = mosquitto(production_config(passwd, certs), tls_port=True, base=False)
    broker.certs = certs
    broker.users = USERS
    return broker


