"""``edgekit fleet ...`` and ``edgekit broker``: monitor a fleet over MQTT, read its history, simulate devices.

Mounted by :mod:`edgekit.cli` (``app.add_typer(fleet_app, name="fleet")``).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from .errors import ConfigError

# edgekit.cli mounts this module at its end, so nothing is imported from it at import time
# (that would be circular when it runs as `python -m edgekit.cli`); its helpers are looked up per call.
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON")


def handle_errors(fn: Callable) -> Callable:
    """edgekit.cli's error handling (user errors: a message and an exit code, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .cli import handle_errors as cli_handle_errors

        return cli_handle_errors(fn)(*args, **kwargs)

    return wrapper


def _consoles():
    """edgekit.cli's (stdout, stderr) rich consoles."""
    from .cli import console, err_console

    return console, err_console


def print_json(data: Any) -> None:
    from .cli import print_json as cli_print_json

    cli_print_json(data)

fleet_app = typer.Typer(help="Monitor a fleet over MQTT, read its history, simulate devices.", no_args_is_help=True)

DEFAULT_DB = Path("fleet.db")
BrokerOpt = typer.Option("mqtt://127.0.0.1:1883", "--broker", "-b", envvar="EDGEKIT_BROKER",
                         help="mqtt://host[:port] or mqtts://host[:port] (TLS)")
UserOpt = typer.Option(None, "--username", "-u", envvar="EDGEKIT_MQTT_USERNAME", help="MQTT user name")
PasswordOpt = typer.Option(None, "--password", envvar="EDGEKIT_MQTT_PASSWORD",
                           help="MQTT password [default: $EDGEKIT_MQTT_PASSWORD]")
CaOpt = typer.Option(None, "--cafile", help="CA certificate (PEM) that signed the broker's certificate")
CertOpt = typer.Option(None, "--cert", help="Client certificate (PEM), with --key")
KeyOpt = typer.Option(None, "--key", help="Client certificate's private key (PEM)")
DbOpt = typer.Option(DEFAULT_DB, "--db", envvar="EDGEKIT_FLEET_DB", help="Fleet store (SQLite)")
FleetOpt = typer.Option(None, "--fleet", "-f", help="Fleet name (when a device name is in several)")


