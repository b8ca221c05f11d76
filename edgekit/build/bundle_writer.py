"""Write and sign bundles (format: ``edgekit_runtime.contract.bundle_spec``, ``docs/bundle-format.md``)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit_runtime.contract import bundle_spec as spec
from edgekit_runtime.bundle import read_manifest_unverified
from edgekit_runtime.contract.manifest import Manifest
from edgekit_runtime.keyring import key_id_of

from ..errors import EdgekitError, VerificationError

# Fixed timestamp for members so the same inputs give the same archive bytes.
_ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o100644 << 16  # regular file, rw-r--r--
    return info


def write_bundle(out: Path, manifest: Manifest | dict[str, Any], members: dict[str, bytes],
                 key: Ed25519PrivateKey) -> Path:
    """Fill in ``files`` and ``signing``, sign the manifest, and write the archive atomically.

    ``manifest`` is the typed
    :class:`~edgekit_runtime.contract.manifest.Manifest` the pipeline builds; a plain dict is
    accepted for tests that write deliberately odd bundles.
    """
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    for name in members:
        if name in spec.RESERVED_NAMES or name.startswith("/") or ".." in name.split("/"):
            raise EdgekitError(f"bad bundle member name {name!r}")
    manifest = dict(manifest)
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in sorted(members.items())
    }
    manifest["signing"] = {"algorithm": spec.SIGNATURE_ALGORITHM, "key_id": key_id_of(key.public_key())}
    spec.validate_manifest(manifest)
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    signature = {
        "algorithm": spec.SIGNATURE_ALGORITHM,
        "key_id": manifest["signing"]["key_id"],
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            zf.writestr(_zipinfo(spec.MANIFEST_NAME), manifest_bytes)
            zf.writestr(_zipinfo(spec.SIGNATURE_NAME), json.dumps(signature, indent=2).encode())
            for name, data in sorted(members.items()):
                zf.writestr(_zipinfo(name), data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; devices' service users must read bundles
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def resign_bundle(path: Path, key: Ed25519PrivateKey, out: Path | None = None, keyring=None) -> Path:
    """Re-sign an existing bundle with ``key`` (e.g. after a key rotation).

    With ``keyring`` (an ``edgekit_runtime.Keyring``) the old signature must
    verify first: use it whenever the old key is still known. Without it the
    member hashes are still checked against the old manifest, so a bundle whose
    files were changed is not laundered by a new signature.
    """
    if keyring is not None:
        from edgekit_runtime.bundle import open_bundle

        open_bundle(path, keyring)
    manifest = read_manifest_unverified(path)
    spec.check_format_version(manifest)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n not in spec.RESERVED_NAMES}
    for name, entry in manifest.get("files", {}).items():
        data = members.get(name)
        if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise VerificationError(f"{path}: member {name!r} does not match its manifest hash; refusing to sign")
    if set(members) != set(manifest.get("files", {})):
        raise VerificationError(f"{path}: members differ from the manifest's file list; refusing to sign")
    return write_bundle(out or path, manifest, members, key)
