"""Errors a user can act on. Each message says what to do next.

Anything else that escapes is our bug, and the CLI shows it with a traceback.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base of errors caused by input, configuration or environment."""

    exit_code = 2


class ConfigError(EdgekitError):
    """A build file, target profile or flag is invalid."""


class ModelImportError(EdgekitError):
    """The model could not be loaded, exported or checked."""


class CalibrationError(EdgekitError):
    """Calibration or validation data is missing or malformed."""


class AccuracyBudgetError(EdgekitError):
    """INT8 lost more accuracy than the profile allows, even after the fallback.

    ``report`` holds every attempt and its measured accuracy.
    """

    exit_code = 3

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class SigningError(EdgekitError):
    """No usable signing key."""


class MissingDependencyError(EdgekitError):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs {package}: pip install 'edgekit[{extra}]'")
