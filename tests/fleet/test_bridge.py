"""Site brokers bridged to a central one (``edgekit broker``'s bridge config), agent and monitor unchanged.

Every broker here is a real Mosquitto started from :class:`BrokerConfig` on a free port;
the devices are the agent's own code (:class:`SimulatedDevice`: its core, spool and
MQTT link) connected to a *site* broker, and the monitor is connected to the *central*
one. Nothing in either knows a bridge is in between.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

from edgekit.fleet.broker import (BridgeConfig, BrokerConfig, BrokerError, RunningBroker, find_mosquitto, free_port,
                                  start_broker)
from edgekit.fleet.connection import BrokerSettings
from edgekit.fleet.simulate import SimulatedDevice, SimulationPlan

pytestmark = pytest.mark.timeout(90)

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware" / "mosquitto"


# ----------------------------------------------------------------------------- the config itself
def test_bridge_section_carries_device_topics_out_and_commands_in(tmp_path):
    bridge = BridgeConfig("central.example", 8883, name="site-a", fleets=("factory-a",), tls=True,
                          cafile=tmp_path / "ca.crt", username="site-a", password_file=tmp_path / "pw")
    (tmp_path / "pw").write_text("s3cret\n")
    path = BrokerConfig(dir=tmp_path / "b", bridges=[bridge]).write()
    text = path.read_text()
    section = text[text.index("connection site-a"):].splitlines()
    assert "address central.example:8883" in section
    assert {"cleansession false", "local_cleansession false", "bridge_protocol_version mqttv311",
            "remote_clientid site-a", "remote_username site-a", "remote_password s3cret",
            f"bridge_cafile {(tmp_path / 'ca.crt').resolve()}"} <= set(section)
    assert [line for line in section if line.startswith("topic ")] == [
        "topic edgekit/v1/factory-a/+/state out 1", "topic edgekit/v1/factory-a/+/telemetry out 1",
        "topic edgekit/v1/factory-a/+/event out 1", "topic edgekit/v1/factory-a/+/ack out 1",
        "topic edgekit/v1/factory-a/+/cmd in 1"]
    # the queue limits that decide how long a central outage the site absorbs are the broker's own
    assert "max_queued_messages 1000000" in text and "persistence true" in text
    assert text.index("listener ") < text.index("connection site-a")  # every line after it belongs to the bridge
    assert os.stat(path).st_mode & 0o777 == 0o600  # the bridge's password is in there


@pytest.mark.parametrize("change, message", [
    ({"qos": 0}, "QoS 1 end to end"),
    ({"name": "site a"}, "bridge name"),
    ({"fleets": ("bad/fleet",)}, "not a fleet name"),
    ({"cafile": Path("ca.crt")}, "use mqtts://"),
    ({"password_file": Path("pw")}, "needs a username"),
    ({"tls": True, "certfile": Path("c.crt")}, "both certfile and keyfile"),
])
def test_bridge_settings_that_would_lose_messages_or_cannot_work_are_refused(tmp_path, change, message):
    bridge = BridgeConfig("central", **change)
    with pytest.raises(BrokerError, match=message):
        BrokerConfig(dir=tmp_path, bridges=[bridge]).render()


def test_broker_command_writes_a_site_broker(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app

    (tmp_path / "pw").write_text("site-a-pw\n")
    result = CliRunner().invoke(app, [
        "broker", "--dir", str(tmp_path / "b"), "--port", "18998", "--max-queued-bytes", "0",
        "--bridge-to", "mqtts://central.example:8883", "--bridge-name", "site-a", "--bridge-fleet", "f1",
        "--bridge-fleet", "f2", "--bridge-username", "site-a", "--bridge-password-file", str(tmp_path / "pw"),
        "--bridge-cafile", str(tmp_path / "ca.crt"), "--print-config", "--json"])
    assert result.exit_code == 0, result.output
    text = json.loads(result.output)["text"]
    assert "max_queued_bytes 0" in text and "address central.example:8883" in text
    assert "remote_password ********" in text and "site-a-pw" not in text and "try_private true" in text
    assert "remote_password site-a-pw" in (tmp_path / "b" / "mosquitto.conf").read_text()
    assert "topic edgekit/v1/f2/+/cmd in 1" in text and "topic edgekit/v1/f1/+/telemetry out 1" in text
    # a broken bridge is refused with the reason, before anything runs
    bad = CliRunner().invoke(app, ["broker", "--dir", str(tmp_path / "c"), "--bridge-to", "mqtt://central",
                                   "--bridge-cafile", str(tmp_path / "ca.crt"), "--print-config"])
    assert bad.exit_code != 0 and "use mqtts://" in bad.output


def test_a_bridge_needs_persistence(tmp_path):
    with pytest.raises(BrokerError, match="keep persistence on"):
        BrokerConfig(dir=tmp_path, persistence=False, bridges=[BridgeConfig("central")]).render()


# ----------------------------------------------------------------------------- real brokers
def need_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))  # CI must run the broker tests, never skip them
        pytest.skip(str(exc))


class Topology:
    """One central broker and named site brokers, each bridged to it (fast link settings for tests)."""

    def __init__(self, root: Path, sites: tuple[str, ...], central_extra: tuple[str, ...] = (),
                 site_settings: Optional[dict] = None):
        need_mosquitto()
        self.root = root
        self.central_config = BrokerConfig(dir=root / "central", port=free_port(), extra=list(central_extra),
                                           log_connections=True)  # the log says when a bridge (re)connected
        self.central: RunningBroker = start_broker(self.central_config)
        self.sites: dict[str, RunningBroker] = {}
        for name in sites:
            bridge = BridgeConfig("127.0.0.1", self.central_config.port, name=name, keepalive_s=5, restart_s=(1, 2))
            self.sites[name] = start_broker(BrokerConfig(dir=root / name, port=free_port(), bridges=[bridge],
                                                         **(site_settings or {})))
        self.wait_bridges()

    def bridge_connections(self) -> dict[str, int]:
        """How often each site's bridge has connected to the central broker (its log survives restarts)."""
        log = self.central.log()
        return {n: log.count(f" as {n} (") for n in self.sites}

    def wait_bridges(self, more_than: Optional[dict[str, int]] = None, timeout: float = 15.0) -> None:
        from tests.polling import wait_until

        floor = more_than or {n: 0 for n in self.sites}
        wait_until(lambda: all(c > floor[n] for n, c in self.bridge_connections().items()), timeout,
                   "every site's bridge connected to the central broker")

    def restart_central(self, down_s: float, while_down=None, once_down=None) -> None:
        """Stop the central broker (it saves its sessions), stay down ``down_s``, start it on the same port."""
        self.central.stop()
        end = time.monotonic() + down_s
        if once_down is not None:
            once_down()
        while time.monotonic() < end:
            if while_down is not None:
                while_down()
            time.sleep(0.05)
        self.central = start_broker(self.central_config)

    def settings(self, site: Optional[str] = None) -> BrokerSettings:
        broker = self.sites[site] if site else self.central
        return BrokerSettings(host="127.0.0.1", port=broker.config.port, keepalive=5)

    def as_fixture_broker(self) -> SimpleNamespace:
        """What tests/fleet/conftest.py's FleetHelper wants of a broker (the central one)."""
        return SimpleNamespace(host="127.0.0.1", port=self.central_config.port)

    def close(self) -> None:
        for broker in [*self.sites.values(), self.central]:
            broker.stop()


