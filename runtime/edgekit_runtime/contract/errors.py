"""Stable, numeric error codes for the device runtime.

Codes are grouped by range so that a fleet dashboard can bucket them without a
lookup table, and they travel in telemetry events. A code, once published, keeps
its meaning forever; new codes are appended.

    1xx  bundle: reading, signature, integrity, format version
    2xx  engine: backend missing, model load, inference
    3xx  input: shape, dtype, unreadable image, preprocessing
    4xx  configuration of the runtime itself (keyring, options)
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    # 1xx bundle
    BUNDLE_UNREADABLE = 100
    BUNDLE_TRUNCATED = 101
    BUNDLE_UNSIGNED = 102
    BUNDLE_BAD_SIGNATURE = 103
    BUNDLE_UNTRUSTED_KEY = 104
    BUNDLE_TAMPERED = 105
    BUNDLE_UNSUPPORTED_VERSION = 106
    BUNDLE_BAD_MANIFEST = 107
    BUNDLE_UNSAFE_MEMBER = 108
    BUNDLE_MISSING_MEMBER = 109
    BUNDLE_UNLISTED_MEMBER = 110
    BUNDLE_DOWNGRADE = 111  # older release than the one installed (anti-rollback)
    BUNDLE_DOWNLOAD_FAILED = 112  # could not be fetched (network, HTTP status, size limit)
    BUNDLE_CHECKSUM_MISMATCH = 113  # the file's sha256 is not the one pinned in the command
    # 2xx engine
    ENGINE_UNAVAILABLE = 200
    ENGINE_LOAD_FAILED = 201
    ENGINE_INFERENCE_FAILED = 202
    ENGINE_UNKNOWN_BACKEND = 203
    ENGINE_HEALTH_CHECK_FAILED = 204  # loaded, but the sample output or latency is out of bounds
    # 3xx input
    INPUT_BAD_SHAPE = 300
    INPUT_BAD_DTYPE = 301
    INPUT_UNREADABLE = 302
    INPUT_MISSING = 303
    INPUT_UNSUPPORTED = 304
    # 4xx runtime configuration
    CONFIG_NO_KEYRING = 400
    CONFIG_INVALID = 401
    CONFIG_UNAUTHORIZED = 402  # a fleet command without a valid signature from a trusted key
    DEVICE_STORAGE = 403  # the device's own storage failed (disk full, I/O error) during an install
    AGENT_ALREADY_RUNNING = 404  # another agent holds the state directory's lock
    # 5xx serving (edgekit-runtime serve): what a request was refused for, beside its HTTP status
    SERVE_BAD_REQUEST = 500  # not a KServe v2 request (not JSON, no inputs, bad binary section)
    SERVE_OVERLOADED = 501  # the queue is full (HTTP 429): retry later
    SERVE_DEADLINE_EXCEEDED = 502  # the request's time-out passed before it ran (HTTP 504)
    SERVE_REQUEST_TOO_LARGE = 503  # body over the server's limit (HTTP 413)
    SERVE_UNAUTHORIZED = 504  # missing or wrong bearer token (HTTP 401)
    SERVE_MODEL_NOT_FOUND = 505  # no model of that name or version is served (HTTP 404)
    SERVE_NOT_READY = 506  # no model is loaded yet, or the server is stopping (HTTP 503)


class ExitStatus(enum.IntEnum):
    """How the device CLIs (``edgekit-runtime``, ``edgekit-agent``) exit; the stable code says which error."""

    OK = 0
    USAGE = 2  # the command line is wrong
    RUNTIME_ERROR = 3  # a RuntimeErrorBase (or a refused install/rollback): its code is printed


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on purpose.

    ``code`` is stable across releases; ``hint`` says what the operator can do.
    """

    code: ErrorCode = ErrorCode.CONFIG_INVALID

    def __init__(self, message: str, *, code: ErrorCode | None = None, hint: str | None = None):
        if code is not None:
            self.code = code
        self.hint = hint
        full = f"[E{int(self.code)} {self.code.name}] {message}"
        if hint:
            full += f" — {hint}"
        super().__init__(full)
        self.message = message

    def to_event(self) -> dict:
        """A JSON-ready description, as sent in telemetry events."""
        return {"code": int(self.code), "name": self.code.name, "message": self.message, "hint": self.hint}


class BundleError(RuntimeErrorBase):
    """The bundle cannot be trusted or read; nothing was installed or run."""

    code = ErrorCode.BUNDLE_UNREADABLE


class EngineError(RuntimeErrorBase):
    """The inference engine is missing, or failed to load or run the model."""

    code = ErrorCode.ENGINE_LOAD_FAILED


class InputError(RuntimeErrorBase):
    """The input given to the model does not match its signature."""

    code = ErrorCode.INPUT_BAD_SHAPE


class RuntimeConfigError(RuntimeErrorBase):
    """The runtime itself is misconfigured (keyring, options)."""

    code = ErrorCode.CONFIG_INVALID
