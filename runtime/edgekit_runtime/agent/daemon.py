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

import logging
import threading
import time
from typing import Any

import numpy as np

from ..errors import ErrorCode, RuntimeErrorBase
from .config import AgentConfig, WorkloadConfig
from .core import AgentCore, Command
from .drift import DriftUnavailable, Reference
from .mqtt import MqttLink
from .state import AgentState, StateDir

log = logging.getLogger("edgekit_runtime.agent")


def load_active_model(state_dir: StateDir, config: AgentConfig) -> tuple[Any | None, dict[str, Any]]:
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
        keyring = Keyring.from_paths(config.keyring) if config.keyring else Keyring.default()
        model = load(bundle, keyring=keyring, threads=config.threads)
        health = model.health_check()
        if not health["ok"]:
            model.close()
            return None, {"code": int(ErrorCode.ENGINE_INFERENCE_FAILED), "name": "HEALTH_CHECK_FAILED",
                          "message": f"the bundle's health check failed: {health}", "hint": None}
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
        stats = model.manifest.get("input_stats") or {}
        self.inputs = []
        for spec in model.inputs:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            try:
                ref: Reference | None = Reference.from_stats(spec.name, stats.get(spec.name))
            except DriftUnavailable:
                ref = None
            s = stats.get(spec.name) or {}
            self.inputs.append((spec, shape, ref, float(s.get("mean", 0.0)), float(s.get("std", 1.0))))

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


class Agent:
    """The daemon: :class:`AgentCore` + :class:`MqttLink` + an optional workload.

    ``model``: serve this model instead of loading the active slot's bundle;
    ``load_model=False``: serve none (simulated devices; ``model_manifest``
    then names what they claim to run and holds their drift reference).
    ``system_stats``: sample /proc and /sys in every telemetry window.
    """

    def __init__(self, config: AgentConfig, *, model: Any | None = None, load_model: bool = True,
                 system_stats: bool = True, workload: bool = True, model_manifest: dict[str, Any] | None = None):
        self.config = config
        self.core = AgentCore(config, None, system_stats=system_stats)
        self._owns_model = model is None
        self.health: dict[str, Any] | None = None
        try:
            error = None
            if model is None and load_model:
                model, info = load_active_model(self.core.state_dir, config)
                if model is None:
                    error = info
                else:
                    self.health = info
            self.core.set_model(model, error=error, manifest=model_manifest)
            self.link = MqttLink(self.core)
        except BaseException:
            self.core.close()
            raise
        self.core.on_message = self.link.wake
        self._workload_enabled = workload and config.workload is not None
        self.workload: Workload | None = None
        self._stop = threading.Event()
        self._next_tick = 0.0
        self._reported_state: AgentState | None = None
        self._workers: list[threading.Thread] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Report the model, start connecting; returns at once."""
        core = self.core
        core.set_state(AgentState.CONNECTING)
        core.live_epoch = 1  # provisional: live if the first connection attempt succeeds
        if core.model is not None:
            core.emit_event("model_loaded", model=core.model_info(), health=self.health)
        elif core.model_error and core.model_error.get("name") != "NO_BUNDLE":
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
        now = time.monotonic()
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
        core.close()
        log.info("agent stopped (boot %d, %d messages left in the spool)", core.boot, len(core.spool))
