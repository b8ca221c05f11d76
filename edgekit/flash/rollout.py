"""Canary rollouts of a bundle to a fleet, with an abort rule and an on-disk record.

Like AWS IoT Jobs / Greengrass deployments: a plan (:class:`~.plan.RolloutPlan`) names
the devices, a canary share or count, a wave size and an abort rule; a
:class:`Rollout` sends the signed ``install`` command to the canaries, checks the
rule, then goes wave by wave, and records every device's outcome in
``<dir>/rollouts/<id>.json`` (rewritten atomically before every command it sends,
at every decision, and after answers: at once, or at most every ``write_interval_s``,
0.5 s under ``edgekit flash``) so an interrupted rollout can be resumed
(:meth:`Rollout.resume`) or rolled back (:func:`rollback_from_record`).

Rules (what the code below does):

* **Canaries** are ``ceil(share * n)`` devices (at least 1) for a share such as
  ``"10%"``, or exactly the count for ``"2"``. They are taken from the devices
  that are *online* when the rollout starts, in plan order, and filled up with
  offline ones only if too few are online. A rollout with no online device is
  refused: a canary phase needs answers.
* **Waves**: the other devices in plan order; the first wave has ``wave_size``
  devices (0: all of them in one wave), each next one ``wave_factor`` times the one
  before (rounded up), at most ``wave_max`` (0: no cap).
* **In flight**: with ``max_in_flight`` K > 0, at most K devices are ``sent`` (online,
  installing) at once; the next device of the phase gets its command when one
  answers or times out. Devices queued offline do not count.
* **Device outcomes**: ``pending`` (nothing sent) → ``sent`` (the device is
  online and has the command; its clock runs) → ``succeeded`` / ``failed``
  (the agent's error ack: reason, step, code, message) / ``timed_out``. A device
  that is *offline* when the command goes out becomes ``pending_offline``: the
  command waits in the broker (agents keep a persistent session) and the device
  is neither a success nor a failure. When its ``state`` turns online it becomes
  ``sent`` and its clock starts then. ``timed_out`` therefore only means: online
  with the command, and no answer within ``device_timeout_s``. A late answer still
  updates the outcome (the record says what the device runs).
* **Abort rules**, checked after the canary phase and after every wave, and with
  ``max_in_flight`` also before every further command of a phase: failures
  (``failed`` + ``timed_out``, over the whole rollout) ``> max_failures`` (unless
  None) → halt; with ``abort_percent`` P, once at least ``abort_min_devices`` devices
  finished (``succeeded``, ``failed`` or ``timed_out``), failures ≥ P % of the
  finished devices → halt. A rule that trips mid-phase stops the sending, waits for
  the devices in flight, then halts. The canary phase must also produce at least one success, else it halts
  (canaries that all stay offline prove nothing). A halted rollout sends nothing
  more; with ``rollback_canaries_on_halt`` it sends a signed ``rollback`` to
  every device that this rollout switched and records ``rolled_back`` or
  ``rollback_failed``. Install commands already queued for offline devices
  cannot be withdrawn from the broker; ``command_expiry_s`` bounds how long they
  stay valid (the agent refuses an expired command).
* **Switched by this rollout** (``install.changed``): decided from the model
  sha256 the device reported *before* the rollout (its retained state, recorded
  as ``sha_before`` when the phases are planned), not from the agent's
  ``already_active`` alone: an agent killed between its pointer switch and its
  log write answers the re-delivered install with ``already_active`` although
  this rollout switched it. So ``changed`` is true when ``sha_before`` differs
  from the plan's sha256, when the answer is not ``already_active``, or when
  ``sha_before`` is unknown (the safe side).
* **Rollbacks are conditional**: every ``rollback`` this module sends (on halt,
  :meth:`Rollout.rollback`, :func:`rollback_from_record`) carries
  ``from_sha256`` = the plan's sha256, so the device rolls back only while it
  still runs this rollout's bundle. A rollback retried after a timeout, renewed
  after its expiry, or answered late can therefore never take a device
  *forward* to the bundle being rolled back from (a plain rollback toggles
  between the two slots). A rollback answered ok with ``changed: false``
  (nothing to undo: the device no longer runs the bundle) counts as
  ``rolled_back``; its attempt records ``changed: false``.
* **Expiry**: every signed command carries ``expires_ts`` = send time +
  ``command_expiry_s`` (a positive number, 1 day by default, at most
  :data:`~edgekit.flash.commands.MAX_SIGNED_EXPIRY_S`; devices refuse a signed
  command without an expiry, or with one further ahead). A recorded attempt without one (an older
  record) is renewed, not re-sent.
* **Resume**: ``pending`` devices of the current and later phases get the
  command; ``sent``/``pending_offline`` ones get the *same* command again (same
  ``request_id`` and expiry, the same deterministic signature) so the agent
  answers a duplicate from its ack cache, unless it has expired, in which case a
  new request is sent. Before any command is published the record already says
  ``sent`` with its request id, so a crash between the two loses nothing; an
  answer that came in after the last write is asked for again the same way.
* **Pause**: :func:`request_pause` (``edgekit flash --pause RECORD``) creates
  ``<record>.pause``. The running rollout sees it before its next command, sends
  nothing more, waits for the devices in flight, removes the file, and records
  ``paused`` (phase ``paused``; :meth:`Rollout.run` returns). A resume (``--resume
  RECORD``) continues it: devices that answered are never sent the install again.
  A request made while nothing runs pauses the next run at its first command.
* **Timing**: ``fleet_switch_s`` is the time from the first install command to the
  last successful answer (None for a halted rollout).

:func:`render` draws the record as a rich table (the CLI wraps it in ``rich.live.Live``
through ``on_change``); the logic never prints.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.fileio import atomic_write

from ..errors import ConfigError, SigningError
from .commands import Received
from .plan import RolloutPlan

RECORD_FORMAT = "edgekit-rollout"
RECORD_VERSION = 2  # 2: plans may carry wave growth, max_in_flight and the percentage rule; records may be paused
OUTCOMES = ("pending", "sent", "pending_offline", "succeeded", "failed", "timed_out", "rolling_back",
            "rolled_back", "rollback_failed")
FAILURES = ("failed", "timed_out")
BUSY_RETRY_S = 2.0  # a device still installing (it answered "busy") is asked to roll back again after this
_LOG_MAX = 500
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- record
def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically: a temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())


def load_record(path: Path) -> dict[str, Any]:
    """Read and check a rollout record; raises :class:`ConfigError` with what is wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"rollout record {path} does not exist (records are under <dir>/rollouts/)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"rollout record {path} cannot be read ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ConfigError(f"{path} is not an edgekit rollout record")
    if not isinstance(record.get("version"), int) or record["version"] > RECORD_VERSION:
        raise ConfigError(f"{path} is a rollout record of version {record.get('version')}; this edgekit reads up "
                          f"to {RECORD_VERSION}: upgrade edgekit")
    plan = RolloutPlan.parse(record.get("plan"), f"{path} (plan)")
    devices = record.get("devices")
    if not isinstance(devices, dict) or set(devices) != set(plan.devices):
        raise ConfigError(f"{path}: the devices do not match the plan; the record was edited or is damaged")
    return record


