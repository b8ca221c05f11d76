"""The monitor's live terminal view (rich): fleet totals, one row per device, alerts."""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .tracker import DeviceView

MAX_ROWS = 30  # devices shown; alerting and offline devices first


def _fmt(value: Optional[float], spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _ago(t: Optional[float], now: float) -> str:
    if t is None:
        return "—"
    s = max(now - t, 0)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _order(dev: DeviceView) -> tuple:
    return (0 if dev.alerts else 1, 0 if dev.status != "online" else 1, dev.fleet, dev.device)


def device_table(devices: list[DeviceView], now: float, max_rows: int = MAX_ROWS) -> Table:
    table = Table(expand=True, pad_edge=False)
    for col, justify in (("device", "left"), ("status", "left"), ("boot", "right"), ("model", "left"),
                         ("p50 ms", "right"), ("p99 ms", "right"), ("inf/window", "right"), ("errors", "right"),
                         ("temp °C", "right"), ("CPU %", "right"), ("drift PSI", "right"), ("missing", "right"),
                         ("last seen", "right"), ("alerts", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    shown = sorted(devices, key=_order)[:max_rows]
    for d in shown:
        f = d.figures
        status = {"online": "[green]online[/]", "offline": "[red]offline[/]"}.get(d.status, f"[dim]{d.status}[/]")
        if d.status == "offline" and d.offline_reason:
            status += f" [dim]({d.offline_reason})[/]"
        errors = f.get("errors")
        rate = f.get("error_rate")
        err = "—" if errors is None else (f"{errors}" + (f" ({rate:.0%})" if rate else ""))
        table.add_row(
            d.device if d.fleet in ("", None) else f"{d.device}", status, str(d.boot) if d.boot >= 0 else "—",
            d.model or "—", _fmt(f.get("p50_ms"), ".1f"),
            ("[red]" if "p99" in d.alerts else "") + _fmt(f.get("p99_ms"), ".1f"),
            _fmt(f.get("inferences"), "d") if isinstance(f.get("inferences"), int) else "—",
            ("[red]" if "error_rate" in d.alerts else "") + err,
            _fmt(f.get("temp_c"), ".0f"), _fmt(f.get("cpu_percent"), ".0f"),
            ("[red]" if "drift" in d.alerts else "") + _fmt(f.get("drift_psi"), ".3f"),
            str(d.missing) if d.missing else "0", _ago(d.last_seen, now),
            "[red]" + ", ".join(sorted(d.alerts)) + "[/]" if d.alerts else "")
    if len(devices) > len(shown):
        table.caption = f"{len(shown)} of {len(devices)} devices shown (alerting and offline first)"
    return table


def render(monitor: Any, now: Optional[float] = None) -> Group:
    """Everything the dashboard shows, from a running :class:`~.monitor.Monitor`."""
    now = time.time() if now is None else now
    tracker = monitor.tracker
    devices = list(tracker.devices.values())
    online = sum(1 for d in devices if d.status == "online")
    offline = sum(1 for d in devices if d.status == "offline")
    counts = getattr(monitor, "last_counts", {}) or {}
    malformed = counts.get("malformed", {})
    head = Text.assemble(
        ("fleet ", "dim"), (monitor.options.fleet, "bold"), ("  broker ", "dim"), monitor.settings.url,
        ("  store ", "dim"), str(monitor.store_path), "\n",
        ("devices ", "dim"), f"{len(devices)}", ("  online ", "dim"), (f"{online}", "green"),
        ("  offline ", "dim"), (f"{offline}", "red" if offline else ""),
        ("  stored ", "dim"), f"{monitor.stored:,}", ("  rate ", "dim"), f"{monitor.rate:,.0f} msg/s",
        ("  duplicates ", "dim"), f"{counts.get('duplicates', 0):,}",
        ("  stale wills ", "dim"), f"{tracker.stale_wills}",
        ("  malformed ", "dim"), (", ".join(f"{k} {v}" for k, v in sorted(malformed.items())) or "0",
                                  "yellow" if malformed else ""),
        ("  workers ", "dim"), f"{monitor.options.workers or 'in-process'}")
    parts: list[Any] = [Panel(head, title="edgekit fleet monitor", border_style="blue"), device_table(devices, now)]
    open_alerts = [a for d in devices for a in d.alerts.values()]
    lines = []
    for entry in tracker.alert_log[-8:]:
        when = time.strftime("%H:%M:%S", time.localtime(entry["closed"] if entry["event"] == "closed"
                                                         else entry["opened"]))
        style = "red" if entry["event"] == "opened" else "green"
        lines.append(Text.assemble((f"{when} ", "dim"), (f"{entry['event']:>6} ", style), entry["message"]))
    parts.append(Panel(Group(*lines) if lines else Text("no alerts", style="dim"),
                       title=f"alerts ({len(open_alerts)} open)", border_style="red" if open_alerts else "dim"))
    return Group(*parts)
