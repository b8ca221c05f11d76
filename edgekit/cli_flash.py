"""``edgekit flash``, ``edgekit serve``, ``edgekit rollback`` and the device side of ``edgekit bench``.

Mounted by :mod:`edgekit.cli`. Two ways onto devices:

* ``--host user@device``: one board on the desk, over SSH/SFTP (:mod:`edgekit.flash.ssh`);
* ``--fleet F``: a signed ``install`` command over MQTT to each selected device, which
  fetches the bundle over HTTP(S) with the sha256 pinned; canaries first, an abort
  rule, a record on disk (:mod:`edgekit.flash.rollout`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_fleet import BrokerOpt, CaOpt, CertOpt, PasswordOpt, UserOpt, _consoles, _settings, print_json
from .errors import ConfigError, EdgekitError

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON")
SigningKeyOpt = typer.Option(None, "--key", envvar="EDGEKIT_SIGNING_KEY",
                             help="Signing key (.key) for the install/rollback commands [default: $EDGEKIT_SIGNING_KEY]")
CertKeyOpt = typer.Option(None, "--cert-key", help="Private key of --cert (MQTT client certificate)")
RecordDirOpt = typer.Option(Path("."), "--record-dir", help="Where rollouts/<id>.json records are kept")


def _sha256(path: Path) -> str:
    from edgekit_runtime.agent.fetch import sha256_file  # the digest devices check the download against

    return sha256_file(path)


def _check_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest (read, not verified: devices verify it; this catches wrong files early)."""
    from edgekit_runtime.bundle import read_manifest_unverified

    if not bundle.is_file():
        raise ConfigError(f"bundle {bundle} does not exist")
    try:
        return read_manifest_unverified(bundle)
    except Exception as exc:
        raise ConfigError(f"{bundle} is not an edgekit bundle ({exc})") from None


def _print_ssh_result(result: dict[str, Any]) -> None:
    console, err_console = _consoles()
    agent = result.get("agent") or {}
    copy = (f"copied {result['bytes_sent']:,} bytes in {result['copy_s']:.1f} s"
            + (f" (resumed at {result['resumed_from']:,})" if result.get("resumed_from") else ""))
    if agent.get("ok"):
        m = agent.get("model") or {}
        hc = agent.get("health") or {}
        lat = hc.get("latency") or {}
        what = ("already active" if agent.get("already_active") else
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
                          f"{err.get('reason')} (E{err.get('code')} {err.get('name')}): {err.get('message')}"
                          + (f" — {err['hint']}" if err.get("hint") else "")
                          + f"; slot {err.get('active_slot')} still serves. {copy}", highlight=False)


def flash_cmd(
    bundle: Optional[Path] = typer.Argument(None, help="The signed bundle (.ekb); not needed with --resume"),
    host: Optional[str] = typer.Option(None, "--host", help="user@device[:port]: flash one board over SSH"),
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="Flash devices of this fleet over MQTT"),
    devices: Optional[str] = typer.Option(None, "--devices", "-d",
                                          help="Globs (cam-*,dock-0?) and filters (model=NAME, status=online)"),
    canary: str = typer.Option("10%", "--canary", help="Canary devices first: a share (10%) or a count (2)"),
    max_failures: int = typer.Option(0, "--max-failures", help="Halt when more devices than this fail"),
    wave_size: int = typer.Option(0, "--wave-size", help="Devices per wave after the canaries (0: all at once)"),
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
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, cert_key: Optional[Path] = CertKeyOpt,
    # --host options
    port: Optional[int] = typer.Option(None, "--port", "-p", help="SSH port"),
    identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="SSH private key"),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file [default: ~/.ssh]"),
    accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                             help="Trust and record an unknown host key (never a changed one)"),
    agent_command: str = typer.Option("edgekit-agent", "--agent-command", help="The agent CLI on the device"),
    agent_config: str = typer.Option("/etc/edgekit/agent.toml", "--agent-config", help="Agent config on the device"),
    keep_upload: bool = typer.Option(False, "--keep-upload", help="Leave the uploaded copy on the device"),
    as_json: bool = JsonOpt,
) -> None:
    """Flash BUNDLE to one board (--host, SSH) or to a fleet (--fleet, signed MQTT command, canary first)."""
    if resume is None and (host is None) == (fleet is None):
        raise ConfigError("say where to flash: --host user@device (one board over SSH) or --fleet NAME (MQTT)")
    if resume is None and bundle is None:
        raise ConfigError("which bundle? edgekit flash BUNDLE --host/--fleet ...")
    if host is not None:
        from .flash.ssh import flash_over_ssh

        _check_bundle(bundle)
        console, _ = _consoles()
        with console.status(f"flashing {bundle.name} to {host}", spinner="dots"):
            result = flash_over_ssh(bundle, host, port=port, identity=identity, known_hosts=known_hosts,
                                    accept_new_host_key=accept_new_host_key, agent_command=agent_command,
                                    agent_config=agent_config, allow_downgrade=allow_downgrade,
                                    keep_upload=keep_upload)
        if as_json:
            print_json(result)
        else:
            _print_ssh_result(result)
        if not (result.get("agent") or {}).get("ok"):
            raise typer.Exit(4)
        return
    _flash_fleet(bundle, fleet, devices, canary, max_failures, wave_size, rollback_on_halt, url, serve, advertise,
                 device_timeout, expiry, allow_downgrade, key, record_dir, resume,
                 _settings(broker, username, password, cafile, cert, cert_key).with_password_from_env(), as_json)


