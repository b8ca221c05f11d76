"""Test doubles for fleet OTA on the host: an in-memory fleet of fake agents on a fake clock, and a
device played by a test thread over a real broker.

:class:`FakeFleet` has the transport interface of :class:`edgekit.flash.commands.FleetClient`; its
agents answer commands the way the flash spec says an agent does (progress events, ok/failed acks,
an ack cache for duplicates, a persistent session that queues commands while offline, the refusal
of a signed command without a numeric expiry, rollbacks that toggle between two slots and honour
``from_sha256``). :class:`MqttDevice` does the same over Mosquitto.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from edgekit.flash.commands import Received, command_body
from edgekit.flash.plan import RolloutPlan
from edgekit.flash.rollout import Rollout
from edgekit_runtime.contract import fleet_protocol as fp
from edgekit_runtime.command_auth import verify_command
from edgekit_runtime.keyring import Keyring

SHA = "ab" * 32
OLD_MODEL = {"name": "digits", "version": "1.0", "release": 1, "sha256": "cd" * 32}
NEW_MODEL = {"name": "digits", "version": "1.1", "release": 2, "sha256": SHA}
STEPS = ("download", "verify", "unpack", "prepare", "health_check", "switch")


class Crash(Exception):
    """Stands for the host process dying (kill -9) at a chosen point."""


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeAgent:
    """One device as the spec describes its agent. ``behaviour``: ok | fail | silent | busy.

    ``already_active``: it runs the new bundle before the rollout. ``crashed_in_switch``: it
    switches to the new bundle but answers ``already_active`` (what an agent killed between
    its pointer switch and its log write answers to the re-delivered install).
    ``state_sha256=False``: its retained state reports no sha256. ``rollback_delay``: seconds
    until a rollback's answer (the rollback itself takes effect at once).
    """

    def __init__(self, name: str, behaviour: str = "ok", *, online: bool = True, delay: float = 2.0,
                 come_online_at: Optional[float] = None, reason: str = "health_check_failed",
                 already_active: bool = False, crashed_in_switch: bool = False, state_sha256: bool = True,
                 rollback_delay: Optional[float] = None):
        self.name, self.behaviour, self.online, self.delay = name, behaviour, online, delay
        self.come_online_at, self.reason, self.already_active = come_online_at, reason, already_active
        self.crashed_in_switch, self.state_sha256 = crashed_in_switch, state_sha256
        self.rollback_delay = delay if rollback_delay is None else rollback_delay
        self.model = dict(NEW_MODEL if already_active else OLD_MODEL)
        self.previous: Optional[dict] = dict(OLD_MODEL) if already_active else None  # the other (good) slot
        self.acks: dict[str, dict] = {}  # the agent's durable record of signed requests (and ack cache)
        self.queued: list[dict] = []  # commands the broker keeps for the persistent session
        self.executed: list[tuple[str, str]] = []  # (command, request_id) actually run
        self.received: list[str] = []  # every request id delivered (duplicates too)


class FakeFleet:
    """An in-memory broker + agents with the transport interface of FleetClient."""

    def __init__(self, agents: list[FakeAgent], keyring: Keyring, clock: FakeClock, fleet: str = "f1",
                 crash_after_sends: Optional[int] = None, crash_on_poll: Optional[int] = None):
        self.fleet, self.keyring, self.clock = fleet, keyring, clock
        self.agents = {a.name: a for a in agents}
        self.sent: list[dict] = []  # every cmd body published
        self.crash_after_sends, self.crash_on_poll, self.polls = crash_after_sends, crash_on_poll, 0
        self._timeline: list[tuple[float, int, Any]] = []  # (when, order, callable returning Received|None)
        self._n = 0

    def devices(self) -> dict[str, dict]:
        def model(a: FakeAgent) -> dict:
            return a.model if a.state_sha256 else {k: v for k, v in a.model.items() if k != "sha256"}
        return {n: {"status": "online" if a.online else "offline", "model": model(a), "active_slot": "a",
                    "boot": 1, "ts": self.clock()} for n, a in self.agents.items()}

    def discover(self, timeout: float = 2.0, quiet_s: float = 0.3) -> dict[str, dict]:
        return self.devices()

    def send(self, device, command, args=None, *, sign_key=None, expires_s=None, expires_ts=None, request_id=None):
        if self.crash_after_sends is not None and len(self.sent) >= self.crash_after_sends:
            raise Crash(f"host died before sending to {device}")
        body = command_body(self.fleet, device, command, args, request_id=request_id, expires_ts=expires_ts,
                            sign_key=sign_key)
        self.sent.append({"device": device, **body})
        agent = self.agents[device]
        if agent.online:  # the broker delivers at once, whatever the host does next
            got = self._deliver(agent, body)
            if got is not None:
                self._at(self.clock(), lambda: got)
        else:
            agent.queued.append(body)
            if agent.come_online_at is not None and not any(getattr(f, "wake", None) == device
                                                            for _, _, f in self._timeline):
                wake = lambda: self._come_online(agent)  # noqa: E731
                wake.wake = device
                self._at(agent.come_online_at, wake)
        return body["request_id"]

    def poll(self, timeout: float = 0.0) -> list[Received]:
        self.polls += 1
        if self.crash_on_poll is not None and self.polls >= self.crash_on_poll:
            raise Crash("host died while waiting")
        out = self._due()
        if not out:
            nxt = min((w for w, _, _ in self._timeline), default=None)
            self.clock.t = min(nxt, self.clock.t + timeout) if nxt is not None and nxt > self.clock.t \
                else self.clock.t + timeout
            out = self._due()
        return out

    # -- internals ---------------------------------------------------------------------------
    def _at(self, when: float, fn) -> None:
        self._n += 1
        self._timeline.append((when, self._n, fn))

    def _due(self) -> list[Received]:
        out = []
        while True:
            due = sorted(e for e in self._timeline if e[0] <= self.clock.t)
            if not due:
                return out
            for entry in due:
                self._timeline.remove(entry)
                got = entry[2]()
                if got is not None:
                    out.append(got)

    def _msg(self, agent: FakeAgent, kind: str, body: dict) -> Received:
        return Received(kind, agent.name, body, self.clock(), self.clock(), body.get("request_id"))

    def _come_online(self, agent: FakeAgent) -> Received:
        agent.online = True
        for body in agent.queued:
            self._at(self.clock(), lambda b=body: self._deliver(agent, b))
        agent.queued = []
        return self._msg(agent, "state", {"status": "online", "model": agent.model, "active_slot": "a"})

    def _deliver(self, agent: FakeAgent, body: dict) -> Optional[Received]:
        rid, command = body["request_id"], body["command"]
        agent.received.append(rid)
        expires = body.get("expires_ts")
        if command in ("install", "rollback") and (isinstance(expires, bool)
                                                   or not isinstance(expires, (int, float))):
            return self._msg(agent, "ack", {"request_id": rid, "ok": False, "command": command, "error": {
                "reason": "bad_request", "message": "a signed command must carry a numeric expires_ts"}})
        if expires is not None and expires < self.clock():
            return self._msg(agent, "ack", {"request_id": rid, "ok": False, "command": command,
                                            "error": {"reason": "expired", "message": "the command expired"}})
        if rid in agent.acks:  # QoS 1 duplicate: the same answer again
            return self._msg(agent, "ack", dict(agent.acks[rid], duplicate=True))
        verify_command(self.fleet, agent.name, body, self.keyring)  # raises if not signed right
        agent.executed.append((command, rid))
        if agent.behaviour == "silent":
            return None
        t0 = self.clock()
        if command == "install":
            assert set(body["args"]) == {"url", "sha256", "size", "allow_downgrade", "rollout"}
            if agent.behaviour == "busy":
                ack = {"request_id": rid, "ok": False, "command": command, "error": {
                    "reason": "busy", "step": None, "code": None, "name": None,
                    "message": "another install is running", "active_slot": "a"}}
                agent.acks[rid] = ack
                self._at(t0 + 0.1, lambda: self._ack(agent, ack))
                return None
            agent.installing_until = t0 + agent.delay
            for i, step in enumerate(STEPS):
                self._at(t0 + agent.delay * (i + 1) / (len(STEPS) + 1),
                         lambda s=step: self._msg(agent, "event", {"type": "install_progress", "request_id": rid,
                                                                   "step": s, "slot": "b"}))
            if agent.behaviour == "fail":
                ack = {"request_id": rid, "ok": False, "command": command, "error": {
                    "reason": agent.reason, "step": "health_check", "code": 204, "name": "ENGINE_HEALTH_CHECK_FAILED",
                    "message": "health-check inference failed", "active_slot": "a"}}
            else:
                ack = {"request_id": rid, "ok": True, "command": command, "result": {
                    "slot": "b", "previous_slot": "a", "model": NEW_MODEL, "sha256": SHA, "health": {"ok": True},
                    "timings_s": {s: 0.1 for s in STEPS},
                    "already_active": agent.already_active or agent.crashed_in_switch}}
        elif command == "rollback":
            # the agent's rollback: with from_sha256 only while that bundle is active; else back to the other slot
            # (a second plain rollback goes forward again). It takes effect now; the answer may come much later.
            # While an install runs the agent answers "busy".
            from_sha = body["args"].get("from_sha256")
            if self.clock() < getattr(agent, "installing_until", 0.0):  # refused at once, not remembered
                ack = {"request_id": rid, "ok": False, "command": command, "error": {
                    "reason": "busy", "step": None, "code": None, "name": None,
                    "message": "an install is running; roll back after it finishes", "active_slot": "a"}}
                self._at(t0 + 0.1, lambda: self._msg(agent, "ack", ack))
                return None
            elif from_sha is not None and agent.model.get("sha256") != from_sha:
                ack = {"request_id": rid, "ok": True, "command": command, "result": {
                    "changed": False, "slot": "a", "sha256": agent.model.get("sha256"), "model": dict(agent.model)}}
            elif agent.previous is None:
                ack = {"request_id": rid, "ok": False, "command": command, "error": {
                    "reason": "rollback_failed", "step": None, "code": None, "name": None,
                    "message": "no previous slot to roll back to", "active_slot": "a"}}
            else:
                agent.model, agent.previous = agent.previous, agent.model
                ack = {"request_id": rid, "ok": True, "command": command, "result": {
                    "changed": True, "slot": "a", "previous_slot": "b", "sha256": agent.model.get("sha256"),
                    "model": dict(agent.model)}}
            agent.acks[rid] = ack
            self._at(t0 + agent.rollback_delay, lambda: self._msg(agent, "ack", ack))
            return None
        else:
            ack = {"request_id": rid, "ok": True, "command": command, "result": {}}
        agent.acks[rid] = ack  # the agent finishes (and caches its answer) even if the host is gone
        self._at(t0 + agent.delay, lambda: self._ack(agent, ack))
        return None

    def _ack(self, agent: FakeAgent, ack: dict) -> Received:
        if ack["ok"] and ack["command"] == "install" and agent.model.get("sha256") != SHA:
            agent.model, agent.previous = dict(NEW_MODEL), agent.model
        return self._msg(agent, "ack", ack)


def make_plan(devices: list[str], **kw: Any) -> RolloutPlan:
    data = {"fleet": "f1", "devices": devices, "url": f"http://10.0.0.1:8080/bundles/{SHA}.ekb", "sha256": SHA,
            "size": 12345, "bundle_name": "digits-1.1.ekb", "model": "digits", "model_version": "1.1",
            "release": 2, "device_timeout_s": 30.0, **kw}
    return RolloutPlan.parse(data)


def names(n: int) -> list[str]:
    return [f"cam-{i}" for i in range(1, n + 1)]


def statuses(record: dict) -> dict[str, str]:
    return {d: e["status"] for d, e in record["devices"].items()}


def start(plan: RolloutPlan, fleet: FakeFleet, key, tmp_path: Path, clock: FakeClock, **kw: Any) -> Rollout:
    return Rollout(plan, fleet, record_dir=tmp_path, sign_key=key, clock=clock, poll_s=1.0, **kw)


class MqttDevice:
    """A test thread playing an agent: persistent session, retained state, signed-command checks, ack cache."""

    def __init__(self, broker, name: str, keyring: Keyring, fleet: str = "f1"):
        self.broker, self.name, self.keyring, self.fleet = broker, name, keyring, fleet
        self.boot, self.seq = 0, 0
        self.acks: dict[str, dict] = {}
        self.executed: list[str] = []
        self.received: list[str] = []
        self.bodies: dict[str, dict] = {}  # request id -> the cmd body as received
        self.client = None

    def _envelope(self, kind: str, body: dict, seq: Optional[int] = None) -> bytes:
        if seq is None:
            self.seq += 1
        return fp.encode(fp.envelope(kind, self.fleet, self.name, self.boot, self.seq if seq is None else seq, body))

    def start(self) -> "MqttDevice":
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.boot += 1
        self.seq = 0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"agent-{self.name}", protocol=mqtt.MQTTv5)
        c.will_set(fp.topic(self.fleet, self.name, "state"), self._envelope("state", {"status": "offline"}, seq=0),
                   qos=1, retain=True)
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_connect = lambda cl, *a: cl.subscribe(fp.topic(self.fleet, self.name, "cmd"), qos=1)
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(self.broker.host, self.broker.port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        assert subscribed.wait(10), f"{self.name} did not subscribe"
        c.publish(fp.topic(self.fleet, self.name, "state"),
                  self._envelope("state", {"status": "online", "model": OLD_MODEL, "active_slot": "a"}),
                  qos=1, retain=True).wait_for_publish(10)
        self.client = c
        return self

    def go_offline(self) -> None:
        """Leave as a device that lost power would: the broker keeps the session, a retained offline state."""
        c, self.client = self.client, None
        c.publish(fp.topic(self.fleet, self.name, "state"), self._envelope("state", {"status": "offline"}, seq=0),
                  qos=1, retain=True).wait_for_publish(10)
        c.disconnect()
        c.loop_stop()

    def _on_message(self, client, userdata, message) -> None:
        msg = fp.decode(message.topic, message.payload)
        body = msg["body"]
        rid = body["request_id"]
        self.received.append(rid)
        self.bodies[rid] = body
        if rid in self.acks:
            ack = dict(self.acks[rid], duplicate=True)
        elif not isinstance(body.get("expires_ts"), float):  # what the agent does with a signed command
            ack = {"request_id": rid, "ok": False, "command": body["command"],
                   "error": {"reason": "bad_request", "message": "a signed command must carry a numeric expires_ts"}}
        else:
            verify_command(self.fleet, self.name, body, self.keyring)
            self.executed.append(rid)
            for step in STEPS:
                client.publish(fp.topic(self.fleet, self.name, "event"), self._envelope(
                    "event", {"type": "install_progress", "request_id": rid, "step": step, "slot": "b"}), qos=1)
            ack = {"request_id": rid, "ok": True, "command": body["command"], "result": {
                "slot": "b", "previous_slot": "a", "model": NEW_MODEL, "sha256": SHA, "already_active": False,
                "timings_s": {s: 0.01 for s in STEPS}}}
            self.acks[rid] = ack
        client.publish(fp.topic(self.fleet, self.name, "ack"), self._envelope("ack", ack), qos=1)
        client.publish(fp.topic(self.fleet, self.name, "state"), self._envelope(
            "state", {"status": "online", "model": NEW_MODEL, "active_slot": "b"}), qos=1, retain=True)

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