class Devices:
    """Simulated devices (the agent's own code) on their sites, stepped by one background thread."""

    def __init__(self, topology: Topology, per_site: dict[str, int], root: Path, rate: float = 10.0):
        self.devices: list[SimulatedDevice] = []
        for site, count in per_site.items():
            plan = SimulationPlan(fleet="f1", devices=count, rate=rate, duration_s=60, device_prefix=f"{site}-",
                                  inferences_per_s=20, keepalive_s=5)
            self.devices += [SimulatedDevice(plan, i, topology.settings(site), root / site, None)
                             for i in range(count)]
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.lock = threading.Lock()  # held around each round: a test may act on a device between rounds
        for dev in self.devices:
            dev.start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    for dev in self.devices:
                        dev.step(time.monotonic() - self._t0)
                time.sleep(0.02)
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def settled(self, timeout: float = 30.0) -> dict[str, int]:
        """Wait until every device's spool is empty and nothing is in flight: everything each one numbered so
        far was acknowledged by its site broker. Returns device -> its last seq at that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(d.link.connected and not len(d.core.spool) and not d.link.pending for d in self.devices):
                    return {d.name: d.core.seq for d in self.devices}
            time.sleep(0.02)
        raise AssertionError(f"the devices' spools did not drain within {timeout:g} s")

    def by_name(self, name: str) -> SimulatedDevice:
        return next(d for d in self.devices if d.name == name)

    def stop(self) -> dict[str, int]:
        """Stop stepping, then each agent's own shutdown (last window, flush, "offline"); device -> last seq."""
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error
        return {d["device"]: d["messages"] for d in (dev.stop() for dev in self.devices)}