def device_status(entry: dict[str, Any]) -> str:
    """One device's outcome (one of :data:`OUTCOMES`) from its install and rollback attempts.

    A rollback decides the outcome of a device whose install succeeded. For one whose
    install got no answer (timed out), the rollback sent as a precaution only counts
    when it undid something; otherwise the install's outcome stands.
    """
    rb, ins = entry.get("rollback"), entry.get("install")
    switched = bool(ins) and ins["status"] == "ok"
    if ins and ins["status"] == "failed":  # it answered that it did not switch: nothing was there to roll back
        return "failed"
    if rb:
        status = rb["status"]
        if switched or (status == "ok" and rb.get("changed", True)) or status in ("failed", "sent"):
            # (a precautionary rollback that was refused or is in flight is worth showing; one that found
            # nothing to undo, or got no answer from a device that never answered either, is not)
            return {"ok": "rolled_back", "failed": "rollback_failed", "timed_out": "rollback_failed"}.get(
                status, "rolling_back")
    if not ins:
        return "pending"
    return "succeeded" if ins["status"] == "ok" else ins["status"]


def counts(record: dict[str, Any]) -> dict[str, int]:
    out = {k: 0 for k in OUTCOMES}
    for entry in record["devices"].values():
        out[device_status(entry)] += 1
    return out


def failures(record: dict[str, Any]) -> list[str]:
    """Devices whose install failed or timed out while online (what the abort rule counts)."""
    return [d for d, e in record["devices"].items() if (e.get("install") or {}).get("status") in FAILURES]


def outstanding(record: dict[str, Any], now: Optional[float] = None) -> dict[str, list[str]]:
    """What a resume does: ``resend`` (same request id), ``renew`` (expired: a new request), ``pending`` (first send).

    ``pending`` lists only devices of the current and later phases; nothing is
    pending after a halt.
    """
    now = time.time() if now is None else now
    out: dict[str, list[str]] = {"resend": [], "renew": [], "pending": []}
    rolling_back = bool(record.get("rollback")) and not record["rollback"].get("done")
    for device, entry in record["devices"].items():
        attempt = entry.get("rollback") if rolling_back and entry.get("rollback") else entry.get("install")
        if attempt and attempt["status"] in ("sent", "pending_offline"):
            out["renew" if _expired(attempt, now) else "resend"].append(device)
    if not record.get("halted") and record.get("phases"):
        for phase in record["phases"][record.get("phase_index", 0):]:
            out["pending"].extend(d for d in phase if not record["devices"][d].get("install"))
    return out


