"""Fleet commands over MQTT: discover devices, send (signed) commands, collect their answers.

:class:`FleetClient` is the host's side of the contract in ``runtime/edgekit_runtime/fleet_protocol.py``
and the flash spec: it subscribes to a fleet's ``state``, ``event`` and ``ack`` topics, keeps a
table of devices from their retained ``state`` messages, and publishes commands on
``edgekit/v1/<fleet>/<device>/cmd`` at QoS 1 (waiting for the broker's PUBACK).
``install`` and ``rollback`` change what a device runs, so they are signed with the
host's ed25519 key (:func:`edgekit_runtime.command_auth.sign_command`); a device
refuses them unsigned. They also always carry a numeric ``expires_ts`` (inside the
signature): a device refuses a signed command without one (``bad_request``) or past
it (``expired``), and remembers the request ids of signed commands until they expire,
so a replayed or re-sent one is answered from that record and never runs twice.
Without an explicit expiry a signed command expires after
:data:`DEFAULT_SIGNED_EXPIRY_S` (1 day).

Agents keep a persistent session, so a command sent to an offline device waits in
the broker and arrives when it reconnects. This client uses a clean session of its
own: answers published while it is away are not kept for it; a resumed rollout
re-sends the same ``request_id`` and the agent answers again from its ack cache.

Everything received is checked with :func:`fleet_protocol.decode`; a malformed
message is counted in :attr:`FleetClient.invalid`, never raised.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edgekit_runtime import command_auth
from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.command_auth import SIGNED_COMMANDS, sign_command

from ..errors import ConfigError, SigningError
from ..fleet.connection import BrokerSettings, FleetConnectionError, paho_reason_code, refusal_message

log = logging.getLogger("edgekit.flash.commands")

SUBSCRIBED_KINDS = ("state", "event", "ack")
FILTER_KEYS = ("model", "status")
DEFAULT_SIGNED_EXPIRY_S = 86400.0  # signed commands sent without an expiry expire after 1 day
# devices refuse a signed command that expires further ahead than this (they remember its request id until then);
# the agent's own limit, taken from the shared runtime module once it is there
MAX_SIGNED_EXPIRY_S = float(command_auth.MAX_COMMAND_LIFETIME_S)


def _check_expiry(command: str, expires_ts: Any) -> Optional[float]:
    """``expires_ts`` as a float (None stays None); a NaN/inf/non-number is a :class:`ConfigError`."""
    if expires_ts is None:
        return None
    if isinstance(expires_ts, bool) or not isinstance(expires_ts, (int, float)) or not math.isfinite(expires_ts):
        raise ConfigError(f"the {command!r} command's expires_ts must be a finite UNIX time, not {expires_ts!r}")
    return float(expires_ts)


@dataclass(frozen=True)
class Received:
    """One valid message from a device: an ``ack``, an ``event`` or a ``state``."""

    kind: str
    device: str
    body: dict[str, Any]
    ts: float  # the envelope's time (the device's clock)
    received_ts: float  # when this host received it
    request_id: Optional[str] = None  # acks, and events that belong to a command (install_progress)
    envelope: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def event_type(self) -> Optional[str]:
        return self.body.get("type") if self.kind == "event" else None


def command_body(fleet: str, device: str, command: str, args: Optional[dict[str, Any]] = None, *,
                 request_id: Optional[str] = None, expires_ts: Optional[float] = None,
                 sign_key: Any = None) -> dict[str, Any]:
    """The ``cmd`` body for ``command`` (signed when it is ``install``/``rollback``).

    A signed command always carries a numeric ``expires_ts`` (devices refuse one
    without): when none is given it is now + :data:`DEFAULT_SIGNED_EXPIRY_S`.
    Signing the same fields again gives the same body (ed25519 signatures are
    deterministic), which is what lets a resumed rollout re-send a command (it
    passes the recorded ``expires_ts``).
    """
    fleet_protocol.check_name(fleet, "fleet")
    fleet_protocol.check_name(device, "device")
    if not isinstance(command, str) or not command:
        raise ConfigError("a command needs a name (install, rollback, bench, ping, config)")
    body: dict[str, Any] = {"request_id": request_id or uuid.uuid4().hex, "command": command}
    signed = command in SIGNED_COMMANDS
    expires_ts = _check_expiry(command, expires_ts)
    if signed and expires_ts is None:
        expires_ts = time.time() + DEFAULT_SIGNED_EXPIRY_S
    if expires_ts is not None:
        body["expires_ts"] = expires_ts
    if args is not None or signed:
        body["args"] = dict(args or {})
    if signed:
        if sign_key is None:
            raise SigningError(f"the {command!r} command must be signed: devices refuse it otherwise — pass --key "
                               "(or set $EDGEKIT_SIGNING_KEY) with a key whose .pub is in the devices' keyring")
        body = sign_command(fleet, device, body, sign_key)
    elif sign_key is not None:
        body = sign_command(fleet, device, body, sign_key)  # harmless: agents ignore auth on other commands
    return body


class FleetClient:
    """A paho-mqtt 2.x (MQTT v5) connection to one fleet: devices, commands, answers.

    Thread-safe: paho's network thread fills the tables; any thread may call
    :meth:`send`, :meth:`poll`, :meth:`wait_ack`, :meth:`devices`. Use it as a
    context manager, or call :meth:`connect` and :meth:`close`.

    ``on_received`` (optional) is called on paho's network thread for every valid
    message; keep it short.
    """

    def __init__(self, settings: BrokerSettings, fleet: str, *, client_id: Optional[str] = None,
                 publish_timeout_s: float = 10.0, queue_max: int = 100_000,
                 on_received: Optional[Callable[[Received], None]] = None):
        self.settings = settings
        self.fleet = fleet_protocol.check_name(fleet, "fleet")
        self.client_id = client_id or f"edgekit-flash-{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.publish_timeout_s = publish_timeout_s
        self.on_received = on_received
        self.invalid = 0  # messages refused by fleet_protocol.decode
        self.last_invalid: Optional[str] = None
        self.dropped = 0  # received messages pushed out of a full poll queue
        self._cond = threading.Condition()
        self._devices: dict[str, dict[str, Any]] = {}
        self._queue: collections.deque[Received] = collections.deque()
        self._queue_max = queue_max
        self._acks: dict[str, dict[str, Any]] = {}  # request id -> ack body (for requests sent from here)
        self._progress: dict[str, list[dict[str, Any]]] = {}  # request id -> install_progress bodies
        self._sent: set[str] = set()
        self._pubacks: dict[int, int] = {}  # mid -> PUBACK reason code
        self._last_state_ts = 0.0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._connect_error: Optional[FleetConnectionError] = None
        self._sub_mid: Optional[int] = None
        self._client: Any = None

    # -- connection ------------------------------------------------------------------------
    def connect(self, timeout: Optional[float] = None) -> "FleetClient":
        """Connect (clean start), subscribe to the fleet; raises :class:`FleetConnectionError`."""
        if self._client is not None:
            return self
        timeout = self.settings.connect_timeout if timeout is None else timeout
        client = self.settings.paho_client(self.client_id)
        client.connect_timeout = timeout
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        try:
            client.connect(self.settings.host, self.settings.port, self.settings.keepalive, clean_start=True)
        except Exception as exc:  # OSError, ssl.SSLError, socket.timeout: all reported the same way
            raise self.settings.connection_error(exc) from None
        self._client = client
        client.loop_start()
        ok = self._subscribed.wait(timeout)
        if not ok or self._connect_error is not None:
            error = self._connect_error or FleetConnectionError(
                f"the broker at {self.settings.url} did not answer within {timeout:g} s "
                f"({'no CONNACK' if not self._connected.is_set() else 'no SUBACK'}) — is it an MQTT broker?")
            self.close()
            raise error
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_error = FleetConnectionError(
                refusal_message(self.settings.url, paho_reason_code(reason_code)), paho_reason_code(reason_code))
            self._subscribed.set()  # wake connect(): it raises the error
            return
        self._connected.set()
        # a clean session forgets subscriptions: subscribe on every (re)connection
        result, mid = client.subscribe([(fleet_protocol.fleet_filter(self.fleet, kind), 1)
                                        for kind in SUBSCRIBED_KINDS])
        self._sub_mid = mid

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed and not self._subscribed.is_set():
            code = paho_reason_code(failed[0])
            self._connect_error = FleetConnectionError(refusal_message(self.settings.url, code, "subscription"), code)
        elif failed:
            log.error("the broker refused a subscription after reconnecting: %s", failed[0])
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if self._client is not None:
            log.warning("lost the broker %s (%s); paho reconnects", self.settings.url, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._pubacks[mid] = int(getattr(reason_code, "value", reason_code))
            self._cond.notify_all()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        """Disconnect and stop paho's thread (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()

    def __enter__(self) -> "FleetClient":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- receiving ---------------------------------------------------------------------------
    def _on_message(self, client, userdata, message) -> None:
        self.handle_message(message.topic, bytes(message.payload))

    def handle_message(self, topic: str, payload: bytes, received_ts: Optional[float] = None) -> Optional[Received]:
        """Decode and file one message (paho's thread calls this); None when it was refused or stale."""
        try:
            msg = fleet_protocol.decode(topic, payload)
        except fleet_protocol.ProtocolError as exc:
            with self._cond:
                self.invalid += 1
                self.last_invalid = f"{topic}: {exc}"
                n = self.invalid
            if n <= 5 or n % 1000 == 0:
                log.warning("refused a message on %s (%d so far): %s", topic, n, exc)
            return None
        kind, device, body = msg["kind"], msg["device"], msg["body"]
        if msg["fleet"] != self.fleet or kind not in SUBSCRIBED_KINDS:
            return None
        now = time.time() if received_ts is None else received_ts
        request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
        item = Received(kind, device, body, float(msg["ts"]), now, request_id, msg)
        with self._cond:
            if kind == "state":
                if not self._update_device(device, msg):
                    return None
                self._last_state_ts = time.monotonic()
            elif kind == "ack" and request_id in self._sent:
                self._acks.setdefault(request_id, body)  # the first answer counts; QoS 1 duplicates do not
            elif kind == "event" and request_id and body.get("type") == "install_progress":
                self._progress.setdefault(request_id, []).append(body)
            if len(self._queue) >= self._queue_max:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            self._cond.notify_all()
        callback = self.on_received
        if callback is not None:
            callback(item)
        return item

    def _update_device(self, device: str, msg: dict[str, Any]) -> bool:
        """Apply a ``state`` message; False for a stale one (an older boot, or an older seq of this boot)."""
        body, boot, seq = msg["body"], msg["boot"], msg["seq"]
        known = self._devices.get(device)
        if known is not None:
            # the will of an older boot arrives after the device reconnected: ignore it (Sparkplug's bdSeq)
            if boot < known["boot"]:
                return False
            if boot == known["boot"] and body["status"] == "online" and seq < known["seq"]:
                return False
        model = body.get("model") if isinstance(body.get("model"), dict) else None
        entry = {"status": body["status"], "model": model if body["status"] == "online" else
                 (known or {}).get("model"), "active_slot": body.get("active_slot",
                                                                       (known or {}).get("active_slot")),
                 "boot": boot, "seq": seq, "ts": float(msg["ts"])}
        self._devices[device] = entry
        return True

    def devices(self) -> dict[str, dict[str, Any]]:
        """What is known now: device → {status, model, active_slot, boot, seq, ts} (a copy)."""
        with self._cond:
            return {name: dict(entry) for name, entry in sorted(self._devices.items())}

    def discover(self, timeout: float = 2.0, quiet_s: float = 0.3) -> dict[str, dict[str, Any]]:
        """Devices of the fleet from their retained ``state``: waits up to ``timeout`` seconds.

        The broker sends retained messages right after the subscription; the wait
        ends early once none has arrived for ``quiet_s`` seconds (and ``quiet_s``
        has passed since this call).
        """
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                last = max(self._last_state_ts, start)
                if now - last >= quiet_s:
                    break
                self._cond.wait(min(deadline, last + quiet_s) - now)
        return self.devices()

    def poll(self, timeout: float = 0.0) -> list[Received]:
        """Messages received since the last call, waiting up to ``timeout`` s for the first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            out = list(self._queue)
            self._queue.clear()
        return out

    def wait_ack(self, request_id: str, timeout: float) -> Optional[dict[str, Any]]:
        """The ack body for a request sent from here, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._acks[request_id]

    def progress(self, request_id: str) -> list[dict[str, Any]]:
        """``install_progress`` event bodies received for a request, in arrival order."""
        with self._cond:
            return list(self._progress.get(request_id, ()))

    # -- sending -----------------------------------------------------------------------------
    def send(self, device: str, command: str, args: Optional[dict[str, Any]] = None, *, sign_key: Any = None,
             expires_s: Optional[float] = None, expires_ts: Optional[float] = None,
             request_id: Optional[str] = None) -> str:
        """Publish a command (QoS 1) and wait for the broker's PUBACK; returns its request id.

        ``install``/``rollback`` are signed with ``sign_key`` (required for them).
        ``expires_s`` (from now) or ``expires_ts`` (UNIX time) bounds how long a
        queued command stays valid; the agent refuses it afterwards. Signed
        commands always expire: with neither given, after
        :data:`DEFAULT_SIGNED_EXPIRY_S` (1 day). Passing the ``request_id`` (and
        ``expires_ts``) of an earlier send re-sends the same command: the agent
        answers a duplicate from its record of signed requests.
        """
        if self._client is None:
            raise FleetConnectionError("not connected to the broker: call connect() first")
        if expires_ts is None and expires_s is not None:
            if isinstance(expires_s, bool) or not isinstance(expires_s, (int, float)) \
                    or not math.isfinite(expires_s) or expires_s <= 0:
                raise ConfigError(f"expires_s must be a positive number of seconds, not {expires_s!r}")
            expires_ts = time.time() + float(expires_s)
        if expires_ts is None and command in SIGNED_COMMANDS:
            expires_ts = time.time() + DEFAULT_SIGNED_EXPIRY_S
        body = command_body(self.fleet, device, command, args, request_id=request_id, expires_ts=expires_ts,
                            sign_key=sign_key)
        info = self._publish(device, body)
        self._confirm(device, command, info, time.monotonic() + self.publish_timeout_s)
        return body["request_id"]

    def send_many(self, command: str, args: Optional[dict[str, Any]], requests: list[tuple[str, str, float]], *,
                  sign_key: Any = None) -> None:
        """Publish ``command`` to many devices at once, then wait for every PUBACK.

        ``requests``: ``(device, request_id, expires_ts)`` each, as :meth:`send` takes them.
        A wave of a rollout goes out this way: the commands are pipelined to the broker
        instead of one PUBACK round trip each. Raises :class:`FleetConnectionError` like
        :meth:`send`, naming the first device whose command the broker did not take.
        """
        if self._client is None:
            raise FleetConnectionError("not connected to the broker: call connect() first")
        published = []
        for device, request_id, expires_ts in requests:
            body = command_body(self.fleet, device, command, args, request_id=request_id, expires_ts=expires_ts,
                                sign_key=sign_key)
            published.append((device, self._publish(device, body)))
        deadline = time.monotonic() + self.publish_timeout_s
        for device, info in published:
            self._confirm(device, command, info, deadline)

    def _publish(self, device: str, body: dict[str, Any]) -> Any:
        msg = fleet_protocol.envelope("cmd", self.fleet, device, boot=0, seq=0, body=body)
        with self._cond:
            self._sent.add(body["request_id"])
        return self._client.publish(fleet_protocol.topic(self.fleet, device, "cmd"), fleet_protocol.encode(msg),
                                    qos=1, retain=False)

    def _confirm(self, device: str, command: str, info: Any, deadline: float) -> None:
        """Wait (until ``deadline``, monotonic) for the broker's PUBACK of ``info``; raise if it refused or is silent."""
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise FleetConnectionError(f"could not publish {command} to {device} via {self.settings.url} ({exc}); "
                                       "check the connection to the broker") from None
        if not info.is_published():
            raise FleetConnectionError(f"the broker {self.settings.url} did not acknowledge the {command} command "
                                       f"for {device} within {self.publish_timeout_s:g} s")
        with self._cond:
            code = self._pubacks.pop(info.mid, 0)
        if code >= 0x80:
            cmd_topic = fleet_protocol.topic(self.fleet, device, "cmd")
            raise FleetConnectionError(refusal_message(self.settings.url, code, "publication")
                                       + f" — may this user publish on {cmd_topic}?", code)


