"""``edgekit bundle inspect|verify|sign``: read a bundle's manifest, verify it as a device does, (re-)sign it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ExitCode
from .exits import fail, handle_errors
from .options import JsonOpt, KeyringOpt, keyring
from .output import console, print_json

app = typer.Typer(help="Inspect, verify and sign bundles.", no_args_is_help=True)

BundleArg = typer.Argument(..., exists=True, dir_okay=False, help="The bundle (.ekb)")


@app.command("inspect")
@handle_errors
def bundle_inspect(bundle: Path = BundleArg, as_json: bool = JsonOpt) -> None:
    """Show a bundle's manifest (without verifying it: use `bundle verify` for that)."""
    from edgekit_runtime.bundle import read_manifest_unverified

    m = read_manifest_unverified(bundle)
    if as_json:
        print_json(m)
        return
    table = Table(show_header=False, title=f"{bundle} (not verified)")
    rows = [
        ("format", m.get("format_version")), ("model", f"{m['model']['name']} {m['model']['version']} "
                                                     f"(release {m['model']['release']})"),
        ("target", m["target"]["name"]), ("backend", f"{m['backend']['name']} {m['backend']['version']}"),
        ("precision", m["backend"]["precision"]), ("engines", ", ".join(m["backend"]["engines"])),
        ("inputs", "; ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in m["inputs"])),
        ("outputs", "; ".join(f"{t['name']} {t['dtype']} {t['shape']}" for t in m["outputs"])),
        ("accuracy", json.dumps({k: v for k, v in m["metrics"].get("accuracy", {}).items()
                                 if k in ("fp32", "int8", "drop_pts", "budget_pts")})),
        ("calibration", (m.get("calibration") or {}).get("sha256", "—")),
        ("signed by", m["signing"]["key_id"]), ("files", ", ".join(m["files"])),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


@app.command("verify")
@handle_errors
def bundle_verify(bundle: Path = BundleArg, keyring_path: Optional[Path] = KeyringOpt,
                  health: bool = typer.Option(True, help="Also load it and run the health check"),
                  as_json: bool = JsonOpt) -> None:
    """Verify signature and every member's sha256, as a device does; then health-check it.

    A bundle that fails verification exits VERIFY; one that verifies but fails its health check prints
    the result and exits DEVICE (health-check members that are not plain .npy arrays: E204, DEVICE).
    A bundle without a health check says so (``health_check.checked`` false).
    """
    import edgekit_runtime

    ring = keyring(keyring_path)
    vb = edgekit_runtime.open_bundle(bundle, ring)
    result: dict[str, Any] = {"ok": True, "bundle": str(bundle), "key_id": vb.key_id, "files": len(vb.members)}
    if health:
        with edgekit_runtime.load(bundle, keyring=ring) as model:
            result["health_check"] = model.health_check()
            result["ok"] = result["health_check"]["ok"]
    if as_json:
        print_json(result)
    else:
        console.print(f"[green]verified[/] {bundle}: signed by {vb.key_id}, {len(vb.members)} files match"
                      + (f"; {_health_text(result['health_check'])}" if health else ""), highlight=False)
    if not result["ok"]:
        raise fail(ExitCode.DEVICE)


def _health_text(hc: dict[str, Any]) -> str:
    if not hc.get("checked", True):
        return "the bundle has no health check (nothing was run)"
    if hc["ok"]:
        return "health check passed"
    return f"health check FAILED (max |diff| {hc.get('max_abs_diff')}, finite {hc.get('finite')})"


@app.command("sign")
@handle_errors
def bundle_sign(bundle: Path = BundleArg, key: Optional[Path] = typer.Option(None, help="Signing key"),
                out: Optional[Path] = typer.Option(None, help="Write here instead of in place"),
                keyring_path: Optional[Path] = typer.Option(None, "--keyring",
                                                            help="Verify the current signature with these keys first"),
                as_json: bool = JsonOpt) -> None:
    """(Re-)sign a bundle, e.g. after rotating keys; refuses a bundle whose files do not match."""
    from edgekit_runtime.keyring import key_id_of

    from ..build.bundle_writer import resign_bundle
    from ..signing import load_private_key

    private = load_private_key(key)
    path = resign_bundle(bundle, private, out, keyring=keyring(keyring_path) if keyring_path else None)
    if as_json:
        print_json({"bundle": str(path), "key_id": key_id_of(private.public_key()), "verified_before":
                    keyring_path is not None})
    else:
        console.print(f"signed {path}", highlight=False)
