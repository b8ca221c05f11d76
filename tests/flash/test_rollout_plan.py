"""Fleet OTA on the host: rollout plans, device selection, the abort rule, the record, FleetClient.

Most tests drive :class:`edgekit.flash.rollout.Rollout` over an in-memory fleet
(:class:`FakeFleet`) whose agents answer commands the way the flash spec says an
agent does (progress events, ok/failed acks, an ack cache for duplicates, a
persistent session that queues commands while offline, the refusal of a signed
command without a numeric expiry, rollbacks that toggle between two slots and honour
``from_sha256``), on a fake clock. The
last tests prove :class:`edgekit.flash.commands.FleetClient` against a real
Mosquitto, with a test thread playing the device.
"""

from __future__ import annotations

import json
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.errors import ConfigError, SigningError
from edgekit.flash.commands import (DEFAULT_SIGNED_EXPIRY_S, MAX_SIGNED_EXPIRY_S, FleetClient, Received, command_body,
                                   select_devices)
from edgekit.flash.plan import RolloutPlan, canary_count, parse_canary, parse_share
from edgekit.flash.rollout import Rollout, load_record, outstanding, render, rollback_from_record
from edgekit.fleet.connection import BrokerSettings, FleetConnectionError
from edgekit_runtime.contract import fleet_protocol as fp
from edgekit_runtime.command_auth import CommandAuthError, verify_command
from edgekit_runtime.keyring import Keyring, key_id_of

SHA = "ab" * 32
OLD_MODEL = {"name": "digits", "version": "1.0", "release": 1, "sha256": "cd" * 32}
NEW_MODEL = {"name": "digits", "version": "1.1", "release": 2, "sha256": SHA}
STEPS = ("download", "verify", "unpack", "prepare", "health_check", "switch")


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keyring(key) -> Keyring:
    pub = key.public_key()
    return Keyring({key_id_of(pub): pub})


# ----------------------------------------------------------------------------- in-memory fleet
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


# ----------------------------------------------------------------------------- shares and canaries
def test_parse_share():
    assert parse_share("10%") == Fraction(1, 10)
    assert parse_share(" 12.5 % ") == Fraction(1, 8)
    assert parse_share("100%") == 1
    for bad in ("0%", "0.0%", "101%", "-5%", "10", "abc", "", "ten%", "10%%"):
        with pytest.raises(ConfigError):
            parse_share(bad)


def test_canary_counts():
    assert canary_count("10%", 10) == 1
    assert canary_count("25%", 10) == 3  # ceil(2.5)
    assert canary_count("30%", 10) == 3  # exact arithmetic: 0.3 * 10 is not 3.0000000000000004 → 4
    assert canary_count("1%", 3) == 1  # at least one
    assert canary_count("100%", 7) == 7
    assert canary_count("2", 10) == 2
    assert canary_count(2, 10) == 2
    assert parse_canary("10%") == Fraction(1, 10) and parse_canary("3") == 3
    for bad in ("0%", "0", "bad", "", "-1", "2.5", True):
        with pytest.raises(ConfigError):
            canary_count(bad, 10)
    with pytest.raises(ConfigError, match="only 3 are selected"):
        canary_count("5", 3)


def test_plan_is_strict_and_checked():
    plan = make_plan(names(10), canary="20%", wave_size=3)
    assert plan.canary_count() == 2
    with pytest.raises(ConfigError, match="did you mean 'max_failures'"):
        make_plan(names(3), max_failure=1)
    with pytest.raises(ConfigError, match="device_timeout_s"):
        make_plan(names(3), device_timeout_s="30")  # strict: no str → float coercion
    with pytest.raises(ConfigError, match="canary"):
        make_plan(names(3), canary="0%")
    with pytest.raises(ConfigError, match="only 3 are selected"):
        make_plan(names(3), canary="4")
    with pytest.raises(ConfigError, match="sha256"):
        make_plan(names(3), sha256="XYZ")
    with pytest.raises(ConfigError, match="twice"):
        make_plan(["cam-1", "cam-1"])
    with pytest.raises(ConfigError, match="max_failures"):
        make_plan(names(3), max_failures=-1)
    assert make_plan(names(3), canary=2).canary == "2"
    # the record holds the plan as JSON: it must come back equal
    assert RolloutPlan.parse(json.loads(json.dumps(plan.model_dump(mode="json")))) == plan


def test_phases_take_online_canaries_first():
    plan = make_plan(names(10), canary="20%", wave_size=3)
    online = [d for d in names(10) if d != "cam-1"]
    phases = plan.phases(online)
    assert phases[0] == ["cam-2", "cam-3"]
    assert phases[1:] == [["cam-1", "cam-4", "cam-5"], ["cam-6", "cam-7", "cam-8"], ["cam-9", "cam-10"]]
    assert make_plan(names(4), canary="1").phases(names(4)) == [["cam-1"], ["cam-2", "cam-3", "cam-4"]]
    assert make_plan(names(1), canary="1").phases(names(1)) == [["cam-1"]]


