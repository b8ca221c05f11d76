"""``edgekit fleet monitor|ls|show|history|plot|simulate``: watch a fleet over MQTT, read its history, simulate devices."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rich.markup import escape

from edgekit_runtime.contract.errors import RuntimeErrorBase

from ..errors import ConfigError, EdgekitError, exit_code_of
from ..fleet.stores import describe as describe_store
from .exits import handle_errors
from .options import (BrokerOpt, CaOpt, CertKeyOpt, CertOpt, DbOpt, FleetOpt, JsonOpt, PasswordOpt, UserOpt,
                      broker_settings)
from .output import console, err_console, print_json

app = typer.Typer(help="Monitor a fleet over MQTT, read its history, simulate devices.", no_args_is_help=True)

SinceOpt = typer.Option(None, help="From: 30s, 10m, 2h, 1d ago, an ISO time, or UNIX seconds")


def _ts(t: Optional[float]) -> str:
    return "—" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------- monitor
@app.command("monitor")
@handle_errors
def monitor_cmd(
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = CertKeyOpt,
    fleet: str = typer.Option("+", "--fleet", "-f", help="Fleet to watch ('+': every fleet)"),
    db: str = DbOpt,
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
    alert_webhook: Optional[list[str]] = typer.Option(None, "--alert-webhook", metavar="URL",
                                                      help="POST each opened/resolved alert as JSON here "
                                                           "(repeatable)"),
    alert_webhook_token: Optional[str] = typer.Option(None, envvar="EDGEKIT_ALERT_TOKEN",
                                                      help="Bearer token for --alert-webhook "
                                                           "[env: EDGEKIT_ALERT_TOKEN]", show_envvar=False),
    alert_topic: bool = typer.Option(True, "--alert-topic/--no-alert-topic",
                                     help="Publish alerts to edgekit/v1/<fleet>/alerts/<device>/<kind> (retained "
                                          "while open; the broker's ACL must let the monitor write there)"),
    duration: Optional[float] = typer.Option(None, help="Stop after this many seconds"),
    max_messages: Optional[int] = typer.Option(None, help="Stop after storing this many messages"),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="No live view (headless; logs alerts)"),
    as_json: bool = JsonOpt,
) -> None:
    """Subscribe to a fleet, store every message (SQLite file or PostgreSQL), track devices, raise alerts.

    With --json: a bounded run (--duration or --max-messages) prints its summary at the end; an
    unbounded one prints what it started (broker, store, pid) once it is subscribed, then nothing
    more on stdout (alerts are in the store).
    """
    from ..config import parse
    from ..fleet.monitor import Monitor, MonitorOptions
    from ..fleet.tracker import Thresholds

    if session_expiry and not client_id:
        raise ConfigError("--session-expiry needs a fixed --client-id (the broker keeps messages per client id)")
    settings = broker_settings(broker, username, password, cafile, cert, key)
    # 0 turns an alert off
    thresholds = parse(Thresholds, {"p99_ms": p99_ms or None, "error_rate": error_rate or None,
                                    "drift_psi": drift_psi or None, "silent_s": silent_s or None,
                                    "gap_grace_s": gap_grace}, "monitor thresholds")
    dispatcher = _alert_dispatcher(settings, fleet, client_id, alert_webhook or [], alert_webhook_token,
                                   alert_topic)
    bounded = duration is not None or max_messages is not None
    dashboard = not (no_dashboard or as_json) and sys.stdout.isatty()
    listeners, on_lead = [], []
    if dispatcher is not None:
        listeners.append(dispatcher.listener)

        def restored(m) -> None:  # open alerts a new tracker restored from the store are never sent again as new
            dispatcher.restored([a for d in m.tracker.devices.values() for a in d.alerts.values()])

        on_lead.append(restored)  # (a PostgreSQL store's tracker is restored when this monitor takes the lead)
    if not dashboard:  # headless: each alert on stderr as it opens or closes
        listeners.append(lambda entry: err_console.print(f"alert {entry['event']}: {entry['message']}",
                                                         highlight=False))
    monitor = Monitor(settings, db, MonitorOptions(fleet=fleet, group=group, workers=workers, share=not no_share,
                                                   client_id=client_id, session_expiry=session_expiry,
                                                   thresholds=thresholds, alert_listeners=listeners,
                                                   lead_listeners=on_lead))
    if not dashboard and not as_json:
        err_console.print(f"monitoring {fleet} on {settings.url} into {describe_store(db)} (Ctrl-C stops)", highlight=False)
    try:
        if dispatcher is not None:
            dispatcher.start()
        monitor.start()
        if dispatcher is not None:  # a SQLite store's tracker was restored in start()
            restored(monitor)
        if as_json and not bounded:
            print_json({"monitoring": True, "broker": settings.url, "fleet": fleet, "store": describe_store(db),
                        "workers": workers, "pid": os.getpid()})
        summary = _run_monitor(monitor, duration, max_messages, dashboard, as_json, bounded)
    finally:
        if dispatcher is not None:
            dispatcher.close(ALERT_CLOSE_S)
    if dispatcher is not None:
        summary["alert_sinks"] = dispatcher.stats()
    if as_json:
        if bounded:
            print_json(summary)
        return
    console.print(f"stored {summary['stored']} messages from {summary['devices']} devices "
                  f"({summary['online']} online, {summary['offline']} offline); duplicates "
                  f"{summary['duplicates']}, stale wills {summary['stale_wills']}, malformed "
                  f"{sum(summary['malformed'].values())}, missing seq {summary['missing']}, "
                  f"open alerts {len(summary['alerts_open'])}", highlight=False)


ALERT_CLOSE_S = 5.0  # at exit, how long queued alerts may still take to go out


def _alert_dispatcher(settings, fleet: str, client_id: Optional[str], webhooks: list[str], token: Optional[str],
                      topic: bool):
    """The monitor's alert sinks (None when there are none)."""
    import socket

    from ..fleet.alerts import AlertDispatcher, MqttAlertSink, WebhookSink

    if token and not webhooks and token != os.environ.get("EDGEKIT_ALERT_TOKEN"):
        raise ConfigError("--alert-webhook-token is for --alert-webhook URL; give one")
    sinks = [WebhookSink(url, token=token) for url in webhooks]
    prefix = client_id or f"edgekit-monitor-{socket.gethostname()}-{os.getpid()}"
    if topic:
        sinks.append(MqttAlertSink(settings, f"{prefix}-alerts", fleet=fleet))
    return AlertDispatcher(sinks, monitor=client_id or socket.gethostname()) if sinks else None