def stored_seqs(fleet, device: str) -> set[int]:
    return {r["seq"] for r in fleet.query(lambda s: s.history("f1", device))}


def wait_all_stored(fleet, acked: dict[str, int], timeout: float = 45.0) -> None:
    """Every seq 1..N each device's site acknowledged is in the monitor's store (0 lost)."""
    fleet.wait(lambda: all(set(range(1, n + 1)) <= stored_seqs(fleet, d) for d, n in acked.items()), timeout,
               f"every acknowledged message of {len(acked)} devices stored")


@pytest.fixture
def topology(tmp_path):
    made: list[Topology] = []

    def make(sites=("site-a", "site-b"), central_extra=(), **site_settings) -> Topology:
        made.append(Topology(tmp_path / f"brokers{len(made)}", sites, central_extra, site_settings))
        return made[-1]

    yield make
    for t in made:
        t.close()


def cut_connection(dev: SimulatedDevice) -> None:
    """The device's network drops: its TCP connection ends without an MQTT DISCONNECT (the broker sends its will)."""
    dev.link.client.socket().shutdown(socket.SHUT_RDWR)


def test_two_sites_through_bridges_to_one_monitor(topology, fleet_tools, tmp_path):
    from edgekit.flash.commands import FleetClient

    topo = topology()
    fleet = fleet_tools.FleetHelper(topo.as_fixture_broker(), tmp_path)
    try:
        fleet.start_monitor(fleet="f1")
        devices = Devices(topo, {"site-a": 2, "site-b": 2}, tmp_path / "devices")
        names = [d.name for d in devices.devices]
        for name in names:
            fleet.wait_device(name, lambda d: d["status"] == "online" and d["seq"] >= 3, what=f"{name} via its site")

        # the retained "online" crossed as retained: a newcomer at the central broker finds every device
        with FleetClient(topo.settings(), "f1").connect() as host:
            known = host.discover(timeout=5, quiet_s=0.5)
            assert sorted(known) == sorted(names) and {d["status"] for d in known.values()} == {"online"}
            # a command published at the central broker reaches the device at its site; its ack comes back
            rid = host.send("site-b-0001", "ping")
            ack = host.wait_ack(rid, 10)
        assert ack is not None and ack["ok"] is True
        fleet.wait(lambda: any(r["body"].get("request_id") == rid for r in fleet.query(
            lambda s: s.history("f1", "site-b-0001", kinds=["ack"]))), what="the ack in the monitor's store")

        # the device's network drops: its site publishes the last will, which crosses to the monitor
        with devices.lock:
            cut_connection(devices.by_name("site-a-0000"))
        dev = fleet.wait_device("site-a-0000", lambda d: d["status"] == "offline", what="the will at the monitor")
        assert dev["offline_reason"] == "last will" and dev["boot"] == 1
        # ... and its reconnection's "online" too (the agent republishes it on every connection)
        fleet.wait_device("site-a-0000", lambda d: d["status"] == "online", what="online again after the will")

        acked = devices.settled()
        wait_all_stored(fleet, acked)
        assert fleet.query(lambda s: s.counters()).get("stale_wills", 0) == 0
        last = devices.stop()
        for name in names:  # the agent's clean stop crosses too (a slow machine may leave it for the next start)
            fleet.wait_device(name, lambda d: d["status"] == "offline" and d["missing"] == 0, timeout=30,
                              what=f"{name} stopped")
        for name in names:  # (+ the will of site-a-0000's first connection, stored under seq -1)
            will = {-1} if name == "site-a-0000" else set()
            assert stored_seqs(fleet, name) == set(range(1, last[name] + 1)) | will
    finally:
        fleet.close()


