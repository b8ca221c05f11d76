"""Flash a bundle to a fleet, resume or roll back: what ``edgekit flash --fleet`` and ``rollback`` do, as a library.

:class:`FleetFlash` puts the pieces of :mod:`.plan`, :mod:`.rollout`, :mod:`.commands`
and :mod:`.server` together: read the bundle, serve it (or use a given URL), connect
to the fleet, select the devices, plan and run the rollout, and stop what it started.
The CLI uses it (``benchmarks/fleet_rollout.py`` runs the CLI, the live tests call it); nobody builds a plan by hand.

    settings = FleetFlashSettings(fleet="f1", devices="cam-*", canary="10%")
    with FleetFlash(broker, sign_key, settings, bundle=Path("m.ekb"), source=BundleSource(url=...)) as job:
        summary = job.run()          # job.rollout.record is the live record while it runs

Nothing here prints: progress is the record (``job.rollout.record``, ``on_change``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..fleet.connection import BrokerSettings
from .commands import FleetClient, select_devices
from .plan import RolloutPlan
from .rollout import Rollout, load_record, request_pause, rollback_from_record
from .server import BundleServer

# answers that arrive while a rollout waits are written to its record at most this often: every write is the
# whole record, fsync'd (~100 KB and tens of ms at a hundred devices), and one per answer grows with the square
# of the fleet; what a crash loses before the next write is asked for again on resume (see rollout.Rollout)
RECORD_WRITE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class BundleInfo:
    """A bundle file as a rollout names it: its manifest (read, not verified), sha256 and size."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    size: int


