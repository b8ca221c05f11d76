"""Questions about a fleet's stored history, answered as data: what ``edgekit fleet ls/show/history/plot`` show.

Each function opens the store read-only (it may be written by a running monitor),
answers, and closes it; none prints. Times are UNIX seconds; :func:`parse_time`
reads what a person types (``10m``, ``2h`` ago, an ISO time).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from .store import FleetStore
from .stores import open_store as _open_store

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_time(text: Optional[str], now: Optional[float] = None, option: str = "--since") -> Optional[float]:
    """``10m``/``2h``/``1d``/``30s`` ago, an ISO date/time, or UNIX seconds → UNIX seconds (None stays None)."""
    if text is None:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass  # not a number: try a date
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give a duration ago (30s, 10m, 2h, 1d), an ISO time "
                          "(2026-11-24T10:00) or UNIX seconds") from None
    if value.tzinfo is None:
        value = value.astimezone()
    return value.timestamp()


def open_store(db: str | Path) -> FleetStore:
    """The store at ``db``, read-only (a monitor may be writing it)."""
    return _open_store(db, create=False, readonly=True)


def list_devices(db: str | Path, fleet: Optional[str] = None) -> list[dict[str, Any]]:
    """Every device in the store: status, boot, model, latest figures, missing seq, open alerts."""
    with open_store(db) as store:
        return store.devices(fleet)


def device_detail(db: str | Path, device: str, fleet: Optional[str] = None) -> dict[str, Any]:
    """One device: ``device`` (as in :func:`list_devices`), ``gaps``, ``alerts``, ``messages`` per kind, and the
    ``workloads`` its latest telemetry reported (serve routes with their shadow candidates, streams)."""
    with open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        info = next((d for d in store.devices(fleet_name) if d["device"] == name), None)
        latest = store.history(fleet_name, name, kinds=["telemetry"], limit=1)
        body = (latest[-1].get("body") or {}) if latest else {}
        workloads = body.get("workloads") if isinstance(body, dict) else None
        return {"device": info or {"fleet": fleet_name, "device": name, "status": "unknown"},
                "gaps": store.gaps(fleet_name, name), "alerts": store.alerts(fleet_name, name),
                "messages": store.message_counts(fleet_name, name),
                # what serve/stream --report-dir said in the latest telemetry (shadow agreement, dropped frames)
                "workloads": workloads if isinstance(workloads, dict) else {}}


def device_history(db: str | Path, device: str, fleet: Optional[str] = None, since: Optional[float] = None,
                   until: Optional[float] = None, kinds: Optional[Sequence[str]] = None,
                   limit: Optional[int] = None) -> list[dict[str, Any]]:
    """A device's stored messages by device time, oldest first (``limit``: only the newest N)."""
    with open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        return store.history(fleet_name, name, since, until, kinds, limit)


def device_hours(db: str | Path, device: str, fleet: Optional[str] = None, since: Optional[float] = None,
                 until: Optional[float] = None) -> list[dict[str, Any]]:
    """A device's telemetry rolled up per hour by ``fleet prune`` (older than its raw retention), oldest first."""
    from .retention import hourly

    with open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        return hourly(store, fleet_name, name, since, until)


def plot_device_history(db: str | Path, device: str, out: Path, fleet: Optional[str] = None,
                        since: Optional[float] = None, drift_psi: Optional[float] = 0.2,
                        p99_ms: Optional[float] = None) -> dict[str, Any]:
    """Write a PNG of the device's p50/p99 latency and drift PSI over time; returns what was drawn."""
    from .plot import plot_device

    with open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        return plot_device(store, fleet_name, name, out, since, drift_psi, p99_ms)
