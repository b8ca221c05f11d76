"""``edgekit fleet simulate``: devices that run the real agent code on synthetic inferences.

Each simulated device is the device agent's own daemon,
:class:`~edgekit_runtime.agent.Agent` without a model: its core (boot counter,
metrics window, latency sketch, drift against a reference, on-disk spool,
commands) and its :class:`~edgekit_runtime.agent.MqttLink` (a paho-mqtt client
with its last will, QoS 1, PUBACK-driven spool), fed synthetic inferences
instead of a model: latencies drawn around ``latency_ms``, failures
at ``error_rate``, and input tensors drawn from the reference distribution —
shifted by ``drift_shift`` standard deviations after ``drift_after_s`` on a
``drift_share`` of the devices. Only the inference is fake; everything a
monitor sees is what a device would send.

Bounded: at most :data:`MAX_DEVICES` devices, and ``duration_s`` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ConfigError
from .connection import BrokerSettings, FleetConnectionError, refusal_message

log = logging.getLogger("edgekit.fleet.simulate")

MAX_DEVICES = 2000
MAX_DURATION_S = 24 * 3600
INPUT_VALUES = 256  # values per synthetic input tensor


def synthetic_manifest(name: str = "simulated", version: str = "1.0") -> dict[str, Any]:
    """A bundle manifest's identity and ``input_stats`` (standard normal reference) for devices without a bundle."""
    edges = np.linspace(-4.0, 4.0, 33)
    cdf = np.array([0.5 * (1 + math.erf(e / math.sqrt(2))) for e in edges])
    counts = np.maximum(np.round(np.diff(cdf) * 100_000), 1).astype(int)
    return {"model": {"name": name, "version": version, "release": 1},
            "target": {"name": "simulated"}, "backend": {"name": "simulated", "precision": "int8"},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, INPUT_VALUES]}],
            "input_stats": {"x": {"count": int(counts.sum()), "mean": 0.0, "std": 1.0,
                                  "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}}}


@dataclass
class SimulationPlan:
    fleet: str = "sim"
    devices: int = 10
    rate: float = 1.0  # telemetry messages per second per device
    duration_s: float = 10.0
    inferences_per_s: float = 20.0
    latency_ms: float = 8.0
    error_rate: float = 0.0
    drift_after_s: Optional[float] = None
    drift_share: float = 1.0
    drift_shift: float = 1.5
    device_prefix: str = "sim"
    state_dir: Optional[Path] = None  # keeps boot counters across runs (default: a temporary folder)
    seed: int = 0
    keepalive_s: int = 10
    manifest: Optional[dict[str, Any]] = None

    def check(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise ConfigError(f"--devices must be 1..{MAX_DEVICES} (got {self.devices})")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ConfigError(f"--duration must be in (0, {MAX_DURATION_S}] s")
        if not 0 < self.rate <= 100:
            raise ConfigError("--rate (telemetry messages per second per device) must be in (0, 100]")
        if not 0 <= self.error_rate <= 1 or not 0 <= self.drift_share <= 1:
            raise ConfigError("--error-rate and --drift-share are fractions in [0, 1]")
        if self.inferences_per_s < 0 or self.latency_ms <= 0:
            raise ConfigError("--inferences must be >= 0 and --latency-ms > 0")


class SimulatedDevice:
    """One device: the agent daemon (:class:`edgekit_runtime.agent.Agent`, no model) plus a synthetic workload."""

    def __init__(self, plan: SimulationPlan, index: int, settings: BrokerSettings, state_root: Path,
                 password_file: Optional[Path]):
        from edgekit_runtime.agent import Agent, AgentConfig

        self.name = f"{plan.device_prefix}{index:04d}"
        self.plan = plan
        self.rng = np.random.default_rng(plan.seed * 100_003 + index)
        self.base_latency_s = plan.latency_ms / 1e3 * float(self.rng.uniform(0.8, 1.25))
        self.drifts = plan.drift_after_s is not None and self.rng.random() < plan.drift_share
        per_window = max(1, int(plan.inferences_per_s / plan.rate))
        cfg: dict[str, Any] = {
            "device_id": self.name, "fleet": plan.fleet,
            "broker_url": f"{'mqtts' if settings.tls else 'mqtt'}://{settings.host}:{settings.port}",
            "state_dir": str(state_root / self.name), "telemetry_interval_s": 1.0 / plan.rate,
            "keepalive_s": plan.keepalive_s, "spool_sync": "normal", "reconnect_min_s": 0.5,
            "reconnect_max_s": 5.0, "shutdown_flush_s": 2.0,
            # judge drift on what about one window brings (the agent's default wants 2000 values)
            "drift_min_values": max(INPUT_VALUES, min(2000, per_window * INPUT_VALUES)),
        }
        if settings.username is not None:
            cfg["username"] = settings.username
            if password_file is not None:
                cfg["password_file"] = str(password_file)
        for key, value in (("ca_file", settings.cafile), ("cert_file", settings.certfile),
                           ("key_file", settings.keyfile)):
            if value is not None:
                cfg[key] = str(value)
        self.agent = Agent(AgentConfig.from_dict(cfg), load_model=False, system_stats=False, workload=False,
                           model_manifest=plan.manifest or synthetic_manifest())
        self.core = self.agent.core
        self.link = self.agent.link
        self.carry = 0.0  # fractional inferences owed to the next round
        self.last = time.monotonic()

    # the small interface a simulator needs from the agent
    def record_inference(self, latency_s: float, inputs: Any = None, error_code: Optional[int] = None) -> None:
        self.core.record_inference(latency_s, inputs, error_code)

    def tick(self) -> dict[str, Any]:
        return self.core.tick()

    def start(self) -> None:
        self.agent.start()
        self.last = time.monotonic()

    def synthetic_inferences(self, elapsed_s: float, now: float) -> None:
        """The inferences owed since the last call: latencies, failures, input tensors (shifted once drifting)."""
        from edgekit_runtime.contract.errors import ErrorCode

        plan = self.plan
        owed = plan.inferences_per_s * (now - self.last) + self.carry
        self.last = now
        n = int(owed)
        self.carry = owed - n
        if n == 0:
            return
        shift = plan.drift_shift if (self.drifts and elapsed_s >= (plan.drift_after_s or 0.0)) else 0.0
        lat = self.base_latency_s * self.rng.lognormal(0.0, 0.25, n)
        fails = self.rng.random(n) < plan.error_rate
        xs = (self.rng.standard_normal((n, INPUT_VALUES)) + shift).astype(np.float32)
        for i in range(n):
            if fails[i]:
                self.record_inference(float(lat[i]), None, int(ErrorCode.ENGINE_INFERENCE_FAILED))
            else:
                self.record_inference(float(lat[i]), {"x": xs[i][None, :]})

    def step(self, elapsed_s: float) -> None:
        """Owed inferences, then one round of the agent (MQTT events, commands, a due window, the sender)."""
        self.synthetic_inferences(elapsed_s, time.monotonic())
        self.agent.step(0)

    @property
    def refused(self) -> Optional[str]:
        link = self.link
        return link.last_reason if (not link.connected and link.connect_failures) else None

    def stop(self) -> dict[str, Any]:
        """The agent's shutdown: last window, spool flush, "offline", disconnect."""
        core = self.core
        boot, name = core.boot, self.name
        self.agent.shutdown()
        return {"device": name, "boot": boot, "messages": core.seq}


def _refusal_text(settings: BrokerSettings, reason: str) -> str:
    """paho's reason text → our message (with what to check) where the code is known."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    for code in (0x84, 0x85, 0x86, 0x87, 0x88, 0x8A, 0x8C):
        if str(ReasonCode(PacketTypes.CONNACK, identifier=code)) == reason:
            return refusal_message(settings.url, code)
    return f"devices cannot connect to {settings.url}: {reason}"


class SimulatedFleet:
    """``plan.devices`` simulated devices against one broker, for ``plan.duration_s`` seconds."""

    def __init__(self, settings: BrokerSettings, plan: SimulationPlan):
        plan.check()
        self.settings = settings
        self.plan = plan
        self.devices: list[SimulatedDevice] = []
        self._tmp: Optional[Path] = None
        self._password_file: Optional[Path] = None

    def start(self) -> None:
        """Create every device (boot counters advance) and start connecting."""
        plan = self.plan
        if plan.state_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edgekit-simulate-"))
        root = plan.state_dir or self._tmp
        root.mkdir(parents=True, exist_ok=True)
        if self.settings.password is not None:
            # the agent reads its password from a file, as on a device
            fd, name = tempfile.mkstemp(prefix="edgekit-sim-pw-")
            os.close(fd)
            self._password_file = Path(name)
            self._password_file.write_text(self.settings.password)
        try:
            for i in range(plan.devices):
                self.devices.append(SimulatedDevice(plan, i, self.settings, root, self._password_file))
            for dev in self.devices:
                dev.start()
        except BaseException:
            self.stop()
            raise

    def run(self, on_second: Optional[Callable[["SimulatedFleet", float], None]] = None) -> dict[str, Any]:
        """Run for ``duration_s``, then stop every device; returns counts.

        Raises :class:`FleetConnectionError` when the broker refuses every device.
        """
        if not self.devices:
            self.start()
        plan = self.plan
        t0 = time.monotonic()
        end = t0 + plan.duration_s
        last_report = t0
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                for dev in self.devices:
                    dev.step(now - t0)
                refused = [d.refused for d in self.devices]
                if all(refused):
                    raise FleetConnectionError(_refusal_text(self.settings, refused[0]))
                if on_second and now - last_report >= 1.0:
                    last_report = now
                    on_second(self, now - t0)
                # a round over every device takes time too: sleep what is left of ~20 ms
                time.sleep(max(0.0, min(0.02 - (time.monotonic() - now), end - time.monotonic())))
        finally:
            summary = self.stop()
        summary["seconds"] = round(time.monotonic() - t0, 3)
        return summary

    def stop(self) -> dict[str, Any]:
        """Stop every device (in parallel: each waits for its last PUBACKs)."""
        devices, self.devices = self.devices, []
        with ThreadPoolExecutor(max_workers=min(32, max(len(devices), 1))) as pool:
            per_device = list(pool.map(SimulatedDevice.stop, devices))
        if self._password_file is not None:
            self._password_file.unlink(missing_ok=True)
            self._password_file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return {"fleet": self.plan.fleet, "devices": len(per_device),
                "messages": sum(d["messages"] for d in per_device),
                "boots": sorted({d["boot"] for d in per_device}), "per_device": per_device}
