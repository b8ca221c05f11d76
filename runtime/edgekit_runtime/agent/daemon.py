"""The device agent daemon: load the active bundle, connect, report, answer commands.

One thread runs :meth:`Agent.step` in a loop: it applies MQTT events, answers
commands, closes telemetry windows on time, runs the optional workload and
feeds the spool to the broker. paho's network thread only queues events; a
``bench`` command runs on a worker thread so telemetry keeps its pace.

A simulator can drive many agents from one thread: ``Agent(config,
load_model=False, system_stats=False)``, :meth:`Agent.start`, then
``agent.core.record_inference(...)`` and :meth:`Agent.step` with ``timeout=0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import shutil
import stat
import threading
import time
from typing import Any, Callable

import numpy as np

from ..contract.errors import ErrorCode, RuntimeErrorBase
from ..contract.manifest import Manifest
from .config import AgentConfig, WorkloadConfig
from .core import AgentCore, Command
from .drift import DriftUnavailable, Reference
from ..command_auth import MAX_COMMAND_LIFETIME_S
from .install import Installer, InstallError, InstallRequest
from .mqtt import MqttLink
from .state import AgentState, CommandLog, StateDir, atomic_write

INBOX_POLL_S = 0.25
CLOCK_SKEW_S = 3600.0  # a device clock this far behind the host's still takes a command at the expiry limit
LOCAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

log = logging.getLogger("edgekit_runtime.agent")


def load_active_model(state_dir: StateDir, config: AgentConfig,
                      installer: Installer | None = None) -> tuple[Any | None, dict[str, Any]]:
    """``(model, health_check_result)`` for the active slot's bundle, or ``(None, error)`` saying why not.

    The bundle is verified again with the device keyring and must pass its
    health check; a failure is reported (the agent runs on, degraded), never raised.
    """
    from ..api import load
    from ..keyring import Keyring

    bundle = state_dir.active_bundle()
    if bundle is None:
        return None, {"code": None, "name": "NO_BUNDLE", "message": f"no bundle is installed in {state_dir.root}",
                      "hint": "edgekit-agent install BUNDLE --config FILE"}
    model = None
    try:
        if installer is not None:
            model = installer._load(bundle, bundle.parent / "model")
            health = installer.health_check(model, latency_gate=False)  # a busy device keeps its model
        else:
            keyring = Keyring.from_paths(config.keyring) if config.keyring else Keyring.default()
            model = load(bundle, keyring=keyring, threads=config.threads)
            health = model.health_check()
        if not health["ok"]:
            model.close()
            return None, {"code": int(ErrorCode.ENGINE_HEALTH_CHECK_FAILED), "name": "HEALTH_CHECK_FAILED",
                          "message": f"the bundle's health check failed: {health.get('problem', health)}",
                          "hint": None}
        return model, health
    except RuntimeErrorBase as exc:
        if model is not None:
            model.close()
        return None, exc.to_event()
    except Exception as exc:  # an engine library failing in its own way: reported, the agent stays up degraded
        log.exception("loading %s failed", bundle)
        if model is not None:
            model.close()
        return None, {"code": int(ErrorCode.ENGINE_LOAD_FAILED), "name": ErrorCode.ENGINE_LOAD_FAILED.name,
                      "message": f"{type(exc).__name__}: {exc}", "hint": None}


def active_bundle_info(state_dir: StateDir) -> dict[str, Any] | None:
    """``{"slot", "sha256"}`` of the active slot (the sha256 is computed for slots of older agents)."""
    slot = state_dir.active_slot()
    if slot is None:
        return None
    rec = state_dir.read_slot(slot)
    sha = rec.get("sha256")
    if sha is None and state_dir.active_bundle() is not None:
        from .fetch import sha256_file

        sha = sha256_file(state_dir.active_bundle())
    return {"slot": slot, "sha256": sha}


class Workload:
    """Inferences the agent runs itself at ``rate_hz``: an image folder, or synthetic tensors.

    Synthetic tensors are drawn afresh for every inference from the bundle's
    reference histogram (so an unshifted workload shows no drift), shifted by
    ``synthetic_shift`` reference standard deviations.
    """

    def __init__(self, cfg: WorkloadConfig, core: AgentCore, seed: int = 0):
        self.core = core
        self.period = 1.0 / cfg.rate_hz
        self.next = time.monotonic()
        self.images: list[Any] = []
        self._i = 0
        self.synthetic: SyntheticFeeds | None = None
        model = core.model
        if model is None:
            raise RuntimeErrorBase("the workload needs a model", code=ErrorCode.ENGINE_UNAVAILABLE)
        if cfg.images is not None:
            from ..processing import list_images

            self.images = list_images(cfg.images)
            if not self.images:
                raise RuntimeErrorBase(f"workload.images {cfg.images} holds no images", code=ErrorCode.INPUT_MISSING)
        else:
            self.synthetic = SyntheticFeeds(model, cfg.synthetic_shift, seed)

    def due(self, now: float) -> bool:
        return now >= self.next

    def run_one(self, now: float) -> None:
        if self.synthetic is not None:
            item: Any = self.synthetic.next()
        else:
            item = self.images[self._i % len(self.images)]
            self._i += 1
        self.next = max(self.next + self.period, now - self.period)  # no burst after a stall
        try:
            self.core.predict(item)
        except Exception as exc:  # already counted (by code) and reported as an event by predict()
            log.debug("workload inference failed: %s", exc)


class SyntheticFeeds:
    """Feeds with the model's signature (batch 1) drawn from its reference input histograms.

    An input without a reference histogram gets ``N(mean, std)`` of its
    input_stats (as ``edgekit_runtime.bench`` does).
    """

    def __init__(self, model: Any, shift: float = 0.0, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.shift = shift
        stats = model.manifest.input_stats
        self.inputs = []
        for spec in model.inputs:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            try:
                ref: Reference | None = Reference.from_stats(spec.name, stats.get(spec.name))
            except DriftUnavailable:
                ref = None
            s = stats.get(spec.name)
            mean = s.mean if s is not None and s.mean is not None else 0.0
            std = s.std if s is not None and s.std is not None else 1.0
            self.inputs.append((spec, shape, ref, mean, std))

    def next(self) -> dict[str, np.ndarray]:
        feeds = {}
        rng = self.rng
        for spec, shape, ref, mean, std in self.inputs:
            size = int(np.prod(shape))
            if ref is not None:
                bins = rng.choice(len(ref.counts), size=size, p=ref.counts / ref.counts.sum())
                lo, hi = ref.edges[bins], ref.edges[bins + 1]
                x = lo + rng.random(size) * (hi - lo) + self.shift * (ref.std or 0.0)
            else:
                x = rng.normal(mean + self.shift * std, std, size)
            feeds[spec.name] = x.reshape(shape).astype(spec.dtype)
        return feeds


def make_installer(state_dir: StateDir, config: AgentConfig, on_progress=None, should_stop=None) -> Installer | str:
    """An :class:`Installer` with the device keyring, or the reason there cannot be one."""
    from ..engines.tensorrt_engine import CACHE_ENV
    from ..keyring import Keyring

    # TensorRT engines built at install time are cached in the state directory (the only place the
    # agent's systemd unit may write), keyed by TensorRT, GPU and bundle: a rollback reuses its engine
    os.environ.setdefault(CACHE_ENV, str(state_dir.root / "engine-cache"))

    try:
        keyring = Keyring.from_paths(config.keyring) if config.keyring else Keyring.default()
    except RuntimeErrorBase as exc:
        return f"no keyring: {exc}"
    return Installer(state_dir, keyring, threads=config.threads, latency_budget_ms=config.health_latency_budget_ms,
                     latency_runs=config.health_latency_runs, download_timeout_s=config.download_timeout_s,
                     download_retries=config.download_retries, ca_file=config.download_ca_file,
                     download_max_s=config.download_max_s,
                     on_progress=on_progress, should_stop=should_stop)


class Agent:
    """The daemon: :class:`AgentCore` + :class:`MqttLink` + an optional workload.

    ``model``: serve this model instead of loading the active slot's bundle;
    ``load_model=False``: serve none (simulated devices; ``model_manifest``
    then names what they claim to run and holds their drift reference).
    ``system_stats``: sample /proc and /sys in every telemetry window.
    """

    def __init__(self, config: AgentConfig, *, model: Any | None = None, load_model: bool = True,
                 system_stats: bool = True, workload: bool = True,
                 model_manifest: Manifest | dict[str, Any] | None = None):
        self.config = config
        self.core = AgentCore(config, None, system_stats=system_stats)
        self._owns_model = model is None
        self.health: dict[str, Any] | None = None
        self._stop = threading.Event()
        self.installer: Installer | None = None
        self.installer_error: str | None = None
        self.recovered: dict[str, Any] | None = None
        self.fell_back: dict[str, Any] | None = None
        try:
            if load_model:
                self.installer = make_installer(self.core.state_dir, config, self._on_progress, self._stop.is_set)
                if isinstance(self.installer, str):
                    self.installer_error, self.installer = self.installer, None
                else:
                    self.recovered = self.installer.recover()
            error = None
            bundle_info = None
            if model is None and load_model:
                model, info = load_active_model(self.core.state_dir, config, self.installer)
                if model is None and self.installer is not None and info.get("name") != "NO_BUNDLE":
                    fallback = self.installer.fall_back(info)  # the active slot is broken: the previous one
                    if fallback is not None:
                        result, model = fallback
                        self.fell_back = {**result, "error": info}
                        info = result["health"]
                if model is None:
                    error = info
                else:
                    self.health = info
                    bundle_info = active_bundle_info(self.core.state_dir)
            self.core.set_model(model, error=error, manifest=model_manifest, bundle_info=bundle_info)
            self.link = MqttLink(self.core)
        except BaseException:
            self.core.close()
            raise
        self.core.on_message = self.link.wake
        self._workload_enabled = workload and config.workload is not None
        self.workload: Workload | None = None
        self._next_tick = 0.0
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run on the loop thread
        self._change: dict[str, Any] | None = None  # the install/rollback running on a worker
        self._retired: list[Any] = []  # replaced models a benchmark may still be running on
        self.command_log = CommandLog(self.core.state_dir.command_log)
        self._next_inbox = 0.0
        self._reported_state: AgentState | None = None
        self._workers: list[threading.Thread] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Report the model, start connecting; returns at once."""
        core = self.core
        core.set_state(AgentState.CONNECTING)
        core.live_epoch = 1  # provisional: live if the first connection attempt succeeds
        if self.recovered is not None:
            core.emit_event("install_recovered", **self.recovered)
        if self.fell_back is not None:
            core.emit_event("rolled_back", reason="the active model failed at start", slot=self.fell_back["slot"],
                            previous_slot=self.fell_back["previous_slot"], error=self.fell_back["error"])
        if self.fell_back is not None:
            log.error("the active model failed at start (%s); serving slot %s instead",
                      self.fell_back["error"].get("message"), self.fell_back["slot"])
        if core.model is not None:
            core.emit_event("model_loaded", model=core.model_info(), health=self.health)
            warning = (self.health or {}).get("warning")
            if warning:
                log.warning("the model serves, but %s", warning)
                core.emit_event("latency_over_budget", message=warning, latency=self.health.get("latency"))
        elif core.model_error and core.model_error.get("name") != "NO_BUNDLE":
            log.error("no model serves: %s", core.model_error.get("message"))
            core.emit_event("model_load_failed", **core.model_error)
        if self._workload_enabled:
            try:
                self.workload = Workload(self.config.workload, core)
            except RuntimeErrorBase as exc:
                log.error("workload disabled: %s", exc)
                core.emit_event("error", **exc.to_event(), context="workload")
        self._next_tick = time.monotonic() + self.config.telemetry_interval_s
        self.link.start()
        self._write_status()

    def request_stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler or another thread)."""
        self._stop.set()
        self.link.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Start, then serve until :meth:`request_stop`; always shuts down cleanly."""
        self.start()
        try:
            while not self._stop.is_set():
                self.step(self._wait_time())
        finally:
            self.shutdown()

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadline = self._next_tick
        if self.workload is not None:
            deadline = min(deadline, self.workload.next)
        return min(max(deadline - now, 0.0), 1.0)

    def step(self, timeout: float = 0.0) -> None:
        """One round: MQTT events, commands, a due telemetry window or inference, the sender."""
        link, core = self.link, self.core
        for topic, payload, mid, qos in link.process(link.wait(timeout)):
            self._dispatch(topic, payload, mid, qos)
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            call()
        self._close_retired()
        now = time.monotonic()
        if now >= self._next_inbox and self.installer is not None:
            self._next_inbox = now + INBOX_POLL_S
            self._poll_inbox()
        if now >= self._next_tick:
            core.tick()
            interval = core.config.telemetry_interval_s
            self._next_tick = max(self._next_tick + interval, now + interval / 2)
            self._write_status()
        elif self._next_tick - now > core.config.telemetry_interval_s:  # the interval was shortened
            self._next_tick = now + core.config.telemetry_interval_s
        if self.workload is not None and self.workload.due(now):
            self.workload.run_one(now)
        link.pump()
        if core.state != self._reported_state:
            self._write_status()

    def _dispatch(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        cmd = self.core.parse_command(topic, payload)
        if cmd is None:
            self.link.ack_command(mid, qos)
        elif cmd.command in ("install", "rollback"):
            self._start_change(cmd, mid, qos)
        elif cmd.command == "bench":  # seconds of work: off the loop, so telemetry keeps its pace
            worker = threading.Thread(target=self._run_async, args=(cmd, mid, qos), daemon=True,
                                      name=f"edgekit-agent-{cmd.command}")
            self._workers = [w for w in self._workers if w.is_alive()] + [worker]
            worker.start()
        else:
            self.core.execute(cmd)
            self.link.ack_command(mid, qos)

    def _run_async(self, cmd: Command, mid: int, qos: int) -> None:
        self.core.execute(cmd)
        self.link.ack_command(mid, qos)
        self.link.wake()

    # -- installs and rollbacks --------------------------------------------------------------
    def _on_progress(self, step: str, info: dict[str, Any]) -> None:
        change = self._change or {}
        self.core.emit_event("install_progress", request_id=change.get("request_id"), step=step, **info)

    def _start_change(self, cmd: Command | None, mid: int | None, qos: int, *,
                      local: dict[str, Any] | None = None) -> None:
        """Check an install/rollback and run it on a worker; its ack is sent when it is done.

        Order matters: the signature first (nothing unauthenticated reaches the command
        log or the caches), then the command log (a finished request id is answered again
        and never executed twice, even after its expiry; a started one, cut short by a
        crash, runs again), then expiry, then "busy".
        """
        core = self.core
        request_id = cmd.request_id if cmd is not None else local["request_id"]
        command = cmd.command if cmd is not None else local["command"]

        def refuse(reason: str, message: str) -> None:
            error = {"reason": reason, "step": None, "code": None, "name": None, "message": message,
                     "active_slot": core.state_dir.active_slot()}
            self._answer(cmd, [(mid, qos)], local, False, None, error, record=False)

        if self.installer is None:
            return refuse("unsupported", self.installer_error or "this agent does not install models")
        expires = None
        if cmd is not None:
            body = cmd.envelope["body"]
            if self.config.require_signed_commands:
                from ..command_auth import CommandAuthError, verify_command

                try:
                    verify_command(self.config.fleet, self.config.device_id, body, self.installer.keyring)
                except CommandAuthError as exc:
                    core.bad_commands += 1
                    return refuse("unauthorized", str(exc))
            expires = body.get("expires_ts")
            if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
                if self.config.require_signed_commands:
                    return refuse("bad_request", "a signed install/rollback must carry expires_ts (UNIX time), so "
                                                 "the device can stop remembering it")
                expires = time.time() + 86400
            if expires > time.time() + MAX_COMMAND_LIFETIME_S + CLOCK_SKEW_S:
                return refuse("bad_request", f"expires_ts is more than {MAX_COMMAND_LIFETIME_S // 86400} days "
                                             "ahead; send commands that expire sooner")
            if self._change is not None and self._change["request_id"] == request_id:
                log.info("%s %s delivered again while it runs: acknowledged when it is done", command, request_id)
                self._change["deliveries"].append((mid, qos))
                return
            seen = self.command_log.get(request_id)
            if seen is not None and "ack" in seen:
                core.replay_ack(request_id, seen["ack"])  # done before (a redelivery, a resumed rollout, a replay)
                self.link.ack_command(mid, qos)
                return
            if expires < time.time():
                pointer = core.state_dir.read_pointer() or {}
                if request_id not in (pointer.get("request_id"), pointer.get("rollback_of")):
                    return refuse("expired", f"the command expired at {expires}")
                # it expired, but it had switched the device before a crash cut off its answer: run it
                # again, which changes nothing and answers what happened (already active / rolled back)
        args = (cmd.args if cmd is not None else local.get("args")) or {}
        req = None
        if command == "install":
            try:
                req = (InstallRequest.from_args(args, request_id) if cmd is not None else
                       InstallRequest(args["path"], args.get("sha256"), None, bool(args.get("allow_downgrade")),
                                      request_id, shadow=bool(args.get("shadow"))))
            except (ValueError, KeyError) as exc:
                return refuse("bad_request", str(exc))
        else:
            unknown = set(args) - {"reason", "from_sha256"}
            frm = args.get("from_sha256")
            if unknown or (frm is not None and (not isinstance(frm, str) or len(frm) != 64)):
                return refuse("bad_request", "rollback takes args.reason and args.from_sha256 (64 hex digits)")
        if self._change is not None:
            return refuse("busy", f"{self._change['command']} {self._change['request_id']} is running; "
                                  "send again when it has finished")
        if cmd is not None:
            try:
                self.command_log.started(request_id, command, float(expires))
            except OSError as exc:  # a full disk: better refused than run without a record against replays
                return refuse("storage_error", f"cannot record the command ({exc.strerror or exc}); free space in "
                                               f"{core.state_dir.root}")
        self._change = {"request_id": request_id, "command": command, "started": time.monotonic(),
                        "deliveries": [(mid, qos)]}
        worker = threading.Thread(target=self._run_change, args=(cmd, local, command, req, args),
                                  daemon=True, name=f"edgekit-agent-{command}")
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()

    def _run_change(self, cmd, local, command: str, req: InstallRequest | None, args: dict[str, Any]) -> None:
        assert self.installer is not None
        request_id = self._change["request_id"] if self._change else None
        result = error = model = None
        try:
            if command == "install":
                result, model = self.installer.install(req)
            else:
                result, model = self.installer.rollback(args.get("reason"), request_id, args.get("from_sha256"))
            ok = True
        except InstallError as exc:
            ok, error = False, exc.to_error(self.core.state_dir.active_slot())
        except Exception as exc:  # a bug of ours: the old model still serves; the host gets an answer
            log.exception("%s failed", command)
            ok, error = False, {"reason": "internal", "step": None, "code": None, "name": "AGENT_INTERNAL",
                                "message": f"{type(exc).__name__}: {exc}",
                                "active_slot": self.core.state_dir.active_slot()}
        if self._stop.is_set() and not ok:
            return  # cut short by the stop: no answer; the broker delivers the command again after the restart
        self._calls.put(lambda: self._finish_change(cmd, local, command, ok, result, error, model))
        self.link.wake()

    def _finish_change(self, cmd, local, command: str, ok: bool, result, error, model) -> None:
        """On the loop thread: serve the new model, retire the old one, report, answer."""
        core = self.core
        if ok and model is None:
            # nothing changed on disk (already active, or nothing to roll back); still, make sure the agent
            # serves what the pointer names (it may have started degraded, or the pointer moved under it)
            active = active_bundle_info(core.state_dir)
            if active is not None and (core.model is None or (core.bundle_info or {}).get("sha256") != active["sha256"]):
                model, health = load_active_model(core.state_dir, self.config, self.installer)
                if model is not None:
                    result = {**result, "health": health}
                    self.health = health
                else:  # the bundle is there and intact, but does not load here: that is no success
                    ok, result = False, None
                    error = {"reason": "prepare_failed", "step": "prepare", "code": health.get("code"),
                             "name": health.get("name"), "message": f"the active bundle does not load: "
                             f"{health.get('message')}", "active_slot": active["slot"]}
        if ok and model is not None:
            self._serve(model, {"slot": result["slot"], "sha256": result.get("sha256")}, result.get("health"))
            kind = "model_installed" if command == "install" else "rolled_back"
            core.emit_event(kind, request_id=(cmd.request_id if cmd else local["request_id"]), slot=result["slot"],
                            previous_slot=result.get("previous_slot"), model=core.model_info(),
                            **({"reason": result.get("reason")} if command == "rollback" else {}))
            self.link.publish_state()
        elif ok and (result or {}).get("shadow"):
            core.emit_event("shadow_installed", request_id=(cmd.request_id if cmd else local["request_id"]),
                            slot=result["shadow_slot"], active_slot=result["slot"], model=result["model"])
        elif not ok:
            core.emit_event("install_failed" if command == "install" else "rollback_failed",
                            request_id=(cmd.request_id if cmd else local["request_id"]), **error)
            # a failed change may still have moved the pointer (a damaged active slot falls back to the
            # previous one before it is installed again): serve what the pointer names
            active = active_bundle_info(core.state_dir)
            if active is not None and (core.bundle_info or {}).get("sha256") != active["sha256"]:
                model, health = load_active_model(core.state_dir, self.config, self.installer)
                if model is not None:
                    self._serve(model, active, health)
                    core.emit_event("model_loaded", model=core.model_info(), health=health)
                    self.link.publish_state()
        deliveries = self._change["deliveries"] if self._change else []
        self._change = None
        self._answer(cmd, deliveries, local, ok, result, error, record=True)
        self._write_status()

    def _serve(self, model: Any, bundle_info: dict[str, Any], health: dict[str, Any] | None) -> None:
        """Swap the served model; the old one is closed once no benchmark still runs on it."""
        core = self.core
        old = core.model
        self.workload = None
        core.set_model(model, bundle_info=bundle_info)
        self.health = health
        if old is not None and self._owns_model:
            self._retired.append(old)
        self._owns_model = True
        self._close_retired()
        if core.state in (AgentState.ONLINE, AgentState.DEGRADED):
            core.set_state(core.serving_state())
        if self._workload_enabled:
            try:
                self.workload = Workload(self.config.workload, core)
            except RuntimeErrorBase as exc:
                log.error("workload disabled: %s", exc)

    def _close_retired(self) -> None:
        if self._retired and not self.core._bench_lock.locked():
            for model in self._retired:
                model.close()
            self._retired = []

    def _answer(self, cmd, deliveries, local, ok: bool, result, error, *, record: bool) -> None:
        if cmd is not None:
            ack = self.core.finish(cmd, ok, result=result, error=error)
            if record:  # kept until the command expires: a redelivery or replay gets this answer again
                try:
                    self.command_log.finished(cmd.request_id, ack["body"])
                except OSError:
                    log.exception("cannot record the outcome of %s", cmd.request_id)
            for mid, qos in deliveries:
                if mid is not None:
                    self.link.ack_command(mid, qos)
        else:
            reply = {"request_id": local["request_id"], "ok": ok, "command": local["command"],
                     **({"result": result} if ok else {"error": error})}
            atomic_write(self.core.state_dir.outbox / f"{local['request_id']}.json",
                         json.dumps(reply, default=str).encode(), durable=False)

    def _poll_inbox(self) -> None:
        """Requests dropped by ``edgekit-agent install``/``rollback`` while this agent runs."""
        for path in sorted(self.core.state_dir.inbox.glob("*.json")):
            taken = path.with_suffix(".taken")
            try:
                path.rename(taken)
                st = os.lstat(taken)
                if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:  # never block on a FIFO or read a huge file
                    raise ValueError("not a small regular file")
                request = json.loads(taken.read_text())
                local = {"request_id": request["request_id"], "command": request["command"],
                         "args": request.get("args") or {}}
                if not isinstance(local["request_id"], str) or not LOCAL_ID.fullmatch(local["request_id"]):
                    raise ValueError("request_id must be 1-64 of [A-Za-z0-9_-] (it names the reply file)")
                if local["command"] not in ("install", "rollback"):
                    raise ValueError(f"unknown command {local['command']!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignored inbox request %s: %s", path.name, exc)
                continue
            finally:
                try:
                    if taken.is_dir() and not taken.is_symlink():
                        shutil.rmtree(taken, ignore_errors=True)
                    else:
                        taken.unlink(missing_ok=True)
                except OSError as exc:  # whatever is in the inbox, the loop goes on
                    log.warning("cannot remove %s: %s", taken, exc)
            self._start_change(None, None, 0, local=local)

    def _write_status(self) -> None:
        status = self.core.status()
        status["connected"] = self.link.connected
        self.core.state_dir.write_status(status)
        self._reported_state = self.core.state

    def shutdown(self) -> None:
        """Close the last window, flush the spool (``shutdown_flush_s``), publish "offline", close."""
        if self._closed:
            return
        self._closed = True
        core = self.core
        if core.state != AgentState.STOPPED:
            core.set_state(AgentState.STOPPING)
        for worker in self._workers:
            worker.join(timeout=self.config.shutdown_flush_s)
        if self._next_tick:  # started: the partial window is telemetry too
            core.tick()
        self.link.stop(self.config.shutdown_flush_s)
        core.set_state(AgentState.STOPPED)
        self._write_status()
        if self._owns_model and core.model is not None:
            core.model.close()
        for model in self._retired:
            model.close()
        core.close()
        log.info("agent stopped (boot %d, %d messages left in the spool)", core.boot, len(core.spool))
