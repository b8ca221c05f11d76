"""``edgekit flash`` and ``edgekit rollback``: put a bundle on one board (SSH) or a fleet (signed MQTT commands).

Two ways onto devices:

* ``--host user@device``: one board on the desk, over SSH/SFTP (:mod:`edgekit.flash.ssh`);
* ``--fleet F``: a signed ``install`` command over MQTT to each selected device, which
  fetches the bundle over HTTP(S) with the sha256 pinned; canaries first, an abort
  rule, a record on disk (:mod:`edgekit.flash.fleet_flash`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from ..errors import ConfigError, ExitCode, exit_code_for_runtime_code
from .exits import fail, handle_errors
from .options import (BrokerOpt, CaOpt, CertKeyFlashOpt, CertOpt, JsonOpt, PasswordOpt, SigningKeyOpt, UserOpt,
                      broker_settings)
from .output import console, err_console, print_json

RecordDirOpt = typer.Option(Path("."), "--record-dir", help="Where rollouts/<id>.json records are kept")


@handle_errors
def flash_cmd(
    bundle: Optional[Path] = typer.Argument(None, help="The signed bundle (.ekb); not needed with --resume"),
    host: Optional[str] = typer.Option(None, "--host", help="user@device[:port]: flash one board over SSH"),
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="Flash devices of this fleet over MQTT"),
    devices: Optional[str] = typer.Option(None, "--devices", "-d",
                                          help="Globs (cam-*,dock-0?) and filters (model=NAME, status=online)"),
    canary: str = typer.Option("10%", "--canary", help="Canary devices first: a share (10%) or a count (2)"),
    max_failures: Optional[int] = typer.Option(None, "--max-failures", min=0,
                                               help="Halt when more devices than this fail [default: 0; no count "
                                                    "rule with --abort-percent]"),
    abort_percent: Optional[float] = typer.Option(None, "--abort-percent", min=0.0, max=100.0,
                                                  help="Halt when at least this % of the finished devices failed"),
    abort_min_devices: int = typer.Option(0, "--abort-min-devices", min=0,
                                          help="--abort-percent applies once this many devices finished"),
    wave_size: int = typer.Option(0, "--wave-start", "--wave-size", min=0,
                                  help="Devices in the first wave after the canaries (0: all the rest at once)"),
    wave_factor: float = typer.Option(1.0, "--wave-factor", min=1.0,
                                      help="Each wave is this many times the one before (rounded up)"),
    wave_max: int = typer.Option(0, "--wave-max", min=0, help="No wave larger than this (0: no cap)"),
    max_in_flight: int = typer.Option(0, "--max-in-flight", min=0,
                                      help="At most this many devices installing at once (0: no cap)"),
    rollback_on_halt: bool = typer.Option(True, "--rollback-on-halt/--no-rollback-on-halt",
                                          help="Roll the devices this rollout switched back when it halts"),
    url: Optional[str] = typer.Option(None, "--url", help="Where devices download BUNDLE (e.g. from `edgekit serve`)"),
    serve: Optional[str] = typer.Option(None, "--serve", help="HOST:PORT: serve BUNDLE from here while flashing"),
    advertise: Optional[str] = typer.Option(None, "--advertise-host",
                                            help="Host name devices use to reach --serve [default: its host]"),
    device_timeout: float = typer.Option(600.0, "--device-timeout", help="Seconds an online device may take"),
    expiry: float = typer.Option(86400.0, "--expiry", help="Seconds after which queued commands expire"),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Install an older release"),
    key: Optional[Path] = SigningKeyOpt,
    record_dir: Path = RecordDirOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the rollout in this record file"),
    pause: Optional[Path] = typer.Option(None, "--pause",
                                         help="Ask the rollout running from this record file to pause "
                                              "(continue it with --resume)"),
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, cert_key: Optional[Path] = CertKeyFlashOpt,
    # --host options
    port: Optional[int] = typer.Option(None, "--port", "-p", help="SSH port"),
    identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="SSH private key"),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file [default: ~/.ssh]"),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                             help="Trust and record an unknown host key (never a changed one)"),
    agent_command: str = typer.Option("edgekit-agent", "--agent-command", help="The agent CLI on the device"),
    agent_config: str = typer.Option("/etc/edgekit/agent.toml", "--agent-config", help="Agent config on the device"),
    keep_upload: bool = typer.Option(False, "--keep-upload", help="Leave the uploaded copy on the device"),
    shadow: bool = typer.Option(False, "--shadow",
                                help="Install into the idle slot without switching (--host, or --fleet with "
                                     "--devices); `edgekit-runtime serve` on the device runs it beside the active "
                                     "model and reports agreement"),
    as_json: bool = JsonOpt,
) -> None:
    """Flash BUNDLE to one board (--host, SSH) or to a fleet (--fleet, signed MQTT command, canary first).

    A device that refuses the bundle, or a rollout that halts or has failures, prints its result and
    exits with the error's code (VERIFY for a bundle the device would not trust, else DEVICE).
    """
    if pause is not None:
        from ..flash.fleet_flash import pause_recorded

        if resume is not None or host is not None or fleet is not None or bundle is not None:
            raise ConfigError("--pause RECORD only asks a running rollout to pause; pass it alone")
        path = pause_recorded(pause)
        if as_json:
            print_json({"pause_requested": str(path), "record": str(pause)})
        else:
            console.print(f"pause requested ({path}): the rollout sends nothing more, waits for the devices "
                          f"installing, then stops; continue with: edgekit flash --resume {pause}", highlight=False)
        return
    if resume is not None and host is not None:
        raise ConfigError("--resume continues a fleet rollout from its record; it does not go with --host")
    if resume is None and (host is None) == (fleet is None):
        raise ConfigError("say where to flash: --host user@device (one board over SSH) or --fleet NAME (MQTT)")
    if resume is None and bundle is None:
        raise ConfigError("which bundle? edgekit flash BUNDLE --host/--fleet ...")
    if shadow and host is None:
        if fleet is None or not devices or resume is not None:
            raise ConfigError("--shadow installs a candidate beside the active model on chosen boards: give --host "
                              "user@device, or --fleet NAME with --devices (a pattern or list; no canary waves, "
                              "nothing switches)")
        _shadow_fleet(bundle, fleet, devices, key, broker_settings(broker, username, password, cafile, cert, cert_key),
                      url, serve, advertise, record_dir, device_timeout, allow_downgrade, as_json)
        return
    if host is not None:
        from ..flash.fleet_flash import read_bundle
        from ..flash.ssh import flash_over_ssh

        read_bundle(bundle)  # a wrong file is refused here, before any connection
        with err_console.status(f"flashing {bundle.name} to {host}", spinner="dots"):
            result = flash_over_ssh(bundle, host, port=port, identity=identity, known_hosts=known_hosts,
                                    accept_new_host_key=accept_new_host_key, agent_command=agent_command,
                                    agent_config=agent_config, allow_downgrade=allow_downgrade,
                                    keep_upload=keep_upload, shadow=shadow)
        if as_json:
            print_json(result)
        else:
            _print_ssh_result(result)
        agent = result.get("agent") or {}
        if not agent.get("ok"):
            raise fail(exit_code_for_runtime_code((agent.get("error") or {}).get("code")))
        return
    _flash_fleet(bundle, resume, key, broker_settings(broker, username, password, cafile, cert, cert_key),
                 _fleet_settings(fleet, devices, canary, max_failures, wave_size, rollback_on_halt, device_timeout,
                                 expiry, allow_downgrade, record_dir, abort_percent=abort_percent,
                                 abort_min_devices=abort_min_devices, wave_factor=wave_factor, wave_max=wave_max,
                                 max_in_flight=max_in_flight),
                 url, serve, advertise, as_json)


def _fleet_settings(fleet, devices, canary, max_failures, wave_size, rollback_on_halt, device_timeout, expiry,
                    allow_downgrade, record_dir, **rate):
    from ..flash.fleet_flash import FleetFlashSettings

    if fleet is None:  # --resume: the record names the fleet and its settings
        return None
    return FleetFlashSettings(fleet=fleet, devices=devices or "*", canary=canary, max_failures=max_failures,
                              wave_size=wave_size, rollback_on_halt=rollback_on_halt, device_timeout_s=device_timeout,
                              command_expiry_s=expiry, allow_downgrade=allow_downgrade, record_dir=record_dir,
                              **rate)


def _shadow_fleet(bundle, fleet, devices, key, broker, url, serve, advertise, record_dir, timeout: float,
                  allow_downgrade: bool, as_json: bool) -> None:
    """`edgekit flash BUNDLE --fleet F --devices D --shadow`: each device installs the candidate without switching."""
    from ..flash.fleet_flash import BundleSource, shadow_devices
    from ..signing import load_private_key

    answers = shadow_devices(bundle, broker, fleet, devices, load_private_key(key),
                             source=BundleSource(url=url, serve=serve, advertise_host=advertise),
                             record_dir=record_dir, timeout_s=timeout, allow_downgrade=allow_downgrade)
    failed = {d: a for d, a in answers.items() if not a.get("ok")}
    if as_json:
        print_json({"ok": not failed, "shadow": True, "devices": answers})
    else:
        for d, a in sorted(answers.items()):
            if a.get("ok"):
                r = a.get("result") or {}
                m = r.get("model") or {}
                console.print(f"[green]ok[/] {d}: {m.get('name')} {m.get('version')} in slot {r.get('shadow_slot')} as "
                              f"a shadow candidate; slot {r.get('slot')} still serves", highlight=False)
            else:
                e = a.get("error") or {}
                err_console.print(escape(f"refused by {d}: {e.get('reason')}: {e.get('message')}"), highlight=False)
    if failed:
        codes = [(a.get("error") or {}).get("code") for a in failed.values()]
        raise fail(exit_code_for_runtime_code(next((c for c in codes if c is not None), None)))


def _flash_fleet(bundle, resume, key, broker, settings, url, serve, advertise, as_json: bool) -> None:
    from ..flash.fleet_flash import BundleSource, FleetFlash, rollout_failed
    from ..flash.rollout import render
    from ..signing import load_private_key

    sign_key = load_private_key(key)
    source = BundleSource(url=url, serve=serve, advertise_host=advertise)
    with FleetFlash(broker, sign_key, settings, bundle=None if resume else bundle, source=source,
                    resume=resume) as job:
        if as_json:
            summary = job.run()
        else:
            from rich.live import Live

            with Live(get_renderable=lambda: render(job.rollout.record), console=console, refresh_per_second=4):
                summary = job.run()
            if not console.is_terminal:
                console.line()  # (piped output: the last frame does not end its line)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)
    if rollout_failed(summary):
        raise fail(ExitCode.DEVICE)


def _print_ssh_result(result: dict[str, Any]) -> None:
    agent = result.get("agent") or {}
    copy = (f"copied {result['bytes_sent']:,} bytes in {result['copy_s']:.1f} s"
            + (f" (resumed at {result['resumed_from']:,})" if result.get("resumed_from") else ""))
    if agent.get("ok"):
        m = agent.get("model") or {}
        hc = agent.get("health") or {}
        lat = hc.get("latency") or {}
        what = ("already active" if agent.get("already_active") else
                f"installed as a shadow candidate in slot {agent.get('shadow_slot')}, not switched to (slot "
                f"{agent.get('slot')} still serves)" if agent.get("shadow") else
                f"installed in slot {agent.get('slot')} (previous {agent.get('previous_slot') or 'none'})")
        console.print(f"[green]ok[/] {result['host']}: {m.get('name')} {m.get('version')} (release "
                      f"{m.get('release')}) {what}; {copy}", highlight=False)
        if lat:
            console.print(f"health check passed: max |diff| {hc.get('max_abs_diff', 0):.3g}, p50 "
                          f"{lat.get('p50_ms')} ms, p90 {lat.get('p90_ms')} ms (budget {lat.get('budget_ms')} ms)",
                          highlight=False)
        if agent.get("agent_running") is False:
            console.print("the agent is not running: it serves this model when it starts", highlight=False)
    else:
        err = agent.get("error") or {}
        err_console.print(f"[bold red]refused[/] by {result['host']} at {err.get('step') or 'start'}: "
                          + escape(f"{err.get('reason')} (E{err.get('code')} {err.get('name')}): {err.get('message')}"
                                   + (f" — {err['hint']}" if err.get("hint") else "")
                                   + f"; slot {err.get('active_slot')} still serves. {copy}"), highlight=False)


def _print_summary(summary: dict[str, Any]) -> None:
    c = {k: v for k, v in summary["counts"].items() if v}
    line = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in c.items())
    if summary.get("paused"):
        console.print(f"[yellow]paused[/]: {line}; continue with: edgekit flash --resume {summary['record']}",
                      highlight=False)
        return
    if summary.get("halted"):
        err_console.print(f"[bold red]halted[/]: {escape(str(summary.get('halt_reason')))}; {line}", highlight=False)
    else:
        console.print(f"[green]done[/]: {line}" + (f"; fleet switch in {summary['fleet_switch_s']:.1f} s"
                                                   if summary.get("fleet_switch_s") is not None else ""),
                      highlight=False)
    if summary.get("pending_offline"):
        console.print(f"offline, command queued in the broker: {', '.join(summary['pending_offline'])}"
                      + (" — they download from --serve, which has stopped: keep a bundle server up "
                         "(`edgekit serve`) and pass --url" if summary.get("served_here") else ""), highlight=False)
    console.print(f"record: {summary['record']} (resume: edgekit flash --resume {summary['record']})",
                  highlight=False)


@handle_errors
def rollback_cmd(
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="Fleet of the devices"),
    devices: Optional[str] = typer.Option(None, "--devices", "-d", help="Globs and filters, as for flash"),
    record: Optional[Path] = typer.Option(None, "--record", exists=True, dir_okay=False,
                                          help="Roll back what this rollout switched"),
    reason: Optional[str] = typer.Option(None, "--reason", help="Recorded on the devices"),
    from_bundle: Optional[Path] = typer.Option(None, "--from", exists=True, dir_okay=False,
                                               help="Only devices running this bundle roll back; "
                                                    "the others answer 'nothing to undo' (safe to repeat)"),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for each device"),
    key: Optional[Path] = SigningKeyOpt,
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, cert_key: Optional[Path] = CertKeyFlashOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Switch devices back to their previous slot (signed ``rollback`` command)."""
    from ..flash.fleet_flash import rollback_devices, rollback_recorded
    from ..signing import load_private_key

    if (record is None) == (fleet is None or devices is None):
        raise ConfigError("pass --record ROLLOUT.json, or --fleet F and --devices SELECTOR")
    sign_key = load_private_key(key)
    settings = broker_settings(broker, username, password, cafile, cert, cert_key)
    if record is not None:
        out = rollback_recorded(record, settings, sign_key, reason=reason)
        if as_json:
            print_json(out)
        else:
            console.print(json.dumps(out, indent=2, default=str), highlight=False)
        if out.get("rollback_failed"):
            raise fail(ExitCode.DEVICE)
        return
    rows = rollback_devices(settings, fleet, devices, sign_key, reason=reason, from_bundle=from_bundle,
                            timeout_s=timeout)
    if as_json:
        print_json(rows)
    else:
        for d, a in rows.items():
            if a["ok"]:
                m = a["result"].get("model") or {}
                what = "rolled back to" if a["result"].get("changed", True) else "nothing to undo; runs"
                console.print(f"[green]ok[/] {d}: {what} slot {a['result']['slot']} ({escape(str(m.get('name')))} "
                              f"{escape(str(m.get('version')))})", highlight=False)
            else:
                err_console.print(f"[red]failed[/] {d}: " + escape(f"{a['error'].get('reason')}: "
                                                                   f"{a['error'].get('message')}"), highlight=False)
    if not all(a["ok"] for a in rows.values()):
        raise fail(ExitCode.DEVICE)
