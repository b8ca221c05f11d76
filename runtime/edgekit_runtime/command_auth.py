"""Signed fleet commands: who may tell a device to install or roll back a model.

Anyone who can publish on a device's ``cmd`` topic could otherwise point it at
another bundle URL or roll it back. Commands that change what a device runs
(``install``, ``rollback``) therefore carry an ed25519 signature by a key in the
device's keyring (the same keys that sign bundles), over a canonical JSON of::

    {"fleet", "device", "request_id", "command", "args", "expires_ts"}

so a signed command cannot be replayed to another device, changed in flight, or
kept beyond its expiry. The signature travels in the command body::

    "auth": {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

The host signs with :func:`sign_command` (it needs the private key); devices
check with :func:`verify_command`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .contract.errors import ErrorCode, RuntimeErrorBase
from .keyring import Keyring, key_id_of

ALGORITHM = "ed25519"
SIGNED_COMMANDS = frozenset({"install", "rollback"})
# Signed commands must expire within this: a device remembers every signed request id until it
# expires (so none runs twice), and this bounds that memory.
MAX_COMMAND_LIFETIME_S = 30 * 86400


class CommandAuthError(RuntimeErrorBase):
    """A command that must be signed is not, or its signature does not verify."""

    code = ErrorCode.CONFIG_UNAUTHORIZED


def signing_payload(fleet: str, device: str, body: dict[str, Any]) -> bytes:
    """The exact bytes that are signed for ``body`` sent to ``fleet``/``device``."""
    signed = {"fleet": fleet, "device": device, "request_id": body.get("request_id"),
              "command": body.get("command"), "args": body.get("args") or {}, "expires_ts": body.get("expires_ts")}
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_command(fleet: str, device: str, body: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """``body`` with an ``auth`` field: the signature of :func:`signing_payload` by ``private_key``."""
    signature = private_key.sign(signing_payload(fleet, device, body))
    return {**body, "auth": {"algorithm": ALGORITHM, "key_id": key_id_of(private_key.public_key()),
                             "signature": base64.b64encode(signature).decode()}}


def verify_command(fleet: str, device: str, body: dict[str, Any], keyring: Keyring) -> str:
    """The key id that signed ``body``; raises :class:`CommandAuthError` if it is not trusted and valid."""
    auth = body.get("auth")
    if not isinstance(auth, dict):
        raise CommandAuthError(f"the {body.get('command')!r} command is not signed",
                               hint="send it with `edgekit flash`/`edgekit rollback`, which sign with --key")
    if auth.get("algorithm") != ALGORITHM:
        raise CommandAuthError(f"command signature algorithm {auth.get('algorithm')!r} is not {ALGORITHM}")
    key_id = auth.get("key_id")
    key = keyring.keys.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise CommandAuthError(f"the command is signed by key {key_id}, which is not in the device keyring "
                               f"({', '.join(sorted(keyring.keys)) or 'empty'})",
                               hint="sign with a key whose .pub is in the device's keyring")
    try:
        signature = base64.b64decode(auth.get("signature") or "", validate=True)
        key.verify(signature, signing_payload(fleet, device, body))
    except (binascii.Error, ValueError, TypeError):
        raise CommandAuthError("the command signature is not valid base64") from None
    except Exception as exc:  # cryptography's InvalidSignature
        if type(exc).__name__ != "InvalidSignature":
            raise
        raise CommandAuthError("the command signature does not verify: the command was changed after signing, "
                               "or was signed for another device") from None
    return key_id
