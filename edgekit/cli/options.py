"""The options several commands share, defined once: --json, --verbose, keyring, signing key, MQTT broker."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout (errors too); nothing else goes there")
VerboseOpt = typer.Option(0, "--verbose", "-v", count=True,
                          help="Show third-party output and edgekit's log on stderr (-vv: debug)")
KeyringOpt = typer.Option(None, "--keyring", help="Trusted public key (.pub) or a directory of them "
                          "[default: $EDGEKIT_KEYRING or /etc/edgekit/keys]")
SigningKeyOpt = typer.Option(None, "--key", envvar="EDGEKIT_SIGNING_KEY",
                             help="Signing key (.key) [default: $EDGEKIT_SIGNING_KEY]")

# MQTT broker (fleet, flash, rollback, bench --device)
BrokerOpt = typer.Option("mqtt://127.0.0.1:1883", "--broker", "-b", envvar="EDGEKIT_BROKER",
                         help="mqtt://host[:port] or mqtts://host[:port] (TLS)")
UserOpt = typer.Option(None, "--username", "-u", envvar="EDGEKIT_MQTT_USERNAME", help="MQTT user name")
PasswordOpt = typer.Option(None, "--password", envvar="EDGEKIT_MQTT_PASSWORD",
                           help="MQTT password [default: $EDGEKIT_MQTT_PASSWORD]")
CaOpt = typer.Option(None, "--cafile", help="CA certificate (PEM) that signed the broker's certificate")
CertOpt = typer.Option(None, "--cert", help="Client certificate (PEM), with its private key")
# `fleet` commands name the client certificate's key --key; `flash`/`rollback` use --key for the
# signing key, so there it is --cert-key.
CertKeyOpt = typer.Option(None, "--key", help="Client certificate's private key (PEM)")
CertKeyFlashOpt = typer.Option(None, "--cert-key", help="Private key of --cert (MQTT client certificate)")

# The fleet store
DbOpt = typer.Option("fleet.db", "--db", envvar="EDGEKIT_FLEET_DB",
                     help="Fleet store: a SQLite file, or a PostgreSQL server as postgresql://USER@HOST/DB")
FleetOpt = typer.Option(None, "--fleet", "-f", help="Fleet name (when a device name is in several)")


def broker_settings(broker: str, username: Optional[str] = None, password: Optional[str] = None,
                    cafile: Optional[Path] = None, cert: Optional[Path] = None, cert_key: Optional[Path] = None,
                    keepalive: int = 30):
    """The broker options as :class:`~edgekit.fleet.connection.BrokerSettings`."""
    from ..fleet.connection import BrokerSettings

    return BrokerSettings.from_url(broker, username=username, password=password, cafile=cafile, certfile=cert,
                                   keyfile=cert_key, keepalive=keepalive).with_password_from_env()


def keyring(path: Optional[Path]):
    """The trusted keys of ``--keyring``, else the default keyring ($EDGEKIT_KEYRING, /etc/edgekit/keys)."""
    from edgekit_runtime.keyring import Keyring

    return Keyring.from_paths(path) if path else Keyring.default()


def parse_input_shape(text: Optional[str]) -> Optional[list[int]]:
    """``--input-shape 1,3,224,224`` (or ``1x3x224x224``) → ints."""
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} is not like 1,3,224,224") from None