# ----------------------------------------------------------------------------- device selection
KNOWN = {
    "cam-1": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
    "cam-2": {"status": "offline", "model": {"name": "digits", "version": "1.0"}},
    "cam-10": {"status": "online", "model": {"name": "yolo", "version": "2"}},
    "dock-01": {"status": "online", "model": None},
    "dock-02": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
    "dock-10": {"status": "online", "model": {"name": "digits", "version": "1.0"}},
}


def test_select_devices_globs_and_filters():
    assert select_devices(KNOWN, "cam-*", None) == ["cam-1", "cam-2", "cam-10"]  # natural order
    assert select_devices(KNOWN, "cam-*,dock-0?", None) == ["cam-1", "cam-2", "cam-10", "dock-01", "dock-02"]
    assert select_devices(KNOWN, "*,status=online", None) == ["cam-1", "cam-10", "dock-01", "dock-02", "dock-10"]
    assert select_devices(KNOWN, "model=digits", None) == ["cam-1", "cam-2", "dock-02", "dock-10"]
    assert select_devices(KNOWN, "cam-*, model=digits, status=online", None) == ["cam-1"]
    assert select_devices(KNOWN, "model=y*", None) == ["cam-10"]
    assert select_devices(KNOWN, None, ["dock-10", "cam-2"]) == ["cam-2", "dock-10"]
    assert select_devices(KNOWN, "dock-1*", ["cam-1"]) == ["cam-1", "dock-10"]
    assert select_devices(KNOWN, "status=online", ["cam-2", "cam-1"]) == ["cam-1"]


def test_select_devices_errors_say_what_is_known():
    with pytest.raises(ConfigError, match=r"selects no device; known devices: cam-1 \(online, digits 1.0\)"):
        select_devices(KNOWN, "gate-*", None)
    with pytest.raises(ConfigError, match="selects no device"):
        select_devices(KNOWN, "cam-*,model=resnet", None)
    with pytest.raises(ConfigError, match="filter 'version' is unknown"):
        select_devices(KNOWN, "version=2", None)
    with pytest.raises(ConfigError, match="status=busy must be one of online, offline"):
        select_devices(KNOWN, "status=busy", None)
    with pytest.raises(ConfigError, match="gate-9: never reported"):
        select_devices(KNOWN, None, ["cam-1", "gate-9"])
    with pytest.raises(ConfigError, match="name the devices"):
        select_devices(KNOWN, None, None)
    with pytest.raises(ConfigError, match="no device has reported"):
        select_devices({}, "*", None)


# ----------------------------------------------------------------------------- commands
def test_command_bodies_follow_the_spec(key, keyring):
    body = command_body("f1", "cam-1", "install", {"url": "http://h/b.ekb", "sha256": SHA, "size": 1,
                                                   "allow_downgrade": False, "rollout": "r1"},
                        request_id="r-1", expires_ts=123.0, sign_key=key)
    assert set(body) == {"request_id", "command", "expires_ts", "args", "auth"}
    assert verify_command("f1", "cam-1", body, keyring) == key_id_of(key.public_key())
    with pytest.raises(CommandAuthError):  # signed for cam-1: useless for cam-2
        verify_command("f1", "cam-2", body, keyring)
    # the same fields sign to the same body: a resumed rollout re-sends an identical command
    assert command_body("f1", "cam-1", "install", body["args"], request_id="r-1", expires_ts=123.0,
                        sign_key=key) == body
    rb = command_body("f1", "cam-1", "rollback", {"reason": None}, sign_key=key)
    assert rb["command"] == "rollback" and rb["args"] == {"reason": None} and "auth" in rb
    # a signed command always expires (devices refuse one without): 1 day unless told
    assert rb["expires_ts"] == pytest.approx(time.time() + DEFAULT_SIGNED_EXPIRY_S, abs=60)
    assert DEFAULT_SIGNED_EXPIRY_S == 86400.0
    verify_command("f1", "cam-1", rb, keyring)  # the expiry is inside the signature
    for bad in (float("nan"), float("inf"), "tomorrow", True):
        with pytest.raises(ConfigError, match="expires_ts must be a finite UNIX time"):
            command_body("f1", "cam-1", "install", {}, expires_ts=bad, sign_key=key)
    assert command_body("f1", "cam-1", "ping", request_id="p") == {"request_id": "p", "command": "ping"}
    for command in ("install", "rollback"):
        with pytest.raises(SigningError, match="must be signed"):
            command_body("f1", "cam-1", command, {})
    fp.envelope("cmd", "f1", "cam-1", 0, 0, body)  # a valid envelope


