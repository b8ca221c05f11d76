"""The edgekit device agent: serve the active bundle, report over MQTT, answer commands.

* :class:`AgentConfig` — the config file (TOML or JSON), validated.
* :class:`AgentCore` — boot/seq, metrics windows, drift, the on-disk spool,
  events and commands, without any network: what ``edgekit fleet simulate``
  drives with synthetic inferences.
* :class:`MqttLink` — one paho-mqtt client sending a core's spool.
* :class:`Agent` — the daemon (``edgekit-agent run``): both, plus model loading
  and an optional workload.

Topics and payloads follow :mod:`edgekit_runtime.contract.fleet_protocol`.
"""

from .config import AgentConfig, AgentConfigError, WorkloadConfig
from .core import AgentCore
from .daemon import Agent, load_active_model
from .drift import DriftMonitor, ks_statistic, psi
from .metrics import LatencyHistogram, MetricsWindow, SystemStats
from .mqtt import MqttLink
from .spool import Spool
from .state import AgentState, StateDir

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentConfigError",
    "AgentCore",
    "AgentState",
    "DriftMonitor",
    "LatencyHistogram",
    "MetricsWindow",
    "MqttLink",
    "Spool",
    "StateDir",
    "SystemStats",
    "WorkloadConfig",
    "ks_statistic",
    "load_active_model",
    "psi",
]
