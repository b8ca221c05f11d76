"""Benchmark a bundle on the device that runs it: the agent's ``bench`` command over MQTT, as a library.

``edgekit bench BUNDLE --device D --fleet F`` calls :func:`bench_on_device`; the
result has the same fields as a local run (:func:`edgekit_runtime.bench.run_benchmark`)
plus ``device`` (which device, which model it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, DeviceError
from ..fleet.connection import BrokerSettings
from .commands import FleetClient
from .fleet_flash import read_bundle


@dataclass(frozen=True)
class RemoteBenchSettings:
    """What the device measures (as ``edgekit bench`` locally) and how long we wait for it."""

    queries: int = 200
    seconds: float = 2.0
    batch: int = 8  # offline batch size; 0 skips the offline run
    warmup: int = 10
    timeout_s: float = 300.0


def bench_on_device(bundle: Path, device: str, fleet: Optional[str], broker: BrokerSettings,
                    settings: RemoteBenchSettings = RemoteBenchSettings()) -> dict[str, Any]:
    """Run the ``bench`` command on ``device`` (which must be running ``bundle``) and return its result."""
    if fleet is None:
        raise ConfigError("--device needs --fleet (the device's fleet)")
    info = read_bundle(bundle)
    sha = info.sha256
    with FleetClient(broker, fleet) as client:
        known = client.discover()
        state = known.get(device)
        if state is None:
            raise ConfigError(f"device {device!r} is not known in fleet {fleet!r} (known: "
                              f"{', '.join(sorted(known)) or 'none'})")
        running = state.get("model") or {}
        if running.get("sha256") not in (None, sha):
            raise ConfigError(f"{device} runs {running.get('name')} {running.get('version')} (sha256 "
                              f"{str(running.get('sha256'))[:12]}…), not {info.path.name} ({sha[:12]}…): flash it "
                              f"first (edgekit flash {bundle} --fleet {fleet} --devices {device})")
        if state.get("status") != "online":
            raise DeviceError(f"{device} is offline; the benchmark needs it online")
        rid = client.send(device, "bench", {"queries": settings.queries, "seconds": settings.seconds,
                                            "warmup": settings.warmup, "batch": settings.batch or None},
                          expires_s=settings.timeout_s)
        ack = client.wait_ack(rid, settings.timeout_s)
    if ack is None:
        raise DeviceError(f"{device} did not answer the benchmark within {settings.timeout_s:.0f} s")
    if not ack["ok"]:
        err = ack.get("error") or {}
        raise DeviceError(f"{device} refused the benchmark: {err.get('reason')}: {err.get('message')}")
    result = ack["result"]
    result["device"] = {"fleet": fleet, "device": device, "model": running, "bundle": info.path.name,
                        "bundle_sha256": sha, "manifest_model": info.manifest["model"]}
    return result
