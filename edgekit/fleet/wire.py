"""A small MQTT v5 client for the two hot paths: fleet ingest and load generation.

paho-mqtt is the client everywhere else (devices, the monitor's ``state``
subscription, ``fleet simulate``). Its reader makes three ``recv`` system calls
and a lock round-trip per message and sends each PUBACK on its own; measured on
the 2-core benchmark machine that caps one subscriber at ~14k messages/s, well
under what one Mosquitto delivers. This module reads the socket in large chunks,
parses every complete packet in the chunk, and answers a whole chunk's PUBACKs
with one ``sendall`` *after* the caller has stored the messages, so an
acknowledged message is a stored message.

Only what those paths need is implemented: CONNECT (with username/password and
a will), CONNACK, SUBSCRIBE/SUBACK, PUBLISH/PUBACK at QoS 0/1, PINGREQ/PINGRESP
and DISCONNECT, over TCP or TLS.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Optional

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# MQTT v5 reason codes a user meets when connecting or subscribing (spec §2.4).
REASONS = {
    0x00: "success", 0x01: "granted QoS 1", 0x02: "granted QoS 2", 0x04: "disconnect with will message",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password", 0x87: "not authorized",
    0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x93: "receive maximum exceeded",
    0x95: "packet too large", 0x97: "quota exceeded", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "QoS not supported", 0x9C: "use another server",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded",
    0xA2: "wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    return f"{REASONS.get(code, 'unknown reason')} (0x{code:02X})"


class WireError(ConnectionError):
    """The broker refused or dropped us; ``reason`` is the MQTT v5 reason code when it sent one."""

    def __init__(self, message: str, reason: Optional[int] = None):
        super().__init__(message)
        self.reason = reason


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(client_id: str, keepalive: int = 30, clean_start: bool = True,
                   username: Optional[str] = None, password: Optional[str] = None,
                   session_expiry: int = 0, receive_maximum: int = 65535, will: Optional[Will] = None) -> bytes:
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    props = b"\x21" + struct.pack("!H", receive_maximum)
    if session_expiry:
        props += b"\x11" + struct.pack("!I", session_expiry)
    body = _str("MQTT") + b"\x05" + bytes((flags,)) + struct.pack("!H", keepalive) + varint(len(props)) + props
    body += _str(client_id)
    if will is not None:
        body += b"\x00" + _str(will.topic) + _str(will.payload)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(CONNECT << 4, body)


def subscribe_packet(pid: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", pid) + b"\x00" + b"".join(_str(f) + bytes((qos,)) for f, qos in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish_packet(topic: str | bytes, payload: bytes, qos: int = 1, pid: int = 0, retain: bool = False) -> bytes:
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + b"\x00" + payload
    return _packet((PUBLISH << 4) | (qos << 1) | (1 if retain else 0), body)


def puback_packet(pid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", pid)


class PacketReader:
    """Splits a byte stream into (type, flags, body) packets; keeps an incomplete tail.

    ``pending`` holds packets that arrived behind a CONNACK/SUBACK during the
    handshake; the caller handles them before reading more.
    """

    def __init__(self) -> None:
        self.buf = b""
        self.pending: list[tuple[int, int, bytes]] = []

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf + data if self.buf else data
        n, pos = len(buf), 0
        out = []
        while pos + 2 <= n:
            first = buf[pos]
            # remaining length: 1-4 bytes, 7 bits each
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= n:
                    self.buf = buf[pos:]
                    return out
                b = buf[i]
                length += (b & 0x7F) * mult
                i += 1
                if b < 0x80:
                    break
                mult <<= 7
                if mult > 1 << 21:
                    raise WireError("malformed packet length from broker", 0x81)
            end = i + length
            if end > n:
                break
            out.append((first >> 4, first & 0x0F, buf[i:end]))
            pos = end
        self.buf = buf[pos:]
        return out


    def feed_split(self, data: bytes) -> tuple[list[tuple[str, int, bytes, int]], list[tuple[int, int, bytes]]]:
        """Like :meth:`feed`, with PUBLISH packets parsed on the spot: ``(publishes, others)``.

        ``publishes`` are ``(topic, packet id or 0, payload, retain flag)`` in
        arrival order, ``others`` the remaining packets as :meth:`feed` returns
        them. Why: the ingest's hot path; parsing in place copies each payload
        once (not body, then payload) and makes no per-packet tuple it drops.
        """
        buf = self.buf + data if self.buf else data
        n, pos = len(buf), 0
        pubs: list[tuple[str, int, bytes, int]] = []
        others: list[tuple[int, int, bytes]] = []
        try:
            while pos + 2 <= n:
                first = buf[pos]
                b = buf[pos + 1]
                if b < 0x80:
                    length, i = b, pos + 2
                else:  # remaining length: 1-4 bytes, 7 bits each
                    length, mult, i = b & 0x7F, 128, pos + 2
                    while True:
                        if i >= n:
                            self.buf = buf[pos:]
                            return pubs, others
                        b = buf[i]
                        length += (b & 0x7F) * mult
                        i += 1
                        if b < 0x80:
                            break
                        mult <<= 7
                        if mult > 1 << 21:
                            raise WireError("malformed packet length from broker", 0x81)
                end = i + length
                if end > n:
                    break
                if first >> 4 == PUBLISH:
                    t = i + 2 + ((buf[i] << 8) | buf[i + 1])
                    topic = buf[i + 2:t].decode(errors="replace")  # (not UTF-8: the ingest refuses it as bad_topic)
                    pid = 0
                    if first & 0x06:
                        pid = (buf[t] << 8) | buf[t + 1]
                        t += 2
                    plen = buf[t]
                    if plen < 0x80:
                        t += 1 + plen
                    else:  # multi-byte property length (only with many user properties)
                        plen, mult = 0, 1
                        while True:
                            b = buf[t]
                            t += 1
                            plen += (b & 0x7F) * mult
                            mult <<= 7
                            if b < 0x80:
                                break
                        t += plen
                    if t > end:
                        raise IndexError
                    pubs.append((topic, pid, buf[t:end], first & 0x01))
                else:
                    others.append((first >> 4, first & 0x0F, buf[i:end]))
                pos = end
        except IndexError:
            raise WireError("malformed PUBLISH packet from broker", 0x81) from None
        self.buf = buf[pos:]
        return pubs, others


def parse_publish(flags: int, body: bytes) -> tuple[str, int, bytes, bool]:
    """PUBLISH body → (topic, packet id or 0, payload, retain); properties are skipped."""
    tlen = (body[0] << 8) | body[1]
    topic = body[2:2 + tlen].decode(errors="replace")  # (not UTF-8: the ingest refuses it as bad_topic)
    pos = 2 + tlen
    pid = 0
    if flags & 0x06:
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    plen = body[pos]
    if plen < 0x80:
        pos += 1 + plen
    else:  # multi-byte property length (only with many user properties)
        length, mult = 0, 1
        while True:
            b = body[pos]
            pos += 1
            length += (b & 0x7F) * mult
            mult <<= 7
            if b < 0x80:
                break
        pos += length
    return topic, pid, body[pos:], bool(flags & 0x01)


def open_socket(host: str, port: int, tls: Optional[ssl.SSLContext] = None, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    return sock


def handshake(sock: socket.socket, connect: bytes, timeout: float = 10.0) -> PacketReader:
    """Send CONNECT, wait for CONNACK; raises :class:`WireError` with the broker's reason."""
    sock.sendall(connect)
    reader = PacketReader()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            raise WireError("the broker closed the connection before CONNACK")
        packets = reader.feed(data)
        if packets:
            ptype, _flags, body = packets[0]
            if ptype != CONNACK:
                raise WireError(f"expected CONNACK, got packet type {ptype}", 0x82)
            code = body[1]
            if code:
                raise WireError(f"connection refused: {reason_text(code)}", code)
            reader.pending.extend(packets[1:])
            return reader
    raise WireError("no CONNACK from the broker in time")