def read_bundle(path: Path) -> BundleInfo:
    """The bundle's manifest, sha256 and size; devices verify it, this catches a wrong file early."""
    from edgekit_runtime.fileio import sha256_file  # the digest devices check the download against
    from edgekit_runtime.bundle import read_manifest_unverified

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bundle {path} does not exist")
    try:
        manifest = read_manifest_unverified(path)
    except Exception as exc:  # any reason it cannot be read as a bundle is the same answer for the user
        raise ConfigError(f"{path} is not an edgekit bundle ({exc})") from None
    return BundleInfo(path, manifest, sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class FleetFlashSettings:
    """How a bundle goes to a fleet: which devices, how carefully, where the record is kept."""

    fleet: str
    devices: str = "*"  # globs and filters, as select_devices reads them
    canary: str = "10%"  # a share ("10%") or a count ("2")
    max_failures: Optional[int] = None  # halt when more fail; None: 0, or no count rule with abort_percent
    abort_percent: Optional[float] = None  # halt when >= this % of the finished devices failed
    abort_min_devices: int = 0  # ... once this many devices finished
    wave_size: int = 0  # devices in the first wave after the canaries; 0: all the rest at once
    wave_factor: float = 1.0  # each wave this many times the one before (rounded up)
    wave_max: int = 0  # no wave larger than this; 0: no cap
    max_in_flight: int = 0  # at most this many devices installing at once; 0: no cap
    rollback_on_halt: bool = True
    device_timeout_s: float = 600.0
    command_expiry_s: float = 86400.0
    allow_downgrade: bool = False
    record_dir: Path = field(default_factory=lambda: Path("."))


@dataclass(frozen=True)
class BundleSource:
    """Where devices download the bundle: a ``url`` already serving it, or ``serve`` (HOST:PORT) from here."""

    url: Optional[str] = None
    serve: Optional[str] = None
    advertise_host: Optional[str] = None

    def check(self) -> None:
        if self.url is None and self.serve is None:
            raise ConfigError("devices download the bundle over HTTP(S): give its URL (--url, e.g. from "
                              "`edgekit serve DIR`) or serve it from here while the rollout runs (--serve HOST:PORT)")
        if self.serve is not None:
            self.address()

    def address(self) -> tuple[str, int]:
        host, _, port = (self.serve or "").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--serve {self.serve!r} must be HOST:PORT, e.g. 0.0.0.0:8800")
        return host, int(port)


def plan_for_bundle(info: BundleInfo, devices: list[str], url: str, settings: FleetFlashSettings) -> RolloutPlan:
    """The rollout plan of ``info`` to ``devices`` (in order), downloaded from ``url``."""
    m = info.manifest["model"]
    return RolloutPlan.parse({
        "fleet": settings.fleet, "devices": devices, "url": url, "sha256": info.sha256, "size": info.size,
        "bundle_name": info.path.name, "model": m["name"], "model_version": m["version"],
        "release": m.get("release"), "allow_downgrade": settings.allow_downgrade, "canary": settings.canary,
        "max_failures": (settings.max_failures if settings.max_failures is not None
                         else None if settings.abort_percent is not None else 0),
        "abort_percent": settings.abort_percent, "abort_min_devices": settings.abort_min_devices,
        "wave_size": settings.wave_size, "wave_factor": float(settings.wave_factor), "wave_max": settings.wave_max,
        "max_in_flight": settings.max_in_flight,
        "device_timeout_s": settings.device_timeout_s, "command_expiry_s": settings.command_expiry_s,
        "rollback_canaries_on_halt": settings.rollback_on_halt})


class FleetFlash:
    """One rollout from start to end: a new one (``bundle`` + ``settings``) or a recorded one (``resume``).

    A context manager: entering serves the bundle (with ``source.serve``), connects
    (unless ``client``, an open :class:`FleetClient` of the fleet, is given), discovers
    the devices and builds :attr:`rollout`; leaving stops the server and closes the
    connection it opened. :meth:`run` runs the rollout and returns its summary.
    """

    def __init__(self, broker: Optional[BrokerSettings], sign_key: Any, settings: Optional[FleetFlashSettings] = None,
                 *, bundle: Optional[Path] = None, source: BundleSource = BundleSource(),
                 resume: Optional[Path] = None, client: Optional[FleetClient] = None,
                 on_change: Optional[Callable[[dict[str, Any]], None]] = None):
        if resume is None and (bundle is None or settings is None):
            raise ConfigError("which bundle, and to which fleet? (or resume a recorded rollout)")
        if client is None and broker is None:
            raise ConfigError("no broker to reach the fleet through")
        self.broker = broker
        self.sign_key = sign_key
        self.settings = settings
        self.resume_from = Path(resume) if resume is not None else None
        self.source = source
        self.on_change = on_change
        self.info: Optional[BundleInfo] = None
        self.fleet = load_record(self.resume_from)["fleet"] if self.resume_from else settings.fleet  # type: ignore[union-attr]
        if self.resume_from is None:
            self.info = read_bundle(bundle)  # type: ignore[arg-type]
            source.check()
        self.server: Optional[BundleServer] = None
        self.url: Optional[str] = source.url
        self.rollout: Optional[Rollout] = None
        self._client = client
        self._stack = contextlib.ExitStack()

    @property
    def served_here(self) -> bool:
        """Devices download from this process (``source.serve``): it stops when the rollout ends."""
        return self.server is not None

    def __enter__(self) -> "FleetFlash":
        try:
            if self.info is not None and self.source.serve is not None:
                host, port = self.source.address()
                served_dir = self.settings.record_dir / "served"  # type: ignore[union-attr]
                served_dir.mkdir(parents=True, exist_ok=True)
                self.server = BundleServer(served_dir, host, port, advertise_host=self.source.advertise_host).start()
                self._stack.callback(self.server.stop)
                self.url = self.server.add(self.info.path)["url"]
            client = self._client
            if client is None:
                client = self._stack.enter_context(FleetClient(self.broker, self.fleet))  # type: ignore[arg-type]
            known = client.discover()
            if self.resume_from is not None:
                self.rollout = Rollout.resume(self.resume_from, client, sign_key=self.sign_key,
                                              on_change=self.on_change, write_interval_s=RECORD_WRITE_INTERVAL_S)
            else:
                devices = select_devices(known, self.settings.devices or "*", None)  # type: ignore[union-attr]
                plan = plan_for_bundle(self.info, devices, self.url, self.settings)  # type: ignore[arg-type]
                self.rollout = Rollout(plan, client, record_dir=self.settings.record_dir,  # type: ignore[union-attr]
                                       sign_key=self.sign_key, on_change=self.on_change,
                                       write_interval_s=RECORD_WRITE_INTERVAL_S)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def run(self) -> dict[str, Any]:
        """Run (or continue) the rollout; the summary adds ``served_here``."""
        if self.rollout is None:
            raise RuntimeError("FleetFlash.run() outside its `with` block")
        return {**self.rollout.run(), "served_here": self.served_here}


def rollout_failed(summary: dict[str, Any]) -> bool:
    """Whether a rollout's summary is a failure: halted, or any device failed or timed out."""
    c = summary.get("counts") or {}
    return bool(summary.get("halted") or c.get("failed") or c.get("timed_out"))


def flash_fleet(bundle: Path, settings: FleetFlashSettings, broker: BrokerSettings, sign_key: Any, *,
                source: BundleSource = BundleSource()) -> dict[str, Any]:
    """Roll ``bundle`` out to the fleet and return the summary (see :class:`FleetFlash`)."""
    with FleetFlash(broker, sign_key, settings, bundle=bundle, source=source) as job:
        return job.run()


def rollback_recorded(record: Path, broker: BrokerSettings, sign_key: Any, *,
                      reason: Optional[str] = None) -> dict[str, Any]:
    """Roll back the devices a recorded rollout switched; returns the rollout's summary."""
    fleet = load_record(record)["fleet"]
    with FleetClient(broker, fleet) as client:
        client.discover()
        return rollback_from_record(record, client, sign_key=sign_key, reason=reason)


def pause_recorded(record: Path) -> Path:
    """Ask the rollout running from ``record`` to pause (see :func:`~.rollout.request_pause`); the pause file."""
    return request_pause(record)


def rollback_devices(broker: BrokerSettings, fleet: str, devices: str, sign_key: Any, *,
                     reason: Optional[str] = None, from_bundle: Optional[Path] = None,
                     timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Send a signed ``rollback`` to the selected devices; device → its answer.

    With ``from_bundle`` only devices that run that bundle roll back (the others
    answer "nothing to undo"), so the call is safe to repeat. A device that does not
    answer within ``timeout_s`` gets ``{"ok": False, "error": {"reason": "timeout"}}``.
    """
    args = {"reason": reason, "from_sha256": read_bundle(from_bundle).sha256 if from_bundle else None}
    with FleetClient(broker, fleet) as client:
        targets = select_devices(client.discover(), devices, None)
        sent = {d: client.send(d, "rollback", args, sign_key=sign_key, expires_s=max(timeout_s, 3600.0))
                for d in targets}
        answers = {d: client.wait_ack(rid, timeout_s) for d, rid in sent.items()}
    return {d: a or {"ok": False, "error": {"reason": "timeout", "message": f"no answer in {timeout_s:.0f} s"}}
            for d, a in answers.items()}


def shadow_devices(bundle: Path, broker: Optional[BrokerSettings], fleet: str, devices: str, sign_key: Any, *,
                   source: BundleSource, record_dir: Path = Path("."), timeout_s: float = 600.0,
                   allow_downgrade: bool = False,
                   client: Optional[FleetClient] = None) -> dict[str, dict[str, Any]]:
    """Install ``bundle`` as a shadow candidate on the selected devices: a signed ``install`` with
    ``args.shadow`` — downloaded, verified, health-checked into the idle slot, never switched to (no canary
    waves: nothing a device serves changes). Device → its answer. Only online devices are sent the command, and
    it expires with ``timeout_s`` (a device that comes back later must not install a candidate nobody waits for,
    from a server that has stopped); an offline device gets ``{"ok": False, "error": {"reason": "offline"}}``, one
    that does not answer in time ``{"reason": "timeout"}``."""
    info = read_bundle(bundle)
    source.check()
    with contextlib.ExitStack() as stack:
        url = source.url
        if source.serve is not None:
            host, port = source.address()
            served_dir = Path(record_dir) / "served"
            served_dir.mkdir(parents=True, exist_ok=True)
            server = BundleServer(served_dir, host, port, advertise_host=source.advertise_host).start()
            stack.callback(server.stop)
            url = server.add(info.path)["url"]
        if client is None:
            if broker is None:
                raise ConfigError("no broker to reach the fleet through")
            client = stack.enter_context(FleetClient(broker, fleet))
        known = client.discover()
        targets = select_devices(known, devices, None)
        online = [d for d in targets if (known.get(d) or {}).get("status") == "online"]
        args = {"url": url, "sha256": info.sha256, "size": info.size, "shadow": True,
                "allow_downgrade": allow_downgrade}
        sent = {d: client.send(d, "install", args, sign_key=sign_key, expires_s=timeout_s) for d in online}
        deadline = time.monotonic() + timeout_s  # one deadline for all: not N × timeout
        answers = {d: client.wait_ack(rid, max(0.0, deadline - time.monotonic())) for d, rid in sent.items()}
    out: dict[str, dict[str, Any]] = {
        d: {"ok": False, "error": {"reason": "offline", "message": "offline: not sent (send again when it is back)"}}
        for d in targets if d not in sent}
    out.update({d: a or {"ok": False, "error": {"reason": "timeout", "message": f"no answer in {timeout_s:.0f} s"}}
                for d, a in answers.items()})
    return out
