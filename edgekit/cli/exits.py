"""How a command ends: exceptions become an exit code (:class:`~edgekit.errors.ExitCode`) and a message.

Without ``--json`` a user error prints ``error: ...`` on stderr, no traceback; our own
bug keeps its traceback. With ``--json`` stdout gets one document either way::

    {"error": {"code": 4, "name": "VERIFY", "message": "...", "hint": "...", "type": "BundleError",
               "runtime": {"code": 105, "name": "BUNDLE_TAMPERED"}}}

``code`` is the process exit code and ``name`` its :class:`ExitCode` name; ``type`` is the
exception's class; ``runtime`` (runtime errors only) is the device runtime's stable error
code, the one ``edgekit-runtime``/``edgekit-agent`` and telemetry report; a refused build
(:class:`~edgekit.errors.GateError`) adds its ``report``.
"""

from __future__ import annotations

import functools
import signal
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import typer
from rich.markup import escape
# typer vendors click: its parser raises typer._click's exceptions, not those of a separately installed click
from typer._click.exceptions import ClickException
from typer.core import TyperGroup

from edgekit_runtime.contract.errors import RuntimeErrorBase

from ..errors import EdgekitError, ExitCode, GateError, exit_code_of
from .output import err_console, print_json

INTERNAL_HINT = "this is a bug in edgekit: please report it with the traceback printed on stderr"


def error_document(exc: BaseException, code: Optional[ExitCode] = None) -> dict[str, Any]:
    """The ``{"error": {...}}`` document for ``exc`` (see the module docstring)."""
    code = exit_code_of(exc) if code is None else code
    err: dict[str, Any] = {"code": int(code), "name": code.name, "message": str(exc), "hint": None,
                           "type": type(exc).__name__}
    if isinstance(exc, RuntimeErrorBase):
        err.update(message=exc.message, hint=exc.hint, runtime={"code": int(exc.code), "name": exc.code.name})
    elif isinstance(exc, EdgekitError):
        err["hint"] = exc.hint
    elif isinstance(exc, ClickException):
        err.update(message=exc.format_message(), hint="see --help")
    else:
        err.update(message=f"{type(exc).__name__}: {exc}", hint=INTERNAL_HINT)
    if isinstance(exc, GateError):
        err["report"] = exc.report
    return {"error": err}


def handle_errors(fn: Callable) -> Callable:
    """Run a command: edgekit and runtime errors end it with their exit code and a message, never a traceback.

    The command's ``as_json`` argument decides the form: one JSON document on stdout, or
    ``error: ...`` on stderr.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException, KeyboardInterrupt):
            raise
        except (EdgekitError, RuntimeErrorBase) as exc:
            if as_json:
                print_json(error_document(exc))
            else:
                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(int(exit_code_of(exc))) from None
        except OSError as exc:
            # a path the user named cannot be read or written (no such folder, no permission, disk full)
            if as_json:
                print_json({"error": {"code": int(ExitCode.USAGE), "name": ExitCode.USAGE.name,
                                      "message": str(exc), "hint": "check the path and its permissions",
                                      "type": type(exc).__name__}})
            else:
                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(int(ExitCode.USAGE)) from None
        except Exception as exc:
            if not as_json:
                raise  # our bug: Python prints the traceback and exits 1 (INTERNAL)
            traceback.print_exc(file=sys.stderr)
            print_json(error_document(exc, ExitCode.INTERNAL))
            raise typer.Exit(int(ExitCode.INTERNAL)) from None

    return wrapper


def fail(code: ExitCode) -> typer.Exit:
    """End a command whose result was printed but is a failure (a refused install, a halted rollout)."""
    return typer.Exit(int(code))


class JsonAwareGroup(TyperGroup):
    """The root command group: with ``--json`` on the command line, a usage error is a JSON document too.

    Usage errors (an unknown option, a missing argument, a bad value) are found by the
    parser before any command runs, so :func:`handle_errors` never sees them.
    """

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if "--json" not in argv or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except ClickException as exc:
            print_json(error_document(exc, ExitCode.USAGE))
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False)
            sys.exit(int(ExitCode.USAGE))
        except typer.Abort:
            sys.exit(128 + signal.SIGINT)  # Ctrl-C, as a shell reports it
        # not standalone: typer returns the exit code of a typer.Exit, or the command's return value (None)
        sys.exit(rv if isinstance(rv, int) else int(ExitCode.OK))
