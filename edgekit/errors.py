"""Errors a user can act on, and the exit code each one means. Each message says what to do next.

Anything else that escapes is our bug: the CLI shows it with a traceback and exits
:attr:`ExitCode.INTERNAL`. The CLI turns an error into its exit code with
:func:`exit_code_of`; nothing else in edgekit spells an exit status as a number.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

from edgekit_runtime.contract.errors import RuntimeErrorBase


class ExitCode(enum.IntEnum):
    """What the process exit status of ``edgekit`` means (the README has the table)."""

    OK = 0
    INTERNAL = 1  # a bug in edgekit: the traceback is shown
    USAGE = 2  # a flag, build file, profile or input file is wrong, or a dependency is missing
    GATE = 3  # an accuracy, fidelity, latency or size gate refused the build
    VERIFY = 4  # a bundle failed verification: signature, tampering, untrusted key, bad manifest
    DEVICE = 5  # a device, runtime, engine, fleet or flash operation failed
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); a training run left last.pt for --resume


class EdgekitError(Exception):
    """Base of errors caused by input, configuration or environment.

    ``hint`` (optional) says what to do, apart from the message, for the CLI's JSON errors.
    """

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str = "", *, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(EdgekitError):
    """A build file, target profile or flag is invalid."""


class ModelImportError(EdgekitError):
    """The model could not be loaded, exported or checked."""


class CalibrationError(EdgekitError):
    """Calibration or validation data is missing or malformed."""


class GateError(EdgekitError):
    """A gate (accuracy, fidelity, latency, size) refused the build; no bundle was written.

    ``report`` holds what the gate measured (every attempt, its figures and the threshold).
    """

    exit_code = ExitCode.GATE

    def __init__(self, message: str, report: dict[str, Any], *, hint: Optional[str] = None):
        super().__init__(message, hint=hint)
        self.report = report


class AccuracyBudgetError(GateError):
    """INT8 lost more accuracy than the profile allows, even after the fallback.

    ``report`` holds every attempt and its measured accuracy.
    """


class SigningError(EdgekitError):
    """No usable signing key."""


class VerificationError(EdgekitError):
    """A bundle did not pass a check edgekit makes before using it (its files, its signature)."""

    exit_code = ExitCode.VERIFY


class DeviceError(EdgekitError):
    """A device, the fleet or its broker did not do what was asked (offline, refused, no answer)."""

    exit_code = ExitCode.DEVICE


class MissingDependencyError(EdgekitError):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs {package}: pip install 'edgekit[{extra}]'",
                         hint=f"pip install 'edgekit[{extra}]'")


# The runtime's stable codes are grouped by hundreds (edgekit_runtime.contract.errors); the
# group decides the exit code, so a code appended later maps without touching this table.
_RUNTIME_GROUPS = {
    1: ExitCode.VERIFY,  # 1xx bundle: unreadable, unsigned, tampered, untrusted key, bad manifest
    2: ExitCode.DEVICE,  # 2xx engine: missing backend, load, inference, health check
    3: ExitCode.USAGE,  # 3xx input: the image or array given does not fit the model
    4: ExitCode.DEVICE,  # 4xx the runtime's own configuration and storage
    5: ExitCode.DEVICE,  # 5xx what a device's inference server refused (queue full, deadline, token, size)
}


def exit_code_for_runtime_code(code: Optional[int]) -> ExitCode:
    """The exit code of a runtime error with stable ``code`` (e.g. 105 → VERIFY); unknown → DEVICE."""
    if code is None:
        return ExitCode.DEVICE
    return _RUNTIME_GROUPS.get(int(code) // 100, ExitCode.DEVICE)


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code that ``exc`` stands for: its own for edgekit errors, by range for runtime errors."""
    if isinstance(exc, EdgekitError):
        return ExitCode(exc.exit_code)
    if isinstance(exc, RuntimeErrorBase):
        return exit_code_for_runtime_code(exc.code)
    return ExitCode.INTERNAL


__all__ = ["AccuracyBudgetError", "CalibrationError", "ConfigError", "DeviceError", "EdgekitError", "ExitCode",
           "GateError", "MissingDependencyError", "ModelImportError", "SigningError", "VerificationError",
           "exit_code_for_runtime_code", "exit_code_of"]