def test_fleet_client_counts_bad_messages_and_ignores_stale_wills():
    client = FleetClient(BrokerSettings(), "f1")  # not connected: handle_message is what paho's thread calls
    topic = fp.topic("f1", "cam-1", "state")
    assert client.handle_message(topic, b"not json") is None
    assert client.handle_message(topic, fp.encode(fp.envelope("state", "f1", "cam-2", 1, 1,
                                                              {"status": "online"}))) is None  # topic mismatch
    assert client.handle_message(fp.topic("f1", "cam-1", "ack"), b'{"schema": 1}') is None
    assert client.invalid == 3 and "cam-1" in client.last_invalid
    online = fp.envelope("state", "f1", "cam-1", 2, 5, {"status": "online", "model": NEW_MODEL, "active_slot": "b"})
    assert client.handle_message(topic, fp.encode(online)) is not None
    stale_will = fp.envelope("state", "f1", "cam-1", 1, 0, {"status": "offline"})
    assert client.handle_message(topic, fp.encode(stale_will)) is None
    dev = client.devices()["cam-1"]
    assert dev["status"] == "online" and dev["model"]["sha256"] == SHA and dev["active_slot"] == "b"
    will = fp.envelope("state", "f1", "cam-1", 2, 0, {"status": "offline"})
    client.handle_message(topic, fp.encode(will))
    assert client.devices()["cam-1"]["status"] == "offline"
    assert client.devices()["cam-1"]["model"]["sha256"] == SHA  # the last model known is kept
    assert [r.kind for r in client.poll()] == ["state", "state"]
    with pytest.raises(FleetConnectionError, match="not connected"):
        client.send("cam-1", "ping")


def test_fleet_client_connection_error_is_clear():
    from edgekit.fleet.broker import free_port

    client = FleetClient(BrokerSettings(port=free_port(), connect_timeout=2), "f1")
    with pytest.raises(FleetConnectionError, match="nothing listens at mqtt://127.0.0.1"):
        client.connect()


# ----------------------------------------------------------------------------- rollouts
def test_rollout_canary_then_waves_all_succeed(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d) for d in names(5)]
    fleet = FakeFleet(agents, keyring, clock)
    seen = []
    rollout = start(make_plan(names(5), canary="1", wave_size=2), fleet, key, tmp_path, clock,
                    on_change=lambda rec: seen.append(rec["phase"]))
    summary = rollout.run()
    assert summary["counts"]["succeeded"] == 5 and not summary["halted"] and summary["phase"] == "done"
    assert summary["failures"] == 0 and summary["halt_reason"] is None
    # three phases: canary (2 s), wave 1 (2 s), wave 2 (2 s); each device answers 2 s after it got the command
    assert summary["fleet_switch_s"] == pytest.approx(6.0, abs=0.01)
    assert [seen.index(p) for p in ("canary", "wave 1", "wave 2", "done")] == sorted(
        seen.index(p) for p in ("canary", "wave 1", "wave 2", "done"))
    # the canary answered before the waves got anything
    order = [b["device"] for b in fleet.sent]
    assert order == names(5)
    assert all(b["command"] == "install" and b["args"]["rollout"] == rollout.id and b["args"]["sha256"] == SHA
               for b in fleet.sent)
    record = load_record(Path(summary["record"]))
    assert Path(summary["record"]) == tmp_path / "rollouts" / f"{rollout.id}.json"
    assert record["phases"] == [["cam-1"], ["cam-2", "cam-3"], ["cam-4", "cam-5"]]
    e = record["devices"]["cam-4"]
    assert e["status"] == "succeeded" and e["phase"] == "wave 2" and e["model"] == "digits 1.1"
    assert e["model_before"] == "digits 1.0" and e["install"]["seconds"] == pytest.approx(2.0)
    assert e["install"]["timings_s"]["switch"] == 0.1 and e["install"]["changed"] is True
    table = render(record, now=clock())
    assert [c.header for c in table.columns] == ["device", "phase", "status", "step", "model", "seconds", "error"]
    assert table.row_count == 5


def test_abort_rule_halts_and_rolls_back_what_succeeded(key, keyring, tmp_path):
    clock = FakeClock()
    behaviour = {"cam-3": "fail", "cam-4": "fail"}
    agents = [FakeAgent(d, behaviour.get(d, "ok")) for d in names(8)]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(8), canary="1", wave_size=3, max_failures=1)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and "2 device(s) failed after the wave 1 phase, more than max_failures 1" in \
        summary["halt_reason"]
    assert "cam-3 (health_check_failed)" in summary["halt_reason"]
    record = load_record(Path(summary["record"]))
    st = statuses(record)
    # the successes of this rollout were rolled back (signed), the failures kept their old model, and wave 2 got nothing
    assert st == {"cam-1": "rolled_back", "cam-2": "rolled_back", "cam-3": "failed", "cam-4": "failed",
                  "cam-5": "pending", "cam-6": "pending", "cam-7": "pending", "cam-8": "pending"}
    assert [(b["device"], b["command"]) for b in fleet.sent if b["command"] == "rollback"] == [
        ("cam-1", "rollback"), ("cam-2", "rollback")]
    assert not {"cam-5", "cam-6", "cam-7", "cam-8"} & {b["device"] for b in fleet.sent}
    err = record["devices"]["cam-3"]["install"]["error"]
    assert err["reason"] == "health_check_failed" and err["code"] == 204 and err["step"] == "health_check"
    assert summary["rolled_back"] == ["cam-1", "cam-2"] and summary["counts"]["failed"] == 2
    assert record["devices"]["cam-1"]["model"] == "digits 1.0"
    assert "halted" in render(record).caption
    # a halted rollout is not continued by a resume
    with pytest.raises(ConfigError, match="halted"):
        Rollout.resume(Path(summary["record"]), FakeFleet(agents, keyring, clock), sign_key=key, clock=clock).run()


