"""ed25519 signing keys on the host.

``edgekit keys generate`` writes ``NAME.key`` (PKCS#8 PEM, mode 0600) and
``NAME.pub`` (the file devices put in their keyring). The key used to sign is
``--key``, else ``$EDGEKIT_SIGNING_KEY``; there is no silent default key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit_runtime.keyring import key_id_of

from .errors import SigningError

SIGNING_KEY_ENV = "EDGEKIT_SIGNING_KEY"


def generate_keypair(directory: Path, name: str = "edgekit", overwrite: bool = False) -> tuple[Path, Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if priv_path.exists() and not overwrite:
        raise SigningError(f"{priv_path} exists; refusing to overwrite a signing key (pass --force)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key()
    pub_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id_of(pub)


def load_private_key(path: Path | None) -> Ed25519PrivateKey:
    if path is None:
        env = os.environ.get(SIGNING_KEY_ENV)
        if not env:
            raise SigningError(
                f"no signing key: pass --key or set {SIGNING_KEY_ENV} "
                f"(create one with `edgekit keys generate --out keys/`)"
            )
        path = Path(env)
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise SigningError(f"signing key {path} does not exist (create one with `edgekit keys generate`)") from None
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an ed25519 key")
    return key
