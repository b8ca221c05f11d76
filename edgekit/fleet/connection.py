"""Where the broker is and how to log in: one settings object for every fleet command.

``mqtt://host:port`` or ``mqtts://host:port`` (TLS; ``cafile`` verifies the
broker, ``certfile``/``keyfile`` are a client certificate), a username and a
password. Connection failures become :class:`FleetConnectionError` with the
broker's reason and what to check, for paho clients and for :mod:`.wire` alike.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError, EdgekitError, ExitCode
from . import wire

SCHEMES = {"mqtt": (1883, False), "mqtts": (8883, True)}

# what to check, per MQTT v5 reason code of a refused CONNECT (CONNACK) or SUBSCRIBE (SUBACK)
_CREDENTIALS = ("check --username and --password (or $EDGEKIT_MQTT_PASSWORD), or the client certificate, "
                "against the broker's password file and ACL")
_ADVICE = {
    ("connection", 0x84): "the broker does not speak MQTT v5; upgrade it (Mosquitto >= 1.6)",
    ("connection", 0x85): "the client id was refused; pick another --client-id",
    # Mosquitto answers a wrong password with 0x87 "not authorized", others with 0x86
    ("connection", 0x86): _CREDENTIALS,
    ("connection", 0x87): _CREDENTIALS,
    ("connection", 0x88): "the broker is not accepting connections right now; try again later",
    ("connection", 0x8A): "this client is banned by the broker",
    ("connection", 0x8C): "the broker expects another authentication method",
    ("subscription", 0x87): "this user may not read the fleet's topics; the ACL must give monitors "
                            "`topic read edgekit/v1/#`",
    ("subscription", 0x8F): "the broker refused the topic filter; check --fleet and --group",
    ("subscription", 0x9E): "the broker does not allow shared subscriptions; run one monitor with --no-share",
}
_V311_TO_V5 = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


class FleetConnectionError(EdgekitError):
    """The broker could not be reached, or refused us; the message says what to check."""

    exit_code = ExitCode.DEVICE

    def __init__(self, message: str, reason: Optional[int] = None):
        super().__init__(message)
        self.reason = reason


def refusal_message(address: str, reason: int, what: str = "connection") -> str:
    """``broker mqtt://h:p refused the connection: bad user name or password (0x86) — check ...``."""
    advice = _ADVICE.get((what, reason))
    return (f"broker {address} refused the {what}: {wire.reason_text(reason)}"
            + (f" — {advice}" if advice else ""))


def paho_reason_code(reason_code: Any) -> int:
    """The numeric MQTT v5 reason code of whatever paho passed to on_connect (v5 ReasonCode or v3 int)."""
    value = getattr(reason_code, "value", reason_code)
    value = int(value)
    if getattr(reason_code, "packetType", None) is None and value in _V311_TO_V5:
        return _V311_TO_V5[value]
    return value


@dataclass
class BrokerSettings:
    """How to reach and log into the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    cafile: Optional[Path] = None
    certfile: Optional[Path] = None
    keyfile: Optional[Path] = None
    username: Optional[str] = None
    password: Optional[str] = None
    keepalive: int = 30
    connect_timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "BrokerSettings":
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in SCHEMES:
            raise ConfigError(f"broker {url!r} must be mqtt://host[:port] or mqtts://host[:port]")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"broker {url!r} must be scheme://host[:port]")
        default_port, tls = SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"broker {url!r} has an invalid port") from None
        if parts.username and "username" not in kwargs:
            kwargs["username"] = parts.username
        if parts.password and "password" not in kwargs:
            kwargs["password"] = parts.password
        settings = cls(host=parts.hostname or "127.0.0.1", port=port, tls=tls, **kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        if (self.cafile or self.certfile) and not self.tls:
            raise ConfigError("--cafile/--cert are for TLS: use an mqtts:// broker address")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("--cert and --key go together (the client certificate and its private key)")
        for name in ("cafile", "certfile", "keyfile"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"{name} {p} does not exist")
        if self.password is not None and self.username is None:
            raise ConfigError("a password was given without --username")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def with_password_from_env(self) -> "BrokerSettings":
        if self.username is not None and self.password is None and os.environ.get("EDGEKIT_MQTT_PASSWORD"):
            self.password = os.environ["EDGEKIT_MQTT_PASSWORD"]
        return self

    # -- TLS -------------------------------------------------------------------------------
    def ssl_context(self) -> Optional[ssl.SSLContext]:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)
        if self.certfile:
            try:
                ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"client certificate {self.certfile} / key {self.keyfile} cannot be used "
                                  f"({exc})") from None
        return ctx

    # -- clients ---------------------------------------------------------------------------
    def open_wire(self, client_id: str, *, clean_start: bool = True, session_expiry: int = 0,
                  will: Optional[wire.Will] = None) -> wire.WireConnection:
        """A connected :class:`~.wire.WireConnection`; raises ``OSError``/``WireError`` (see :meth:`connection_error`)."""
        packet = wire.connect_packet(client_id, self.keepalive, clean_start, self.username, self.password,
                                     session_expiry=session_expiry, will=will)
        return wire.WireConnection.connect(self.host, self.port, packet, self.keepalive, self.ssl_context(),
                                           self.connect_timeout)

    def connection_error(self, exc: BaseException) -> FleetConnectionError:
        """A clear error for a failed connection attempt (refusal, TLS failure, unreachable)."""
        if isinstance(exc, wire.WireError) and exc.reason is not None:
            what = "subscription" if "subscription" in str(exc) else "connection"
            return FleetConnectionError(refusal_message(self.url, exc.reason, what), exc.reason)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return FleetConnectionError(f"TLS: the certificate of {self.url} is not trusted ({exc.verify_message}) "
                                        "— pass the CA that signed it with --cafile")
        if isinstance(exc, ssl.SSLError) and ("CERTIFICATE_REQUIRED" in str(exc.reason or exc)
                                              or self.certfile is None):
            # (TLS 1.3 reports a missing client certificate after the handshake, often as a bare EOF)
            return FleetConnectionError(f"TLS with {self.url} failed ({exc.reason or exc}) — if the broker requires "
                                        "client certificates (require_certificate), pass --cert and --key "
                                        "(firmware/mosquitto/make-certs.sh issues them)")
        if isinstance(exc, ssl.SSLError):
            return FleetConnectionError(f"TLS handshake with {self.url} failed ({exc.reason or exc}) — is it an "
                                        "mqtts:// listener, and does it accept this client certificate?")
        if isinstance(exc, ConnectionRefusedError):
            return FleetConnectionError(f"nothing listens at {self.url} — start a broker (`edgekit broker`) or "
                                        "fix --broker")
        if isinstance(exc, (TimeoutError, OSError)) and not isinstance(exc, wire.WireError):
            return FleetConnectionError(f"cannot reach the broker at {self.url} ({exc})")
        hint = (" — if it requires client certificates, pass --cert and --key" if self.tls and self.certfile is None
                else "")
        return FleetConnectionError(f"broker {self.url}: {exc}{hint}")

    def paho_client(self, client_id: str, *, clean_start: bool = True, userdata: Any = None):
        """A configured paho-mqtt 2.x client (MQTT v5, credentials, TLS); not yet connected."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             userdata=userdata)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        ctx = self.ssl_context()
        if ctx is not None:
            client.tls_set_context(ctx)
        return client