def test_failures_within_the_budget_do_not_halt(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, {"cam-3": "fail", "cam-4": "busy"}.get(d, "ok")) for d in names(8)]
    summary = start(make_plan(names(8), canary="1", wave_size=3, max_failures=2),
                    FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    assert not summary["halted"] and summary["counts"]["succeeded"] == 6 and summary["counts"]["failed"] == 2
    record = load_record(Path(summary["record"]))
    assert record["devices"]["cam-4"]["install"]["error"]["reason"] == "busy"
    assert record["devices"]["cam-3"]["install"]["step"] == "health_check"  # where it failed


def test_a_failed_canary_halts_before_any_wave(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1", "fail", reason="download_failed")] + [FakeAgent(d) for d in names(5)[1:]]
    fleet = FakeFleet(agents, keyring, clock)
    summary = start(make_plan(names(5), canary="1", max_failures=0), fleet, key, tmp_path, clock).run()
    assert summary["halted"] and summary["phase"] == "halted" and "cam-1 (download_failed)" in summary["halt_reason"]
    assert [b["device"] for b in fleet.sent] == ["cam-1"]  # nothing else was sent, nothing to roll back
    # with a failure budget, a canary phase without any success still halts
    clock = FakeClock()
    agents = [FakeAgent("cam-1", "fail")] + [FakeAgent(d) for d in names(5)[1:]]
    summary = start(make_plan(names(5), canary="1", max_failures=3), FakeFleet(agents, keyring, clock), key,
                    tmp_path, clock).run()
    assert summary["halted"] and summary["halt_reason"] == "no canary device succeeded (cam-1 failed)"


def test_timed_out_rule_online_silence_fails_offline_waits(key, keyring, tmp_path):
    clock = FakeClock()
    t0 = clock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", "silent"),  # online, never answers: a failure
              FakeAgent("cam-3", online=False),  # offline throughout: pending-offline, not a failure
              FakeAgent("cam-4", online=False, come_online_at=t0 + 10),  # comes back during the rollout, installs
              FakeAgent("cam-5", "silent", online=False, come_online_at=t0 + 10)]  # comes back, never answers
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(5), canary="1", max_failures=2, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    record = load_record(Path(summary["record"]))
    assert statuses(record) == {"cam-1": "succeeded", "cam-2": "timed_out", "cam-3": "pending_offline",
                                "cam-4": "succeeded", "cam-5": "timed_out"}
    assert not summary["halted"] and summary["failures"] == 2 and summary["pending_offline"] == ["cam-3"]
    c5 = record["devices"]["cam-5"]["install"]
    assert c5["online_at_send"] is False and c5["wait_from_ts"] == pytest.approx(t0 + 10)  # the clock started then
    assert c5["error"]["reason"] == "timeout" and "while online" in c5["error"]["message"]
    c4 = record["devices"]["cam-4"]["install"]
    assert c4["status"] == "ok" and c4["seconds"] == pytest.approx(2.0)
    assert record["devices"]["cam-3"]["install"]["wait_from_ts"] is None
    # one more failure than the budget halts
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", "silent"), FakeAgent("cam-3", "silent")]
    summary = start(make_plan(names(3), canary="1", max_failures=1), FakeFleet(agents, keyring, clock), key,
                    tmp_path, clock).run()
    assert summary["halted"] and summary["counts"]["timed_out"] == 2


def test_no_online_device_is_refused_and_a_key_is_required(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, online=False) for d in names(3)]
    with pytest.raises(ConfigError, match="none of the 3 selected devices is online"):
        start(make_plan(names(3)), FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    with pytest.raises(SigningError, match="must be signed"):
        Rollout(make_plan(names(3)), FakeFleet([FakeAgent(d) for d in names(3)], keyring, clock),
                record_dir=tmp_path / "x", clock=clock).run()
    with pytest.raises(ConfigError, match="fleet 'f1'"):
        Rollout(make_plan(names(3)), FakeFleet([], keyring, clock, fleet="other"), record_dir=tmp_path)


def test_record_round_trip_resume_after_a_crash_while_sending(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d) for d in names(6)]
    # the host dies after publishing the canary and the first device of wave 1
    fleet = FakeFleet(agents, keyring, clock, crash_after_sends=2)
    rollout = start(make_plan(names(6), canary="1", wave_size=3), fleet, key, tmp_path, clock)
    with pytest.raises(Crash):
        rollout.run()
    path = rollout.record_path
    record = load_record(path)
    assert record["phase"] == "wave 1" and record["phase_index"] == 1
    # written before publishing: the whole of wave 1 is "sent", although cam-3 and cam-4 never got it
    assert statuses(record) == {"cam-1": "succeeded", "cam-2": "sent", "cam-3": "sent", "cam-4": "sent",
                                "cam-5": "pending", "cam-6": "pending"}
    assert outstanding(record, now=clock()) == {"resend": ["cam-2", "cam-3", "cam-4"], "renew": [],
                                                "pending": ["cam-5", "cam-6"]}
    ids = {d: record["devices"][d]["install"]["request_id"] for d in ("cam-2", "cam-3", "cam-4")}
    # a new process, the same agents (cam-2 already installed: it answers from its ack cache)
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(path, fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 6 and not summary["halted"]
    resent = {b["device"]: b["request_id"] for b in fleet2.sent if b["device"] in ids}
    assert resent == ids  # the same request ids
    assert [b["device"] for b in fleet2.sent] == ["cam-2", "cam-3", "cam-4", "cam-5", "cam-6"]
    assert all(len(a.executed) == 1 for a in agents)  # nothing was installed twice
    assert agents[1].received.count(ids["cam-2"]) == 2  # cam-2 got the duplicate and answered from its cache
    record = load_record(path)
    assert record["devices"]["cam-2"]["install"]["resent"] == 1 and record["phase"] == "done"


def test_resume_after_a_crash_while_waiting_reuses_request_ids(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, delay=5.0) for d in names(4)]
    fleet = FakeFleet(agents, keyring, clock, crash_on_poll=3)
    rollout = start(make_plan(names(4), canary="2"), fleet, key, tmp_path, clock)
    with pytest.raises(Crash):
        rollout.run()
    record = load_record(rollout.record_path)
    assert statuses(record)["cam-1"] == "sent" and record["devices"]["cam-1"]["install"]["step"] is not None
    first_ids = [b["request_id"] for b in fleet.sent]
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(rollout.record_path, fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 4
    assert [b["request_id"] for b in fleet2.sent[:2]] == first_ids
    assert all(len(a.executed) == 1 for a in agents)


def test_resume_renews_an_expired_command(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", online=False)]
    plan = make_plan(names(2), canary="1", command_expiry_s=60.0)
    summary = start(plan, FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    assert summary["pending_offline"] == ["cam-2"] and summary["phase"] == "done"
    old = load_record(Path(summary["record"]))["devices"]["cam-2"]["install"]["request_id"]
    clock.t += 3600  # an hour later cam-2 is back; its queued command has expired
    agents[1].online, agents[1].queued = True, []
    record = load_record(Path(summary["record"]))
    assert outstanding(record, now=clock()) == {"resend": [], "renew": ["cam-2"], "pending": []}
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 2 and summary["pending_offline"] == []
    assert [b["device"] for b in fleet2.sent] == ["cam-2"] and fleet2.sent[0]["request_id"] != old
    assert load_record(Path(summary["record"]))["devices"]["cam-2"]["install"]["attempt"] == 2


def test_rollback_from_record_skips_devices_that_already_ran_the_bundle(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", already_active=True), FakeAgent("cam-3")]
    summary = start(make_plan(names(3), canary="1"), FakeFleet(agents, keyring, clock), key, tmp_path,
                    clock).run()
    assert summary["counts"]["succeeded"] == 3
    fleet2 = FakeFleet(agents, keyring, clock)
    with pytest.raises(SigningError):
        rollback_from_record(Path(summary["record"]), fleet2, clock=clock)
    result = rollback_from_record(Path(summary["record"]), fleet2, sign_key=key, clock=clock, reason="bad model",
                                  poll_s=1.0)
    assert result["rolled_back"] == ["cam-1", "cam-3"] and result["counts"]["succeeded"] == 1
    undo = {"reason": "bad model", "from_sha256": SHA}  # only while the device runs this rollout's bundle
    assert [(b["device"], b["args"]) for b in fleet2.sent] == [("cam-1", undo), ("cam-3", undo)]
    record = load_record(Path(result["record"]))
    assert record["rollback"]["done"] and record["devices"]["cam-1"]["rollback"]["status"] == "ok"
    assert agents[0].model == OLD_MODEL and agents[1].model == NEW_MODEL


def test_a_late_rollback_is_never_repeated_into_a_roll_forward(key, keyring, tmp_path):
    """A halt's rollback that answers after device_timeout_s is recorded rollback_failed although the device
    did roll back; `edgekit rollback --record` then sends a new rollback. A plain rollback toggles between the
    two slots (the device would go forward to the halted release): with from_sha256 it finds nothing to undo."""
    clock = FakeClock()
    agents = [FakeAgent("cam-1", rollback_delay=100.0), FakeAgent("cam-2", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(2), canary="2", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and summary["rollback_failed"] == ["cam-1"]
    assert agents[0].model == OLD_MODEL  # it did roll back; the answer is what came late
    assert [(b["device"], b["args"]) for b in fleet.sent if b["command"] == "rollback"] == [
        ("cam-1", {"reason": f"rollout {Path(summary['record']).stem} halted: {summary['halt_reason']}",
                   "from_sha256": SHA})]
    first = load_record(Path(summary["record"]))["devices"]["cam-1"]["rollback"]["request_id"]

    agents[0].rollback_delay = 1.0
    fleet2 = FakeFleet(agents, keyring, clock)
    result = rollback_from_record(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0)
    sent = [b for b in fleet2.sent if b["command"] == "rollback"]
    assert len(sent) == 1 and sent[0]["request_id"] != first and sent[0]["args"]["from_sha256"] == SHA
    assert agents[0].model == OLD_MODEL and agents[0].previous == NEW_MODEL  # not forward to the halted release
    assert result["rolled_back"] == ["cam-1"] and result["rollback_failed"] == []
    rb = load_record(Path(result["record"]))["devices"]["cam-1"]["rollback"]
    assert rb["status"] == "ok" and rb["changed"] is False and rb["attempt"] == 1
    record = load_record(Path(result["record"]))
    assert record["devices"]["cam-1"]["model"] == "digits 1.0"
    assert any("nothing to undo" in line["message"] for line in record["log"])
    # once more (an operator who is not sure): still nothing to undo, still on the old release
    again = rollback_from_record(Path(summary["record"]), FakeFleet(agents, keyring, clock), sign_key=key,
                                 clock=clock, poll_s=1.0)
    assert again["rolled_back"] == ["cam-1"] and agents[0].model == OLD_MODEL


def test_switched_is_decided_from_the_model_before_not_from_already_active(key, keyring, tmp_path):
    """An agent killed between its pointer switch and its log write answers the re-delivered install with
    already_active although this rollout switched it: the halt must still roll it back."""
    clock = FakeClock()
    agents = [FakeAgent("cam-1", crashed_in_switch=True),  # ran 1.0, now 1.1, says already_active
              FakeAgent("cam-2", crashed_in_switch=True, state_sha256=False),  # the same, its state has no sha256
              FakeAgent("cam-3", already_active=True),  # ran 1.1 before the rollout: not switched by it
              FakeAgent("cam-4", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    summary = start(make_plan(names(4), canary="4", max_failures=0), fleet, key, tmp_path, clock).run()
    assert summary["halted"]
    record = load_record(Path(summary["record"]))
    devices = record["devices"]
    assert devices["cam-1"]["sha_before"] == OLD_MODEL["sha256"] and devices["cam-2"]["sha_before"] is None
    assert devices["cam-3"]["sha_before"] == SHA
    assert all(devices[d]["install"]["already_active"] for d in ("cam-1", "cam-2", "cam-3"))
    assert [devices[d]["install"]["changed"] for d in ("cam-1", "cam-2", "cam-3")] == [True, True, False]
    assert summary["rolled_back"] == ["cam-1", "cam-2"] and statuses(record)["cam-3"] == "succeeded"
    assert agents[0].model == OLD_MODEL and agents[1].model == OLD_MODEL and agents[2].model == NEW_MODEL
    assert {b["device"] for b in fleet.sent if b["command"] == "rollback"} == {"cam-1", "cam-2"}


def test_signed_commands_always_carry_an_expiry(key, keyring, tmp_path):
    for bad in (None, 0, -5.0, "60", float("inf"), True):
        with pytest.raises(ConfigError, match="command_expiry_s: .*positive number of seconds.*always expire"):
            make_plan(names(2), command_expiry_s=bad)
    with pytest.raises(ConfigError, match="command_expiry_s: .*devices refuse signed commands that expire later"):
        make_plan(names(2), command_expiry_s=MAX_SIGNED_EXPIRY_S + 1)
    assert make_plan(names(2), command_expiry_s=MAX_SIGNED_EXPIRY_S).command_expiry_s == MAX_SIGNED_EXPIRY_S
    assert make_plan(names(2)).command_expiry_s == 86400.0  # 1 day unless told
    assert make_plan(names(2), command_expiry_s=60).command_expiry_s == 60.0
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", online=False), FakeAgent("cam-3", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(3), canary="1", max_failures=1, command_expiry_s=600.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["counts"]["succeeded"] == 1 and summary["pending_offline"] == ["cam-2"]
    assert fleet.sent and all(isinstance(b["expires_ts"], float) for b in fleet.sent)
    record = load_record(Path(summary["record"]))
    for d in names(3):
        attempt = record["devices"][d]["install"]
        assert attempt["expires_ts"] == pytest.approx(attempt["first_sent_ts"] + 600.0)
    # a record written by an older edgekit (a command sent without an expiry) is renewed, never re-sent as is:
    # a device refuses a signed command without an expiry
    record["devices"]["cam-2"]["install"]["expires_ts"] = None
    Path(summary["record"]).write_text(json.dumps(record))
    assert outstanding(load_record(Path(summary["record"])), now=clock()) == {"resend": [], "renew": ["cam-2"],
                                                                             "pending": []}
    old = record["devices"]["cam-2"]["install"]["request_id"]
    agents[1].online, agents[1].queued = True, []
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 2
    assert [b["device"] for b in fleet2.sent] == ["cam-2"] and fleet2.sent[0]["request_id"] != old
    assert fleet2.sent[0]["expires_ts"] == pytest.approx(clock() + 600.0, abs=30.0)


def test_record_is_written_atomically_and_checked(key, keyring, tmp_path):
    clock = FakeClock()
    rollout = start(make_plan(names(2), canary="1"), FakeFleet([FakeAgent(d) for d in names(2)], keyring, clock),
                    key, tmp_path, clock)
    rollout.run()
    folder = rollout.record_path.parent
    assert [p.name for p in folder.iterdir() if p.suffix == ".tmp"] == []
    with pytest.raises(ConfigError, match="does not exist"):
        load_record(folder / "nope.json")
    bad = folder / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not an edgekit rollout record"):
        load_record(bad)
    data = json.loads(rollout.record_path.read_text())
    data["plan"]["max_failures"] = "many"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="max_failures"):
        load_record(bad)
    with pytest.raises(ConfigError, match="exists"):
        start(make_plan(names(2), canary="1"), FakeFleet([], keyring, clock), key, tmp_path, clock,
              rollout_id=rollout.id)


# ----------------------------------------------------------------------------- real broker
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


def test_fleet_client_against_mosquitto(mqtt_broker, key, keyring, tmp_path):
    settings = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port, keepalive=10)
    cam1 = MqttDevice(mqtt_broker, "cam-1", keyring).start()
    cam2 = MqttDevice(mqtt_broker, "cam-2", keyring).start()
    cam2.go_offline()  # its session (and cmd subscription) stays with the broker
    client = FleetClient(settings, "f1").connect()
    try:
        known = client.discover(timeout=3.0)
        assert {d: e["status"] for d, e in known.items()} == {"cam-1": "online", "cam-2": "offline"}
        assert known["cam-1"]["model"]["sha256"] == OLD_MODEL["sha256"] and known["cam-1"]["active_slot"] == "a"
        assert known["cam-1"]["boot"] == 1 and known["cam-1"]["ts"] > 0
        assert select_devices(known, "cam-*,status=online", None) == ["cam-1"]
        args = {"url": f"http://127.0.0.1:1/bundles/{SHA}.ekb", "sha256": SHA, "size": 10, "allow_downgrade": False,
                "rollout": None}
        rid = client.send("cam-1", "install", args, sign_key=key, expires_s=600)
        ack = client.wait_ack(rid, 10)
        assert ack is not None and ack["ok"] and ack["result"]["slot"] == "b"
        deadline = time.monotonic() + 5
        while len(client.progress(rid)) < len(STEPS) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [e["step"] for e in client.progress(rid)] == list(STEPS)
        # a command for the offline device is kept by the broker and delivered when it comes back
        expires = time.time() + 600
        rid2 = client.send("cam-2", "install", args, sign_key=key, expires_ts=expires)
        assert client.wait_ack(rid2, 0.5) is None
        cam2.start()
        ack2 = client.wait_ack(rid2, 10)
        assert ack2 is not None and ack2["ok"] and cam2.executed == [rid2]
        # the same request again (a resumed rollout): answered from the agent's cache, not run twice
        assert client.send("cam-2", "install", args, sign_key=key, request_id=rid2, expires_ts=expires) == rid2
        deadline = time.monotonic() + 5
        while cam2.received.count(rid2) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cam2.received.count(rid2) == 2 and cam2.executed == [rid2]
        deadline = time.monotonic() + 5
        got: list[Received] = []
        while not any(r.kind == "ack" and r.body.get("duplicate") for r in got) and time.monotonic() < deadline:
            got += client.poll(0.2)
        assert any(r.kind == "ack" and r.body.get("duplicate") and r.request_id == rid2 for r in got)
        assert client.wait_ack(rid2, 0)["ok"] and "duplicate" not in client.wait_ack(rid2, 0)  # the first answer
        deadline = time.monotonic() + 5  # the device's retained state after its switch may trail its ack
        while client.devices()["cam-2"].get("active_slot") != "b" and time.monotonic() < deadline:
            client.poll(0.1)
        assert client.devices()["cam-2"]["status"] == "online" and client.devices()["cam-2"]["active_slot"] == "b"
        with pytest.raises(SigningError):
            client.send("cam-1", "rollback", {"reason": None})
        # a signed command sent without an expiry gets the default one (1 day), inside its signature
        rid3 = client.send("cam-1", "rollback", {"reason": None, "from_sha256": SHA}, sign_key=key)
        ack3 = client.wait_ack(rid3, 10)
        assert ack3 is not None and ack3["ok"], ack3
        assert cam1.bodies[rid3]["expires_ts"] == pytest.approx(time.time() + 86400, abs=60)
        verify_command("f1", "cam-1", cam1.bodies[rid3], keyring)
        with pytest.raises(ConfigError, match="expires_s must be a positive number"):
            client.send("cam-1", "rollback", {"reason": None}, sign_key=key, expires_s=0)
        assert client.invalid == 0
    finally:
        client.close()
        cam1.stop()
        cam2.stop()


def test_rollout_over_mosquitto_with_an_offline_device(mqtt_broker, key, keyring, tmp_path):
    settings = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port, keepalive=10)
    devices = [MqttDevice(mqtt_broker, d, keyring).start() for d in names(3)]
    devices[2].go_offline()
    client = FleetClient(settings, "f1").connect()
    try:
        client.discover(timeout=3.0)
        plan = make_plan(names(3), canary="1", device_timeout_s=10.0)
        summary = Rollout(plan, client, record_dir=tmp_path, sign_key=key, poll_s=0.2).run()
        assert summary["counts"]["succeeded"] == 2 and summary["pending_offline"] == ["cam-3"]
        assert not summary["halted"] and summary["fleet_switch_s"] is not None
        record = load_record(Path(summary["record"]))
        assert record["devices"]["cam-1"]["install"]["step"] is None  # progress cleared by the final answer
        devices[2].start()  # back: the queued install runs; a resume collects its answer (same request id)
        summary = Rollout.resume(Path(summary["record"]), client, sign_key=key, poll_s=0.2).run()
        assert summary["counts"]["succeeded"] == 3 and summary["pending_offline"] == []
        assert len(devices[2].executed) == 1
    finally:
        client.close()
        for d in devices:
            d.stop()


def test_a_canary_that_answers_after_its_timeout_is_rolled_back_too(tmp_path, key, keyring):
    """The canary's install outlives device_timeout_s (a TensorRT engine build, say): the rollout halts on the
    timeout, and its rollback reaches the canary too — "busy" while the install runs, then, once the late
    success arrives, a real rollback. The device must not stay on the halted rollout's bundle."""
    clock = FakeClock()
    slow = FakeAgent("cam-1", delay=45.0, rollback_delay=1.0)
    fleet = FakeFleet([slow, FakeAgent("cam-2")], keyring, clock)
    plan = make_plan(names(2), canary="1", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and "cam-2" not in [s["device"] for s in fleet.sent]
    rollbacks = [s for s in fleet.sent if s["command"] == "rollback"]
    assert rollbacks and all(s["device"] == "cam-1" for s in rollbacks)
    assert slow.model.get("sha256") != SHA  # back on what it ran before the rollout
    rec = json.loads(Path(summary["record"]).read_text())
    assert rec["devices"]["cam-1"]["install"]["status"] == "ok"  # the late answer was read
    assert rec["devices"]["cam-1"]["rollback"]["status"] == "ok" and summary["rolled_back"] == ["cam-1"]


def test_a_late_device_that_ran_the_bundle_before_is_not_rolled_back(tmp_path, key, keyring):
    """cam-2 already ran the rollout's bundle (its older release in the other slot); its answer is late and the
    rollout halts on cam-1's failure: a precautionary rollback must not take cam-2 to the older model."""
    clock = FakeClock()
    before = FakeAgent("cam-2", already_active=True, delay=45.0)
    fleet = FakeFleet([FakeAgent("cam-1", "fail"), before], keyring, clock)
    plan = make_plan(names(2), canary="2", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"]
    assert before.model.get("sha256") == SHA  # still on the bundle it ran before the rollout
    assert not [s for s in fleet.sent if s["command"] == "rollback" and s["device"] == "cam-2"]


def test_a_device_that_stays_busy_is_asked_again_at_a_bounded_pace(tmp_path, key, keyring):
    clock = FakeClock()
    slow = FakeAgent("cam-1", delay=1000.0, rollback_delay=0.1)  # installs for longer than the retry window
    fleet = FakeFleet([slow, FakeAgent("cam-2")], keyring, clock)
    plan = make_plan(names(2), canary="1", max_failures=0, device_timeout_s=30.0)
    t0 = clock()
    summary = start(plan, fleet, key, tmp_path, clock).run()
    rollbacks = [s for s in fleet.sent if s["command"] == "rollback"]
    assert summary["halted"] and clock() - t0 < 200  # the loop ends (2 x device_timeout_s of retries)
    assert 10 <= len(rollbacks) <= 40  # about one every BUSY_RETRY_S, not one per poll