def test_a_central_outage_loses_no_telemetry(topology, fleet_tools, tmp_path):
    """The central broker stops for a few seconds: each site queues for its bridge, the monitor's session
    (fixed client id, session expiry, plain subscriptions) survives the central restart in its persistence,
    0 lost. (Mosquitto 2.0 does not keep *shared* subscriptions over its restart: see the test below.)"""
    topo = topology()
    fleet = fleet_tools.FleetHelper(topo.as_fixture_broker(), tmp_path)
    try:
        run = fleet.start_monitor(fleet="f1", client_id="central-monitor", session_expiry=3600, share=False)
        devices = Devices(topo, {"site-a": 2, "site-b": 1}, tmp_path / "devices", rate=20.0)
        names = [d.name for d in devices.devices]
        for name in names:
            fleet.wait_device(name, lambda d: d["seq"] >= 3, what=f"{name} via its site")
        before = {name: fleet.device(name)["seq"] for name in names}
        made_while_down = {}

        def note_progress():
            made_while_down.update({d.name: d.core.seq for d in devices.devices})

        connected = topo.bridge_connections()
        topo.restart_central(3.0, while_down=note_progress)
        # the devices never noticed: their site broker acknowledged everything while the central one was away
        assert all(made_while_down[n] > before[n] + 5 for n in names), (before, made_while_down)
        assert all(d.link.connected for d in devices.devices)
        topo.wait_bridges(more_than=connected)
        acked = devices.settled()
        wait_all_stored(fleet, acked)
        devices.stop()
        run.check()
    finally:
        fleet.close()


