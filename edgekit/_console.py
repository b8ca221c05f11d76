"""Keep stdout for results: send third-party output to stderr and quiet known chatter unless asked.

A ``--json`` command must print exactly one JSON document on stdout, yet libraries we call
write there themselves (NNCF's progress bars) or log on import (TensorFlow, absl, oneDNN,
torch's "No CUDA runtime" line). Two tools, usable by any code that calls such a library:

* :func:`redirect_stdout_to_stderr` — within the block, everything written to stdout, by
  Python code or by C code on file descriptor 1, lands on stderr;
* :func:`quiet_third_party` — environment variables and logger levels that silence the
  known chatter; it must run before those libraries are imported to take full effect.

Native libraries that log straight to file descriptor 2 regardless of these settings
(LiteRT's bundled TensorFlow prints its oneDNN note and XNNPACK line) stay on stderr:
never on stdout, but not silenced either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

# Environment read by native libraries when they load (setdefault: a user's own choice wins).
_QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow/LiteRT C++ logs: errors only (no oneDNN or CPU-feature notes)
    "GRPC_VERBOSITY": "ERROR",  # pulled in by TensorFlow
    "GLOG_minloglevel": "2",  # glog/absl users
    "ABSL_MIN_LOG_LEVEL": "2",
}

# Python loggers that report at WARNING what is not a problem for the user of a build.
_QUIET_LOGGERS = {
    "torch.utils.cpp_extension": logging.ERROR,  # "No CUDA runtime is found" on every CPU-only machine
    "torch.utils._pytree": logging.ERROR,  # deprecation notices about other libraries' registrations (LiteRT)
    "nncf": logging.WARNING,  # INFO lines on stdout from NNCF's own handler
    "absl": logging.ERROR,
    "tensorflow": logging.ERROR,
    "openvino": logging.WARNING,
}


# What quiet_third_party changed, so that loud_third_party can undo exactly that.
_changed_env: list[str] = []
_changed_loggers: dict[str, int] = {}


def quiet_third_party() -> None:
    """Silence known third-party chatter (call early, before torch/TensorFlow/NNCF are imported).

    Only environment defaults and logger levels are set: warnings and errors that
    matter still reach stderr, and nothing is changed that alters results.
    """
    for name, value in _QUIET_ENV.items():
        if name not in os.environ:
            os.environ[name] = value
            _changed_env.append(name)
    for name, level in _QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            _changed_loggers.setdefault(name, logger.level)
            logger.setLevel(level)


def loud_third_party() -> None:
    """Undo :func:`quiet_third_party` (a user's own settings stay): for ``-v`` given after it ran."""
    while _changed_env:
        os.environ.pop(_changed_env.pop(), None)
    for name, level in _changed_loggers.items():
        logging.getLogger(name).setLevel(level)
    _changed_loggers.clear()


@contextlib.contextmanager
def redirect_stdout_to_stderr() -> Iterator[None]:
    """Within the block, stdout goes to stderr, at the file-descriptor level where there is one.

    Python writers that hold ``sys.stdout`` (``print``, rich consoles made earlier) and
    native code writing to descriptor 1 are both redirected. Under a test runner that
    replaced ``sys.stdout`` with an in-memory stream there is no descriptor to move, and
    only ``sys.stdout`` is swapped.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fd = None
    try:
        out_fd, err_fd = sys.__stdout__.fileno(), sys.__stderr__.fileno()  # type: ignore[union-attr]
        saved_fd = os.dup(out_fd)
        os.dup2(err_fd, out_fd)
    except (AttributeError, OSError, ValueError):
        saved_fd = None  # no real descriptors (captured output): the Python-level swap below still applies
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        if saved_fd is not None:
            with contextlib.suppress(Exception):
                sys.__stdout__.flush()  # type: ignore[union-attr]
            os.dup2(saved_fd, out_fd)
            os.close(saved_fd)
