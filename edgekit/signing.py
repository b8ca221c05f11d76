"""ed25519 signing keys on the host.

``edgekit keys generate`` writes ``NAME.key`` (PKCS#8 PEM, mode 0600) and
``NAME.pub`` (the file devices put in their keyring). The key used to sign is
``--key``, else ``$EDGEKIT_SIGNING_KEY``; there is no silent default key.
A private key written inside a git work tree is one ``git add`` away from being
published: :func:`private_key_warning` says so (the CLI prints it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit_runtime.keyring import key_id_of

from .errors import SigningError

SIGNING_KEY_ENV = "EDGEKIT_SIGNING_KEY"


def generate_keypair(directory: Path, name: str = "edgekit", overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (private, mode 0600) and ``NAME.pub`` under ``directory``; returns them and the key id."""
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


def git_work_tree_of(path: Path) -> Optional[Path]:
    """The top of the git work tree that holds ``path`` (a ``.git`` folder or file above it), or None."""
    path = Path(path).resolve()
    for folder in [path, *path.parents]:
        if (folder / ".git").exists():
            return folder
    return None


def git_ignores(path: Path, work_tree: Path) -> Optional[bool]:
    """Whether git ignores ``path`` in ``work_tree`` (``git check-ignore``); None when git cannot tell."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run([git, "check-ignore", "-q", str(Path(path).resolve())], cwd=work_tree,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: True, 1: False}.get(out.returncode)  # 128: not a repository git can read


def private_key_warning(path: Path) -> Optional[str]:
    """A warning when the private key at ``path`` lies inside a git work tree, else None."""
    tree = git_work_tree_of(path)
    if tree is None:
        return None
    ignored = git_ignores(path, tree)
    where = f"private key {path} is inside the git work tree {tree}"
    if ignored:
        return (f"{where} (git ignores it there); keep it out of copies and archives of the tree, or "
                f"keep keys outside it (--out ~/.config/edgekit/keys)")
    state = "git does not ignore it" if ignored is False else "git could not say whether it ignores it"
    return (f"{where} and {state}: one `git add` publishes it. Add it to .gitignore (keys/, *.key) or "
            f"keep keys outside the tree (--out ~/.config/edgekit/keys)")


def load_private_key(path: Path | None) -> Ed25519PrivateKey:
    """The ed25519 key at ``path``, else at ``$EDGEKIT_SIGNING_KEY``; a :class:`SigningError` says what to do."""
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
