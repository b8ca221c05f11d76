"""A local Mosquitto for a fleet: its config file, and starting it.

Mosquitto's defaults suit a few chatty clients, not a fleet behind one monitor:

* ``max_inflight_messages 20`` is also the *Receive Maximum* it announces to
  MQTT v5 clients, so each device may have only 20 QoS 1 messages awaiting
  PUBACK (a device draining its spool after an outage waits on round trips);
* ``max_queued_messages 1000`` is the per-client queue behind that window: when
  a subscriber (the monitor) falls behind by more, further QoS 1 messages to it
  are **dropped silently** — the device got its PUBACK, so nobody resends.

``edgekit broker`` raises both (the queue is bounded in bytes instead, so a
stalled monitor cannot take all memory), keeps persistence on for sessions and
retained states, and runs ``mosquitto`` in the foreground.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import EdgekitError, ExitCode

INSTALL_HINT = ("install the broker: `apt-get install mosquitto mosquitto-clients` (Debian/Ubuntu), "
                "`brew install mosquitto` (macOS), or point --broker at one you run")


class BrokerError(EdgekitError):
    """Mosquitto is missing, or did not start."""

    exit_code = ExitCode.DEVICE


@dataclass
class BrokerConfig:
    """What ``edgekit broker`` writes into ``mosquitto.conf``."""

    dir: Path
    port: int = 1883
    bind: str = "127.0.0.1"
    max_inflight_messages: int = 1000  # also the Receive Maximum v5 clients are given
    max_queued_messages: int = 1_000_000  # per client, behind the in-flight window
    max_queued_bytes: int = 1 << 30  # ... and in bytes (1 GiB per client)
    persistence: bool = True
    allow_anonymous: bool = True
    password_file: Optional[Path] = None
    acl_file: Optional[Path] = None
    tls_port: Optional[int] = None  # an mqtts listener too
    cafile: Optional[Path] = None
    certfile: Optional[Path] = None
    keyfile: Optional[Path] = None
    require_certificate: bool = False
    user: Optional[str] = None  # user mosquitto runs as when started by root (default: the current user)
    log_connections: bool = False
    tcp_nodelay: bool = True  # send each packet at once (lower latency; more segments under load)
    extra: list[str] = field(default_factory=list)  # raw lines appended (tests, experiments)

    def render(self) -> str:
        d = Path(self.dir).resolve()
        lines = [
            "# written by `edgekit broker`; see firmware/mosquitto/ for a fleet's production config",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"set_tcp_nodelay {'true' if self.tcp_nodelay else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {d}/",
            "autosave_interval 60",
            # mosquitto started by root drops to this user; run as whoever started it
            f"user {self.user or getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"connection_messages {'true' if self.log_connections else 'false'}",
        ]
        if self.password_file:
            lines.append(f"password_file {Path(self.password_file).resolve()}")
        if self.acl_file:
            lines.append(f"acl_file {Path(self.acl_file).resolve()}")
        lines += ["", f"listener {self.port} {self.bind}", "protocol mqtt"]
        if self.tls_port is not None:
            if not (self.cafile and self.certfile and self.keyfile):
                raise BrokerError("a TLS listener needs cafile, certfile and keyfile "
                                  "(firmware/mosquitto/make-certs.sh makes a test CA)")
            lines += ["", f"listener {self.tls_port} {self.bind}", "protocol mqtt",
                      f"cafile {Path(self.cafile).resolve()}", f"certfile {Path(self.certfile).resolve()}",
                      f"keyfile {Path(self.keyfile).resolve()}",
                      f"require_certificate {'true' if self.require_certificate else 'false'}"]
        lines += self.extra
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        d = Path(self.dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "mosquitto.conf"
        path.write_text(self.render())
        return path


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
         if os.access(p, os.X_OK)), None)
    if not found:
        raise BrokerError(f"mosquitto is not installed; {INSTALL_HINT}")
    return found


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RunningBroker:
    """A mosquitto process started by :func:`start_broker`; stop it with :meth:`stop` (or ``with``)."""

    def __init__(self, proc: subprocess.Popen, config: BrokerConfig, config_path: Path, log_path: Path):
        self.proc = proc
        self.config = config
        self.config_path = config_path
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"mqtt://{self.config.bind}:{self.config.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> "RunningBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_broker(config: BrokerConfig, timeout: float = 10.0) -> RunningBroker:
    """Write the config, start mosquitto in the background, return once its port(s) accept connections."""
    binary = find_mosquitto()
    path = config.write()
    log_path = Path(config.dir) / "mosquitto.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([binary, "-c", str(path)], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    broker = RunningBroker(proc, config, path, log_path)
    ports = [config.port] + ([config.tls_port] if config.tls_port is not None else [])
    deadline = time.monotonic() + timeout
    while not all(port_open(config.bind, p) for p in ports):
        if proc.poll() is not None or time.monotonic() > deadline:
            broker.stop()
            raise BrokerError(f"mosquitto did not start on {config.bind}:{ports}:\n{broker.log()[-2000:]}")
        time.sleep(0.02)
    return broker


def run_foreground(config: BrokerConfig, before_exec: Optional[Callable[[Path], None]] = None) -> None:
    """Write the config and become mosquitto (exec): signals, exit status and logs are the broker's own.

    ``before_exec(config_path)`` runs once every check has passed, just before the exec
    (the CLI reports what it starts there: after the exec this process is mosquitto).
    """
    binary = find_mosquitto()
    path = config.write()
    if port_open(config.bind, config.port):
        raise BrokerError(f"something already listens on {config.bind}:{config.port}; pick another --port")
    if before_exec is not None:
        before_exec(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(binary, [binary, "-c", str(path)])
