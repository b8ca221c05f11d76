"""What the monitor knows about each device, rebuilt from stored messages in commit order.

Rules (Sparkplug B's, with our envelope's ``boot`` as its bdSeq):

* A device's ``boot`` is the largest seen. A ``state`` message of an older boot
  is stale — typically the last will of a connection the broker noticed dead
  after the device had already restarted — and is counted, never applied.
* ``state`` "online"/"offline" of the current (or a newer) boot sets the status.
  Any *live* message of a newer boot also means online. After an "offline" of
  the current boot, only the device's next "online" brings it back (the agent
  republishes it on every reconnect).
* Within a boot, ``state`` carries the MQTT connection it belongs to (``body.connection``,
  from agents that send it): a ``state`` of an earlier connection than the latest one seen
  is stale too — a will a broker the device had left published after the device's next
  "online" through another broker.
* ``seq`` counts a boot's messages from 1 (0 is the will; the store keeps a will that names
  its connection N under ``seq`` −N, so each connection's will is kept, not dropped as a
  duplicate of the boot's first). Missing numbers
  between the lowest and highest seen open a gap; a gap that is filled within
  ``gap_grace_s`` was only reordering between ingest workers and is never
  reported, a later fill (the device's spool replaying after an outage) closes it.
* ``historical`` (replayed) messages fill gaps and are stored, but do not move
  "last seen" or the live figures.
* Thresholds open an alert when crossed and close it when the value is back
  under: offline, p99 latency, error rate, drift PSI.
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import Field

from ..config import Strict

ALERT_KINDS = ("offline", "p99", "error_rate", "drift", "silent")


class Thresholds(Strict):
    """When an alert opens (None: that alert is off)."""

    p99_ms: Optional[float] = Field(100.0, gt=0, description="p99 latency budget per telemetry window, ms")
    error_rate: Optional[float] = Field(0.05, ge=0, le=1, description="failed calls / calls in a window")
    min_calls: int = Field(20, ge=1, description="calls a window needs before its error rate is judged")
    drift_psi: Optional[float] = Field(0.2, gt=0, description="largest input PSI (0.1-0.2: moderate, >0.2: drifted)")
    offline: bool = Field(True, description="alert when a device goes offline")
    silent_s: Optional[float] = Field(None, gt=0, description="alert when an online device sends nothing this long")
    gap_grace_s: float = Field(2.0, ge=0, description="a seq gap must stay open this long to be reported")


@dataclass
class _Range:
    first: int
    last: int
    opened: float
    gap_id: Optional[int] = None  # row in `gaps` once reported


class SeqTracker:
    """Received ``seq`` numbers of one (device, boot), as the missing ranges between lowest and highest."""

    def __init__(self, seq: int, now: float):
        self.low = self.high = seq
        self.missing: list[_Range] = []  # sorted, disjoint
        self.filled_after_report: list[int] = []  # gap ids whose last range was filled

    def add(self, seq: int, now: float) -> None:
        if seq == self.high + 1:
            self.high = seq
        elif seq > self.high:
            self.missing.append(_Range(self.high + 1, seq - 1, now))
            self.high = seq
        elif seq < self.low:
            if seq < self.low - 1:
                self.missing.insert(0, _Range(seq + 1, self.low - 1, now))
            self.low = seq
        else:
            self._fill(seq)

    def _fill(self, seq: int) -> None:
        firsts = [r.first for r in self.missing]
        i = bisect.bisect_right(firsts, seq) - 1
        if i < 0 or self.missing[i].last < seq:
            return  # not missing: a duplicate (the store has already dropped it)
        r = self.missing[i]
        if r.first == r.last:
            del self.missing[i]
            if r.gap_id is not None and not any(x.gap_id == r.gap_id for x in self.missing):
                self.filled_after_report.append(r.gap_id)
        elif seq == r.first:
            r.first += 1
        elif seq == r.last:
            r.last -= 1
        else:
            self.missing.insert(i + 1, _Range(seq + 1, r.last, r.opened, r.gap_id))
            r.last = seq - 1

    @property
    def missing_count(self) -> int:
        return sum(r.last - r.first + 1 for r in self.missing)


@dataclass
class DeviceView:
    fleet: str
    device: str
    first_seen: float
    status: str = "unknown"
    boot: int = -1
    seq: int = 0
    model: Optional[str] = None
    last_seen: Optional[float] = None  # monitor clock of the last live message (device clock for retained)
    offline_reason: Optional[str] = None
    figures: dict[str, Any] = field(default_factory=dict)
    figures_from: tuple[int, int] = (-1, -1)  # (boot, seq) of the telemetry the figures come from
    messages: int = 0
    historical: int = 0
    stale_wills: int = 0
    events: int = 0
    last_event: Optional[str] = None
    seqs: dict[int, SeqTracker] = field(default_factory=dict)
    gaps_reported: int = 0
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # open alerts by kind
    state_body: dict[str, Any] = field(default_factory=dict)
    connection: int = 0  # the latest MQTT connection of the current boot a `state` came from (body.connection)

    @property
    def missing(self) -> int:
        return sum(t.missing_count for t in self.seqs.values())

    def info(self) -> dict[str, Any]:
        return {"offline_reason": self.offline_reason, "figures": self.figures, "messages": self.messages,
                "historical": self.historical, "stale_wills": self.stale_wills, "events": self.events,
                "last_event": self.last_event, "missing": self.missing, "gaps_reported": self.gaps_reported,
                "alerts": sorted(self.alerts), "runtime_version": self.state_body.get("runtime_version"),
                "agent_state": self.state_body.get("agent_state"), "connection": self.connection}


def _model_name(model: Any) -> Optional[str]:
    if isinstance(model, dict) and model.get("name"):
        return f"{model['name']} {model.get('version', '')}".strip()
    return None


class FleetTracker:
    """Consumes stored rows (``store.TAIL_COLUMNS`` + payload) and keeps device views, gaps and alerts."""

    def __init__(self, thresholds: Optional[Thresholds] = None, clock=time.time):
        self.thresholds = thresholds or Thresholds()
        self.clock = clock
        self.devices: dict[tuple[str, str], DeviceView] = {}
        self.last_id = 0
        self.messages = 0
        self.stale_wills = 0
        self.alert_log: list[dict[str, Any]] = []  # opened/closed, newest last (bounded)
        # called with each opened/closed entry, in order (alert sinks: webhook, MQTT alert topic); a listener
        # must not block or raise: it queues the entry and delivers from its own thread
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._dirty: set[tuple[str, str]] = set()
        self._alerts_new: list[tuple] = []
        self._alerts_closed: list[tuple] = []
        self._gaps_closed: list[tuple] = []
        self._stale_new = 0
        self._devices_written = 0.0

    # -- restore -------------------------------------------------------------------------
    def restore(self, store) -> None:
        """Continue from a store written before (devices, open alerts, each current boot's highest seq)."""
        for row in store.devices():
            key = (row["fleet"], row["device"])
            dev = DeviceView(row["fleet"], row["device"], row["first_seen"], status=row["status"], boot=row["boot"],
                             seq=row["seq"], model=row["model"], last_seen=row["last_seen"],
                             offline_reason=row.get("offline_reason"), figures=row.get("figures") or {},
                             messages=row.get("messages", 0), historical=row.get("historical", 0),
                             stale_wills=row.get("stale_wills", 0), events=row.get("events", 0),
                             last_event=row.get("last_event"), gaps_reported=row.get("gaps_reported", 0),
                             connection=row.get("connection") or 0)
            top = store.max_seq(row["fleet"], row["device"], row["boot"])
            if top:
                dev.seqs[row["boot"]] = SeqTracker(top, self.clock())
            self.devices[key] = dev
        for alert in store.alerts(open_only=True):
            dev = self.devices.get((alert["fleet"], alert["device"]))
            if dev is not None:
                dev.alerts[alert["kind"]] = alert
        self.last_id = store.last_id()

    # -- consume -------------------------------------------------------------------------
    def consume(self, rows: list[tuple]) -> None:
        now = self.clock()
        devices = self.devices
        dirty = self._dirty
        one = self._one
        telemetry = self._telemetry
        n = 0
        for row in rows:
            # the common row, handled inline: live telemetry of a known device's current boot, next in seq
            # order (what _one does with it, without its general cases; the tracker spends ~1 µs per row here)
            if row[3] == "telemetry" and not row[8] and not row[9]:
                key = (row[1], row[2])
                dev = devices.get(key)
                if dev is not None and row[4] == dev.boot:
                    seq = row[5]
                    tracker = dev.seqs.get(dev.boot)
                    if tracker is not None and seq == tracker.high + 1:
                        tracker.high = seq
                        dirty.add(key)
                        n += 1
                        dev.messages += 1
                        if seq > dev.seq:
                            dev.seq = seq
                        dev.last_seen = row[7]
                        if (dev.boot, seq) > dev.figures_from:
                            dev.figures_from = (dev.boot, seq)
                            telemetry(dev, *row[10:18], now)
                        continue
            one(row, now)
        self.messages += n
        if rows:
            self.last_id = rows[-1][0]

    def _one(self, row: tuple, now: float) -> None:
        (_id, fleet, device, kind, boot, seq, ts, received, historical, retained,
         p50, p99, inferences, calls, errors, temp, cpu, psi, payload) = row
        key = (fleet, device)
        dev = self.devices.get(key)
        if dev is None:
            dev = self.devices[key] = DeviceView(fleet, device, received)
        self._dirty.add(key)
        self.messages += 1
        dev.messages += 1
        live = not historical and not retained
        if historical:
            dev.historical += 1
        body = json.loads(payload)["body"] if payload is not None else None

        if seq > 0 and not retained:
            tracker = dev.seqs.get(boot)
            if tracker is None:
                dev.seqs[boot] = SeqTracker(seq, now)
                # keep the current and previous boot only: older ones cannot be filled any more
                for old in sorted(dev.seqs)[:-2]:
                    self._close_boot(dev, old, now)
            else:
                tracker.add(seq, now)
                for gap_id in tracker.filled_after_report:
                    self._gaps_closed.append((now, gap_id))
                tracker.filled_after_report.clear()

        if kind == "state":
            self._state(dev, boot, seq, ts, received, retained, body, now)
            return
        if boot < dev.boot:
            return  # an older boot's message (a replay): stored and gap-tracked, nothing more
        if boot > dev.boot:
            dev.boot, dev.seq = boot, seq
            if live:
                self._set_status(dev, "online", None, now)
        dev.seq = max(dev.seq, seq)
        if not live:
            return
        dev.last_seen = received
        if kind == "telemetry" and (boot, seq) > dev.figures_from:
            # (workers can commit a device's windows out of order: only the newest sets the figures)
            dev.figures_from = (boot, seq)
            self._telemetry(dev, p50, p99, inferences, calls, errors, temp, cpu, psi, now)
        elif kind == "event" and body is not None:
            dev.events += 1
            dev.last_event = str(body.get("type"))

    def _state(self, dev: DeviceView, boot: int, seq: int, ts: float, received: float, retained: bool,
               body: Optional[dict], now: float) -> None:
        status = (body or {}).get("status")
        connection = (body or {}).get("connection")
        if connection.__class__ is not int:
            connection = None  # (an agent before per-connection state: arrival order decides, as before)
        if boot < dev.boot or (boot == dev.boot and connection is not None and connection < dev.connection):
            # an older boot's, or an earlier connection's of this boot (a will a broker published late, after the
            # device had connected again, through another broker): stale, counted, never applied
            if status == "offline":
                dev.stale_wills += 1
                self.stale_wills += 1
                self._stale_new += 1
            return
        if boot > dev.boot:
            dev.connection = 0
        if connection is not None:
            dev.connection = connection
        dev.boot = boot
        dev.seq = max(dev.seq, seq)
        dev.last_seen = ts if retained else received
        if status == "online":
            dev.state_body = body or {}
            dev.model = _model_name(dev.state_body.get("model")) or dev.model
            self._set_status(dev, "online", None, now)
        elif status == "offline":
            reason = (body or {}).get("reason") or ("last will" if seq <= 0 else "offline")
            self._set_status(dev, "offline", reason, now)

    def _set_status(self, dev: DeviceView, status: str, reason: Optional[str], now: float) -> None:
        dev.status = status
        dev.offline_reason = reason
        if status == "offline":
            if self.thresholds.offline:
                self._open(dev, "offline", None, None, f"{dev.device} went offline ({reason}), boot {dev.boot}", now)
        else:
            self._close(dev, "offline", now)
            self._close(dev, "silent", now)

    def _telemetry(self, dev: DeviceView, p50, p99, inferences, calls, errors, temp, cpu, psi, now: float) -> None:
        th = self.thresholds
        rate = (errors / calls) if (errors is not None and calls) else None
        # a window without inferences has no latency, and drift is judged only every few windows:
        # keep the last known value of those rather than blanking the row
        old = dev.figures
        dev.figures = {"p50_ms": old.get("p50_ms") if p50 is None else p50,
                       "p99_ms": old.get("p99_ms") if p99 is None else p99,
                       "inferences": inferences, "calls": calls, "errors": errors, "error_rate": rate,
                       "temp_c": old.get("temp_c") if temp is None else temp,
                       "cpu_percent": old.get("cpu_percent") if cpu is None else cpu,
                       "drift_psi": old.get("drift_psi") if psi is None else psi, "at": now}
        alerts = dev.alerts
        if th.p99_ms is not None and p99 is not None:
            if p99 > th.p99_ms:
                self._open(dev, "p99", p99, th.p99_ms, f"{dev.device} p99 {p99:.1f} ms > budget {th.p99_ms:g} ms", now)
            elif "p99" in alerts:
                self._close(dev, "p99", now)
        if th.error_rate is not None and rate is not None and calls >= th.min_calls:
            if rate > th.error_rate:
                self._open(dev, "error_rate", rate, th.error_rate,
                           f"{dev.device} error rate {rate:.1%} > {th.error_rate:.1%} ({errors}/{calls} calls)", now)
            elif "error_rate" in alerts:
                self._close(dev, "error_rate", now)
        if th.drift_psi is not None and psi is not None:
            if psi > th.drift_psi:
                self._open(dev, "drift", psi, th.drift_psi, f"{dev.device} input drift PSI {psi:.3f} > "
                                                            f"{th.drift_psi:g}", now)
            elif "drift" in alerts:
                self._close(dev, "drift", now)

    # -- alerts --------------------------------------------------------------------------
    def _open(self, dev: DeviceView, kind: str, value: Optional[float], threshold: Optional[float], message: str,
              now: float) -> None:
        current = dev.alerts.get(kind)
        if current is not None:
            current["value"] = value  # still open: the latest value, no new row
            return
        alert = {"fleet": dev.fleet, "device": dev.device, "kind": kind, "value": value, "threshold": threshold,
                 "message": message, "opened": now, "closed": None}
        dev.alerts[kind] = alert
        self._alerts_new.append((dev.fleet, dev.device, kind, value, threshold, message, now))
        self._log({"event": "opened", **alert})

    def _close(self, dev: DeviceView, kind: str, now: float) -> None:
        alert = dev.alerts.pop(kind, None)
        if alert is None:
            return
        self._alerts_closed.append((now, dev.fleet, dev.device, kind))
        self._log({"event": "closed", **alert, "closed": now})

    def _log(self, entry: dict[str, Any]) -> None:
        self.alert_log.append(entry)
        del self.alert_log[:-200]
        for listener in self.listeners:
            listener(entry)

    def check_silence(self) -> None:
        """Open ``silent`` alerts for online devices quiet longer than ``silent_s``."""
        limit = self.thresholds.silent_s
        if limit is None:
            return
        now = self.clock()
        for key, dev in self.devices.items():
            if dev.status == "online" and dev.last_seen is not None and now - dev.last_seen > limit:
                self._open(dev, "silent", now - dev.last_seen, limit,
                           f"{dev.device} sent nothing for {now - dev.last_seen:.0f} s", now)
                self._dirty.add(key)

    # -- gaps ----------------------------------------------------------------------------
    def _close_boot(self, dev: DeviceView, boot: int, now: float) -> None:
        dev.seqs.pop(boot)  # its reported gaps stay open in the store: nothing can fill them now

    def open_gaps(self) -> list[dict[str, Any]]:
        out = []
        for (fleet, device), dev in self.devices.items():
            for boot, t in dev.seqs.items():
                for r in t.missing:
                    out.append({"fleet": fleet, "device": device, "boot": boot, "first_seq": r.first,
                                "last_seq": r.last, "opened": r.opened, "reported": r.gap_id is not None})
        return out

    # -- persistence -----------------------------------------------------------------------
    def flush(self, store, devices_every_s: float = 0.0) -> None:
        """Write gaps past their grace period and alert changes to the store, and changed devices
        (at most every ``devices_every_s``: a large fleet changes every device every second)."""
        now = self.clock()
        write_devices = now - self._devices_written >= devices_every_s
        grace = self.thresholds.gap_grace_s
        self.check_silence()
        gaps_new: list[tuple] = []
        gap_ranges: list[_Range] = []
        for (fleet, device), dev in self.devices.items():
            for boot, t in dev.seqs.items():
                for r in t.missing:
                    if r.gap_id is None and now - r.opened >= grace:
                        gaps_new.append((fleet, device, boot, r.first, r.last, r.opened))
                        gap_ranges.append(r)
                        dev.gaps_reported += 1
                        self._dirty.add((fleet, device))
        devices = [(d.fleet, d.device, d.status, d.boot, d.seq, d.model, d.first_seen,
                    d.last_seen if d.last_seen is not None else d.first_seen, json.dumps(d.info()))
                   for d in (self.devices[k] for k in self._dirty)] if write_devices else []
        if not (devices or gaps_new or self._gaps_closed or self._alerts_new or self._alerts_closed
                or self._stale_new):
            return
        ids = store.save_tracker(devices, gaps_new, self._gaps_closed, self._alerts_new, self._alerts_closed,
                                 {"stale_wills": self._stale_new})
        for gid, r in zip(ids, gap_ranges):
            r.gap_id = gid
        if write_devices:
            self._dirty.clear()
            self._devices_written = now
        self._alerts_new.clear()
        self._alerts_closed.clear()
        self._gaps_closed.clear()
        self._stale_new = 0