def _flash_fleet(bundle, fleet, devices, canary, max_failures, wave_size, rollback_on_halt, url, serve, advertise,
                 device_timeout, expiry, allow_downgrade, key, record_dir, resume, settings, as_json) -> None:
    from .flash.commands import FleetClient, select_devices
    from .flash.plan import RolloutPlan
    from .flash.rollout import Rollout, load_record
    from .flash.server import BundleServer
    from .signing import load_private_key

    console, err_console = _consoles()
    sign_key = load_private_key(key)
    server = None
    if resume is not None:
        record = load_record(resume)
        fleet = record["fleet"]
    else:
        manifest = _check_bundle(bundle)
        sha, size = _sha256(bundle), bundle.stat().st_size
        if url is None and serve is None:
            raise ConfigError("devices download the bundle over HTTP(S): pass --url (e.g. from `edgekit serve DIR`) "
                              "or --serve HOST:PORT to serve it from here while the rollout runs")
        if serve is not None:
            h, _, p = serve.rpartition(":")
            if not h or not p.isdigit():
                raise ConfigError(f"--serve {serve!r} must be HOST:PORT, e.g. 0.0.0.0:8800")
            served_dir = record_dir / "served"
            served_dir.mkdir(parents=True, exist_ok=True)
            server = BundleServer(served_dir, h, int(p), advertise_host=advertise).start()
            url = server.add(bundle)["url"]
    try:
        with FleetClient(settings, fleet) as client:
            known = client.discover()
            if resume is not None:
                rollout = Rollout.resume(resume, client, sign_key=sign_key)
            else:
                selected = select_devices(known, devices or "*", None)
                m = manifest["model"]
                plan = RolloutPlan.parse({
                    "fleet": fleet, "devices": selected, "url": url, "sha256": sha, "size": size,
                    "bundle_name": bundle.name, "model": m["name"], "model_version": m["version"],
                    "release": m.get("release"), "allow_downgrade": allow_downgrade, "canary": canary,
                    "max_failures": max_failures, "wave_size": wave_size, "device_timeout_s": device_timeout,
                    "command_expiry_s": expiry, "rollback_canaries_on_halt": rollback_on_halt})
                rollout = Rollout(plan, client, record_dir=record_dir, sign_key=sign_key)
            if as_json:
                summary = rollout.run()
            else:
                from rich.live import Live

                from .flash.rollout import render

                with Live(get_renderable=lambda: render(rollout.record), console=console, refresh_per_second=4):
                    summary = rollout.run()
                if not console.is_terminal:
                    console.line()  # (piped output: the last frame does not end its line)
    finally:
        if server is not None:
            server.stop()
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary, server is not None)
    if summary.get("halted") or summary["counts"].get("failed") or summary["counts"].get("timed_out"):
        raise typer.Exit(4)


def _print_summary(summary: dict[str, Any], served_here: bool) -> None:
    console, err_console = _consoles()
    c = {k: v for k, v in summary["counts"].items() if v}
    line = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in c.items())
    if summary.get("halted"):
        err_console.print(f"[bold red]halted[/]: {summary.get('halt_reason')}; {line}", highlight=False)
    else:
        console.print(f"[green]done[/]: {line}" + (f"; fleet switched in {summary['fleet_switch_s']:.1f} s"
                                                   if summary.get("fleet_switch_s") is not None else ""),
                      highlight=False)
    if summary.get("pending_offline"):
        console.print(f"offline, command queued in the broker: {', '.join(summary['pending_offline'])}"
                      + (" — they download from --serve, which has stopped: keep a bundle server up "
                         "(`edgekit serve`) and pass --url" if served_here else ""), highlight=False)
    console.print(f"record: {summary['record']} (resume: edgekit flash --resume {summary['record']})",
                  highlight=False)


