"""Alerts out of the monitor: each alert the tracker opens or resolves, posted to webhooks and an MQTT alert topic.

::

    FleetTracker ──listener──▶ AlertDispatcher ──▶ sink queue ──thread──▶ WebhookSink   (HTTP POST, JSON)
      (_open/_close)           (dedup, payload)  ──▶ sink queue ──thread──▶ MqttAlertSink (retained per alert)

The tracker calls the listener in its own loop, so nothing here may block or raise
there: the dispatcher builds the payload and appends it to each sink's bounded
queue; when a queue is full the *oldest* event is dropped (counted, logged), since
the newest ones describe the fleet as it is now. Each sink delivers from its own
thread, in order, with retries and exponential backoff; one slow receiver never
delays another, nor ingest.

Dedup key: ``(fleet, device, kind, opened)`` — one alert from its opening to its
resolution. The tracker already reports an alert once while it stays open (a new
value of an open alert is not an event); the dispatcher drops a repeated "opened"
of a key it knows open, so a restart or a bug upstream cannot page anyone twice.
Receivers get the key as ``id`` and can de-duplicate deliveries that a retry
repeated (a webhook's ``Idempotency-Key`` header is ``<id>:<event>``).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from edgekit_runtime.contract.fleet_protocol import TOPIC_ROOT, check_name

from ..errors import ConfigError
from .connection import BrokerSettings, paho_reason_code, refusal_message

log = logging.getLogger("edgekit.fleet.alerts")

ALERT_SCHEMA = 1
ALERTS_LEVEL = "alerts"  # edgekit/v1/<fleet>/alerts/<device>/<kind>: six levels, a device's topics have five
EVENTS = ("opened", "resolved")


# ----------------------------------------------------------------------------- payload and topic
def alert_topic(fleet: str, device: str, kind: str) -> str:
    """``edgekit/v1/<fleet>/alerts/<device>/<kind>``: one topic per (device, kind), retained while open."""
    return f"{TOPIC_ROOT}/{check_name(fleet, 'fleet')}/{ALERTS_LEVEL}/{check_name(device, 'device')}/{kind}"


def alert_filter(fleet: str = "+") -> str:
    """Every alert topic of ``fleet`` (``+``: all fleets). ``+/+``, not ``#``: a device may be named "alerts"."""
    return f"{TOPIC_ROOT}/{fleet}/{ALERTS_LEVEL}/+/+"


def alert_id(fleet: str, device: str, kind: str, opened: float) -> str:
    """The dedup key as a string: ``<fleet>/<device>/<kind>/<opened, UNIX ms>`` (names never contain ``/``)."""
    return f"{fleet}/{device}/{kind}/{int(round(opened * 1000))}"


def alert_payload(entry: dict[str, Any], monitor: str, event: Optional[str] = None) -> dict[str, Any]:
    """The JSON document every sink sends for a tracker entry (``opened``/``closed``) or a stored open alert."""
    event = event or ("opened" if entry.get("event", "opened") == "opened" else "resolved")
    return {"schema": ALERT_SCHEMA, "event": event,
            "id": alert_id(entry["fleet"], entry["device"], entry["kind"], entry["opened"]),
            "fleet": entry["fleet"], "device": entry["device"], "kind": entry["kind"],
            "value": entry.get("value"), "threshold": entry.get("threshold"), "message": entry.get("message"),
            "opened": entry["opened"], "closed": entry.get("closed") if event == "resolved" else None,
            "monitor": monitor}


@dataclass
class AlertEvent:
    """One thing a sink delivers: an opened/resolved alert, or ``sync`` (the open alerts after a restart)."""

    event: str  # opened | resolved | sync
    payload: dict[str, Any] = field(default_factory=dict)
    open_alerts: list[dict[str, Any]] = field(default_factory=list)  # sync only: payloads of the open alerts


