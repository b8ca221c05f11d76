"""Where the CLI writes: results on stdout (a rich console, or one JSON document), everything else on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console

# Tables stay readable when the output is piped or logged (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


_verbose = [0]  # the -v count in effect: `edgekit -v ...`, raised by a command's own -v


def set_verbosity(level: int) -> None:
    """Apply ``-v``: 0 quiets known third-party chatter and logs warnings; 1 logs info; 2 debug.

    The root option calls it before any command runs; a command with its own ``-v``
    calls it again with a higher count (which undoes the quieting).
    """
    from .._console import loud_third_party, quiet_third_party

    if level < _verbose[0]:
        return
    _verbose[0] = level
    if level:
        loud_third_party()
    else:
        quiet_third_party()  # before any command imports torch, TensorFlow or NNCF
    log_level = logging.WARNING if not level else logging.INFO if level == 1 else logging.DEBUG
    if not logging.getLogger().handlers:  # an embedding program's logging setup is left alone
        logging.basicConfig(stream=sys.stderr, level=log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgekit").setLevel(log_level)


def print_json(data: Any) -> None:
    """Write ``data`` as the command's one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(text: str) -> None:
    """A warning for people, on stderr (a ``--json`` document carries it in its own ``warning`` field)."""
    err_console.print(f"[bold yellow]warning:[/] {text}", highlight=False, markup=True)