def _settings(broker: str, username: Optional[str], password: Optional[str], cafile: Optional[Path],
              cert: Optional[Path], key: Optional[Path], keepalive: int = 30):
    from .fleet.connection import BrokerSettings

    return BrokerSettings.from_url(broker, username=username, password=password, cafile=cafile, certfile=cert,
                                   keyfile=key, keepalive=keepalive)


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_since(text: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """``10m``/``2h``/``1d``/``30s`` ago, an ISO date/time, or UNIX seconds → UNIX seconds."""
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
        raise ConfigError(f"--since {text!r}: give a duration ago (30s, 10m, 2h, 1d), an ISO time "
                          "(2026-11-24T10:00) or UNIX seconds") from None
    if value.tzinfo is None:
        value = value.astimezone()
    return value.timestamp()


def _ts(t: Optional[float]) -> str:
    return "—" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------- monitor
@fleet_app.command("monitor")
@handle_errors
def monitor_cmd(
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
    fleet: str = typer.Option("+", "--fleet", "-f", help="Fleet to watch ('+': every fleet)"),
    db: Path = DbOpt,
    group: str = typer.Option("edgekit-monitor", help="Shared-subscription group: monitors in one group split "
                                                      "the fleet's messages"),
    workers: int = typer.Option(0, min=0, max=64, help="Ingest worker processes (0: one thread in this process)"),
    no_share: bool = typer.Option(False, "--no-share", help="Plain subscription (brokers without MQTT v5 shared "
                                                            "subscriptions; run one monitor only)"),
    client_id: Optional[str] = typer.Option(None, help="Prefix of this monitor's MQTT client ids "
                                                       "[default: host and pid]"),
    session_expiry: int = typer.Option(0, min=0, help="Seconds the broker keeps our subscription's messages "
                                                      "while we are away (needs a fixed --client-id)"),
    p99_ms: Optional[float] = typer.Option(100.0, "--p99-ms", help="Alert when a window's p99 latency is above (ms; 0: off)"),
    error_rate: Optional[float] = typer.Option(0.05, help="Alert when failed calls / calls is above (0: off)"),
    drift_psi: Optional[float] = typer.Option(0.2, help="Alert when an input's drift PSI is above (0: off)"),
    silent_s: Optional[float] = typer.Option(None, help="Alert when an online device sends nothing this long (s)"),
    gap_grace: float = typer.Option(2.0, help="Seconds a seq gap must stay open before it is reported"),
    duration: Optional[float] = typer.Option(None, help="Stop after this many seconds"),
    max_messages: Optional[int] = typer.Option(None, help="Stop after storing this many messages"),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="No live view (headless; logs alerts)"),
    as_json: bool = JsonOpt,
) -> None:
    """Subscribe to a fleet, store every message in SQLite, track devices and raise alerts."""
    console, err_console = _consoles()
    from .fleet.monitor import Monitor, MonitorOptions
    from .fleet.tracker import Thresholds

    if session_expiry and not client_id:
        raise ConfigError("--session-expiry needs a fixed --client-id (the broker keeps messages per client id)")
    settings = _settings(broker, username, password, cafile, cert, key)
    from .config import parse

    # 0 turns an alert off
    thresholds = parse(Thresholds, {"p99_ms": p99_ms or None, "error_rate": error_rate or None,
                                    "drift_psi": drift_psi or None, "silent_s": silent_s or None,
                                    "gap_grace_s": gap_grace}, "monitor thresholds")
    monitor = Monitor(settings, db, MonitorOptions(fleet=fleet, group=group, workers=workers, share=not no_share,
                                                   client_id=client_id, session_expiry=session_expiry,
                                                   thresholds=thresholds))
    dashboard = not (no_dashboard or as_json) and sys.stdout.isatty()
    if not dashboard and not as_json:
        err_console.print(f"monitoring {fleet} on {settings.url} into {db} (Ctrl-C stops)", highlight=False)
    monitor.start()
    try:
        if dashboard:
            from rich.live import Live

            from .fleet.dashboard import render

            with Live(render(monitor), console=console, refresh_per_second=4, screen=False) as live:
                summary = monitor.run(duration, max_messages, on_tick=lambda m: live.update(render(m)))
        else:
            seen = [0]

            def log_alerts(m) -> None:
                for entry in m.tracker.alert_log[seen[0]:]:
                    err_console.print(f"alert {entry['event']}: {entry['message']}", highlight=False)
                seen[0] = len(m.tracker.alert_log)

            summary = monitor.run(duration, max_messages, on_tick=None if as_json else log_alerts)
    except KeyboardInterrupt:
        monitor.stop()
        summary = monitor.summary()
    if as_json:
        print_json(summary)
    else:
        console.print(f"stored {summary['stored']} messages from {summary['devices']} devices "
                      f"({summary['online']} online, {summary['offline']} offline); duplicates "
                      f"{summary['duplicates']}, stale wills {summary['stale_wills']}, malformed "
                      f"{sum(summary['malformed'].values())}, missing seq {summary['missing']}, "
                      f"open alerts {len(summary['alerts_open'])}", highlight=False)


# ----------------------------------------------------------------------------- store readers
def _open_store(db: Path):
    from .fleet.store import FleetStore

    return FleetStore(db, create=False, readonly=True)


@fleet_app.command("ls")
@handle_errors
def ls_cmd(db: Path = DbOpt, fleet: Optional[str] = FleetOpt, as_json: bool = JsonOpt) -> None:
    """Devices in the store: status, model, latest figures, open alerts."""
    console, err_console = _consoles()
    with _open_store(db) as store:
        devices = store.devices(fleet)
    if as_json:
        print_json(devices)
        return
    table = Table("fleet", "device", "status", "boot", "model", "p99 ms", "drift PSI", "missing", "alerts",
                  "last seen")
    for d in devices:
        f = d.get("figures") or {}
        table.add_row(d["fleet"], d["device"], d["status"], str(d["boot"]), d["model"] or "—",
                      "—" if f.get("p99_ms") is None else f"{f['p99_ms']:.1f}",
                      "—" if f.get("drift_psi") is None else f"{f['drift_psi']:.3f}", str(d.get("missing", 0)),
                      ", ".join(d.get("alerts") or []), _ts(d["last_seen"]))
    console.print(table)


