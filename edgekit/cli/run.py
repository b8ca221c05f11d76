"""``edgekit run``: predict on image files with the device runtime, as a device would."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .exits import handle_errors
from .options import JsonOpt, KeyringOpt, keyring
from .output import console, print_json


@handle_errors
def run_cmd(bundle: Path = typer.Argument(..., exists=True, dir_okay=False, help="The bundle (.ekb)"),
            inputs: list[Path] = typer.Argument(..., exists=True, help="Images or folders"),
            keyring_path: Optional[Path] = KeyringOpt, top_k: int = typer.Option(3), as_json: bool = JsonOpt) -> None:
    """Predict on images with the device runtime."""
    import edgekit_runtime
    from edgekit_runtime.processing import list_images

    files = [f for p in inputs for f in (list_images(p) if p.is_dir() else [p])]
    with edgekit_runtime.load(bundle, keyring=keyring(keyring_path)) as model:
        results = model.predict(files, top_k=top_k)
    rows = [{"input": str(f), **r} for f, r in zip(files, results)]
    if as_json:
        print_json(rows)
        return
    table = Table("input", "prediction")
    for row in rows:
        table.add_row(row["input"], ", ".join(f"{t['label']} ({t['score']:.3f})" for t in row.get("top_k", [])))
    console.print(table)
