"""A fast publisher for load tests: many device connections, valid envelopes, QoS 1, PUBACKs counted.

Each simulated device is its own MQTT connection (client id and topics of its
own, as a real fleet), publishes its retained ``state`` "online" (seq 1) and
then ``count`` telemetry envelopes (seq 2...), keeping up to ``window``
messages awaiting PUBACK. A process drives many connections from one
``selectors`` loop with the :mod:`.wire` codec; ``processes`` of them split the
fleet. A message counts as *acknowledged* only when its PUBACK carries a
success reason code: that is the count a load test compares with what the
monitor stored.

Telemetry bodies are made once by the device agent's own code
(:class:`edgekit_runtime.agent.AgentCore` on synthetic inferences), so the
payloads have the agent's size and layout; only envelope fields vary.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import selectors
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from edgekit_runtime.contract import fleet_protocol

from . import wire
from .connection import BrokerSettings


@dataclass
class LoadPlan:
    fleet: str = "bench"
    devices: int = 1000
    messages_per_device: int = 100  # telemetry messages, after one state message
    processes: int = 2
    window: int = 64  # PUBACKs outstanding per connection (the broker's Receive Maximum may lower it)
    rate: Optional[float] = None  # total messages/s (None: as fast as the broker takes them)
    device_prefix: str = "dev"
    boot: int = 1
    timeout_s: float = 300.0


@dataclass
class LoadResult:
    published: int = 0
    acked: int = 0
    refused: int = 0  # PUBACK with a failure reason code
    connections: int = 0
    started: float = 0.0  # wall clock of the first publish
    finished: float = 0.0  # wall clock of the last PUBACK
    cpu_s: float = 0.0

    def merge(self, other: "LoadResult") -> None:
        self.published += other.published
        self.acked += other.acked
        self.refused += other.refused
        self.connections += other.connections
        self.cpu_s += other.cpu_s
        self.started = min(self.started or other.started, other.started or self.started)
        self.finished = max(self.finished, other.finished)


def agent_bodies(n: int = 8, seed: int = 0) -> list[str]:
    """``n`` telemetry bodies as the device agent makes them (synthetic latencies), JSON-encoded."""
    try:
        from edgekit_runtime.agent import AgentConfig, AgentCore
    except ImportError:  # the agent package is not there: a hand-made body of the same layout
        return [json.dumps(_fallback_body(random.Random(seed + i)), separators=(",", ":")) for i in range(n)]
    rng = random.Random(seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="edgekit-loadgen-") as tmp:
        cfg = AgentConfig.from_dict({"device_id": "template", "fleet": "bench", "broker_url": "mqtt://127.0.0.1",
                                     "state_dir": tmp, "spool_sync": "normal"})
        core = AgentCore(cfg, system_stats=False, lock=False)
        try:
            for _ in range(n):
                for _ in range(50):
                    core.record_inference(rng.lognormvariate(-5.5, 0.3))
                out.append(json.dumps(core.tick()["body"], separators=(",", ":")))
        finally:
            core.close()
    return out


def _fallback_body(rng: random.Random) -> dict[str, Any]:
    return {"window_s": 10.0, "inferences": 50, "calls": 50, "errors": 0,
            "latency_ms": {"count": 50, "p50": 4 + rng.random(), "p99": 7 + rng.random()}}


def _pubacks(data: bytes) -> int:
    """How many PUBACKs ``data`` is, when it is nothing but whole PUBACKs with a success reason code
    (4 bytes, or 5 with a reason below 0x80, e.g. 0x10 "no matching subscribers"); else 0."""
    n = len(data)
    if n & 3 == 0:
        k = n >> 2
        if data[0::4].count(0x40) == k and data[1::4].count(2) == k:
            return k
    if n % 5 == 0:
        k = n // 5
        if data[0::5].count(0x40) == k and data[1::5].count(3) == k and max(data[4::5]) < 0x80:
            return k
    return 0


class _Device:
    """One publisher connection and its sequence/in-flight bookkeeping."""

    __slots__ = ("name", "sock", "reader", "seq", "inflight", "template", "fixed", "topic_field", "state", "out",
                 "writing", "queued")

    def __init__(self, plan: LoadPlan, name: str, conn: "wire.WireConnection", body: str):
        self.name = name
        self.sock = conn.sock
        self.reader = conn.reader
        self.seq = 0
        self.inflight = 0
        # the envelope as one bytes template: only seq and ts vary, so a message is one %-format (a real
        # device's CPU is not what this measures; the generator shares the monitor's machine)
        head = ('{"schema":1,"kind":"telemetry","fleet":"%s","device":"%s","boot":%d,"seq":'
                % (plan.fleet, name, plan.boot)).encode()
        self.template = (head.replace(b"%", b"%%") + b'%d,"ts":%.3f,"historical":false,"body":'
                         + body.encode().replace(b"%", b"%%") + b"}")
        tele = fleet_protocol.topic(plan.fleet, name, "telemetry").encode()
        self.topic_field = struct.pack("!H", len(tele)) + tele
        self.fixed = len(self.topic_field) + 3  # topic, packet id, empty properties
        self.state = fleet_protocol.topic(plan.fleet, name, "state").encode()
        self.out = b""
        self.writing = False
        self.queued = True  # in the `starved` queue


def _run_slice(settings: BrokerSettings, plan: LoadPlan, first: int, count: int, rate: Optional[float],
               bodies: list[str], connected, go, out) -> None:
    """One process: ``count`` devices from index ``first``; puts a LoadResult dict on ``out``.

    Event driven: a device is refilled (up to ``window`` in flight) when its
    PUBACKs arrive, so the loop's work follows the message rate, not the
    number of connections.
    """
    import collections
    import os

    res = LoadResult()
    sel = selectors.DefaultSelector()
    devs = []
    for i in range(first, first + count):
        name = f"{plan.device_prefix}{i:05d}"
        conn = settings.open_wire(f"edgekit-load-{plan.fleet}-{name}")
        conn.sock.setblocking(False)
        d = _Device(plan, name, conn, bodies[i % len(bodies)])
        sel.register(d.sock, selectors.EVENT_READ, d)
        devs.append(d)
    res.connections = len(devs)
    with connected.get_lock():
        connected.value += len(devs)
    go.wait()
    cpu0 = os.times()  # from the start signal: connecting is not part of the load
    per_device = plan.messages_per_device + 1
    total = count * per_device
    window = plan.window
    refill_at = window // 2
    pack = struct.pack
    varint = wire.varint
    now = time.time
    res.started = now()
    t0 = time.monotonic()
    deadline = t0 + plan.timeout_s
    published = 0
    starved = collections.deque(devs)  # devices with room in their window, waiting for rate budget

    def fill(d: _Device, budget: int) -> int:
        room = min(window - d.inflight, per_device - d.seq, budget)
        parts = [d.out] if d.out else []
        for _ in range(room if room > 0 else 0):
            d.seq += 1
            seq = d.seq
            pid = seq % 65535 + 1
            if seq == 1:
                payload = fleet_protocol.encode(fleet_protocol.envelope(
                    "state", plan.fleet, d.name, plan.boot, 1, {"status": "online",
                                                               "model": {"name": "bench", "version": "1"}}))
                parts.append(wire.publish_packet(d.state, payload, 1, pid, retain=True))
            else:
                payload = d.template % (seq, now())
                n = d.fixed + len(payload)
                parts += (b"\x32" + (bytes((n & 0x7F | 0x80, n >> 7)) if 128 <= n < 16384 else varint(n)),
                          d.topic_field, pack("!HB", pid, 0), payload)
        d.inflight += max(room, 0)
        if parts:
            data = b"".join(parts)
            try:
                sent = d.sock.send(data)
            except BlockingIOError:
                sent = 0
            d.out = data[sent:]
            want_write = bool(d.out)
            if want_write != d.writing:
                d.writing = want_write
                sel.modify(d.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0), d)
        return max(room, 0)

    while res.acked + res.refused < total and time.monotonic() < deadline:
        budget = (int(rate * (time.monotonic() - t0)) - published) if rate else 1 << 30
        while starved and budget > 0:
            d = starved.popleft()
            d.queued = False
            n = fill(d, budget)
            published += n
            budget -= n
            if d.inflight < window and d.seq < per_device:
                starved.appendleft(d)  # the budget ran out before its window filled
                d.queued = True
                break
        for key, events in sel.select(0.002 if (rate and starved) else 0.05):
            d = key.data
            if events & selectors.EVENT_WRITE and d.out:
                fill(d, 0)
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = d.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                raise wire.WireError(f"the broker closed {d.name}'s connection")
            k = _pubacks(data) if not d.reader.buf else 0
            if k:  # only PUBACKs with a success reason: counted without parsing
                d.inflight -= k
                res.acked += k
                packets = ()
            else:
                packets = d.reader.feed(data)
            for ptype, _flags, body in packets:
                if ptype == wire.PUBACK:
                    d.inflight -= 1
                    if len(body) > 2 and body[2] >= 0x80:
                        res.refused += 1
                    else:
                        res.acked += 1
            res.finished = now()
            # refill once half the window came back: one send() for many messages
            if d.seq < per_device and d.inflight <= refill_at:
                if budget > 0:
                    n = fill(d, budget)
                    published += n
                    budget -= n
                if d.inflight < window and d.seq < per_device and not d.queued:
                    starved.append(d)
                    d.queued = True
    res.published = published
    for d in devs:
        try:
            d.sock.setblocking(True)
            d.sock.sendall(d.out + wire.DISCONNECT_PACKET)
        except OSError:
            pass  # the broker may already have dropped us
        d.sock.close()
    cpu1 = os.times()
    res.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    out.put(asdict(res))


class LoadGenerator:
    """Connect a fleet of publisher connections (in ``plan.processes`` processes), then :meth:`go`."""

    def __init__(self, settings: BrokerSettings, plan: LoadPlan):
        self.settings = settings
        self.plan = plan
        ctx = mp.get_context("spawn")
        self._go = ctx.Event()
        self._out = ctx.Queue()
        self._connected = ctx.Value("i", 0)
        bodies = agent_bodies()
        self.payload_bytes = sum(len(b) for b in bodies) // len(bodies) + 120
        n = plan.processes
        sizes = [plan.devices // n + (1 if i < plan.devices % n else 0) for i in range(n)]
        rate = plan.rate / n if plan.rate else None
        self.procs = []
        first = 0
        for size in sizes:
            if size == 0:
                continue
            p = ctx.Process(target=_run_slice, args=(settings, plan, first, size, rate, bodies, self._connected, self._go, self._out),
                            daemon=True, name=f"edgekit-loadgen-{first}")
            p.start()
            self.procs.append(p)
            first += size

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def expected(self) -> int:
        return self.plan.devices * (self.plan.messages_per_device + 1)

    def go(self) -> None:
        self._go.set()

    def wait(self, timeout: float) -> LoadResult:
        total = LoadResult()
        deadline = time.monotonic() + timeout
        for _ in self.procs:
            remaining = max(deadline - time.monotonic(), 0.1)
            total.merge(LoadResult(**self._out.get(timeout=remaining)))
        for p in self.procs:
            p.join(timeout=5)
        return total

    def ready(self, timeout: float = 60.0) -> None:
        """Return once every process has connected its devices (they then wait for :meth:`go`)."""
        deadline = time.monotonic() + timeout
        while self._connected.value < self.plan.devices:
            if time.monotonic() > deadline or not all(p.is_alive() for p in self.procs):
                raise TimeoutError(f"only {self._connected.value} of {self.plan.devices} load-test devices "
                                   "connected")
            time.sleep(0.05)
