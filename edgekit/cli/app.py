"""The ``edgekit`` typer app: the root command, its global options, and every command group mounted once.

Each group lives in its own module (``targets``, ``keys``, ``compile``, ``bundle``, ``run``,
``bench``, ``demo``, ``train``, ``fleet``, ``broker``, ``flash``, ``serve``); they import only
:mod:`.options`, :mod:`.output` and :mod:`.exits`, never each other or this module.
"""

from __future__ import annotations

import typer

from .bench import bench_cmd
from .broker import broker_cmd
from .bundle import app as bundle_app
from .compile import compile_cmd
from .demo import demo_cmd
from .flash import flash_cmd, rollback_cmd
from .fleet import app as fleet_app
from .init import init_cmd
from .keys import app as keys_app
from .run import run_cmd
from .serve import serve_cmd
from .targets import app as targets_app
from .train import eval_cmd, train_cmd
from .tune import tune_cmd
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


app.add_typer(targets_app, name="targets")
app.add_typer(bundle_app, name="bundle")
app.add_typer(keys_app, name="keys")
app.add_typer(fleet_app, name="fleet")
app.command("train")(train_cmd)
app.command("eval")(eval_cmd)
app.command("init")(init_cmd)
app.command("compile")(compile_cmd)
app.command("run")(run_cmd)
app.command("bench")(bench_cmd)
app.command("demo")(demo_cmd)
app.command("flash")(flash_cmd)
app.command("rollback")(rollback_cmd)
app.command("serve")(serve_cmd)
app.command("broker")(broker_cmd)
app.command("tune")(tune_cmd)


def main() -> None:  # pragma: no cover - console entry point
    """Run the CLI (``python -m edgekit.cli``)."""
    app()
