"""What the agent needs beyond the base runtime (the ``[agent]`` extra), and the error when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..contract.errors import ErrorCode, RuntimeErrorBase

INSTALL_HINT = "pip install 'edgekit-runtime[agent]'"


class AgentExtraMissing(RuntimeErrorBase, ImportError):
    """A library of the ``[agent]`` extra is not installed.

    An ``ImportError`` because it is raised while importing an agent module; a runtime error
    with a stable code so that ``edgekit-agent`` prints it on one line and exits 3.
    """

    code = ErrorCode.CONFIG_INVALID


def require(module: str, distribution: str) -> ModuleType:
    """Import ``module`` from the ``[agent]`` extra's ``distribution``, or say which extra to install.

    Only a missing ``module`` itself becomes :class:`AgentExtraMissing`; an installed library that
    fails to import for another reason keeps its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise AgentExtraMissing(f"the edgekit agent needs {distribution}, which is not installed "
                                "(the base edgekit-runtime only loads, verifies, runs and benchmarks bundles)",
                                hint=INSTALL_HINT) from None
