"""``edgekit keys generate``: an ed25519 signing key pair, and a warning when the private key lands in a git tree."""

from __future__ import annotations

from pathlib import Path

import typer

from .exits import handle_errors
from .options import JsonOpt
from .output import console, print_json, warn

app = typer.Typer(help="Signing keys.", no_args_is_help=True)


@app.command("generate")
@handle_errors
def keys_generate(
    out: Path = typer.Option(Path("keys"), "--out", help="Directory for NAME.key and NAME.pub"),
    name: str = typer.Option("edgekit", help="File name stem"),
    force: bool = typer.Option(False, help="Overwrite an existing key"),
    as_json: bool = JsonOpt,
) -> None:
    """Create an ed25519 signing key pair; devices trust the .pub file."""
    from ..signing import generate_keypair, private_key_warning

    priv, pub, key_id = generate_keypair(out, name, overwrite=force)
    warning = private_key_warning(priv)
    if warning:
        warn(warning)
    if as_json:
        print_json({"private_key": str(priv), "public_key": str(pub), "key_id": key_id, "warning": warning})
    else:
        console.print(f"key {key_id}: private {priv} (keep secret), public {pub} (copy to devices' keyring)",
                      highlight=False)
