"""``edgekit targets list|show``: the device profiles edgekit knows."""

from __future__ import annotations

import typer
from rich.table import Table

from .exits import handle_errors
from .options import JsonOpt
from .output import console, print_json

app = typer.Typer(help="Device profiles.", no_args_is_help=True)


@app.command("list")
@handle_errors
def targets_list(as_json: bool = JsonOpt) -> None:
    """List the device profiles edgekit knows."""
    from ..config.targets import available_targets, load_target

    profiles = [load_target(p) for p in available_targets().values()]
    if as_json:
        print_json([p.model_dump() for p in profiles])
        return
    table = Table("name", "backend", "device", "INT8", "max drop (pt)", "description")
    for p in profiles:
        table.add_row(p.name, p.backend, p.device.family, "yes" if p.quantize.enabled else "no",
                      str(p.accuracy.max_accuracy_drop), p.description)
    console.print(table)


@app.command("show")
@handle_errors
def targets_show(name: str = typer.Argument(..., help="Profile name or YAML path"), as_json: bool = JsonOpt) -> None:
    """Show one profile with every setting."""
    from ..config.targets import load_target

    profile = load_target(name)
    if as_json:
        print_json(profile.model_dump())
    else:
        import yaml

        console.print(yaml.safe_dump(profile.model_dump(), sort_keys=False), highlight=False)