@fleet_app.command("show")
@handle_errors
def show_cmd(device: str, db: Path = DbOpt, fleet: Optional[str] = FleetOpt, as_json: bool = JsonOpt) -> None:
    """One device: status, boot, model, latest figures, gaps and alerts."""
    console, err_console = _consoles()
    with _open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        info = next((d for d in store.devices(fleet_name) if d["device"] == name), None)
        out = {"device": info or {"fleet": fleet_name, "device": name, "status": "unknown"},
               "gaps": store.gaps(fleet_name, name), "alerts": store.alerts(fleet_name, name),
               "messages": store.db.execute("SELECT kind, COUNT(*) FROM messages WHERE fleet=? AND device=? "
                                            "GROUP BY kind", (fleet_name, name)).fetchall()}
    out["messages"] = dict(out["messages"])
    if as_json:
        print_json(out)
        return
    d = out["device"]
    table = Table(show_header=False, title=f"{fleet_name}/{name}")
    f = d.get("figures") or {}
    rows = [("status", d["status"] + (f" ({d['offline_reason']})" if d.get("offline_reason") else "")),
            ("boot / seq", f"{d.get('boot')} / {d.get('seq')}"), ("model", d.get("model") or "—"),
            ("last seen", _ts(d.get("last_seen"))), ("messages", json.dumps(out["messages"])),
            ("latest window", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in f.items() if k != "at" and v is not None) or "—"),
            ("missing seq", str(d.get("missing", 0))), ("stale wills", str(d.get("stale_wills", 0)))]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    for g in out["gaps"]:
        console.print(f"gap boot {g['boot']} seq {g['first_seq']}–{g['last_seq']} ({g['missing']} missing), "
                      f"opened {_ts(g['opened'])}, " + (f"filled {_ts(g['closed'])}" if g["closed"] else "open"),
                      highlight=False)
    for a in out["alerts"]:
        console.print(f"alert {a['kind']}: {a['message']} — opened {_ts(a['opened'])}"
                      + (f", closed {_ts(a['closed'])}" if a["closed"] else " (open)"), highlight=False)


@fleet_app.command("history")
@handle_errors
def history_cmd(
    device: str, db: Path = DbOpt, fleet: Optional[str] = FleetOpt,
    since: Optional[str] = typer.Option(None, help="From: 30s, 10m, 2h, 1d ago, an ISO time, or UNIX seconds"),
    until: Optional[str] = typer.Option(None, help="Until (same forms)"),
    kind: Optional[list[str]] = typer.Option(None, "--kind", help="Only these kinds (repeatable)"),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the newest N messages"),
    as_json: bool = JsonOpt,
) -> None:
    """A device's stored messages, oldest first, by device time."""
    console, err_console = _consoles()
    with _open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        rows = store.history(fleet_name, name, parse_since(since), parse_since(until), kind, limit)
    if as_json:
        print_json(rows)
        return
    table = Table("time", "kind", "boot", "seq", "p50 ms", "p99 ms", "PSI", "flags", "summary")
    for r in rows:
        body = r.get("body") or {}
        summary = (body.get("status") or body.get("type") or body.get("command") or "") if r["kind"] != "telemetry" \
            else f"{r['inferences']} inferences, {r['errors']} errors"
        flags = " ".join(x for x, on in (("historical", r["historical"]), ("retained", r["retained"])) if on)
        table.add_row(_ts(r["ts"]), r["kind"], str(r["boot"]), str(r["seq"]),
                      "" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                      "" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}",
                      "" if r["drift_psi"] is None else f"{r['drift_psi']:.3f}", flags, str(summary))
    console.print(table)


@fleet_app.command("plot")
@handle_errors
def plot_cmd(
    device: str, out: Path = typer.Option(..., "--out", "-o", help="PNG to write"), db: Path = DbOpt,
    fleet: Optional[str] = FleetOpt, since: Optional[str] = typer.Option(None, help="From (as in history)"),
    p99_ms: Optional[float] = typer.Option(None, "--p99-ms", help="Draw this p99 budget"),
    drift_psi: Optional[float] = typer.Option(0.2, help="Draw this PSI threshold"),
    as_json: bool = JsonOpt,
) -> None:
    """Plot a device's p50/p99 latency and drift PSI over time."""
    console, err_console = _consoles()
    from .fleet.plot import plot_device

    with _open_store(db) as store:
        fleet_name, name = store.find_device(device, fleet)
        result = plot_device(store, fleet_name, name, out, parse_since(since), drift_psi, p99_ms)
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {result['out']} ({result['windows']} windows)")