def _run_monitor(monitor, duration: Optional[float], max_messages: Optional[int], dashboard: bool, as_json: bool,
                 bounded: bool) -> dict:
    """Run until a bound or Ctrl-C; the summary."""
    try:
        if dashboard:
            from rich.live import Live

            from ..fleet.dashboard import render

            with Live(render(monitor), console=console, refresh_per_second=4, screen=False) as live:
                summary = monitor.run(duration, max_messages, on_tick=lambda m: live.update(render(m)))
        else:
            summary = monitor.run(duration, max_messages)
    except KeyboardInterrupt:
        monitor.stop()
        summary = monitor.summary()
    except (EdgekitError, RuntimeErrorBase) as exc:
        if not (as_json and not bounded):
            raise
        # the start document is this run's one JSON document: the failure goes to stderr and the exit code
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(int(exit_code_of(exc))) from None
    return summary


# ----------------------------------------------------------------------------- store readers
@app.command("ls")
@handle_errors
def ls_cmd(db: str = DbOpt, fleet: Optional[str] = FleetOpt, as_json: bool = JsonOpt) -> None:
    """Devices in the store: status, model, latest figures, open alerts."""
    from ..fleet.queries import list_devices

    devices = list_devices(db, fleet)
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


@app.command("show")
@handle_errors
def show_cmd(device: str, db: str = DbOpt, fleet: Optional[str] = FleetOpt, as_json: bool = JsonOpt) -> None:
    """One device: status, boot, model, latest figures, gaps and alerts."""
    from ..fleet.queries import device_detail

    out = device_detail(db, device, fleet)
    if as_json:
        print_json(out)
        return
    d = out["device"]
    table = Table(show_header=False, title=f"{d['fleet']}/{d['device']}")
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
    for name, w in sorted(out.get("workloads", {}).items()):
        console.print(escape(f"workload {name}: {_workload_line(w)}"), highlight=False)