def test_mosquitto_forgets_shared_subscriptions_over_its_restart(tmp_path, fleet_tools):
    """Why a monitor that must not lose what arrives while the central broker restarts uses plain
    subscriptions there: Mosquitto restores a persistent session's plain subscription from its persistence,
    but not a shared one, so messages that arrive before the monitor is back are gone."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    need_mosquitto()
    config = BrokerConfig(dir=tmp_path / "central", port=free_port())
    broker = start_broker(config)
    received: dict[str, list[str]] = {"plain": [], "shared": []}
    clients = []

    def session(kind: str, topic_filter: str):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"monitor-{kind}", protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, u, m: received[kind].append(m.payload.decode())
        subscribed = threading.Event()
        c.on_connect = lambda cl, *a: cl.subscribe(topic_filter, qos=1)  # every connection, as the monitor does
        c.on_subscribe = lambda *a: subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", config.port, 10, clean_start=False, properties=props)
        c.loop_start()
        fleet_tools.wait_until(subscribed.is_set, 10, f"{kind} subscribed")
        clients.append(c)
        return c

    def publish(payload: str) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device", protocol=mqtt.MQTTv5)
        c.connect("127.0.0.1", config.port)
        c.loop_start()
        c.publish(STATE, payload.encode(), qos=1).wait_for_publish(10)
        c.loop_stop()
        c.disconnect()

    try:
        for kind, topic_filter in (("plain", STATE), ("shared", f"$share/g/{STATE}")):
            session(kind, topic_filter)
        publish("before")
        fleet_tools.wait_until(lambda: all(received.values()), 10, "both got the first message")
        for c in clients:  # away, the session kept by the broker
            c.loop_stop()
            c.disconnect(reasoncode=None)
        clients.clear()
        broker.stop()
        broker = start_broker(config)
        publish("while-away")  # the broker restarted; the monitors are not back yet
        for kind, topic_filter in (("plain", STATE), ("shared", f"$share/g/{STATE}")):
            session(kind, topic_filter)
        publish("after")
        fleet_tools.wait_until(lambda: all(r[-1:] == ["after"] for r in received.values()), 10, "the last message")
        assert received["plain"] == ["before", "while-away", "after"]
        assert received["shared"] == ["before", "after"]  # Mosquitto 2.0: lost with the shared subscription
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        broker.stop()


def test_a_site_queue_below_the_outage_drops_messages_silently(topology, fleet_tools, tmp_path):
    """Why the site's max_queued_* matter: the bridge is one client of the site broker, and past its queue
    limit Mosquitto drops QoS 1 messages that the devices already had PUBACKs for."""
    topo = topology(sites=("site-a",), max_queued_messages=50)
    fleet = fleet_tools.FleetHelper(topo.as_fixture_broker(), tmp_path)
    try:
        fleet.start_monitor(fleet="f1", client_id="central-monitor", session_expiry=3600, share=False)
        fleet._pub = fleet.client("device-at-site", port=topo.sites["site-a"].config.port)
        fleet.publish("telemetry", "cam-1", 1, {"window_s": 1.0, "inferences": 1})
        fleet.wait_device("cam-1", lambda d: d["seq"] == 1, what="cam-1 through the bridge")
        connected = topo.bridge_connections()

        def publish_backlog():
            for seq in range(2, 202):  # each acknowledged by the site broker
                fleet.publish("telemetry", "cam-1", seq, {"window_s": 1.0, "inferences": 1})

        topo.restart_central(0.5, once_down=publish_backlog)
        topo.wait_bridges(more_than=connected)
        fleet.publish("telemetry", "cam-1", 202, {"window_s": 1.0, "inferences": 1})  # after the backlog, in order
        fleet.wait_device("cam-1", lambda d: d["seq"] == 202, timeout=45, what="the last message")
        stored = fleet.query(lambda s: s.message_count())
        assert stored < 150, stored  # ~50 queued (+ what was in flight) of 200
        assert fleet.device("cam-1")["missing"] == 202 - stored
        assert "Outgoing messages are being dropped for client local.site-a" in topo.sites["site-a"].log()
    finally:
        fleet.close()


def test_a_second_will_in_one_boot_marks_the_device_offline(topology, fleet_tools, tmp_path):
    topo = topology(sites=("site-a",))
    fleet = fleet_tools.FleetHelper(topo.as_fixture_broker(), tmp_path)
    try:
        fleet.start_monitor(fleet="f1")
        devices = Devices(topo, {"site-a": 1}, tmp_path / "devices")
        dev = devices.devices[0]
        fleet.wait_device(dev.name, lambda d: d["status"] == "online", what="online")
        with devices.lock:
            cut_connection(dev)
        fleet.wait_device(dev.name, lambda d: d["status"] == "offline", what="the first will")
        fleet.wait_device(dev.name, lambda d: d["status"] == "online", what="reconnected")
        with devices.lock:  # the network goes for good this time: no reconnection
            dev.link.client.loop_stop()
            cut_connection(dev)
        try:
            fleet.wait_device(dev.name, lambda d: d["status"] == "offline", timeout=5, what="the second will")
        finally:
            devices.stop()
    finally:
        fleet.close()


def test_the_bridge_link_with_tls_and_a_password(tmp_path, fleet_tools):
    """The central broker wants TLS and a password from each site's bridge, and its ACL lets a site only
    publish device topics and read commands."""
    need_mosquitto()
    certs = tmp_path / "certs"
    subprocess.run([str(FIRMWARE / "make-certs.sh"), str(certs)], capture_output=True, text=True, check=True)
    passwd = tmp_path / "central.passwd"
    for user, password in (("site-a", "site-a-pw"), ("edgekit-monitor", "monitor-pw")):
        subprocess.run([str(FIRMWARE / "add-user.sh"), str(passwd), user, password], capture_output=True,
                       text=True, check=True)
    acl = tmp_path / "central.acl"
    acl.write_text("user edgekit-monitor\ntopic read edgekit/v1/#\ntopic write edgekit/v1/+/+/cmd\n\n"
                   "user site-a\n" + "".join(f"topic write edgekit/v1/f1/+/{k}\n"
                                             for k in ("state", "telemetry", "event", "ack"))
                   + "topic read edgekit/v1/+/+/cmd\n")
    central_cfg = BrokerConfig(dir=tmp_path / "central", port=free_port(), tls_port=free_port(),
                               allow_anonymous=False, password_file=passwd, acl_file=acl, log_connections=True,
                               cafile=certs / "ca.crt", certfile=certs / "server.crt", keyfile=certs / "server.key")
    (tmp_path / "bridge.pw").write_text("site-a-pw\n")
    (tmp_path / "wrong.pw").write_text("not-it\n")
    brokers: list[RunningBroker] = []
    try:
        brokers.append(start_broker(central_cfg))
        for name, pw in (("site-a", "bridge.pw"), ("site-x", "wrong.pw")):
            bridge = BridgeConfig("localhost", central_cfg.tls_port, name=name, tls=True, cafile=certs / "ca.crt",
                                  username="site-a", password_file=tmp_path / pw, keepalive_s=5, restart_s=(1, 2))
            brokers.append(start_broker(BrokerConfig(dir=tmp_path / name, port=free_port(), bridges=[bridge])))
        central, good, bad = brokers
        fleet = fleet_tools.FleetHelper(SimpleNamespace(host="127.0.0.1", port=central_cfg.port), tmp_path)
        fleet.settings = BrokerSettings(host="127.0.0.1", port=central_cfg.port, username="edgekit-monitor",
                                        password="monitor-pw", keepalive=10)
        fleet.start_monitor(fleet="f1")
        fleet_tools.wait_until(lambda: "as site-a (" in central.log(), 15, "the good bridge connected over TLS")
        for site, device in ((good, "dev-good"), (bad, "dev-bad")):
            fleet.client(f"pub-{device}", port=site.config.port)
            fleet._pub = fleet._clients[-1]
            fleet.publish("state", device, 1, {"status": "online"}, retain=True)
            fleet.publish("telemetry", device, 2, {"window_s": 1.0, "inferences": 3})
        fleet.wait_device("dev-good", lambda d: d["seq"] == 2, what="dev-good through the TLS bridge")
        fleet.close()
        assert fleet.device("dev-bad") is None  # the site with the wrong password never got through
        assert "not authori" in central.log() or "bad user name or password" in central.log().lower()
    finally:
        for b in brokers:
            b.stop()


# ----------------------------------------------------------------------------- late wills
def agent_like_client(client_id: str, port: int, name: str, keepalive: int = 2):
    """A paho client connected as the agent connects (MQTT v5, clean_start false, a session expiry, a
    retained will), publishing a retained ``name``-online on connect; its will says ``name``-will."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.polling import wait_until

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.will_set(STATE, f"{name}-will".encode(), qos=1, retain=True)
    published = []
    c.on_connect = lambda cl, *a: published.append(cl.publish(STATE, f"{name}-online".encode(), qos=1, retain=True))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, keepalive, clean_start=False, properties=props)
    c.loop_start()
    wait_until(lambda: published and published[0].is_published(), 10, f"{name}-online published")
    return c


