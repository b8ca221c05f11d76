"""The agent's configuration file: one TOML (or JSON) document, validated before anything starts.

Unknown keys are refused with a "did you mean" suggestion, every problem is
reported at once, and nothing is silently corrected. Relative paths are read
relative to the directory of the config file. Example (``firmware/`` ships one)::

    device_id = "cam-01"
    fleet = "factory-a"
    broker_url = "mqtts://broker.example.com:8883"
    username = "cam-01"
    password_file = "/etc/edgekit/agent.password"
    ca_file = "/etc/edgekit/ca.pem"
    cert_file = "/etc/edgekit/cam-01.crt"      # client certificate (optional, with key_file)
    key_file = "/etc/edgekit/cam-01.key"
    state_dir = "/var/lib/edgekit-agent"
    keyring = "/etc/edgekit/keys"
    telemetry_interval_s = 10
    spool_max_bytes = 67108864
    spool_policy = "drop_oldest"               # or "reject_new"

    [workload]                                 # optional: the agent runs inferences itself (demos)
    images = "/opt/edgekit/demo-images"
    rate_hz = 2
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..contract import fleet_protocol
from ..contract.errors import ErrorCode, RuntimeConfigError
from .extra import require

SPOOL_POLICIES = ("drop_oldest", "reject_new")
SPOOL_SYNC = ("full", "normal")
MQTT_VERSIONS = ("5", "3.1.1")
SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}


class AgentConfigError(RuntimeConfigError):
    """The agent's config file is missing, unreadable or invalid."""

    code = ErrorCode.CONFIG_INVALID


