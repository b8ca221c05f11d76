"""The agent's MQTT side (paho-mqtt 2.x): connection, last will, spool sender, commands.

* MQTT v5 (or 3.1.1 where configured) with ``clean_start=False`` and a session
  expiry, so commands published at QoS 1 while the device is away are kept by
  the broker and arrive when it returns.
* The retained ``state`` "online" is published from ``on_connect``; the last
  will (retained "offline", this boot, seq 0) is set before each connection attempt,
  and both carry that connection's number (``body.connection``, counted per boot), so
  a will that arrives after a later connection's "online" reads as stale. The online
  is not spooled: it is numbered when the connection comes up, so it goes out
  before the backlog of lower ``seq`` it follows (the ordering rule consumers rely
  on is in docs/telemetry.md, "The device's spool on disk").
* The sender hands the oldest spooled messages to paho, never more than
  ``max_inflight`` at a time, and deletes a message from the spool only when its
  PUBACK came back with a success reason code. paho re-sends what was in flight
  after a reconnect; anything it never sent stays in the spool (across crashes
  too). Messages that waited out an outage are re-stamped ``historical=true``.
* paho reconnects with exponential backoff (``reconnect_min_s`` ..
  ``reconnect_max_s``, the minimum jittered per device so a fleet does not
  reconnect in lockstep after a broker restart).

paho's callbacks run on its network thread; they only queue events. The owner
(the daemon's loop, or a simulator) calls :meth:`MqttLink.process` and
:meth:`MqttLink.pump` from one thread, which is the only one touching the
in-flight table.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import ssl
import time

from ..contract import fleet_protocol
from .config import AgentConfigError
from .core import AgentCore
from .extra import require
from .state import AgentState

# paho-mqtt comes with the [agent] extra only: without it, say which extra to install
mqtt = require("paho.mqtt.client", "paho-mqtt")
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402 - needs the check above
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

log = logging.getLogger("edgekit_runtime.agent.mqtt")

# PUBACK reason codes worth a retry later; any other failure (not authorized, topic
# name invalid, payload format invalid, ...) would fail again, so the message is
# dropped and counted as broker_rejected.
TRANSIENT_PUBACK = frozenset({0x80, 0x91, 0x97})  # unspecified error, packet id in use, quota exceeded


def _historical(payload: bytes) -> bytes:
    msg = json.loads(payload)
    msg["historical"] = True
    return fleet_protocol.encode(msg)


class MqttLink:
    """One device's MQTT client, sending ``core``'s spool and receiving its commands.

    Many links can live in one process (a simulator: one per simulated device).
    """

    def __init__(self, core: AgentCore):
        self.core = core
        cfg = core.config
        self.host, self.port, self.tls = cfg.broker
        self.v5 = cfg.mqtt_version == "5"
        self.events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.connected = False
        self.subscribed = False  # the broker granted our cmd subscription on this connection
        self.epoch = 0  # successful connections so far in this boot
        self.pending: dict[int, int] = {}  # paho mid -> spool row id (in flight)
        self.disconnected_at: float | None = None
        self.last_reason: str | None = None
        self.connect_failures = 0
        self._rejections_logged: set[str] = set()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.effective_client_id,
                             protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                             clean_session=None if self.v5 else False)
        if cfg.username is not None:
            try:
                client.username_pw_set(cfg.username, cfg.password())
            except OSError as exc:
                raise AgentConfigError(f"cannot read password_file {cfg.password_file} ({exc.strerror})") from None
        if self.tls:
            try:
                client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                               certfile=str(cfg.cert_file) if cfg.cert_file else None,
                               keyfile=str(cfg.key_file) if cfg.key_file else None,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise AgentConfigError(f"TLS files cannot be used ({exc})",
                                       hint="ca_file: PEM CA certificate; cert_file/key_file: PEM client "
                                            "certificate and its unencrypted private key") from None
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        # the will is armed before every connection attempt (on_pre_connect runs in connect and each reconnect)
        # with that connection's number, which the "online" sent on it carries too
        client.on_pre_connect = self._on_pre_connect
        client.reconnect_delay_set(cfg.reconnect_min_s * random.uniform(0.8, 1.2), cfg.reconnect_max_s)
        # our own window bounds what we hand over; a few more for the state messages
        client.max_inflight_messages_set(cfg.max_inflight + 4)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # a command is acknowledged to the broker only after it was handled (its ack spooled),
        # so one that arrives just before a crash is delivered again
        client.manual_ack_set(True)
        self.client = client
        self._started = False

    # -- paho callbacks (network thread): queue only ---------------------------------------
    def _on_pre_connect(self, client, userdata) -> None:
        core = self.core
        core.connection += 1
        client.will_set(core.topic("state"), fleet_protocol.encode(core.will_envelope()), qos=1, retain=True)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.events.put(("connect_failed", str(reason_code)))
            return
        client.subscribe(self.core.topic("cmd"), qos=1)
        online = self.core.state_envelope("online")
        client.publish(self.core.topic("state"), fleet_protocol.encode(online), qos=1, retain=True)
        self.events.put(("connected", bool(flags.session_present)))

    def _on_connect_fail(self, client, userdata) -> None:
        self.events.put(("connect_failed", "the broker cannot be reached (network, DNS or TLS handshake failure)"))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.events.put(("disconnected", str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.events.put(("published", mid, int(reason_code.value), str(reason_code)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.events.put(("subscribed", [str(rc) for rc in reason_codes if rc.is_failure]))

    def _on_message(self, client, userdata, message) -> None:
        self.events.put(("message", message.topic, bytes(message.payload), message.mid, message.qos))

    # -- owner's thread ----------------------------------------------------------------------
    def wake(self) -> None:
        """Make a :meth:`wait` return now (a message was spooled, a stop was asked, ...)."""
        self.events.put(("wake",))

    def start(self) -> None:
        """Connect in the background (paho's thread retries with backoff until it gets through)."""
        cfg = self.core.config
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            self.client.connect_async(self.host, self.port, cfg.keepalive_s, clean_start=False, properties=props)
        else:
            self.client.connect_async(self.host, self.port, cfg.keepalive_s)
        self.client.loop_start()
        self._started = True

    def wait(self, timeout: float) -> list[tuple]:
        """Events that arrived, waiting up to ``timeout`` seconds for the first one."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait())
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            pass  # nothing (more) arrived
        return out

    def process(self, events: list[tuple]) -> list[tuple[str, bytes, int, int]]:
        """Apply connection and PUBACK events.

        Returns the received commands as ``(topic, payload, mid, qos)``; call
        :meth:`ack_command` with ``mid, qos`` once each is handled.
        """
        acked: list[int] = []
        rejected = 0
        commands: list[tuple[str, bytes, int, int]] = []
        core = self.core
        for event in events:
            kind = event[0]
            if kind == "published":
                _, mid, code, text = event
                row = self.pending.pop(mid, None)
                if row is None:
                    continue  # a state message, not from the spool
                if code < 0x80:
                    acked.append(row)
                elif code in TRANSIENT_PUBACK:
                    log.warning("broker refused a message for now (%s); it stays spooled", text)
                    core.spool.release([row])
                else:
                    if text not in self._rejections_logged:  # once per reason: the count is in telemetry
                        self._rejections_logged.add(text)
                        log.error("broker rejected a message (%s); dropped and counted as broker_rejected", text)
                    acked.append(row)
                    rejected += 1
            elif kind == "connected":
                self._connected(event[1])
            elif kind in ("disconnected", "connect_failed"):
                self._disconnected(kind, event[1])
            elif kind == "message":
                commands.append(event[1:])
            elif kind == "subscribed":
                self.subscribed = not event[1]
                if event[1]:  # e.g. an ACL without read access to our cmd topic: commands cannot reach us
                    log.error("the broker refused the subscription to %s: %s", core.topic("cmd"), event[1])
                    core.emit_event("error", code=None, name="CMD_SUBSCRIBE_REFUSED", topic=core.topic("cmd"),
                                    message=f"the broker refused the command subscription: {', '.join(event[1])}",
                                    hint="grant this device read access to its cmd topic in the broker ACL")
        if acked:
            core.spool.ack(acked, rejected=rejected)
        return commands

    def publish_state(self) -> None:
        """Re-publish the retained "online" state (after a model switch); on the next connect if offline."""
        if self.connected:
            online = self.core.state_envelope("online")
            self.client.publish(self.core.topic("state"), fleet_protocol.encode(online), qos=1, retain=True)

    def ack_command(self, mid: int, qos: int) -> None:
        """Tell the broker a command was handled (its ack is spooled)."""
        if qos > 0:
            self.client.ack(mid, qos)

    def _connected(self, session_present: bool) -> None:
        core = self.core
        self.connected = True
        self.epoch += 1
        core.live_epoch = self.epoch
        if core.state not in (AgentState.STOPPING, AgentState.STOPPED):
            core.set_state(core.serving_state())
        offline_s = None if self.disconnected_at is None else round(time.time() - self.disconnected_at, 3)
        log.info("connected to %s:%d (session present: %s)", self.host, self.port, session_present)
        if self.epoch > 1 or self.connect_failures:
            core.emit_event("reconnected", offline_s=offline_s, reason=self.last_reason,
                            session_present=session_present, connect_failures=self.connect_failures,
                            backlog=len(core.spool))
        self.disconnected_at = None
        self.connect_failures = 0

    def _disconnected(self, kind: str, reason: str) -> None:
        core = self.core
        if kind == "connect_failed":
            self.connect_failures += 1
        if kind == "connect_failed" or self.connected:
            # (the disconnect that follows a refused CONNACK says less than the refusal did)
            if reason != self.last_reason or self.connected:
                log.warning("%s: %s", "connection lost" if self.connected else "cannot connect", reason)
            self.last_reason = reason
        if self.disconnected_at is None:
            self.disconnected_at = time.time()
        if self.epoch == 0 and core.live_epoch == 1:
            # what was made while the first connection was being tried waited: it is historical
            core.live_epoch = None
            core.spool.forget_live(core.boot, 1)
        if self.connected:
            self.connected = False
            self.subscribed = False
            core.live_epoch = None
            if core.state not in (AgentState.STOPPING, AgentState.STOPPED):
                core.set_state(AgentState.OFFLINE_SPOOLING)

    def pump(self) -> int:
        """Hand the oldest unsent spooled messages to paho, keeping at most ``max_inflight`` in flight."""
        if not self.connected:
            return 0
        core = self.core
        room = core.config.max_inflight - len(self.pending)
        sent = 0
        for row in core.spool.next_unsent(room):
            payload = row.payload
            if row.boot != core.boot or row.live is None or row.live != self.epoch:
                payload = _historical(payload)
            info = self.client.publish(row.topic, payload, qos=1, retain=False)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("paho refused a publish (%s); retrying later", mqtt.error_string(info.rc))
                break
            # NO_CONN: paho keeps the message and sends it after the reconnect, so it is in flight too
            self.pending[info.mid] = row.id
            core.spool.mark_inflight(row.id)
            sent += 1
        return sent

    def stop(self, flush_s: float) -> None:
        """Send what the spool holds (up to ``flush_s``), publish "offline", disconnect."""
        if not self._started:
            return
        core = self.core
        deadline = time.monotonic() + flush_s
        while self.connected and (len(core.spool) > 0 or self.pending) and time.monotonic() < deadline:
            for topic, payload, mid, qos in self.process(self.wait(min(0.05, max(deadline - time.monotonic(), 0)))):
                cmd = core.parse_command(topic, payload)
                if cmd is not None:
                    core.refuse(cmd, "stopping", "the agent is stopping; send the command again later")
                self.ack_command(mid, qos)
            self.pump()
        if self.connected:
            offline = core.state_envelope("offline")
            offline["body"]["reason"] = "stopped"
            info = self.client.publish(core.topic("state"), fleet_protocol.encode(offline), qos=1, retain=True)
            end = time.monotonic() + 2.0
            while not info.is_published() and time.monotonic() < end and self.connected:
                self.process(self.wait(0.02))
        self.client.disconnect()
        self.client.loop_stop()
        self._started = False
        core.spool.release()  # nothing is in flight any more; unacked messages stay for the next start
        self.pending.clear()
