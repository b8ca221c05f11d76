"""``edgekit broker``: a local Mosquitto for a fleet, in the foreground (the process becomes mosquitto)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .exits import handle_errors
from .options import JsonOpt
from .output import console, err_console, print_json


@handle_errors
def broker_cmd(
    port: int = typer.Option(1883, help="Port of the mqtt:// listener"),
    dir: Path = typer.Option(Path(".edgekit/broker"), "--dir", help="Config, persistence and log folder"),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)"),
    max_queued: int = typer.Option(1_000_000, help="QoS 1 messages queued per client behind its in-flight window"),
    max_inflight: int = typer.Option(1000, help="QoS 1 messages in flight per client (v5 Receive Maximum)"),
    password_file: Optional[Path] = typer.Option(None, help="mosquitto_passwd file (disables anonymous access)"),
    acl_file: Optional[Path] = typer.Option(None, help="ACL file (firmware/mosquitto/acl)"),
    max_queued_bytes: int = typer.Option(1 << 30, help="... and in bytes per client (0: no byte limit); on a "
                                         "site broker this bounds what it keeps while the central link is down"),
    bridge_to: Optional[str] = typer.Option(None, "--bridge-to", help="Make this a site broker: bridge the fleet's "
                                            "device topics to this central broker (mqtt[s]://host[:port]) and its "
                                            "commands back"),
    bridge_name: str = typer.Option("edgekit-site", help="The bridge's client id at the central broker (one per site)"),
    bridge_fleet: list[str] = typer.Option([], "--bridge-fleet", help="Fleet to bridge (repeat; default: every fleet)"),
    bridge_username: Optional[str] = typer.Option(None, help="User name of the bridge at the central broker"),
    bridge_password_file: Optional[Path] = typer.Option(None, help="File holding that user's password"),
    bridge_cafile: Optional[Path] = typer.Option(None, help="CA of the central broker's certificate (mqtts://)"),
    bridge_certfile: Optional[Path] = typer.Option(None, help="This site's client certificate (mqtts://)"),
    bridge_keyfile: Optional[Path] = typer.Option(None, help="... and its key"),
    bridge_no_private: bool = typer.Option(False, "--bridge-no-private", help="The central broker is not Mosquitto "
                                           "(it may refuse Mosquitto's bridge flag; retain flags then depend on it)"),
    print_config: bool = typer.Option(False, "--print-config", help="Write and print the config; do not run"),
    as_json: bool = JsonOpt,
) -> None:
    """Run a local Mosquitto for a fleet (raised queue limits) in the foreground.

    With --bridge-to it is a site broker: devices connect to it, and it forwards their
    state/telemetry/event/ack to the central broker (where the monitor runs) and the
    central broker's commands to them, queueing while the link is down.

    With --json it prints what it starts (URL, config, pid: the broker keeps this process's pid)
    and nothing else on stdout; mosquitto logs on stderr.
    """
    from ..fleet.broker import BridgeConfig, BrokerConfig, run_foreground
    from ..fleet.connection import BrokerSettings

    bridges = []
    if bridge_to is not None:
        central = BrokerSettings.from_url(bridge_to)
        bridges.append(BridgeConfig(central.host, central.port, name=bridge_name, tls=central.tls,
                                    fleets=tuple(bridge_fleet) or ("+",), username=bridge_username,
                                    password_file=bridge_password_file, cafile=bridge_cafile,
                                    certfile=bridge_certfile, keyfile=bridge_keyfile,
                                    try_private=not bridge_no_private))
    config = BrokerConfig(dir=dir, port=port, bind=bind, max_queued_messages=max_queued,
                          max_queued_bytes=max_queued_bytes, max_inflight_messages=max_inflight,
                          password_file=password_file, acl_file=acl_file, allow_anonymous=password_file is None,
                          bridges=bridges)
    path = config.write()
    if print_config:
        # the file holds the bridge's password (mode 0600); what is printed does not
        text = "".join("remote_password ********\n" if line.startswith("remote_password ") else line
                       for line in path.read_text().splitlines(keepends=True))
        if as_json:
            print_json({"config": str(path), "text": text})
        else:
            console.print(text, highlight=False, markup=False)
        return

    def starting(config_path: Path) -> None:
        if as_json:
            print_json({"broker": f"mqtt://{bind}:{port}", "config": str(config_path), "pid": os.getpid(),
                        "bridge_to": bridge_to})
        else:
            via = f", bridged to {bridge_to} as {bridge_name}" if bridge_to else ""
            err_console.print(f"mosquitto on {bind}:{port}{via}, config {config_path} (Ctrl-C stops)",
                              highlight=False)

    run_foreground(config, before_exec=starting)  # does not return: the process becomes mosquitto