def _toml_loads(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 (JetPack 6): tomli comes with the [agent] extra, imported
        tomllib = require("tomli", "tomli")  # here so that `edgekit-agent` can print what to install
    return tomllib.loads(text)


@dataclass
class WorkloadConfig:
    """Inferences the agent runs by itself (demos, soak tests)."""

    rate_hz: float = 1.0
    images: Path | None = None  # a folder of images, used in a loop (sorted order)
    synthetic: bool = False  # tensors drawn around the bundle's input_stats instead of images
    synthetic_shift: float = 0.0  # shift synthetic inputs by this many reference std (drift demos)


@dataclass
class AgentConfig:
    """Everything the device agent needs; see the module docstring for the file format."""

    device_id: str
    fleet: str
    broker_url: str
    state_dir: Path
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False  # skip the broker host name check (test brokers only)
    client_id: str | None = None  # default: edgekit-<fleet>-<device_id>
    mqtt_version: str = "5"  # "3.1.1" for a broker without MQTT v5
    keyring: Path | None = None  # default: $EDGEKIT_KEYRING or /etc/edgekit/keys
    threads: int | None = None  # inference threads; default from the bundle
    telemetry_interval_s: float = 10.0
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker keeps our commands while we are away
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight: int = 20  # spooled messages handed to the MQTT client before their PUBACK
    spool_max_bytes: int = 64 * 1024 * 1024
    spool_policy: str = "drop_oldest"
    spool_sync: str = "full"  # SQLite synchronous mode: "full" survives power loss, "normal" is faster
    shutdown_flush_s: float = 5.0
    drift_psi_threshold: float = 0.2
    drift_ks_threshold: float | None = None  # alarm on KS too when set
    drift_min_values: int = 2000  # tensor values a drift window needs before it is judged
    drift_max_values_per_inference: int = 4096  # larger inputs are subsampled (strided) for drift
    # installs (A/B slots): see install.py
    require_signed_commands: bool = True  # install/rollback must be signed by a keyring key
    health_latency_runs: int = 20  # timed runs of the health-check input after an install
    health_latency_budget_ms: float | None = None  # p90 limit; default: the bundle's target latency budget
    download_timeout_s: float = 30.0
    download_retries: int = 5
    download_max_s: float = 3600.0  # an install whose download takes longer fails (a trickling link)
    download_ca_file: Path | None = None  # CA for https:// bundle URLs (default: the system's)
    workload: WorkloadConfig | None = None
    # where workloads (`edgekit-runtime serve|stream --report-dir`) leave their reports: each fresh one rides
    # in the telemetry as body["workloads"][name]
    reports_dir: Path | None = None
    source: Path | None = field(default=None, compare=False)  # the file this was read from

    # -- derived ----------------------------------------------------------------
    @property
    def broker(self) -> tuple[str, int, bool]:
        """``(host, port, tls)`` from ``broker_url``."""
        return _parse_broker_url(self.broker_url)

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edgekit-{self.fleet}-{self.device_id}"

    def password(self) -> str | None:
        """The password, read from ``password_file`` (trailing newline stripped)."""
        if self.password_file is None:
            return None
        return self.password_file.read_text().rstrip("\r\n")

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON, without secrets (for the ``config`` command and ``status``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if isinstance(value, WorkloadConfig):
                value = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(value).items()}
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    # -- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "AgentConfig":
        """Read and validate a ``.toml`` or ``.json`` config file."""
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise AgentConfigError(f"cannot read agent config {path} ({exc.strerror})",
                                   hint="pass --config with the path of the agent's TOML file") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                data = _toml_loads(text.decode())
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            raise AgentConfigError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} "
                                   f"({exc})") from None
        if not isinstance(data, dict):
            raise AgentConfigError(f"{path} must hold a table of settings")
        return cls.from_dict(data, base_dir=path.resolve().parent, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | os.PathLike | None = None,
                  source: Path | None = None) -> "AgentConfig":
        """Validate a mapping of settings; relative paths are taken relative to ``base_dir``."""
        problems: list[str] = []
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        values = _convert(data, _FIELDS, "", base, problems)
        workload = None
        if "workload" in values:
            wl_values = _convert(values.pop("workload"), _WORKLOAD_FIELDS, "workload.", base, problems) \
                if isinstance(values.get("workload"), dict) else None
            if wl_values is None:
                problems.append("workload must be a table ([workload] in TOML)")
            else:
                workload = WorkloadConfig(**wl_values)
        for name in ("device_id", "fleet", "broker_url", "state_dir"):
            if name not in values and not any(p.startswith(f"{name} ") for p in problems):
                problems.append(f"{name} is required")
        if all(name in values for name in ("device_id", "fleet", "broker_url", "state_dir")):
            # settings that failed to convert keep their defaults here, so the checks below still run
            cfg = cls(**values, workload=workload, source=source)
            cfg._check(problems)
        if problems:
            raise AgentConfigError(_problems_text(problems, source))
        return cfg

    def _check(self, problems: list[str]) -> None:
        for name, what in (("device_id", "device"), ("fleet", "fleet")):
            try:
                fleet_protocol.check_name(getattr(self, name), what)
            except fleet_protocol.ProtocolError as exc:
                problems.append(f"{name}: {exc}")
        try:
            _, _, tls = self.broker
        except ValueError as exc:
            problems.append(f"broker_url: {exc}")
            tls = False
        if self.mqtt_version not in MQTT_VERSIONS:
            problems.append(f"mqtt_version {self.mqtt_version!r} is not one of {MQTT_VERSIONS}")
        if self.spool_policy not in SPOOL_POLICIES:
            problems.append(f"spool_policy {self.spool_policy!r} is not one of {SPOOL_POLICIES}"
                            + _suggest(self.spool_policy, SPOOL_POLICIES))
        if self.spool_sync not in SPOOL_SYNC:
            problems.append(f"spool_sync {self.spool_sync!r} is not one of {SPOOL_SYNC}")
        positive = ("telemetry_interval_s", "reconnect_min_s", "drift_psi_threshold")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if not 1 <= self.keepalive_s <= 65535:
            problems.append(f"keepalive_s must be 1..65535 (got {self.keepalive_s})")
        if self.reconnect_max_s < self.reconnect_min_s:
            problems.append("reconnect_max_s must be >= reconnect_min_s")
        if not 1 <= self.max_inflight <= 65535:
            problems.append(f"max_inflight must be 1..65535 (got {self.max_inflight})")
        if self.spool_max_bytes < 4096:
            problems.append(f"spool_max_bytes must be at least 4096 (got {self.spool_max_bytes})")
        if self.session_expiry_s < 0 or self.shutdown_flush_s < 0:
            problems.append("session_expiry_s and shutdown_flush_s must be >= 0")
        if self.drift_min_values < 1 or self.drift_max_values_per_inference < 1:
            problems.append("drift_min_values and drift_max_values_per_inference must be >= 1")
        if self.drift_ks_threshold is not None and not 0 < self.drift_ks_threshold <= 1:
            problems.append("drift_ks_threshold must be in (0, 1]")
        if self.health_latency_runs < 0 or self.download_retries < 0:
            problems.append("health_latency_runs and download_retries must be >= 0")
        if self.download_timeout_s <= 0 or self.download_max_s <= 0:
            problems.append("download_timeout_s and download_max_s must be > 0")
        if self.health_latency_budget_ms is not None and self.health_latency_budget_ms <= 0:
            problems.append("health_latency_budget_ms must be > 0")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be >= 1")
        if (self.cert_file is None) != (self.key_file is None):
            problems.append("cert_file and key_file go together (the client certificate and its private key)")
        if (self.ca_file or self.cert_file) and not tls:
            problems.append("ca_file/cert_file are set but broker_url is not mqtts://; use mqtts://host:8883")
        if self.password_file is not None and self.username is None:
            problems.append("password_file is set but username is not")
        for name in ("password_file", "ca_file", "cert_file", "key_file", "download_ca_file"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                problems.append(f"{name} {p} does not exist")
        if self.workload is not None:
            wl = self.workload
            if wl.rate_hz <= 0:
                problems.append("workload.rate_hz must be > 0")
            if (wl.images is None) == (not wl.synthetic):
                problems.append("workload needs exactly one source: images = DIR or synthetic = true")
            if wl.images is not None and not wl.images.is_dir():
                problems.append(f"workload.images {wl.images} is not a directory")


def _parse_broker_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{url!r} must be scheme://host[:port] (credentials go in username/password_file)")
    default_port, tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return parts.hostname, port, tls


# key -> (accepted types, converter). Paths are resolved against the config file's folder.
_PATH = "path"
_FIELDS: dict[str, tuple[tuple[type, ...] | str, bool]] = {
    "device_id": ((str,), False), "fleet": ((str,), False), "broker_url": ((str,), False),
    "state_dir": (_PATH, False), "username": ((str,), True), "password_file": (_PATH, True),
    "ca_file": (_PATH, True), "cert_file": (_PATH, True), "key_file": (_PATH, True),
    "tls_insecure": ((bool,), False), "client_id": ((str,), True), "mqtt_version": ((str,), False),
    "keyring": (_PATH, True), "threads": ((int,), True),
    "telemetry_interval_s": ((float,), False), "keepalive_s": ((int,), False),
    "session_expiry_s": ((int,), False), "reconnect_min_s": ((float,), False),
    "reconnect_max_s": ((float,), False), "max_inflight": ((int,), False),
    "spool_max_bytes": ((int,), False), "spool_policy": ((str,), False), "spool_sync": ((str,), False),
    "shutdown_flush_s": ((float,), False), "drift_psi_threshold": ((float,), False),
    "drift_ks_threshold": ((float,), True), "drift_min_values": ((int,), False),
    "drift_max_values_per_inference": ((int,), False), "workload": ((dict,), False),
    "require_signed_commands": ((bool,), False), "health_latency_runs": ((int,), False),
    "health_latency_budget_ms": ((float,), True), "download_timeout_s": ((float,), False),
    "download_retries": ((int,), False), "download_max_s": ((float,), False), "download_ca_file": (_PATH, True),
    "reports_dir": (_PATH, True),
}
_WORKLOAD_FIELDS: dict[str, tuple[tuple[type, ...] | str, bool]] = {
    "rate_hz": ((float,), False), "images": (_PATH, True), "synthetic": ((bool,), False),
    "synthetic_shift": ((float,), False),
}


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(data: dict[str, Any], table: dict, prefix: str, base: Path, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in table:
            problems.append(f"unknown setting {prefix + key!r}{_suggest(key, table)}")
            continue
        kinds, nullable = table[key]
        if value is None:
            if nullable:
                out[key] = None
            else:
                problems.append(f"{prefix}{key} cannot be empty")
            continue
        if kinds == _PATH:
            if not isinstance(value, str) or not value:
                problems.append(f"{prefix}{key} must be a path (a string)")
                continue
            p = Path(value).expanduser()
            out[key] = p if p.is_absolute() else base / p
            continue
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            problems.append(f"{prefix}{key} must be {' or '.join(k.__name__ for k in kinds)}, "
                            f"got {type(value).__name__} {value!r}")
            continue
        out[key] = value
    return out


def _problems_text(problems: list[str], source: Path | None) -> str:
    where = f"agent config {source}" if source else "agent config"
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where} has {len(problems)} problems:\n  - " + "\n  - ".join(problems)
