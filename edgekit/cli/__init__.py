"""``edgekit``: the host command line (typer + rich), one module per command group.

``app`` is the console entry point (``edgekit = "edgekit.cli:app"``); :mod:`.app`
mounts the groups, :mod:`.options` holds the shared options, :mod:`.exits` maps
errors to :class:`~edgekit.errors.ExitCode` and prints them (as JSON with ``--json``).
"""

from .app import app, main

__all__ = ["app", "main"]