def _workload_line(w: Any) -> str:
    """One line per workload report (device data: any field may be missing or of another type): a stream's drops,
    a serve route's answers and its shadow's agreement."""
    def d(x: Any) -> dict:
        return x if isinstance(x, dict) else {}

    def num(x: Any, spec: str) -> str:
        return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"

    if not isinstance(w, dict) or "error" in w:
        return str(w.get("error") if isinstance(w, dict) else w)
    if w.get("type") == "stream_stats":
        inf = d(d(w.get("stages")).get("inference"))
        return (f"{w.get('processed')} processed, {w.get('dropped')} dropped ({num(w.get('drop_rate'), '.0%')}), "
                f"{num(w.get('processed_fps'), '.1f')} fps, inference p50 {num(inf.get('p50_ms'), '.1f')} ms")
    parts = [f"model {d(w.get('model')).get('version')}", f"answers {w.get('requests')}"]
    total = d(d(w.get("stages")).get("total"))
    if total:
        parts.append(f"p99 {num(total.get('p99_ms'), '.1f')} ms")
    sh = d(w.get("shadow"))
    if sh:
        agree = ", ".join(f"{k} {num(v, '.3f')}" for k, v in d(sh.get("agreement")).items())
        ratio = d(sh.get("latency_ms")).get("ratio")
        parts.append(f"shadow {d(sh.get('candidate')).get('version')} on {sh.get('rows')} rows: "
                     f"{agree or 'nothing compared yet'}"
                     + (f", {num(ratio, '.2f')}x the served latency" if ratio else ""))
    return "; ".join(parts)


@app.command("history")
@handle_errors
def history_cmd(
    device: str, db: str = DbOpt, fleet: Optional[str] = FleetOpt,
    since: Optional[str] = SinceOpt,
    until: Optional[str] = typer.Option(None, help="Until (same forms)"),
    kind: Optional[list[str]] = typer.Option(None, "--kind", help="Only these kinds (repeatable)"),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the newest N messages"),
    hourly: bool = typer.Option(False, "--hourly", help="The hours `fleet prune` rolled up (telemetry older than "
                                                        "its raw retention) instead of raw messages"),
    as_json: bool = JsonOpt,
) -> None:
    """A device's stored messages, oldest first, by device time (--hourly: its rolled-up hours)."""
    from ..fleet.queries import device_history, device_hours, parse_time

    if hourly:
        if kind or limit:
            raise ConfigError("--hourly shows rolled-up telemetry hours: it takes no --kind or --limit")
        hours = device_hours(db, device, fleet, parse_time(since), parse_time(until, option="--until"))
        if as_json:
            print_json(hours)
            return
        table = Table("hour", "messages", "inferences", "errors", "p50 ms", "p99 ms", "worst window p99",
                      "max PSI")

        def ms(v: Optional[float]) -> str:
            return "" if v is None else f"{v:.2f}"

        for h in hours:
            table.add_row(_ts(h["hour"]), str(h["messages"]), str(h["inferences"]), str(h["errors"]),
                          ms(h["p50_ms"]), ms(h["p99_ms"]), ms(h["worst_window_p99_ms"]),
                          "" if h["drift_psi_max"] is None else f"{h['drift_psi_max']:.3f}")
        console.print(table)
        return
    rows = device_history(db, device, fleet, parse_time(since), parse_time(until, option="--until"), kind, limit)
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


@app.command("plot")
@handle_errors
def plot_cmd(
    device: str, out: Path = typer.Option(..., "--out", "-o", help="PNG to write"), db: str = DbOpt,
    fleet: Optional[str] = FleetOpt, since: Optional[str] = typer.Option(None, help="From (as in history)"),
    p99_ms: Optional[float] = typer.Option(None, "--p99-ms", help="Draw this p99 budget"),
    drift_psi: Optional[float] = typer.Option(0.2, help="Draw this PSI threshold"),
    as_json: bool = JsonOpt,
) -> None:
    """Plot a device's p50/p99 latency and drift PSI over time."""
    from ..fleet.queries import parse_time, plot_device_history

    result = plot_device_history(db, device, out, fleet, parse_time(since), drift_psi, p99_ms)
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {result['out']} ({result['windows']} windows)", highlight=False)


