"""Where the CLI writes: results on stdout (a rich console, or one JSON document), everything else on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Tables stay readable when the output is piped or logged (rich assumes 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def print_json(data: Any) -> None:
    """Write ``data`` as the command's one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(text: str) -> None:
    """A warning for people, on stderr (a ``--json`` document carries it in its own ``warning`` field)."""
    err_console.print(f"[bold yellow]warning:[/] {text}", highlight=False, markup=True)
