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

A *site* broker adds a :class:`BridgeConfig`: one MQTT connection to a central
broker that carries the devices' ``state``/``telemetry``/``event``/``ack`` out
and their ``cmd`` in, so devices and the monitor keep their topics and code.
The bridge is one client of the site broker, so the same ``max_queued_*``
limits bound what the site keeps for the central broker while the link is down
(docs/telemetry.md, "Broker topology", has the arithmetic).
"""

from __future__ import annotations

import getpass
import os
import re
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


# What crosses a site's bridge, per direction (the fleet_protocol topic tree's last level).
# Disjoint sets: a command coming in is never sent back out, so the brokers cannot loop.
BRIDGED_OUT = ("state", "telemetry", "event", "ack")  # device -> central
BRIDGED_IN = ("cmd",)  # central -> device
TOPIC_ROOT = "edgekit/v1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # fleet_protocol's names


@dataclass
class BridgeConfig:
    """A site broker's link to the central broker (Mosquitto ``connection`` section).

    Why these settings (each one was needed for "0 lost" through a link outage):

    * QoS 1 both ways: the site keeps a message until the central broker PUBACKs it.
    * ``cleansession false`` (local and remote): the site keeps queueing for the
      bridge while the link is down, and the central broker keeps the commands for
      the site. Both brokers need ``persistence true`` for that to survive their
      restart.
    * MQTT 3.1.1 on the link, not 5: Mosquitto 2.0's v5 bridge sends no session
      expiry, so the central broker drops the bridge's session (and the commands
      queued in it) at every disconnect (eclipse-mosquitto/mosquitto#2424, #2793).
    * ``try_private`` (Mosquitto's bridge flag) lets a Mosquitto central broker keep
      the retain flag of what a bridge forwards; other brokers may refuse it
      (``try_private=False``).
    """

    host: str
    port: int = 1883
    name: str = "edgekit-site"  # the bridge's client id at the central broker: unique per site
    fleets: tuple[str, ...] = ("+",)  # "+" bridges every fleet
    qos: int = 1
    tls: bool = False
    cafile: Optional[Path] = None  # the central broker's CA (TLS); None: the system's CAs
    certfile: Optional[Path] = None  # this site's client certificate, if the central broker wants one
    keyfile: Optional[Path] = None
    username: Optional[str] = None
    password_file: Optional[Path] = None  # read at render time: Mosquitto wants the password in its config
    keepalive_s: int = 30  # how soon a dead link is noticed (then the site queues)
    restart_s: tuple[int, int] = (1, 30)  # reconnect backoff: first try, cap (Mosquitto's jitter)
    try_private: bool = True
    notifications: bool = True  # retained 1/0 on $SYS/broker/connection/<name>/state, both sides

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise BrokerError(f"bridge name {self.name!r}: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit "
                              "(it is the bridge's client id at the central broker: one per site)")
        for fleet in self.fleets:
            if fleet != "+" and not _NAME.match(fleet):
                raise BrokerError(f"bridged fleet {fleet!r} is not a fleet name (or + for every fleet)")
        if not self.fleets:
            raise BrokerError("a bridge needs at least one fleet (+ for every fleet)")
        if self.qos != 1:
            raise BrokerError("the fleet's topics are QoS 1 end to end: a bridge at QoS 0 would drop messages "
                              "during a link outage, and QoS 2 buys nothing (the store drops duplicates)")
        if not 0 < self.port < 65536:
            raise BrokerError(f"bridge port {self.port} is not a TCP port")
        if (self.certfile is None) != (self.keyfile is None):
            raise BrokerError("a bridge client certificate needs both certfile and keyfile")
        if (self.cafile or self.certfile) and not self.tls:
            raise BrokerError("bridge TLS files were given for a plain mqtt:// link; use mqtts://")
        if self.password_file is not None and self.username is None:
            raise BrokerError("a bridge password file needs a username")
        if self.keepalive_s < 5:
            raise BrokerError("Mosquitto's bridge keepalive is at least 5 s")

    def password(self) -> Optional[str]:
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise BrokerError(f"cannot read the bridge password file {self.password_file} ({exc.strerror})") \
                from None

    def topics(self) -> list[str]:
        """``topic`` lines: the devices' kinds out, commands in, per fleet."""
        lines = []
        for fleet in self.fleets:
            lines += [f"topic {TOPIC_ROOT}/{fleet}/+/{kind} out {self.qos}" for kind in BRIDGED_OUT]
            lines += [f"topic {TOPIC_ROOT}/{fleet}/+/{kind} in {self.qos}" for kind in BRIDGED_IN]
        return lines

    def render(self) -> list[str]:
        self.check()
        lines = ["", f"connection {self.name}", f"address {self.host}:{self.port}",
                 "bridge_protocol_version mqttv311",
                 f"try_private {'true' if self.try_private else 'false'}",
                 "cleansession false", "local_cleansession false",
                 f"remote_clientid {self.name}", f"local_clientid local.{self.name}",
                 f"keepalive_interval {self.keepalive_s}",
                 f"restart_timeout {self.restart_s[0]} {self.restart_s[1]}",
                 "start_type automatic",
                 f"notifications {'true' if self.notifications else 'false'}",
                 "bridge_attempt_unsubscribe false"]
        if self.username is not None:
            lines.append(f"remote_username {self.username}")
            password = self.password()
            if password is not None:
                lines.append(f"remote_password {password}")
        if self.tls:
            # Mosquitto needs a CA to turn TLS on for a bridge: the system's when none is given
            lines.append(f"bridge_cafile {Path(self.cafile).resolve()}" if self.cafile
                         else "bridge_capath /etc/ssl/certs")
            if self.certfile:
                lines += [f"bridge_certfile {Path(self.certfile).resolve()}",
                          f"bridge_keyfile {Path(self.keyfile).resolve()}"]
        return lines + self.topics()


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
    bridges: list[BridgeConfig] = field(default_factory=list)  # a site broker's links to a central one
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
        if self.bridges:
            names = [b.name for b in self.bridges]
            if len(set(names)) != len(names):
                raise BrokerError(f"bridge names must differ (got {names})")
            if not self.persistence:
                raise BrokerError("a bridge without persistence loses what the site queued for the central "
                                  "broker when the site broker restarts; keep persistence on")
            for bridge in self.bridges:  # connection sections go last: every line after one belongs to it
                lines += bridge.render()
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        d = Path(self.dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "mosquitto.conf"
        text = self.render()
        # a bridge's password sits in the config (Mosquitto reads it from there): owner only
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
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