# ----------------------------------------------------------------------------- simulate
@app.command("simulate")
@handle_errors
def simulate_cmd(
    devices: int = typer.Option(10, "--devices", "-n", help="Simulated devices (real MQTT clients)"),
    rate: float = typer.Option(1.0, help="Telemetry messages per second per device"),
    duration: float = typer.Option(10.0, help="Seconds to run"),
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = CertKeyOpt,
    fleet: str = typer.Option("sim", "--fleet", "-f", help="Fleet name"),
    prefix: str = typer.Option("sim", help="Device names: PREFIX0000, PREFIX0001, ..."),
    inferences: float = typer.Option(20.0, help="Synthetic inferences per second per device"),
    latency_ms: float = typer.Option(8.0, help="Median synthetic latency"),
    error_rate: float = typer.Option(0.0, help="Share of inferences that fail"),
    drift_after: Optional[float] = typer.Option(None, help="Shift the inputs after this many seconds"),
    drift_share: float = typer.Option(1.0, help="Share of devices whose inputs drift"),
    drift_shift: float = typer.Option(1.5, help="Shift, in reference standard deviations"),
    bundle: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                          help="Report this bundle's model and judge drift against its "
                                               "input_stats (default: a synthetic reference)"),
    state_dir: Optional[Path] = typer.Option(None, help="Keep boot counters and spools here across runs"),
    seed: int = typer.Option(0, help="Random seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Run simulated devices (the agent's own code on synthetic inferences) against a broker."""
    from ..fleet.simulate import SimulatedFleet, SimulationPlan

    manifest = None
    if bundle is not None:
        from edgekit_runtime.bundle import read_manifest_unverified

        manifest = read_manifest_unverified(bundle)
    settings = broker_settings(broker, username, password, cafile, cert, key)
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


# `fleet prune`: retention and hourly rollups (edgekit/fleet/retention.py)
from .fleet_retention import prune_cmd  # noqa: E402  (registered last: it reuses this module's options)

app.command("prune")(prune_cmd)


# ----------------------------------------------------------------------------- samples
samples_app = typer.Typer(help="Samples devices captured for retraining (serve/stream --capture-dir).",
                          no_args_is_help=True)
app.add_typer(samples_app, name="samples")


@samples_app.command("pull")
@handle_errors
def samples_pull_cmd(
    device: str = typer.Argument(..., help="The device (its host name, unless --host says how to reach it)"),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder the samples go into (edgekit train --data)"),
    host: Optional[str] = typer.Option(None, "--host", help="user@host[:port] over SSH [default: DEVICE]"),
    remote_dir: str = typer.Option("/var/lib/edgekit/samples", "--remote-dir",
                                   help="The device's capture folder (its --capture-dir)"),
    delete: bool = typer.Option(False, "--delete", help="Remove each sample from the device once it is here"),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="SSH port"),
    identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="SSH private key"),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file [default: ~/.ssh]"),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                             help="Trust an unknown host's key on first use (never a changed one)"),
    as_json: bool = JsonOpt,
) -> None:
    """Fetch a device's captured samples over SSH into a folder `edgekit train` reads, labelled with the model's
    answers for review: one folder per predicted class, or COCO annotations for detections."""
    from ..flash.samples import pull_samples

    result = pull_samples(host or device, remote_dir, out, device=device, port=port, identity=identity,
                          known_hosts=known_hosts, accept_new_host_key=accept_new_host_key, delete=delete)
    if as_json:
        print_json(result)
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in result["by_kind"].items()) or "none new"
        console.print(f"{result['pulled']} sample(s) pulled from {result['host']} into {result['out']} ({kinds}); "
                      f"{result['already_here']} already here" + (f", {result['deleted']} removed from the device"
                                                                 if delete else ""), highlight=False)