def go_half_open(client) -> None:
    """The device stops talking but its TCP connection stays open (a network path that died silently)."""
    client._thread_terminate = True
    client.loop_stop()


STATE = "edgekit/v1/f1/dev-1/state"


def test_an_earlier_connections_will_never_follows_the_online_on_one_broker_but_can_across_sites(topology,
                                                                                                 fleet_tools):
    topo = topology()
    wait_until = fleet_tools.wait_until
    seen: list[str] = []
    FleetHelperClient = fleet_tools.FleetHelper(topo.as_fixture_broker(), topo.root)
    watcher = FleetHelperClient.client("watcher")
    watcher.on_message = lambda c, u, m: seen.append(m.payload.decode())
    watcher.subscribe(STATE, qos=1)
    site_a, site_b = (topo.sites[n].config.port for n in ("site-a", "site-b"))
    try:
        # the same client id at the same site while the old connection is half-open: the broker hands the
        # session over and drops the old connection's will (v5, clean_start false, session expiry > 0)
        first = agent_like_client("edgekit-f1-dev-1", site_a, "c1")
        go_half_open(first)
        second = agent_like_client("edgekit-f1-dev-1", site_a, "c2")
        time.sleep(2 * 1.5 + 1)  # past the old connection's keepalive deadline
        wait_until(lambda: "c2-online" in seen, 10, "c2-online at the central broker")
        assert seen == ["c1-online", "c2-online"]
        # a clean stop: no will (paho would otherwise take the session back below); the DISCONNECT packet must
        # have left before the network loop stops, or the broker sees a dropped connection and sends c2's will
        gone = threading.Event()
        second.on_disconnect = lambda *args: gone.set()
        second.disconnect()
        assert gone.wait(10), "c2's clean disconnect did not complete"
        second.loop_stop()
        # the device comes back through ANOTHER site while site A still holds its half-open connection:
        # site A publishes that connection's will only at its keepalive deadline, after the new online
        third = agent_like_client("edgekit-f1-dev-1", site_a, "c3")
        go_half_open(third)
        agent_like_client("edgekit-f1-dev-1", site_b, "c4")
        wait_until(lambda: "c3-will" in seen, 10, "the half-open connection's will")
        assert seen[2:] == ["c3-online", "c4-online", "c3-will"]
        # ... and it is what the central broker now retains for a device that is online at site B
        late = []
        newcomer = FleetHelperClient.client("newcomer")
        newcomer.on_message = lambda c, u, m: late.append((m.payload.decode(), m.retain))
        newcomer.subscribe(STATE, qos=1)
        wait_until(lambda: late, 5, "the retained state")
        assert late == [("c3-will", True)]
    finally:
        FleetHelperClient.close()