def wait_suback(sock: socket.socket, reader: PacketReader, pid: int, timeout: float = 10.0) -> list[int]:
    """Wait for the SUBACK of ``pid``; returns granted QoS per filter, raises on a refusal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            raise WireError("the broker closed the connection before SUBACK")
        packets = reader.feed(data)
        for k, (ptype, _flags, body) in enumerate(packets):
            if ptype == SUBACK and (body[0] << 8 | body[1]) == pid:
                plen = body[2]  # short property lists only (mosquitto sends none)
                codes = list(body[3 + plen:])
                bad = [c for c in codes if c >= 0x80]
                if bad:
                    raise WireError(f"subscription refused: {reason_text(bad[0])}", bad[0])
                reader.pending.extend(packets[k + 1:])
                return codes
            reader.pending.append((ptype, _flags, body))
    raise WireError("no SUBACK from the broker in time")


class WireConnection:
    """A connected, CONNACKed socket; :meth:`subscribe` then read packets with ``reader``."""

    def __init__(self, sock: socket.socket, reader: PacketReader, keepalive: int):
        self.sock = sock
        self.reader = reader
        self.keepalive = keepalive
        self._pid = 0

    @classmethod
    def connect(cls, host: str, port: int, packet: bytes, keepalive: int, tls: Optional[ssl.SSLContext] = None,
                timeout: float = 10.0) -> "WireConnection":
        sock = open_socket(host, port, tls, timeout)
        try:
            reader = handshake(sock, packet, timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, reader, keepalive)

    def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        self._pid = self._pid % 65535 + 1
        self.sock.sendall(subscribe_packet(self._pid, filters))
        return wait_suback(self.sock, self.reader, self._pid, timeout)

    def close(self) -> None:
        try:
            self.sock.sendall(DISCONNECT_PACKET)
        except OSError:
            pass  # already gone: closing is all that is left to do
        self.sock.close()