class AlertDeliveryError(Exception):
    """One delivery attempt failed; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, retryable: bool = True, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class SinkStats:
    delivered: int = 0
    retries: int = 0
    failed: int = 0  # given up: a refusal, or retries exhausted
    overflow: int = 0  # dropped (the oldest) because the queue was full
    abandoned: int = 0  # still queued when close()'s deadline passed


# ----------------------------------------------------------------------------- a sink: queue + thread
class AlertSink:
    """A bounded queue and one delivery thread; subclasses implement :meth:`send` (one attempt)."""

    def __init__(self, name: str, queue_size: int = 1000, retries: int = 5, backoff_s: float = 0.5,
                 backoff_max_s: float = 30.0):
        if queue_size < 1 or retries < 0 or backoff_s < 0:
            raise ConfigError("an alert sink needs queue_size >= 1, retries >= 0 and backoff_s >= 0")
        self.name = name
        self.queue_size = queue_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stats = SinkStats()
        self._queue: collections.deque[AlertEvent] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._give_up_at: Optional[float] = None  # monotonic; set by close()
        self._thread: Optional[threading.Thread] = None
        self._overflow_logged_at = 0.0

    # -- producer side (the tracker's thread): never blocks -----------------------------------
    def submit(self, event: AlertEvent) -> None:
        with self._cond:
            if self._closing:
                self.stats.abandoned += 1
                return
            if len(self._queue) >= self.queue_size:
                dropped = self._queue.popleft()
                self.stats.overflow += 1
                n, now = self.stats.overflow, time.monotonic()
                if n <= 5 or now - self._overflow_logged_at >= 60.0:  # a receiver down for hours: one line a minute
                    self._overflow_logged_at = now
                    log.warning("alert sink %s: %d alerts waiting, dropped the oldest (%s %s); %d dropped so far "
                                "— is the receiver down?", self.name, len(self._queue), dropped.event,
                                dropped.payload.get("id", ""), n)
            self._queue.append(event)
            self._cond.notify_all()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"edgekit-alerts-{self.name}", daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued was delivered or given up (True), or ``timeout`` passed (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` s, then stop; what is left is counted as abandoned."""
        with self._cond:
            self._closing = True
            self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.stats.abandoned += left
        if self.stats.abandoned:
            log.warning("alert sink %s stopped with %d alerts undelivered", self.name, self.stats.abandoned)
        self.shutdown()

    def shutdown(self) -> None:
        """Release the sink's connection (after the thread ended)."""

    def giving_up(self) -> bool:
        """True once close()'s deadline has passed: stop waiting and retrying."""
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    # -- the delivery thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self.giving_up():
                    self._cond.notify_all()
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(event)
            except Exception:  # a bug in a sink: log it with its traceback, keep the thread (and the next alert)
                self.stats.failed += 1
                log.exception("alert sink %s failed on %s %s", self.name, event.event, event.payload.get("id", ""))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, event: AlertEvent) -> None:
        attempt = 0
        while True:
            try:
                self.send(event)
                if event.event != "sync":
                    self.stats.delivered += 1
                return
            except AlertDeliveryError as exc:
                attempt += 1
                if not exc.retryable or attempt > self.retries or self.giving_up():
                    self.stats.failed += 1
                    log.error("alert sink %s: %s %s not delivered after %d attempts: %s", self.name, event.event,
                              event.payload.get("id", ""), attempt, exc)
                    return
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                if exc.retry_after is not None:
                    delay = min(self.backoff_max_s, max(delay, exc.retry_after))
                self.stats.retries += 1
                log.info("alert sink %s: %s (attempt %d), again in %.1f s", self.name, exc, attempt, delay)
                self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake when close()'s deadline passes."""
        end = time.monotonic() + seconds
        with self._cond:
            while not self.giving_up():
                left = end - time.monotonic()
                if left <= 0:
                    return
                limit = left if self._give_up_at is None else min(left, self._give_up_at - time.monotonic())
                self._cond.wait(max(limit, 0.001))

    def send(self, event: AlertEvent) -> None:
        """One delivery attempt; raises :class:`AlertDeliveryError`."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- webhook
class WebhookSink(AlertSink):
    """POSTs each alert event as JSON to ``url`` (standard library HTTP client).

    2xx is delivered; 408, 425, 429 and 5xx, timeouts and connection errors are
    retried with backoff (``Retry-After`` is honoured up to ``backoff_max_s``);
    any other status is a refusal, logged and not retried. Only the URL's scheme
    and host are ever logged: webhook URLs often carry their secret in the path.
    """

    def __init__(self, url: str, token: Optional[str] = None, headers: Optional[dict[str, str]] = None,
                 timeout: float = 5.0, **sink: Any):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"alert webhook {url!r} must be an http:// or https:// URL")
        super().__init__(f"webhook {parts.scheme}://{parts.netloc.rpartition('@')[2]}", **sink)
        if token and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("alert %s: the bearer token travels unencrypted (http://); use https://", self.name)
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "edgekit-monitor",
                        **(headers or {})}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def send(self, event: AlertEvent) -> None:
        if event.event == "sync":
            return  # a webhook has no state to reconcile: open alerts are not sent again after a restart
        body = json.dumps(event.payload).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={**self.headers,
                                                  "Idempotency-Key": f"{event.payload['id']}:{event.event}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:
            status = exc.code
            retry_after = None
            try:
                retry_after = float(exc.headers.get("Retry-After", ""))
            except (TypeError, ValueError):
                pass
            exc.close()
            raise AlertDeliveryError(f"HTTP {status} {exc.reason}", retryable=status in (408, 425, 429)
                                     or status >= 500, retry_after=retry_after) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertDeliveryError(f"cannot reach the receiver ({reason})") from None


# ----------------------------------------------------------------------------- MQTT alert topic
class MqttAlertSink(AlertSink):
    """Publishes alerts to ``edgekit/v1/<fleet>/alerts/<device>/<kind>`` with QoS 1.

    An open alert is the topic's *retained* message, so a subscriber that comes
    later sees what is open now. A resolution is published as a normal message
    (subscribers see the "resolved" event), then an empty retained message clears
    the topic. After a restart, :meth:`AlertDispatcher.restored` makes this sink
    reconcile the broker's retained alerts with the store's open ones.
    """

    def __init__(self, settings: BrokerSettings, client_id: str, fleet: str = "+", ack_timeout: float = 10.0,
                 connect_wait: float = 5.0, **sink: Any):
        super().__init__(f"mqtt {settings.url}", **sink)
        self.settings = settings
        self.client_id = client_id
        self.fleet = fleet
        self.ack_timeout = ack_timeout
        self.connect_wait = connect_wait
        self._connected = threading.Event()
        self._acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self._acked = threading.Condition()
        self._retained: Optional[dict[str, bytes]] = None  # collecting during a sync
        self._suback = threading.Event()
        self._client = None

    def start(self) -> None:
        if self._client is None:
            client = self.settings.paho_client(self.client_id)
            client.reconnect_delay_set(1, 30)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.on_message = self._on_message
            client.on_subscribe = lambda *a: self._suback.set()
            client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
            client.loop_start()
            self._client = client
        super().start()

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    # -- paho's network thread ------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("alert %s: %s", self.name, refusal_message(self.settings.url, paho_reason_code(reason_code)))
            return
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked:
            self._acks[mid] = paho_reason_code(reason_code)
            self._acked.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        collecting = self._retained
        if collecting is not None and message.retain:
            collecting[message.topic] = bytes(message.payload)

    # -- the delivery thread ----------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if not self._connected.wait(self.connect_wait):
            raise AlertDeliveryError(f"not connected to the broker at {self.settings.url}")
        import paho.mqtt.client as mqtt

        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise AlertDeliveryError(f"paho refused the publish ({mqtt.error_string(info.rc)})")
        # NO_CONN, or a connection lost before the PUBACK: paho keeps the QoS 1 message and sends it again after
        # the reconnect, so we wait for its PUBACK rather than publish a second copy
        with self._acked:
            while info.mid not in self._acks:
                if self.giving_up():
                    raise AlertDeliveryError("stopping before the broker acknowledged", retryable=False)
                self._acked.wait(0.1)
            reason = self._acks.pop(info.mid)
        if reason >= 0x80:
            raise AlertDeliveryError(refusal_message(self.settings.url, reason, "publish") + (
                " — the monitor's user needs `topic write edgekit/v1/+/alerts/#` in the broker's ACL"
                if reason == 0x87 else ""), retryable=False)

    def send(self, event: AlertEvent) -> None:
        if event.event == "sync":
            self._sync(event.open_alerts)
            return
        p = event.payload
        topic = alert_topic(p["fleet"], p["device"], p["kind"])
        data = json.dumps(p).encode()
        if event.event == "opened":
            self._publish(topic, data, retain=True)
        else:
            self._publish(topic, data, retain=False)  # live subscribers see the resolution...
            self._publish(topic, b"", retain=True)  # ...and the retained "open" copy is gone

    def _sync(self, open_alerts: list[dict[str, Any]], quiet_s: float = 0.3, max_s: float = 5.0) -> None:
        """Make the broker's retained alerts (of our fleet) the open ones: clear stale copies, restore missing ones."""
        if not self._connected.wait(self.connect_wait):
            raise AlertDeliveryError(f"not connected to the broker at {self.settings.url}")
        seen: dict[str, bytes] = {}
        self._retained = seen
        self._suback.clear()
        try:
            self._client.subscribe(alert_filter(self.fleet), qos=1)
            end = time.monotonic() + max_s
            self._suback.wait(max_s)
            count, quiet_until = -1, 0.0
            while time.monotonic() < end:  # retained copies follow the SUBACK; stop once none came for quiet_s
                if len(seen) != count:
                    count, quiet_until = len(seen), time.monotonic() + quiet_s
                elif time.monotonic() >= quiet_until:
                    break
                time.sleep(0.02)
            self._client.unsubscribe(alert_filter(self.fleet))
        finally:
            self._retained = None
        wanted = {alert_topic(p["fleet"], p["device"], p["kind"]): p for p in open_alerts}
        cleared = restored = 0
        for topic, payload in seen.items():
            if payload and topic not in wanted:
                self._publish(topic, b"", retain=True)
                cleared += 1
        for topic, p in wanted.items():
            try:
                current = json.loads(seen.get(topic) or b"null")
            except ValueError:
                current = None
            if not isinstance(current, dict) or current.get("id") != p["id"]:
                self._publish(topic, json.dumps(p).encode(), retain=True)
                restored += 1
        if cleared or restored:
            log.info("alert %s: cleared %d stale retained alerts, restored %d open ones", self.name, cleared,
                     restored)