def test_a_site_bridged_to_the_firmware_central_broker_with_its_certificate(tmp_path, fleet_tools):
    """The documented production path: the central broker runs firmware/mosquitto/edgekit.conf (TLS with a
    client certificate per client, CN = user name, ACL), the site's bridge presents a certificate whose CN is
    the site's name, and the ACL gives that user the site's block from docs/telemetry.md."""
    need_mosquitto()
    certs = tmp_path / "certs"
    subprocess.run([str(FIRMWARE / "make-certs.sh"), str(certs), "site-a"], capture_output=True, text=True,
                   check=True)
    passwd = tmp_path / "edgekit.passwd"
    subprocess.run([str(FIRMWARE / "add-user.sh"), str(passwd), "edgekit-monitor", "monitor-pw"],
                   capture_output=True, text=True, check=True)
    acl = tmp_path / "edgekit.acl"
    acl.write_text((FIRMWARE / "edgekit.acl").read_text() + "\nuser site-a\n"
                   + "".join(f"topic write edgekit/v1/f1/+/{k}\n" for k in ("state", "telemetry", "event", "ack"))
                   + "topic read edgekit/v1/f1/+/cmd\n")
    port, tls_port = free_port(), free_port()
    lines = []
    for line in (FIRMWARE / "edgekit.conf").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = (line.replace("/etc/mosquitto/edgekit.passwd", str(passwd))
                .replace("/etc/mosquitto/edgekit.acl", str(acl)).replace("/etc/mosquitto/certs/", f"{certs}/"))
        lines.append({"listener 1883 127.0.0.1": f"listener {port} 127.0.0.1",
                      "listener 8883": f"listener {tls_port} 127.0.0.1"}.get(line, line))
    central = start_broker(BrokerConfig(dir=tmp_path / "central", port=free_port(), extra=lines,
                                        allow_anonymous=False, log_connections=True))
    brokers = [central]
    try:
        bridge = BridgeConfig("localhost", tls_port, name="site-a", fleets=("f1",), tls=True,
                              cafile=certs / "ca.crt", certfile=certs / "devices" / "site-a.crt",
                              keyfile=certs / "devices" / "site-a.key", keepalive_s=5, restart_s=(1, 2))
        site = start_broker(BrokerConfig(dir=tmp_path / "site-a", port=free_port(), bridges=[bridge]))
        brokers.append(site)
        fleet = fleet_tools.FleetHelper(SimpleNamespace(host="127.0.0.1", port=port), tmp_path)
        fleet.settings = BrokerSettings(host="127.0.0.1", port=port, username="edgekit-monitor",
                                        password="monitor-pw", keepalive=10)
        try:
            fleet.start_monitor(fleet="+")  # every fleet: what does not arrive was not bridged
            fleet._pub = fleet.client("dev-at-site", port=site.config.port)
            fleet.publish("state", "cam-1", 1, {"status": "online"}, retain=True)
            fleet.publish("telemetry", "cam-1", 2, {"window_s": 1.0, "inferences": 3})
            fleet.publish("telemetry", "cam-2", 1, {"window_s": 1.0, "inferences": 3}, fleet="f2")  # not its fleet
            fleet.publish("telemetry", "cam-1", 3, {"window_s": 1.0, "inferences": 3})
            fleet.wait_device("cam-1", lambda d: d["seq"] == 3, timeout=20, what="cam-1 through the certificate link")
            assert fleet.query(lambda s: s.devices("f2")) == []  # never bridged: --bridge-fleet f1 only
            assert fleet.query(lambda s: s.malformed()) == {}
        finally:
            fleet.close()
    finally:
        for b in brokers:
            b.stop()
