"""The broker-free heart of the agent: boot/seq, metrics, drift, spool, events, commands.

:class:`AgentCore` is what the daemon runs and what ``edgekit fleet simulate``
drives on synthetic inferences; it never touches the network. Every message it
makes is an envelope from :mod:`edgekit_runtime.contract.fleet_protocol`, numbered
``(boot, seq)`` and written to the on-disk spool; :class:`~.mqtt.MqttLink`
sends the spool. ``seq`` 0 of every boot is the last will ("offline", set when
connecting); every other message counts from 1.

Typical use without a broker::

    core = AgentCore(config)                    # increments the boot counter
    core.record_inference(0.012)                # or core.predict(images) with a model
    msg = core.tick()                           # one telemetry window, spooled
    core.close()
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import __version__
from ..contract import fleet_protocol
from ..contract.errors import ErrorCode, RuntimeErrorBase
from ..contract.manifest import InputStats, Manifest, ModelInfo, TargetInfo, TensorSpec
from .config import AgentConfig
from .drift import DriftMonitor
from .metrics import MetricsWindow, SystemStats
from .spool import Spool
from .state import AgentState, StateDir, check_transition

log = logging.getLogger("edgekit_runtime.agent")

# settings the `config` command may change at run time (not persisted: a restart reads the file)
RUNTIME_SETTINGS = {"telemetry_interval_s": float, "drift_psi_threshold": float, "drift_min_values": int}
BENCH_LIMITS = {"queries": (1, 100_000), "seconds": (0.0, 120.0), "warmup": (0, 10_000), "batch": (1, 1024)}
WILL_SEQ = 0


class CommandError(ValueError):
    """A command that cannot be executed; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Serving:
    """What a device says it serves: the model's identity, its inputs, and their drift references."""

    model: ModelInfo
    target: str
    backend: str
    precision: str | None
    input_names: list[str]
    input_stats: Mapping[str, InputStats | Mapping[str, Any]]

    @classmethod
    def of(cls, manifest: Manifest | Mapping[str, Any]) -> "Serving":
        """From a bundle's typed manifest, or from the manifest a simulated device claims (a JSON object)."""
        if isinstance(manifest, Manifest):
            m = manifest
            return cls(m.model, m.target.name, m.backend.name, m.backend.precision, [t.name for t in m.inputs],
                       m.input_stats)
        # A simulated device carries the sections it reports, not a whole bundle's manifest:
        # each is read by its own type (drift parses the input_stats entries it uses).
        backend = manifest.get("backend") or {}
        inputs = [TensorSpec.from_dict(t, f"manifest.inputs[{i}]") for i, t in enumerate(manifest.get("inputs") or [])]
        return cls(ModelInfo.from_dict(manifest.get("model")), TargetInfo.from_dict(manifest.get("target")).name,
                   str(backend.get("name")), backend.get("precision"), [t.name for t in inputs],
                   manifest.get("input_stats") or {})


@dataclass
class Command:
    request_id: str
    command: str
    args: dict[str, Any]
    envelope: dict[str, Any]