def _expired(attempt: dict[str, Any], now: float) -> bool:
    """Whether a recorded request can no longer be re-sent as it is (expired, or recorded without an expiry)."""
    expires = attempt.get("expires_ts")
    return not isinstance(expires, (int, float)) or expires <= now + 1.0


def _sha256_of(model: Any) -> Optional[str]:
    """The sha256 a device's retained state reports for its active bundle, if it reports a valid one."""
    sha = model.get("sha256") if isinstance(model, dict) else None
    return sha if isinstance(sha, str) and _SHA256.match(sha) else None


def new_rollout_id() -> str:
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def pause_file(record_path: Path) -> Path:
    """The file whose existence asks the rollout recorded at ``record_path`` to pause."""
    record_path = Path(record_path)
    return record_path.with_name(record_path.name + ".pause")


def request_pause(record_path: Path) -> Path:
    """Ask the rollout recorded at ``record_path`` to pause before its next command; returns the pause file.

    Raises :class:`ConfigError` for a rollout that is halted or done (nothing left to pause).
    """
    record = load_record(record_path)
    if record.get("halted") or record.get("phase") == "done":
        raise ConfigError(f"rollout {record['id']} is {'halted' if record.get('halted') else 'done'}: "
                          "there is nothing left to pause")
    path = pause_file(record_path)
    path.write_text(f"pause requested at {dt.datetime.now().isoformat(timespec='seconds')}\n", encoding="utf-8")
    return path


def phase_label(index: int) -> str:
    return "canary" if index == 0 else f"wave {index}"


# ----------------------------------------------------------------------------- rollout
class Transport(Protocol):
    """What a rollout needs from the fleet (:class:`~edgekit.flash.commands.FleetClient` has it)."""

    fleet: str

    def devices(self) -> dict[str, dict[str, Any]]: ...

    def send(self, device: str, command: str, args: Optional[dict[str, Any]] = None, *, sign_key: Any = None,
             expires_s: Optional[float] = None, expires_ts: Optional[float] = None,
             request_id: Optional[str] = None) -> str: ...

    def poll(self, timeout: float = 0.0) -> list[Received]: ...


def _model_text(model: Any) -> Optional[str]:
    if not isinstance(model, dict) or not model.get("name"):
        return None
    return " ".join(str(x) for x in (model.get("name"), model.get("version")) if x)