# ----------------------------------------------------------------------------- device selection
def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _describe_known(known: dict[str, dict[str, Any]], limit: int = 20) -> str:
    if not known:
        return "no device has reported to this fleet (no retained state): are the agents connected to this broker?"
    names = sorted(known, key=_natural_key)
    shown = []
    for name in names[:limit]:
        entry = known[name] or {}
        model = entry.get("model") or {}
        what = f"{model.get('name')} {model.get('version') or ''}".strip() if model.get("name") else "no model"
        shown.append(f"{name} ({entry.get('status', '?')}, {what})")
    more = f", … and {len(names) - limit} more" if len(names) > limit else ""
    return "known devices: " + ", ".join(shown) + more


def select_devices(known: dict[str, dict[str, Any]], selector: Optional[str],
                   explicit: Optional[list[str]]) -> list[str]:
    """The devices a command or rollout goes to, sorted (natural order: cam-2 before cam-10).

    ``selector``: comma-separated fnmatch globs (``cam-*,dock-0?``) and filters
    ``model=NAME`` (a glob on the active model's name) / ``status=online|offline``.
    ``explicit``: device names. Candidates are the union of ``explicit`` and the
    glob matches (every known device when the selector has filters only); the
    filters then apply to all of them. Every device must be in ``known`` (it has a
    retained ``state``): a command to a device that never connected would be lost.
    Raises :class:`ConfigError` for an empty selection, listing what is known.
    """
    if selector is None and not explicit:
        raise ConfigError("name the devices: --device NAME (repeatable) or --select 'cam-*,model=digits' "
                          "('*' selects every device); " + _describe_known(known))
    globs: list[str] = []
    filters: dict[str, str] = {}
    for token in (selector or "").split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, _, value = token.partition("=")
            key, value = key.strip(), value.strip()
            if key not in FILTER_KEYS:
                raise ConfigError(f"selector filter {key!r} is unknown; filters are "
                                  f"{', '.join(k + '=...' for k in FILTER_KEYS)}")
            if not value:
                raise ConfigError(f"selector filter {key}= needs a value")
            if key == "status" and value not in fleet_protocol.STATUSES:
                raise ConfigError(f"status={value} must be one of {', '.join(fleet_protocol.STATUSES)}")
            if key in filters and filters[key] != value:
                raise ConfigError(f"selector gives {key}= twice ({filters[key]!r}, {value!r})")
            filters[key] = value
        else:
            globs.append(token)
    if selector is not None and not globs and not filters and not explicit:
        raise ConfigError(f"selector {selector!r} names nothing; give globs such as 'cam-*' or '*'")
    unknown = [name for name in (explicit or []) if name not in known]
    if unknown:
        for name in unknown:
            fleet_protocol.check_name(name, "device")
        raise ConfigError(f"{', '.join(sorted(unknown, key=_natural_key))}: never reported to this fleet (no retained "
                          f"state), so a command would be lost; check the name and --fleet — " + _describe_known(known))
    chosen = set(explicit or [])
    if globs:
        chosen.update(name for name in known if any(fnmatch.fnmatchcase(name, g) for g in globs))
    elif not explicit:
        chosen.update(known)
    out = []
    for name in chosen:
        entry = known.get(name) or {}
        if "status" in filters and entry.get("status") != filters["status"]:
            continue
        if "model" in filters:
            model = entry.get("model") or {}
            if not isinstance(model.get("name"), str) or not fnmatch.fnmatchcase(model["name"], filters["model"]):
                continue
        out.append(name)
    if not out:
        asked = ", ".join(filter(None, [selector and f"--select {selector!r}",
                                        explicit and f"--device {' '.join(explicit)}"]))
        raise ConfigError(f"{asked} selects no device; " + _describe_known(known))
    return sorted(out, key=_natural_key)