def serve_cmd(
    directory: Path = typer.Argument(..., help="Folder of *.ekb bundles"),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on"),
    port: int = typer.Option(8800, "--port", "-p"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="HTTPS certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="HTTPS private key (PEM)"),
    advertise: Optional[str] = typer.Option(None, "--advertise-host", help="Host name in the printed URLs"),
) -> None:
    """Serve bundles to devices over HTTP(S), with Range requests so downloads resume."""
    from .flash.server import BundleServer

    console, _ = _consoles()
    server = BundleServer(directory, host, port, tls_cert=tls_cert, tls_key=tls_key, advertise_host=advertise)
    server.start()
    try:
        for b in server.index():
            console.print(f"{server.url_for(b['sha256'])}  {b['name']}  {b['size']:,} bytes", highlight=False)
        console.print(f"serving {directory} at {server.url} (Ctrl-C stops)", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def rollback_cmd(
    fleet: Optional[str] = typer.Option(None, "--fleet", "-f", help="Fleet of the devices"),
    devices: Optional[str] = typer.Option(None, "--devices", "-d", help="Globs and filters, as for flash"),
    record: Optional[Path] = typer.Option(None, "--record", help="Roll back what this rollout switched"),
    reason: Optional[str] = typer.Option(None, "--reason", help="Recorded on the devices"),
    from_bundle: Optional[Path] = typer.Option(None, "--from", help="Only devices running this bundle roll back; "
                                               "the others answer 'nothing to undo' (safe to repeat)"),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for each device"),
    key: Optional[Path] = SigningKeyOpt,
    broker: str = BrokerOpt, username: Optional[str] = UserOpt, password: Optional[str] = PasswordOpt,
    cafile: Optional[Path] = CaOpt, cert: Optional[Path] = CertOpt, cert_key: Optional[Path] = CertKeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Switch devices back to their previous slot (signed ``rollback`` command)."""
    from .flash.commands import FleetClient, select_devices
    from .flash.rollout import load_record, rollback_from_record
    from .signing import load_private_key

    if (record is None) == (fleet is None or devices is None):
        raise ConfigError("pass --record ROLLOUT.json, or --fleet F and --devices SELECTOR")
    sign_key = load_private_key(key)
    settings = _settings(broker, username, password, cafile, cert, cert_key).with_password_from_env()
    fleet = fleet or load_record(record)["fleet"]
    console, err_console = _consoles()
    with FleetClient(settings, fleet) as client:
        known = client.discover()
        if record is not None:
            out = rollback_from_record(record, client, sign_key=sign_key, reason=reason)
            if as_json:
                print_json(out)
            else:
                console.print(json.dumps(out, indent=2, default=str), highlight=False)
            return
        targets = select_devices(known, devices, None)
        args = {"reason": reason, "from_sha256": _sha256(from_bundle) if from_bundle else None}
        sent = {d: client.send(d, "rollback", args, sign_key=sign_key, expires_s=max(timeout, 3600.0))
                for d in targets}
        results = {d: client.wait_ack(rid, timeout) for d, rid in sent.items()}
    rows = {d: (a or {"ok": False, "error": {"reason": "timeout", "message": f"no answer in {timeout:.0f} s"}})
            for d, a in results.items()}
    if as_json:
        print_json(rows)
    else:
        for d, a in rows.items():
            if a["ok"]:
                m = a["result"].get("model") or {}
                what = "rolled back to" if a["result"].get("changed", True) else "nothing to undo; runs"
                console.print(f"[green]ok[/] {d}: {what} slot {a['result']['slot']} ({m.get('name')} "
                              f"{m.get('version')})", highlight=False)
            else:
                err_console.print(f"[red]failed[/] {d}: {a['error'].get('reason')}: {a['error'].get('message')}",
                                  highlight=False)
    if not all(a["ok"] for a in rows.values()):
        raise typer.Exit(4)


def remote_bench(bundle: Path, device: str, fleet: Optional[str], settings: Any, *, queries: int, seconds: float,
                 batch: int, timeout: float) -> dict[str, Any]:
    """Run the ``bench`` command on ``device`` (which must be running BUNDLE) and return its result."""
    from .flash.commands import FleetClient

    if fleet is None:
        raise ConfigError("--device needs --fleet (the device's fleet)")
    manifest = _check_bundle(bundle)
    sha = _sha256(bundle)
    with FleetClient(settings, fleet) as client:
        known = client.discover()
        state = known.get(device)
        if state is None:
            raise ConfigError(f"device {device!r} is not known in fleet {fleet!r} (known: "
                              f"{', '.join(sorted(known)) or 'none'})")
        running = state.get("model") or {}
        if running.get("sha256") not in (None, sha):
            raise EdgekitError(f"{device} runs {running.get('name')} {running.get('version')} (sha256 "
                               f"{str(running.get('sha256'))[:12]}…), not {bundle.name} ({sha[:12]}…): flash it "
                               f"first (edgekit flash {bundle} --fleet {fleet} --devices {device})")
        if state.get("status") != "online":
            raise EdgekitError(f"{device} is offline; the benchmark needs it online")
        rid = client.send(device, "bench", {"queries": queries, "seconds": seconds, "warmup": 10,
                                            "batch": batch or None}, expires_s=timeout)
        ack = client.wait_ack(rid, timeout)
    if ack is None:
        raise EdgekitError(f"{device} did not answer the benchmark within {timeout:.0f} s")
    if not ack["ok"]:
        err = ack.get("error") or {}
        raise EdgekitError(f"{device} refused the benchmark: {err.get('reason')}: {err.get('message')}")
    result = ack["result"]
    result["device"] = {"fleet": fleet, "device": device, "model": running, "bundle": bundle.name,
                        "bundle_sha256": sha, "manifest_model": manifest["model"]}
    return result