# ----------------------------------------------------------------------------- simulate
@fleet_app.command("simulate")
@handle_errors
def simulate_cmd(
    devices: int = typer.Option(10, "--devices", "-n", help="Simulated devices (real MQTT clients)"),
    rate: float = typer.Option(1.0, help="Telemetry messages per second per device"),
    duration: float = typer.Option(10.0, help="Seconds to run"),
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
    fleet: str = typer.Option("sim", "--fleet", "-f", help="Fleet name"),
    prefix: str = typer.Option("sim", help="Device names: PREFIX0000, PREFIX0001, ..."),
    inferences: float = typer.Option(20.0, help="Synthetic inferences per second per device"),
    latency_ms: float = typer.Option(8.0, help="Median synthetic latency"),
    error_rate: float = typer.Option(0.0, help="Share of inferences that fail"),
    drift_after: Optional[float] = typer.Option(None, help="Shift the inputs after this many seconds"),
    drift_share: float = typer.Option(1.0, help="Share of devices whose inputs drift"),
    drift_shift: float = typer.Option(1.5, help="Shift, in reference standard deviations"),
    bundle: Optional[Path] = typer.Option(None, help="Report this bundle's model and judge drift against its "
                                                     "input_stats (default: a synthetic reference)"),
    state_dir: Optional[Path] = typer.Option(None, help="Keep boot counters and spools here across runs"),
    seed: int = typer.Option(0, help="Random seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Run simulated devices (the agent's own code on synthetic inferences) against a broker."""
    console, err_console = _consoles()
    from .fleet.simulate import SimulatedFleet, SimulationPlan

    manifest = None
    if bundle is not None:
        from edgekit_runtime.bundle import read_manifest_unverified

        manifest = read_manifest_unverified(bundle)
    settings = _settings(broker, username, password, cafile, cert, key)
    plan = SimulationPlan(fleet=fleet, devices=devices, rate=rate, duration_s=duration, inferences_per_s=inferences,
                          latency_ms=latency_ms, error_rate=error_rate, drift_after_s=drift_after,
                          drift_share=drift_share, drift_shift=drift_shift, device_prefix=prefix,
                          state_dir=state_dir, seed=seed, manifest=manifest)
    sim = SimulatedFleet(settings, plan)
    if not as_json:
        err_console.print(f"{devices} simulated devices → {settings.url}, fleet {fleet}, {rate:g} msg/s each, "
                          f"{duration:g} s", highlight=False)
    sim.start()
    summary = sim.run()
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "per_device"})
    else:
        console.print(f"{summary['devices']} devices made {summary['messages']} messages in {summary['seconds']} s "
                      f"(boot {', '.join(map(str, summary['boots']))})", highlight=False)


# ----------------------------------------------------------------------------- broker
@handle_errors
def broker_cmd(
    port: int = typer.Option(1883, help="Port of the mqtt:// listener"),
    dir: Path = typer.Option(Path(".edgekit/broker"), "--dir", help="Config, persistence and log folder"),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)"),
    max_queued: int = typer.Option(1_000_000, help="QoS 1 messages queued per client behind its in-flight window"),
    max_inflight: int = typer.Option(1000, help="QoS 1 messages in flight per client (v5 Receive Maximum)"),
    password_file: Optional[Path] = typer.Option(None, help="mosquitto_passwd file (disables anonymous access)"),
    acl_file: Optional[Path] = typer.Option(None, help="ACL file (firmware/mosquitto/acl)"),
    print_config: bool = typer.Option(False, "--print-config", help="Write and print the config; do not run"),
) -> None:
    """Run a local Mosquitto for a fleet (raised queue limits) in the foreground."""
    console, err_console = _consoles()
    from .fleet.broker import BrokerConfig, run_foreground

    config = BrokerConfig(dir=dir, port=port, bind=bind, max_queued_messages=max_queued,
                          max_inflight_messages=max_inflight, password_file=password_file, acl_file=acl_file,
                          allow_anonymous=password_file is None)
    path = config.write()
    if print_config:
        console.print(path.read_text(), highlight=False, markup=False)
        return
    err_console.print(f"mosquitto on {bind}:{port}, config {path} (Ctrl-C stops)", highlight=False)
    run_foreground(config)  # does not return: the process becomes mosquitto
