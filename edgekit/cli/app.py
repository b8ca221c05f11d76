"""The ``edgekit`` typer app: the root command, its global options, and every command group mounted once.

Each group lives in its own module (``targets``, ``keys``, ``compile``, ``bundle``, ``run``,
``bench``, ``demo``, ``fleet``, ``broker``, ``flash``, ``serve``); they import only
:mod:`.options`, :mod:`.output` and :mod:`.exits`, never each other or this module.
"""

from __future__ import annotations

import typer

from . import bench, broker, bundle, compile, demo, flash, fleet, keys, run, serve, targets
from .exits import JsonAwareGroup
from .options import VerboseOpt
from .output import set_verbosity

app = typer.Typer(help="Compile models for edge devices, ship signed bundles, run and benchmark them.\n\n"
                       "Every command takes --json (one JSON document on stdout, errors included). Exit codes: "
                       "0 ok, 1 internal error, 2 usage, 3 a gate refused the build, 4 bundle verification, "
                       "5 device or fleet.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=JsonAwareGroup)


@app.callback()
def root(verbose: int = VerboseOpt) -> None:
    """Set up output before any command runs: third-party chatter quiet unless -v, logs on stderr."""
    set_verbosity(verbose)


app.add_typer(targets.app, name="targets")
app.add_typer(bundle.app, name="bundle")
app.add_typer(keys.app, name="keys")
app.add_typer(fleet.app, name="fleet")
app.command("compile")(compile.compile_cmd)
app.command("run")(run.run_cmd)
app.command("bench")(bench.bench_cmd)
app.command("demo")(demo.demo_cmd)
app.command("flash")(flash.flash_cmd)
app.command("rollback")(flash.rollback_cmd)
app.command("serve")(serve.serve_cmd)
app.command("broker")(broker.broker_cmd)


def main() -> None:  # pragma: no cover - console entry point
    """Run the CLI (``python -m edgekit.cli``)."""
    app()