class AgentCore:
    """One device's telemetry, drift, spool and command handling (no network).

    ``config``: an :class:`AgentConfig` (``state_dir`` holds the boot counter and
    the spool). ``model``: a loaded :class:`edgekit_runtime.Model`, or None
    (simulated devices, or no bundle installed). ``model_manifest``: for a
    simulated device, a bundle manifest (e.g. ``read_manifest_unverified(path)``)
    whose model identity is reported and whose ``input_stats`` are the drift
    reference, without loading an engine (a whole manifest, or its ``model``,
    ``target``, ``backend`` name and precision, ``inputs`` and ``input_stats``). ``system_stats``: sample CPU, memory
    and temperatures in every window (a simulator with many devices in one
    process turns it off). ``lock``: hold the state directory's lock.
    """

    def __init__(self, config: AgentConfig, model: Any | None = None, *, state_dir: StateDir | None = None,
                 system_stats: bool = True, lock: bool = True, model_error: dict[str, Any] | None = None,
                 model_manifest: dict[str, Any] | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.state_dir = (state_dir or StateDir(config.state_dir)).ensure()
        if lock:
            self.state_dir.lock()
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.spool = Spool(self.state_dir.spool_path, config.spool_max_bytes, config.spool_policy,
                               sync=config.spool_sync)
            self.boot = self.state_dir.next_boot(floor=self.spool.max_boot())
        except BaseException:
            self.state_dir.unlock()
            raise
        self._seq = WILL_SEQ
        # MQTT connections made in this boot (the link counts them before each attempt): every `state` carries
        # it, so a monitor can tell an earlier connection's will from the current one (Sparkplug's bdSeq)
        self.connection = 0
        self.state = AgentState.STARTING
        self.started_at = time.time()
        self.window = MetricsWindow(clock)
        self.system = SystemStats() if system_stats else None
        self.live_epoch: int | None = None  # connection epoch messages are made in (None: offline)
        self._reported_drops = dict(self.spool.counters)
        self._acks: OrderedDict[str, dict[str, Any]] = OrderedDict()  # request_id -> ack body, for duplicates
        self._bench_lock = threading.Lock()
        self.bad_commands = 0
        self.on_message: Callable[[], None] | None = None  # called after a message is spooled (wakes the sender)
        self.model = None
        self.serving: Serving | None = None
        self.bundle_info: dict[str, Any] | None = None  # {"sha256", "slot"} of what serves
        self.model_error = model_error
        self.drift = DriftMonitor(None, unavailable_reason="no model is loaded")
        self.set_model(model, error=model_error, manifest=model_manifest)

    # -- model ---------------------------------------------------------------------
    def set_model(self, model: Any | None, *, error: dict[str, Any] | None = None,
                  manifest: Manifest | Mapping[str, Any] | None = None,
                  bundle_info: dict[str, Any] | None = None) -> None:
        """Serve ``model`` (None: none); drift references come from its manifest.

        ``manifest`` without a model: a simulated device that reports this
        bundle's identity and judges drift against its ``input_stats``.
        """
        self.model = model
        source = model.manifest if model is not None else manifest
        self.serving = Serving.of(source) if source is not None else None
        self.bundle_info = bundle_info if self.serving is not None else None
        self.model_error = error
        cfg = self.config
        if self.serving is None:
            self.drift = DriftMonitor(None, unavailable_reason="no model is loaded")
        else:
            self.drift = DriftMonitor(self.serving.input_stats, self.serving.input_names,
                                      psi_threshold=cfg.drift_psi_threshold, ks_threshold=cfg.drift_ks_threshold,
                                      min_values=cfg.drift_min_values,
                                      max_values_per_inference=cfg.drift_max_values_per_inference)

    def model_info(self) -> dict[str, Any] | None:
        """Name, version, release, target, backend (and engine) of what serves; None if nothing does."""
        s = self.serving
        if s is None:
            return None
        info = {"name": s.model.name, "version": s.model.version, "release": s.model.release,
                "target": s.target, "backend": s.backend, "precision": s.precision}
        if self.bundle_info:
            info.update({k: v for k, v in self.bundle_info.items() if k in ("sha256", "slot")})
        engine = getattr(self.model, "engine", None)
        if engine is not None and hasattr(engine, "describe"):
            info["engine"] = engine.describe().get("engine")
        elif self.model is None:
            info["simulated"] = True
        return info

    def serving_state(self) -> AgentState:
        """ONLINE while a model (or a simulated one) serves, else DEGRADED."""
        return AgentState.ONLINE if self.serving is not None else AgentState.DEGRADED

    def set_state(self, new: AgentState) -> None:
        with self._lock:
            check_transition(self.state, new)
            if new != self.state:
                log.info("agent state %s -> %s", self.state.value, new.value)
            self.state = new

    # -- envelopes ------------------------------------------------------------------
    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    @property
    def seq(self) -> int:
        """The last sequence number used in this boot."""
        return self._seq

    def topic(self, kind: str) -> str:
        return fleet_protocol.topic(self.config.fleet, self.config.device_id, kind)

    def envelope(self, kind: str, body: dict[str, Any], *, seq: int | None = None) -> dict[str, Any]:
        return fleet_protocol.envelope(kind, self.config.fleet, self.config.device_id, self.boot,
                                       self.next_seq() if seq is None else seq, body)

    def state_envelope(self, status: str, *, seq: int | None = None) -> dict[str, Any]:
        """The retained ``state`` message: "online" with what runs, or "offline" (the will), with the number
        of the MQTT connection it belongs to."""
        body: dict[str, Any] = {"status": status, "connection": self.connection}
        if status == "online":
            model = self.model_info()
            body.update({
                "agent_state": self.serving_state().value,
                "model": model,
                "backend": model["backend"] if model else None,
                "active_slot": (self.bundle_info or {}).get("slot"),
                "runtime_version": __version__,
                "started_at": self.started_at,
                "telemetry_interval_s": self.config.telemetry_interval_s,
                "pid": os.getpid(),
            })
            if self.model_error:
                body["model_error"] = self.model_error
        return self.envelope("state", body, seq=seq)

    def will_envelope(self) -> dict[str, Any]:
        """The last will: "offline" with this boot, seq 0 and the connection it is registered for, so a monitor
        can tell it is stale (an older boot, or an earlier connection than the last "online")."""
        return self.state_envelope("offline", seq=WILL_SEQ)

    def publish(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Number, spool (durably) and return one message; it is sent when the link can."""
        with self._lock:
            msg = self.envelope(kind, body)
            try:
                payload = fleet_protocol.encode(msg)
            except ValueError:  # a NaN/inf figure: JSON has no such number; sent as null, not lost
                log.warning("%s body held a non-finite number; sent as null", kind)
                msg = _finite(msg)
                payload = fleet_protocol.encode(msg)
            result = self.spool.put(self.topic(kind), payload, kind=kind, boot=self.boot,
                                    seq=msg["seq"], live=self.live_epoch)
        if not result.accepted:
            log.warning("spool full (%s): %s boot=%d seq=%d not stored", self.spool.policy, kind, self.boot,
                        msg["seq"])
        if self.on_message is not None:
            self.on_message()
        return msg

    def emit_event(self, type_: str, **fields: Any) -> dict[str, Any]:
        """An ``event`` message (errors, model loaded, drift alarm, spool drops, ...)."""
        return self.publish("event", {"type": type_, **fields})

    # -- inference ----------------------------------------------------------------------
    def record_inference(self, latency_s: float | None, inputs: Mapping[str, np.ndarray] | np.ndarray | None = None,
                         error_code: int | None = None, *, items: int = 1,
                         error: dict[str, Any] | None = None) -> None:
        """Count one inference call (``items`` images) that took ``latency_s`` seconds.

        ``inputs``: the preprocessed tensor(s), fed to the drift monitor;
        ``error_code``: a stable runtime code (:class:`ErrorCode`) when it
        failed. The first failure of each code in a window becomes an
        ``error`` event; all are counted in telemetry.
        """
        first = self.window.record(latency_s, items=items, error_code=error_code)
        if error_code is None and inputs is not None:
            self.drift.add(inputs)
        if first:
            code = int(error_code)
            name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else None
            self.emit_event("error", **(error or {"code": code, "name": name}))

    def predict(self, items: Any) -> list[dict[str, Any]]:
        """Run the loaded model on images (paths/arrays) or tensors, timed and counted.

        Images are preprocessed as the manifest says; a float array or a dict
        of arrays goes to the model as is, except for bundles with ``tensor``
        preprocessing, whose raw windows/rows are normalized as the manifest
        says. Errors are counted by their stable code and re-raised.
        """
        model = self.model
        if model is None:
            exc = RuntimeErrorBase("no model is loaded", code=ErrorCode.ENGINE_UNAVAILABLE,
                                   hint="install a bundle with `edgekit-agent install`")
            self.record_inference(None, error_code=exc.code, error=exc.to_event())
            raise exc
        t0 = time.perf_counter()
        feeds: Mapping[str, np.ndarray] | np.ndarray | None = None
        try:
            pre = model.manifest.preprocess
            if isinstance(items, np.ndarray) and pre is not None and pre.type == "tensor":
                feeds = model.preprocess(items)
                outputs = model.run(feeds)
            elif isinstance(items, dict) or (isinstance(items, np.ndarray) and items.dtype != np.uint8):
                feeds = items
                outputs = model.run(feeds)
            else:
                if isinstance(items, (str, os.PathLike)) or (isinstance(items, np.ndarray) and items.ndim <= 3):
                    items = [items]
                feeds = model.preprocess(items)
                outputs = model.run(feeds)
            results = model.postprocess(outputs)
        except RuntimeErrorBase as exc:
            self.record_inference(time.perf_counter() - t0, error_code=exc.code, error=exc.to_event())
            raise
        except Exception as exc:  # an engine failure that is not ours: counted as an inference failure, re-raised
            err = {"code": int(ErrorCode.ENGINE_INFERENCE_FAILED), "name": ErrorCode.ENGINE_INFERENCE_FAILED.name,
                   "message": f"{type(exc).__name__}: {exc}", "hint": None}
            self.record_inference(time.perf_counter() - t0, error_code=ErrorCode.ENGINE_INFERENCE_FAILED, error=err)
            raise
        n = len(results)
        self.record_inference(time.perf_counter() - t0, feeds, items=n)
        return results

    # -- telemetry -------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> dict[str, Any]:
        """Close the current window: spool a ``telemetry`` message (and any drift/spool events)."""
        body = self.window.close(now)
        body["state"] = self.state.value
        body["model"] = self.model_info()
        body["system"] = self.system.sample() if self.system is not None else None
        drift, changes = self.drift.evaluate()
        body["drift"] = drift
        body["spool"] = self.spool.stats()
        body["bad_commands"] = self.bad_commands
        if self.config.reports_dir is not None:
            # fresh: written within three telemetry intervals, and never less than 30 s (serve writes every 10 s)
            body["workloads"] = workload_reports(self.config.reports_dir,
                                                 max(3 * self.config.telemetry_interval_s, 30.0))
        msg = self.publish("telemetry", body)
        for change in changes:
            self.emit_event(change.pop("type"), **change)
        self._report_spool_drops()
        return msg

    def _report_spool_drops(self) -> None:
        now = self.spool.counters
        before = self._reported_drops
        new = {k: now[k] - before.get(k, 0) for k in ("dropped_oldest", "rejected_new", "broker_rejected")}
        if any(v > 0 for v in new.values()):
            self._reported_drops = now
            self.emit_event("spool_drop", policy=self.spool.policy, max_bytes=self.spool.max_bytes,
                            dropped_oldest=new["dropped_oldest"], rejected_new=new["rejected_new"],
                            broker_rejected=new["broker_rejected"],
                            dropped_oldest_total=now["dropped_oldest"], rejected_new_total=now["rejected_new"],
                            broker_rejected_total=now["broker_rejected"])

    # -- commands ----------------------------------------------------------------------------
    def parse_command(self, topic: str, payload: bytes) -> Command | None:
        """A valid command, or None after spooling an error ack (never raises)."""
        request_id = None
        try:
            msg = fleet_protocol.decode(topic, payload)
            body = msg["body"]
            request_id = body["request_id"]
            if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
                request_id = None
                raise CommandError("bad_request", "request_id must be a non-empty string of at most 128 characters")
            if msg["kind"] != "cmd":
                raise CommandError("bad_request", f"kind {msg['kind']!r} is not cmd")
            if (msg["fleet"], msg["device"]) != (self.config.fleet, self.config.device_id):
                raise CommandError("bad_request", f"command for {msg['fleet']}/{msg['device']}, this is "
                                                  f"{self.config.fleet}/{self.config.device_id}")
            command = body["command"]
            args = body.get("args") or {}
            if not isinstance(args, dict):
                raise CommandError("bad_request", "args must be an object")
            expires = body.get("expires_ts")
            # (install/rollback: the daemon checks expiry after its command log, so a redelivered command
            # that had already run is answered with its outcome, not refused as expired)
            if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires < time.time() \
                    and body.get("command") not in ("install", "rollback"):
                raise CommandError("expired", f"the command expired at {expires}")
            if command not in fleet_protocol.COMMANDS:
                raise CommandError("unknown_command", f"unknown command {command!r}; this agent knows "
                                                      f"{', '.join(fleet_protocol.COMMANDS)}")
            return Command(request_id, command, args, msg)
        except (fleet_protocol.ProtocolError, CommandError) as exc:
            if request_id is None:
                request_id = _peek_request_id(payload)
            reason = exc.reason if isinstance(exc, CommandError) else "malformed"
            self.bad_commands += 1
            log.warning("refused command on %s: %s", topic, exc)
            self._ack(request_id, False, error={"reason": reason, "message": str(exc)})
            return None

    def execute(self, cmd: Command) -> dict[str, Any]:
        """Run a parsed command and spool its ack (the ack envelope is returned)."""
        cached = self._acks.get(cmd.request_id)
        if cached is not None:  # QoS 1 can deliver a command twice: answer the same again
            return self.publish("ack", dict(cached, duplicate=True))
        try:
            handler = getattr(self, f"_cmd_{cmd.command}")
            result = handler(cmd.args)
            return self._ack(cmd.request_id, True, command=cmd.command, result=result)
        except CommandError as exc:
            return self._ack(cmd.request_id, False, command=cmd.command,
                             error={"reason": exc.reason, "message": str(exc)})
        except RuntimeErrorBase as exc:
            return self._ack(cmd.request_id, False, command=cmd.command, error={"reason": "runtime_error",
                                                                                 **exc.to_event()})
        except Exception as exc:  # a bug of ours: the host still gets an answer, and the event says what broke
            log.exception("command %s failed", cmd.command)
            self.emit_event("error", code=None, name="AGENT_INTERNAL", message=f"{type(exc).__name__}: {exc}",
                            command=cmd.command)
            return self._ack(cmd.request_id, False, command=cmd.command,
                             error={"reason": "internal", "message": f"{type(exc).__name__}: {exc}"})

    def handle_command(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """parse + execute in the calling thread; None when the command was refused."""
        cmd = self.parse_command(topic, payload)
        return self.execute(cmd) if cmd is not None else None

    def refuse(self, cmd: Command, reason: str, message: str) -> dict[str, Any]:
        """Answer a valid command with an error ack without running it."""
        return self._ack(cmd.request_id, False, command=cmd.command, error={"reason": reason, "message": message})

    def _ack(self, request_id: str | None, ok: bool, **fields: Any) -> dict[str, Any]:
        body = {"request_id": request_id, "ok": ok, **fields}
        if request_id is not None:
            self._acks[request_id] = body
            while len(self._acks) > 64:
                self._acks.popitem(last=False)
        return self.publish("ack", body)

    def _cmd_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": time.time(), "boot": self.boot, "state": self.state.value, "model": self.model_info(),
                "runtime_version": __version__, "uptime_s": round(time.time() - self.started_at, 3)}

    def _cmd_install(self, args: dict[str, Any]) -> dict[str, Any]:
        # the daemon runs installs and rollbacks itself (on a worker thread, with its Installer)
        raise CommandError("unsupported", "this agent does not install models (a simulated device)")

    _cmd_rollback = _cmd_install

    def finish(self, cmd: Command, ok: bool, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> dict[str, Any]:
        """Spool the ack of a command that ran elsewhere (install/rollback on a worker thread)."""
        fields: dict[str, Any] = {"command": cmd.command}
        if ok:
            fields["result"] = _finite(result)
        else:
            fields["error"] = error
        return self._ack(cmd.request_id, ok, **fields)

    def replay_ack(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Answer a command again from a kept outcome (a QoS 1 redelivery after a restart)."""
        return self._ack(request_id, bool(body.get("ok")), command=body.get("command"),
                         **({"result": body["result"]} if "result" in body else {"error": body.get("error")}),
                         duplicate=True)

    def _cmd_config(self, args: dict[str, Any]) -> dict[str, Any]:
        changes = args.get("set") or {}
        unknown = set(args) - {"set"}
        if unknown or not isinstance(changes, dict):
            raise CommandError("bad_request", "config takes {} (read) or {\"set\": {name: value}}")
        applied = {}
        for name, value in changes.items():
            kind = RUNTIME_SETTINGS.get(name)
            if kind is None:
                close = difflib.get_close_matches(name, RUNTIME_SETTINGS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise CommandError("bad_request", f"{name!r} cannot be changed at run time{hint}; "
                                                  f"changeable: {', '.join(RUNTIME_SETTINGS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                    (kind is int and int(value) != value):
                raise CommandError("bad_request", f"{name} must be a positive {kind.__name__}")
            applied[name] = kind(value)
        for name, value in applied.items():
            setattr(self.config, name, value)
            if name == "drift_psi_threshold":
                self.drift.psi_threshold = value
            elif name == "drift_min_values":
                self.drift.min_values = value
        return {"config": self.config.public_dict(), "changed": applied, "persisted": False}

    def _cmd_bench(self, args: dict[str, Any]) -> dict[str, Any]:
        from ..bench import BenchSettings, run_benchmark

        if self.model is None:
            raise CommandError("no_model", "no model is loaded; install a bundle first")
        values = {}
        for name, value in args.items():
            if name not in BENCH_LIMITS:
                raise CommandError("bad_request", f"bench takes {', '.join(BENCH_LIMITS)}; not {name!r}")
            lo, hi = BENCH_LIMITS[name]
            if value is None and name == "batch":
                values[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise CommandError("bad_request", f"bench {name} must be a number in [{lo}, {hi}]")
            values[name] = value
        settings = BenchSettings(warmup=int(values.get("warmup", 10)), min_queries=int(values.get("queries", 100)),
                                 min_duration_s=float(values.get("seconds", 1.0)),
                                 max_duration_s=max(float(values.get("seconds", 1.0)) * 4, 10.0),
                                 offline_batch=int(values["batch"]) if values.get("batch") else None)
        if not self._bench_lock.acquire(blocking=False):
            raise CommandError("busy", "a benchmark is already running")
        try:
            result = run_benchmark(self.model, settings=settings)
            result["memory"] = self._bench_memory(settings)
            return json.loads(json.dumps(result, default=str))
        finally:
            self._bench_lock.release()

    def _bench_memory(self, settings) -> dict[str, Any] | None:
        """The active bundle's RSS in a child process of its own, as ``edgekit bench`` measures it on the host
        (:mod:`..memory`); a failure is reported in the figure, the latency result still goes back."""
        from ..keyring import Keyring
        from ..memory import measure

        bundle = self.state_dir.active_bundle()
        if bundle is None:  # a model given to the agent directly (tests, a simulated device)
            return None
        try:
            keyring = Keyring.from_paths(self.config.keyring) if self.config.keyring else Keyring.default()
            return measure(bundle, keyring, threads=self.config.threads, warmup=settings.warmup,
                           offline_batch=settings.offline_batch)
        except RuntimeErrorBase as exc:
            return {"error": exc.to_event()}

    # -- lifecycle -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``agent.json`` holds (read by ``edgekit-agent status``)."""
        return {"pid": os.getpid(), "state": self.state.value, "boot": self.boot, "seq": self._seq,
                "device_id": self.config.device_id, "fleet": self.config.fleet,
                "broker_url": self.config.broker_url, "model": self.model_info(), "model_error": self.model_error,
                "spool": self.spool.stats(), "started_at": self.started_at}

    def close(self) -> None:
        if self.system is not None:
            self.system.close()
        self.spool.close()
        self.state_dir.unlock()


def _finite(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None (and numpy scalars made plain)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _peek_request_id(payload: bytes) -> str | None:
    """Best effort: the request id of a command that failed validation, so its ack can be matched."""
    try:
        rid = json.loads(payload)["body"]["request_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


MAX_REPORT_BYTES = 32 * 1024  # one workload report in a telemetry message; larger ones are left out


def workload_reports(folder: Path, fresh_s: float) -> dict[str, Any]:
    """The reports workloads wrote into ``folder`` (``NAME.json``) within the last ``fresh_s`` seconds, by name:
    a stopped workload's last report is not sent as if it were current. Unreadable or oversized files are named
    with the reason, never raised."""
    import stat as stat_mod

    out: dict[str, Any] = {}
    now = time.time()
    fresh: list[tuple[Path, int]] = []
    try:
        for f in sorted(Path(folder).glob("*.json")):
            st = f.stat()
            if stat_mod.S_ISREG(st.st_mode) and now - st.st_mtime <= fresh_s:  # (a FIFO would block the agent)
                fresh.append((f, st.st_size))
    except OSError:
        return out
    for f, size in fresh[:16]:
        if size > MAX_REPORT_BYTES:
            out[f.stem] = {"error": f"report of {size} bytes left out (limit {MAX_REPORT_BYTES})"}
            continue
        try:
            with open(f, "rb") as fh:
                data = fh.read(MAX_REPORT_BYTES + 1)  # (it may have grown since the stat)
            if len(data) > MAX_REPORT_BYTES:
                out[f.stem] = {"error": f"report over {MAX_REPORT_BYTES} bytes left out"}
                continue
            out[f.stem] = json.loads(data)
        except (OSError, ValueError) as exc:
            out[f.stem] = {"error": f"unreadable report ({type(exc).__name__})"}
    return out