class Rollout:
    """Runs a :class:`RolloutPlan` over a transport; see the module docstring for the rules.

    ``on_change(record)`` is called after every write of the record (a live view
    re-renders it); ``clock`` is the UNIX-time source (tests pass a fake one that
    their transport advances).
    """

    def __init__(self, plan: RolloutPlan, transport: Transport, *, record_dir: Optional[Path] = None,
                 sign_key: Any = None, rollout_id: Optional[str] = None, clock: Callable[[], float] = time.time,
                 on_change: Optional[Callable[[dict[str, Any]], None]] = None, poll_s: float = 0.5,
                 write_interval_s: float = 0.0,
                 _record: Optional[dict[str, Any]] = None, _record_path: Optional[Path] = None):
        if transport.fleet != plan.fleet:
            raise ConfigError(f"the plan is for fleet {plan.fleet!r}, the connection is to fleet {transport.fleet!r}")
        self.plan = plan
        self.transport = transport
        self.sign_key = sign_key
        self.clock = clock
        self.on_change = on_change
        self.poll_s = poll_s
        self.write_interval_s = write_interval_s
        self.writes = 0  # how many times the record was written (a figure for benchmarks)
        self._dirty = False
        self._written_at = float("-inf")  # time.monotonic() of the last write
        if _record is not None:
            self.record = _record
            self.record_path = Path(_record_path)
        else:
            rid = rollout_id or new_rollout_id()
            fleet_protocol.check_name(rid, "rollout id")
            self.record_path = Path(record_dir if record_dir is not None else ".") / "rollouts" / f"{rid}.json"
            if self.record_path.exists():
                raise ConfigError(f"rollout record {self.record_path} exists; resume it or pick another id")
            now = clock()
            self.record = {
                "format": RECORD_FORMAT, "version": RECORD_VERSION, "id": rid, "fleet": plan.fleet,
                "created_ts": now, "updated_ts": now, "phase": "planned", "phase_index": 0, "phases": None,
                "halted": False, "halt_reason": None, "paused": False, "first_sent_ts": None, "last_switch_ts": None,
                "rollback": None, "plan": plan.model_dump(mode="json"),
                "devices": {d: {"phase": None, "status": "pending", "model_before": None, "sha_before": None,
                                "model": None, "install": None, "rollback": None} for d in plan.devices},
                "log": [],
            }
        self._by_request: dict[str, tuple[str, str]] = {}
        for device, entry in self.record["devices"].items():
            for which in ("install", "rollback"):
                if entry.get(which):
                    self._by_request[entry[which]["request_id"]] = (device, which)

    # -- construction from a record ---------------------------------------------------------
    @classmethod
    def resume(cls, record_path: Path, transport: Transport, *, sign_key: Any = None,
               clock: Callable[[], float] = time.time, on_change: Optional[Callable[[dict[str, Any]], None]] = None,
               poll_s: float = 0.5, write_interval_s: float = 0.0) -> "Rollout":
        """The rollout recorded at ``record_path``; call :meth:`run` to continue it (or :meth:`rollback`)."""
        record = load_record(record_path)
        plan = RolloutPlan.parse(record["plan"])
        return cls(plan, transport, sign_key=sign_key, clock=clock, on_change=on_change, poll_s=poll_s,
                   write_interval_s=write_interval_s, _record=record, _record_path=Path(record_path))

    @property
    def id(self) -> str:
        return self.record["id"]

    # -- bookkeeping ------------------------------------------------------------------------
    def _write(self) -> None:
        """Write the record now (before every command it sends, and at every decision: halt, pause, done)."""
        rec = self.record
        rec["updated_ts"] = self.clock()
        for entry in rec["devices"].values():
            entry["status"] = device_status(entry)
        write_record(self.record_path, rec)
        self.writes += 1
        self._dirty = False
        self._written_at = time.monotonic()
        if self.on_change is not None:
            self.on_change(rec)

    def _changed(self) -> None:
        """An answer, a progress step, a timeout or a phase step: written at most every ``write_interval_s``.

        Each write is the whole record, fsync'd: at a hundred devices that is ~100 KB and
        tens of milliseconds, once per answer. What waits for the next write is safe to lose
        in a crash: a device recorded ``sent`` is sent the same request again on resume, and
        its agent answers from its record of signed requests without installing again.
        """
        if time.monotonic() - self._written_at >= self.write_interval_s:
            self._write()
            return
        self._dirty = True
        rec = self.record
        for entry in rec["devices"].values():
            entry["status"] = device_status(entry)
        if self.on_change is not None:
            self.on_change(rec)

    def _flush(self) -> None:
        if self._dirty:
            self._write()

    def _log(self, message: str) -> None:
        log = self.record["log"]
        log.append({"ts": self.clock(), "message": message})
        del log[:-_LOG_MAX]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time per record (a second `resume` of a running rollout is refused)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_path.with_name(self.record_path.name + ".lock"), "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"rollout {self.id} is being run by another process "
                                  f"({self.record_path}.lock is held)") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _require_key(self, command: str) -> None:
        if self.sign_key is None:
            raise SigningError(f"{command} commands must be signed: pass --key (or set $EDGEKIT_SIGNING_KEY) with a "
                               "key whose .pub is in the devices' keyring")

    # -- running ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or continue) the rollout until it is done or halted; returns :meth:`summary`."""
        rec = self.record
        with self._locked():
            if rec.get("rollback") and not rec["rollback"].get("done"):
                return self._rollback_locked(rec["rollback"].get("reason"))
            if rec["halted"]:
                raise ConfigError(f"rollout {self.id} halted ({rec['halt_reason']}); roll back what it installed "
                                  f"with rollback_from_record/`--rollback`, or start a new rollout")
            self._require_key("install")
            if rec["phases"] is None:
                self._plan_phases()
            if rec.get("paused"):
                rec["paused"] = False
                self._log("resumed")
                self._write()
            self._send_install(self._to_resend("install"))
            while rec["phase_index"] < len(rec["phases"]):
                index = rec["phase_index"]
                if rec["phase"] != phase_label(index):
                    rec["phase"] = phase_label(index)
                    self._log(f"{phase_label(index)}: {len(rec['phases'][index])} device(s)")
                    self._changed()  # (written with the phase's first commands, before they go out)
                paused = self._run_phase(index)
                # (a paused phase is not over: only the failure rules apply, not "a canary must succeed")
                reason = self._rule_reason(index) if paused else self._abort_reason(index)
                if reason:
                    rec["halted"], rec["halt_reason"], rec["phase"] = True, reason, "halted"
                    self._log(f"halted: {reason}")
                    self._write()
                    if self.plan.rollback_canaries_on_halt:
                        return self._rollback_locked(f"rollout {self.id} halted: {reason}")
                    return self.summary()
                if paused:
                    rec["paused"], rec["phase"] = True, "paused"
                    self._log(f"paused in the {phase_label(index)} phase; continue with a resume")
                    self._write()
                    with contextlib.suppress(FileNotFoundError):
                        pause_file(self.record_path).unlink()
                    return self.summary()
                rec["phase_index"] = index + 1
                self._changed()
            self._wait()  # answers still owed (resumed `sent` devices of earlier phases)
            if rec["phase"] != "done":
                rec["phase"] = "done"
                self._log("done")
                self._write()
            self._flush()
        return self.summary()

    def _plan_phases(self) -> None:
        rec = self.record
        known = self.transport.devices()
        online = [d for d in self.plan.devices if (known.get(d) or {}).get("status") == "online"]
        if not online:
            raise ConfigError(f"none of the {len(self.plan.devices)} selected devices is online; the canary phase "
                              "needs devices that answer (start their agents, or check --fleet and the broker)")
        rec["phases"] = self.plan.phases(online)
        for index, phase in enumerate(rec["phases"]):
            for d in phase:
                entry = rec["devices"][d]
                entry["phase"] = phase_label(index)
                model = (known.get(d) or {}).get("model")
                entry["model_before"] = _model_text(model)
                entry["sha_before"] = _sha256_of(model)  # what it ran before: decides install.changed
        self._log(f"planned: {len(rec['phases'][0])} canary device(s), {len(rec['phases']) - 1} wave(s)")
        self._write()

    def _run_phase(self, index: int) -> bool:
        """Send the phase's installs (at most ``max_in_flight`` online at once) and wait; True if paused.

        Stops sending (and waits for the devices in flight) when a pause is requested or,
        with ``max_in_flight``, when an abort rule trips; the caller decides what follows.
        """
        rec = self.record
        limit = self.plan.max_in_flight
        pause = pause_file(self.record_path)
        while True:
            todo = [d for d in rec["phases"][index] if not rec["devices"][d]["install"]]
            if not todo:
                self._wait()
                return False
            if pause.exists():
                self._log(f"pause requested ({pause.name}): waiting for the devices in flight")
                self._write()
                self._wait()
                return True
            if limit and self._rule_reason(index):
                self._wait()
                return False
            if not limit:
                self._send_install(todo)
                continue
            room = limit - sum(1 for _ in self._attempts("sent"))
            if room > 0:
                self._send_install(todo[:room])
            else:
                self._wait(max_waiting=limit - 1)

    def _to_resend(self, which: str) -> list[str]:
        return [d for d, e in self.record["devices"].items()
                if e.get(which) and e[which]["status"] in ("sent", "pending_offline")]

    def _rule_reason(self, index: int) -> Optional[str]:
        """Why the failure rules (count, percentage) halt the rollout now, or None."""
        rec = self.record
        failed = failures(rec)
        shown = ", ".join(f"{d} ({(rec['devices'][d]['install'].get('error') or {}).get('reason', '?')})"
                          for d in failed[:10]) + (", …" if len(failed) > 10 else "")
        plan = self.plan
        if plan.max_failures is not None and len(failed) > plan.max_failures:
            return (f"{len(failed)} device(s) failed after the {phase_label(index)} phase, more than max_failures "
                    f"{plan.max_failures}: {shown}")
        if plan.abort_percent is not None:
            finished = sum(1 for e in rec["devices"].values()
                           if (e.get("install") or {}).get("status") in ("ok",) + FAILURES)
            if finished and finished >= plan.abort_min_devices and 100 * len(failed) >= plan.abort_percent * finished:
                return (f"{len(failed)} of {finished} finished device(s) failed ({100 * len(failed) / finished:.1f} %) "
                        f"in the {phase_label(index)} phase, at least abort_percent {plan.abort_percent:g} % "
                        f"(rule active from {plan.abort_min_devices} device(s)): {shown}")
        return None

    def _abort_reason(self, index: int) -> Optional[str]:
        rec = self.record
        reason = self._rule_reason(index)
        if reason:
            return reason
        if index == 0:
            canaries = rec["phases"][0]
            if not any((rec["devices"][d]["install"] or {}).get("status") == "ok" for d in canaries):
                states = ", ".join(f"{d} {rec['devices'][d]['status']}" for d in canaries)
                return f"no canary device succeeded ({states})"
        return None

    # -- sending ----------------------------------------------------------------------------
    def _send_install(self, devices: list[str]) -> None:
        if devices:
            self._send(devices, "install", "install", self.plan.install_args(self.id))

    def _send(self, devices: list[str], which: str, command: str, args: dict[str, Any]) -> None:
        """Record the attempts (written before publishing), then publish each command."""
        rec = self.record
        now = self.clock()
        known = self.transport.devices()
        expiry = self.plan.command_expiry_s  # always a positive number: signed commands must expire
        for d in devices:
            entry = rec["devices"][d]
            attempt = entry.get(which)
            if attempt and attempt["status"] in ("sent", "pending_offline"):
                if _expired(attempt, now):
                    self._log(f"{d}: {command} request {attempt['request_id']} expired; sending a new one")
                    attempt.update(request_id=uuid.uuid4().hex, attempt=attempt["attempt"] + 1,
                                   expires_ts=now + expiry)
                else:
                    attempt["resent"] = attempt.get("resent", 0) + 1
            else:
                attempt = {"request_id": uuid.uuid4().hex, "command": command, "attempt": 1, "resent": 0,
                           "expires_ts": now + expiry, "first_sent_ts": now}
                entry[which] = attempt
            online = (known.get(d) or {}).get("status") == "online"
            attempt.update(status="sent" if online else "pending_offline", queued_ts=now, last_send_ts=now,
                           online_at_send=online,
                           wait_from_ts=now if online else None, step=None, finished_ts=None, error=None)
            self._by_request[attempt["request_id"]] = (d, which)
        if which == "install" and rec["first_sent_ts"] is None:
            rec["first_sent_ts"] = now
        self._write()  # a crash from here on: the record says "sent", and a resume re-sends the same request
        send_many = getattr(self.transport, "send_many", None)  # (FleetClient has it; a transport may not)
        if send_many is not None and len(devices) > 1:
            # a wave at once: pipelined to the broker, not one PUBACK round trip per device
            send_many(command, args, [(d, rec["devices"][d][which]["request_id"],
                                       rec["devices"][d][which]["expires_ts"]) for d in devices],
                      sign_key=self.sign_key)
            sent = dict.fromkeys(devices, self.clock())
        else:
            sent = {}
            for d in devices:
                attempt = rec["devices"][d][which]
                self.transport.send(d, command, args, sign_key=self.sign_key, expires_ts=attempt["expires_ts"],
                                    request_id=attempt["request_id"])
                sent[d] = self.clock()
        for d, sent_at in sent.items():
            attempt = rec["devices"][d][which]
            attempt["last_send_ts"] = sent_at
            if attempt["wait_from_ts"] is not None:
                attempt["wait_from_ts"] = sent_at
        self._changed()

    # -- waiting ----------------------------------------------------------------------------
    def _attempts(self, status: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for d, entry in self.record["devices"].items():
            for which in ("install", "rollback"):
                attempt = entry.get(which)
                if attempt and attempt["status"] == status:
                    yield d, attempt

    def _wait(self, max_waiting: int = 0) -> None:
        """Until at most ``max_waiting`` devices that have their command (online) still owe an answer."""
        timeout = self.plan.device_timeout_s
        while True:
            now = self.clock()
            changed = False
            for d, attempt in list(self._attempts("sent")):
                if now >= attempt["wait_from_ts"] + timeout:
                    attempt.update(status="timed_out", finished_ts=now, seconds=round(timeout, 3), error={
                        "reason": "timeout", "step": attempt.get("step"), "code": None, "name": None,
                        "message": f"no answer within {timeout:g} s while online"})
                    self._log(f"{d}: {attempt['command']} timed out")
                    changed = True
            if changed:
                self._changed()
            waiting = [a["wait_from_ts"] + timeout for _, a in self._attempts("sent")]
            if len(waiting) <= max_waiting:
                return
            if self._dirty and time.monotonic() - self._written_at >= self.write_interval_s:
                self._write()  # answers held back, and a quiet moment: on disk within the interval
            events = self.transport.poll(max(0.0, min(self.poll_s, min(waiting) - now)))
            if events and self.apply(events):
                self._changed()

    def apply(self, events: Iterable[Received]) -> bool:
        """Fold received acks, progress events and state changes into the record; True if it changed."""
        changed = False
        for ev in events:
            if ev.kind == "ack":
                changed |= self._apply_ack(ev)
            elif ev.kind == "event" and ev.event_type == "install_progress":
                hit = self._by_request.get(ev.request_id or "")
                if hit and hit[0] == ev.device:
                    attempt = self.record["devices"][hit[0]][hit[1]]
                    if attempt["status"] in ("sent", "pending_offline"):
                        attempt["step"] = ev.body.get("step")
                        attempt["slot"] = ev.body.get("slot")
                        changed = True
            elif ev.kind == "state" and ev.body.get("status") == "online":
                entry = self.record["devices"].get(ev.device)
                for which in ("install", "rollback"):
                    attempt = (entry or {}).get(which)
                    # a state received before the command went out says nothing about its delivery
                    if attempt and attempt["status"] == "pending_offline" and ev.received_ts >= attempt["queued_ts"]:
                        attempt.update(status="sent", wait_from_ts=ev.received_ts)
                        self._log(f"{ev.device}: came online; {attempt['command']} delivered from the broker queue")
                        changed = True
        return changed

    def _apply_ack(self, ev: Received) -> bool:
        hit = self._by_request.get(ev.request_id or "")
        if hit is None or hit[0] != ev.device:
            return False
        device, which = hit
        entry = self.record["devices"][device]
        attempt = entry[which]
        if attempt["request_id"] != ev.request_id or attempt["status"] in ("ok", "failed"):
            return False  # an older request of this device, or a QoS 1 duplicate
        now = ev.received_ts
        late = attempt["status"] == "timed_out"
        start = attempt.get("wait_from_ts") or attempt["last_send_ts"]
        attempt.update(finished_ts=now, seconds=round(max(0.0, now - start), 3), late=late)
        body = ev.body
        if body.get("ok"):
            result = body.get("result") if isinstance(body.get("result"), dict) else {}
            attempt.update(status="ok", error=None, step=None, slot=result.get("slot"),
                           previous_slot=result.get("previous_slot"), timings_s=result.get("timings_s"),
                           already_active=bool(result.get("already_active")))
            note = ""
            if which == "install":
                # switched by this rollout unless it ran this bundle before (known from its state at the start);
                # already_active alone is not proof: after a crash between the agent's pointer switch and its log
                # write, the re-delivered install answers already_active although this rollout switched it
                before = entry.get("sha_before")
                attempt["changed"] = not attempt["already_active"] or before is None or before != self.plan.sha256
                self.record["last_switch_ts"] = max(now, self.record["last_switch_ts"] or now)
            else:
                # a conditional rollback (from_sha256) that found the device on another bundle: nothing to undo
                attempt["changed"] = result.get("changed") is not False
                if not attempt["changed"]:
                    note = " (nothing to undo: it no longer runs this rollout's bundle)"
            entry["model"] = _model_text(result.get("model")) or entry.get("model")
            self._log(f"{device}: {attempt['command']} ok" + (" (late)" if late else "") + note)
        else:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            attempt.update(status="failed", step=error.get("step") or attempt.get("step"), error={
                "reason": error.get("reason") or "unknown", "step": error.get("step"), "code": error.get("code"),
                "name": error.get("name"), "message": error.get("message") or "",
                "active_slot": error.get("active_slot")})
            self._log(f"{device}: {attempt['command']} failed: {error.get('reason')}: {error.get('message')}")
        return True

    # -- rolling back -----------------------------------------------------------------------
    def rollback(self, reason: Optional[str] = None) -> dict[str, Any]:
        """Send a signed ``rollback`` (``from_sha256`` = the plan's bundle) to every device this rollout switched.

        Returns :meth:`summary`. A device that answers ``changed: false`` no longer
        ran the bundle (an earlier rollback took effect after its answer timed
        out, say): it counts as rolled back.
        """
        with self._locked():
            return self._rollback_locked(reason or f"rollback of rollout {self.id}")

    def _rollback_locked(self, reason: str) -> dict[str, Any]:
        rec = self.record
        self._require_key("rollback")
        if not rec.get("rollback") or rec["rollback"].get("done"):
            rec["rollback"] = {"reason": reason, "requested_ts": self.clock(), "done": False}
            self._log(f"rolling back: {reason}")
        tried: set[str] = set()
        busy_until = self.clock() + 2 * self.plan.device_timeout_s  # how long a device still installing is retried

        def wanted(e: dict[str, Any]) -> bool:
            inst, rb = e.get("install") or {}, e.get("rollback") or {}
            if rb.get("status") == "ok":
                return False
            switched = inst.get("status") == "ok" and inst.get("changed", True)
            # online with the command but no answer (yet): it may have switched, or may still; the rollback
            # names this plan's bundle, so for a device that did not switch it changes nothing. Not a device
            # that ran this bundle before the rollout: rolling it back would take it to an older model.
            unknown = inst.get("status") in ("timed_out", "sent") and e.get("sha_before") != self.plan.sha256
            return switched or unknown

        next_try: dict[str, float] = {}  # a device that answered "busy" is asked again from this time on
        while True:
            # (an install may still succeed late while we wait, and a device still installing answers "busy": loop)
            targets, waiting_busy = [], []
            for d, e in rec["devices"].items():
                if not wanted(e):
                    continue
                rb = e.get("rollback") or {}
                busy = rb.get("status") == "failed" and (rb.get("error") or {}).get("reason") == "busy" \
                    and self.clock() < busy_until
                # (tried per install outcome: a timed-out install that succeeds late is a new reason to roll back)
                if (d, (e.get("install") or {}).get("status")) not in tried:
                    targets.append(d)
                elif busy:
                    due = next_try.setdefault(d, (rb.get("finished_ts") or self.clock()) + BUSY_RETRY_S)
                    (targets if self.clock() >= due else waiting_busy).append(d)
            if not targets and waiting_busy:  # wait for the earliest retry (answers are applied meanwhile)
                until = min(next_try[d] for d in waiting_busy)
                events = self.transport.poll(max(0.05, until - self.clock()))
                if events and self.apply(events):
                    self._changed()
                continue
            if not targets:
                break
            for d in targets:
                next_try.pop(d, None)
            for d in targets:
                rb = rec["devices"][d].get("rollback")
                if rb and rb["status"] in ("failed", "timed_out", "ok"):
                    rec["devices"][d]["rollback"] = None  # a new attempt after a failed (or now stale) one
            tried.update((d, (rec["devices"][d].get("install") or {}).get("status")) for d in targets)
            # conditional on this plan's bundle: a retried or late rollback never takes a device forward to it
            self._send(targets, "rollback", "rollback", self.plan.rollback_args(rec["rollback"]["reason"]))
            self._wait()
        rec["rollback"]["done"] = True
        rec["rollback"]["finished_ts"] = self.clock()
        self._write()
        return self.summary()

    # -- results ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return summarize(self.record, self.record_path)


def summarize(record: dict[str, Any], record_path: Optional[Path] = None) -> dict[str, Any]:
    """Counts per outcome, halted, halt_reason, fleet_switch_s, the record path, and who still waits."""
    first, last = record.get("first_sent_ts"), record.get("last_switch_ts")
    devices = record["devices"]
    return {
        "id": record["id"], "fleet": record["fleet"], "phase": record["phase"], "counts": counts(record),
        "failures": len(failures(record)), "halted": bool(record["halted"]), "halt_reason": record["halt_reason"],
        "paused": bool(record.get("paused")),
        # a halted rollout did not switch the fleet (its canaries may even be rolled back)
        "fleet_switch_s": None if first is None or last is None or record["halted"] else round(last - first, 3),
        "record": str(record_path) if record_path is not None else None,
        "pending_offline": [d for d, e in devices.items() if device_status(e) == "pending_offline"],
        "rolled_back": [d for d, e in devices.items() if device_status(e) == "rolled_back"],
        "rollback_failed": [d for d, e in devices.items() if device_status(e) == "rollback_failed"],
        "rollback": record.get("rollback"),
    }


def rollback_from_record(record_path: Path, transport: Transport, *, sign_key: Any = None,
                         reason: Optional[str] = None, clock: Callable[[], float] = time.time,
                         on_change: Optional[Callable[[dict[str, Any]], None]] = None,
                         poll_s: float = 0.5) -> dict[str, Any]:
    """Roll back the devices a recorded rollout switched (``succeeded``); returns the summary."""
    rollout = Rollout.resume(record_path, transport, sign_key=sign_key, clock=clock, on_change=on_change,
                             poll_s=poll_s)
    return rollout.rollback(reason)


# ----------------------------------------------------------------------------- display
_STYLE = {"pending": "dim", "sent": "cyan", "pending_offline": "yellow", "succeeded": "green", "failed": "bold red",
          "timed_out": "red", "rolling_back": "magenta", "rolled_back": "magenta", "rollback_failed": "bold red"}


def render(state: dict[str, Any], now: Optional[float] = None):
    """The record as a rich table: device, phase, status, step, model, seconds, error."""
    from rich.table import Table

    now = time.time() if now is None else now
    plan = state["plan"]
    c = counts(state)
    shown = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in c.items() if n)
    target = " ".join(str(x) for x in (plan.get("model"), plan.get("model_version")) if x)
    title = (f"rollout {state['id']}: {target} → {len(state['devices'])} device(s) of {state['fleet']}"
             f" · {state['phase']}")
    caption = shown + (f" · halted: {state['halt_reason']}" if state.get("halted") else "")
    if state.get("paused"):
        caption += " · paused (continue with a resume)"
    if state.get("first_sent_ts") and state.get("last_switch_ts") and not state.get("halted"):
        caption += f" · fleet switch {state['last_switch_ts'] - state['first_sent_ts']:.1f} s"
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for name, justify in (("device", "left"), ("phase", "left"), ("status", "left"), ("step", "left"),
                          ("model", "left"), ("seconds", "right"), ("error", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name == "error" else "ellipsis")
    order = [d for phase in (state.get("phases") or [list(state["devices"])]) for d in phase]
    for d in order:
        e = state["devices"][d]
        status = device_status(e)
        attempt = e.get("rollback") or e.get("install") or {}
        if attempt.get("finished_ts") is not None:
            seconds = f"{attempt.get('seconds') or 0.0:.1f}"
        elif attempt.get("status") == "sent" and attempt.get("wait_from_ts") is not None:
            seconds = f"{max(0.0, now - attempt['wait_from_ts']):.1f}"
        else:
            seconds = ""
        error = attempt.get("error") or {}
        err = ""
        if error:
            err = f"{error.get('reason')}" + (f" at {error['step']}" if error.get("step") else "") + \
                  (f" ({error['name']} {error['code']})" if error.get("code") is not None else "") + \
                  (f": {error['message']}" if error.get("message") else "")
        model = e.get("model") or e.get("model_before") or ""
        if e.get("model") and e.get("model_before") and e["model"] != e["model_before"]:
            model = f"{e['model_before']} → {e['model']}"
        table.add_row(d, e.get("phase") or "", f"[{_STYLE[status]}]{status.replace('_', ' ')}[/]",
                      attempt.get("step") or "", model, seconds, err)
    return table
