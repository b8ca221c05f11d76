"""The edgekit device agent: serve the active bundle, report over MQTT, answer commands.

* :class:`AgentConfig` — the config file (TOML or JSON), validated.
* :class:`AgentCore` — boot/seq, metrics windows, drift, the on-disk spool,
  events and commands, without any network: what ``edgekit fleet simulate``
  drives with synthetic inferences.
* :class:`MqttLink` — one paho-mqtt client sending a core's spool.
* :class:`Agent` — the daemon (``edgekit-agent run``): both, plus model loading
  and an optional workload.

Topics and payloads follow :mod:`edgekit_runtime.contract.fleet_protocol`.
The agent is the device distribution's ``[agent]`` extra (``pip install 'edgekit-runtime[agent]'``):
paho-mqtt, and tomli on Python 3.10. Nothing outside this package imports paho.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562), not here: the agent's MQTT side needs the [agent]
# extra (paho-mqtt), and with it missing `edgekit-agent` and `import edgekit_runtime.agent.cli` must
# still start, to say which extra to install instead of dying in a traceback.
_EXPORTS = {
    "Agent": ".daemon",
    "AgentConfig": ".config",
    "AgentConfigError": ".config",
    "AgentCore": ".core",
    "AgentState": ".state",
    "DriftMonitor": ".drift",
    "LatencyHistogram": ".metrics",
    "MetricsWindow": ".metrics",
    "MqttLink": ".mqtt",
    "Spool": ".spool",
    "StateDir": ".state",
    "SystemStats": ".metrics",
    "WorkloadConfig": ".config",
    "ks_statistic": ".drift",
    "load_active_model": ".daemon",
    "psi": ".drift",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
