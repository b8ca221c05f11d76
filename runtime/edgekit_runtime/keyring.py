"""Trusted ed25519 public keys on the device.

A device holds a *keyring*: a directory of PEM public keys. A bundle names the
key that signed it by ``key_id`` (the first 16 hex digits of the sha256 of the
raw 32-byte public key), so keys can rotate: ship the new public key, sign with
the new private key, retire the old file later.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .contract.errors import BundleError, ErrorCode, RuntimeConfigError

KEYRING_ENV = "EDGEKIT_KEYRING"
DEFAULT_KEYRING = Path("/etc/edgekit/keys")


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise RuntimeConfigError(
            f"{path} is not a PEM public key ({exc})",
            code=ErrorCode.CONFIG_NO_KEYRING,
            hint="use the .pub file written by `edgekit keys generate`",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise RuntimeConfigError(f"{path} is not an ed25519 key", code=ErrorCode.CONFIG_NO_KEYRING)
    return key


class Keyring:
    """A set of trusted public keys, looked up by key id."""

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None):
        self.keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    @classmethod
    def from_paths(cls, *paths: str | os.PathLike) -> "Keyring":
        """Load ``*.pub`` files; a directory contributes every ``*.pub`` in it."""
        ring = cls()
        for path in paths:
            path = Path(path)
            files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
            if not path.exists():
                raise RuntimeConfigError(
                    f"keyring path {path} does not exist",
                    code=ErrorCode.CONFIG_NO_KEYRING,
                    hint=f"copy the host's public key (*.pub) there, or set {KEYRING_ENV}",
                )
            for file in files:
                key = load_public_key(file)
                ring.keys[key_id_of(key)] = key
        return ring

    @classmethod
    def default(cls) -> "Keyring":
        """``$EDGEKIT_KEYRING`` (``os.pathsep``-separated) or ``/etc/edgekit/keys``."""
        env = os.environ.get(KEYRING_ENV)
        paths = [p for p in env.split(os.pathsep) if p] if env else [DEFAULT_KEYRING]
        ring = cls.from_paths(*paths)
        if not ring.keys:
            raise RuntimeConfigError(
                f"no trusted keys found in {', '.join(map(str, paths))}",
                code=ErrorCode.CONFIG_NO_KEYRING,
                hint=f"install the signer's public key (*.pub) there or set {KEYRING_ENV}",
            )
        return ring

    def verify(self, key_id: str, signature: bytes, message: bytes) -> None:
        key = self.keys.get(key_id)
        if key is None:
            raise BundleError(
                f"bundle is signed by key {key_id}, which is not in the device keyring "
                f"({', '.join(sorted(self.keys)) or 'empty'})",
                code=ErrorCode.BUNDLE_UNTRUSTED_KEY,
                hint="add the signer's public key to the keyring, or re-sign with a trusted key",
            )
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise BundleError(
                "manifest signature does not verify: the manifest was changed after signing",
                code=ErrorCode.BUNDLE_BAD_SIGNATURE,
            ) from None
