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
    print_config: bool = typer.Option(False, "--print-config", help="Write and print the config; do not run"),
    as_json: bool = JsonOpt,
) -> None:
    """Run a local Mosquitto for a fleet (raised queue limits) in the foreground.

    With --json it prints what it starts (URL, config, pid: the broker keeps this process's pid)
    and nothing else on stdout; mosquitto logs on stderr.
    """
    from ..fleet.broker import BrokerConfig, run_foreground

    config = BrokerConfig(dir=dir, port=port, bind=bind, max_queued_messages=max_queued,
                          max_inflight_messages=max_inflight, password_file=password_file, acl_file=acl_file,
                          allow_anonymous=password_file is None)
    path = config.write()
    if print_config:
        if as_json:
            print_json({"config": str(path), "text": path.read_text()})
        else:
            console.print(path.read_text(), highlight=False, markup=False)
        return

    def starting(config_path: Path) -> None:
        if as_json:
            print_json({"broker": f"mqtt://{bind}:{port}", "config": str(config_path), "pid": os.getpid()})
        else:
            err_console.print(f"mosquitto on {bind}:{port}, config {config_path} (Ctrl-C stops)", highlight=False)

    run_foreground(config, before_exec=starting)  # does not return: the process becomes mosquitto