# ----------------------------------------------------------------------------- the dispatcher
class AlertDispatcher:
    """Fans the tracker's alert entries out to every sink; pass :meth:`listener` to ``MonitorOptions``.

    Only the monitor that runs the tracker sends alerts: with several monitors on
    one store, only the tracker leader may have a dispatcher.
    """

    def __init__(self, sinks: Iterable[AlertSink], monitor: str):
        self.sinks = list(sinks)
        self.monitor = monitor
        self._open: dict[tuple[str, str, str], str] = {}  # (fleet, device, kind) -> id of the open alert
        self.duplicates = 0
        self.errors = 0

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def listener(self, entry: dict[str, Any]) -> None:
        """A tracker listener: never blocks, never raises (it runs in the monitor's loop)."""
        try:
            payload = alert_payload(entry, self.monitor)
            where = (payload["fleet"], payload["device"], payload["kind"])
            if payload["event"] == "opened":
                if self._open.get(where) == payload["id"]:
                    self.duplicates += 1
                    return
                self._open[where] = payload["id"]
            else:
                self._open.pop(where, None)
            event = AlertEvent(payload["event"], payload)
            for sink in self.sinks:
                sink.submit(event)
        except Exception:  # a bug here must not stop the monitor: logged with its traceback, counted
            self.errors += 1
            log.exception("alert dispatch failed for %r", entry)

    def restored(self, open_alerts: Iterable[dict[str, Any]]) -> None:
        """The open alerts a restarted monitor restored from its store: known, so never sent as new.

        A webhook gets nothing for them; the MQTT sink reconciles its retained
        topics with them. Call after ``Monitor.start()`` and before its ``run()``.
        """
        payloads = [alert_payload(a, self.monitor, "opened") for a in open_alerts]
        for p in payloads:
            self._open[(p["fleet"], p["device"], p["kind"])] = p["id"]
        for sink in self.sinks:
            sink.submit(AlertEvent("sync", open_alerts=payloads))

    def flush(self, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        return all([sink.flush(max(0.0, end - time.monotonic())) for sink in self.sinks])

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` s (all sinks together), then stop every sink."""
        end = time.monotonic() + timeout
        threads = [threading.Thread(target=s.close, args=(max(0.0, end - time.monotonic()),), daemon=True)
                   for s in self.sinks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 10)

    def stats(self) -> list[dict[str, Any]]:
        """Per sink, in order: its name (scheme and host only) and its counters."""
        return [{"sink": s.name, **vars(s.stats)} for s in self.sinks]
