"""``edgekit serve``: serve bundles to devices over HTTP(S), with Range requests so downloads resume."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from .exits import handle_errors
from .options import JsonOpt
from .output import console, print_json


@handle_errors
def serve_cmd(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of *.ekb bundles"),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on"),
    port: int = typer.Option(8800, "--port", "-p"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="HTTPS certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="HTTPS private key (PEM)"),
    advertise: Optional[str] = typer.Option(None, "--advertise-host", help="Host name in the printed URLs"),
    as_json: bool = JsonOpt,
) -> None:
    """Serve bundles to devices over HTTP(S), with Range requests so downloads resume.

    With --json it prints what it serves (URL, pid, each bundle's URL and sha256) once listening,
    then nothing else on stdout.
    """
    from ..flash.server import BundleServer

    server = BundleServer(directory, host, port, tls_cert=tls_cert, tls_key=tls_key, advertise_host=advertise)
    server.start()
    try:
        bundles = [{**b, "url": server.url_for(b["sha256"])} for b in server.index()]
        if as_json:
            print_json({"serving": str(directory), "url": server.url, "pid": os.getpid(), "bundles": bundles})
        else:
            for b in bundles:
                console.print(f"{b['url']}  {b['name']}  {b['size']:,} bytes", highlight=False)
            console.print(f"serving {directory} at {server.url} (Ctrl-C stops)", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
