"""Read and verify a bundle before anything from it is used.

Order of checks (everything happens before a single byte is written to disk):

1. the file is a complete ZIP (a cut download is reported as truncated);
2. every member name is safe and canonical (one name per file: no absolute path,
   no ``.``/``..``/empty component, no ``\\``, NFC, length limits), no link or special
   file, no duplicate or alias, no file that is also another member's folder, at
   most ``MAX_MEMBERS`` members;
3. ``manifest.json`` declares a format this runtime reads (major version);
4. ``signature.json`` verifies against a trusted key over the manifest bytes;
5. the manifest parses into the typed :class:`~.contract.manifest.Manifest`;
6. the archive holds exactly the files the manifest lists, each with the listed
   size and sha256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import bundle_spec as spec
from .contract.errors import BundleError, ErrorCode
from .contract.manifest import Manifest
from .keyring import Keyring

_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_REBUILD = "the bundle was not written by edgekit's bundle writer: rebuild it with `edgekit build`"


@dataclass
class VerifiedBundle:
    """A bundle whose signature and member hashes have been checked.

    ``manifest`` is the typed manifest; ``manifest_json`` the signed JSON object as
    written, with any fields of a newer 1.x minor that this runtime does not know (for
    JSON output and inspection).
    """

    path: Path
    manifest: Manifest
    manifest_json: dict[str, Any] = field(repr=False)
    key_id: str
    members: dict[str, bytes] = field(repr=False)

    def extract(self, dest: str | os.PathLike) -> Path:
        """Write the verified members (and the manifest) under ``dest``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for name, data in self.members.items():
            target = dest / name
            if not (root / name).resolve().is_relative_to(root):  # names were checked; a symlinked folder was not
                raise BundleError(f"member {name!r} would be written outside {dest}",
                                  code=ErrorCode.BUNDLE_UNSAFE_MEMBER)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (dest / spec.MANIFEST_NAME).write_text(json.dumps(self.manifest_json, indent=2))
        return dest

    def extract_temp(self) -> Path:
        """Extract into a new temporary folder (the caller removes it; removed here if extracting fails)."""
        folder = tempfile.mkdtemp(prefix="edgekit-bundle-")
        try:
            return self.extract(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def _check_member_name(info: zipfile.ZipInfo) -> None:
    name = info.filename
    mode = info.external_attr >> 16
    if info.is_dir():
        raise BundleError(f"directory entry {name!r} not allowed", code=ErrorCode.BUNDLE_UNSAFE_MEMBER)
    problem = spec.member_name_problem(name)
    if problem is not None:
        raise BundleError(f"unsafe member path {name[:300]!r}: the name {problem}",
                          code=ErrorCode.BUNDLE_UNSAFE_MEMBER, hint=_REBUILD)
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise BundleError(
            f"member {name!r} is a link or special file (mode {oct(mode)})",
            code=ErrorCode.BUNDLE_UNSAFE_MEMBER,
        )


def _check_members(infos: list[zipfile.ZipInfo]) -> set[str]:
    """Every member name safe and canonical, no two naming one file, no file also a folder; the names."""
    if len(infos) > spec.MAX_MEMBERS:
        raise BundleError(f"the archive has {len(infos)} members (at most {spec.MAX_MEMBERS})",
                          code=ErrorCode.BUNDLE_UNSAFE_MEMBER, hint=_REBUILD)
    seen: set[str] = set()
    for info in infos:
        _check_member_name(info)
        if info.filename in seen:
            raise BundleError(f"duplicate member {info.filename!r}", code=ErrorCode.BUNDLE_UNSAFE_MEMBER)
        seen.add(info.filename)
    problem = spec.member_set_problem(seen)
    if problem is not None:
        raise BundleError(problem, code=ErrorCode.BUNDLE_UNSAFE_MEMBER, hint=_REBUILD)
    return seen


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist", code=ErrorCode.BUNDLE_UNREADABLE) from None
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head and _ZIP_LOCAL_MAGIC.startswith(head):
            raise BundleError(
                f"{path} is truncated (the archive's directory is missing)",
                code=ErrorCode.BUNDLE_TRUNCATED,
                hint="download or copy the bundle again",
            ) from None
        raise BundleError(f"{path} is not an edgekit bundle (not a ZIP archive)") from None


def _read(zf: zipfile.ZipFile, name: str) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, EOFError, OSError, binascii.Error, zlib.error) as exc:
        # A cut-off member, a CRC mismatch or a corrupt deflate stream: the file was damaged in transit.
        raise BundleError(
            f"member {name!r} cannot be read ({exc})",
            code=ErrorCode.BUNDLE_TRUNCATED,
            hint="download or copy the bundle again",
        ) from None


def _manifest_json(data: bytes) -> dict[str, Any]:
    """``manifest.json``'s bytes as a JSON object, or BUNDLE_BAD_MANIFEST."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json is not JSON ({exc})", code=ErrorCode.BUNDLE_BAD_MANIFEST) from None
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json is not an object", code=ErrorCode.BUNDLE_BAD_MANIFEST)
    return manifest


def read_manifest_unverified(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest, *without* verification: for inspection tools only."""
    with _open_zip(Path(path)) as zf:
        if spec.MANIFEST_NAME not in zf.namelist():
            raise BundleError("manifest.json is missing", code=ErrorCode.BUNDLE_BAD_MANIFEST)
        return _manifest_json(_read(zf, spec.MANIFEST_NAME))


def open_bundle(path: str | os.PathLike, keyring: Keyring | None = None) -> VerifiedBundle:
    """Verify ``path`` completely and return its contents held in memory.

    ``keyring`` defaults to :meth:`Keyring.default` (``$EDGEKIT_KEYRING`` or
    ``/etc/edgekit/keys``). Raises :class:`BundleError` with a stable code.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        seen = _check_members(zf.infolist())
        if spec.MANIFEST_NAME not in seen:
            raise BundleError("manifest.json is missing", code=ErrorCode.BUNDLE_BAD_MANIFEST)
        manifest_bytes = _read(zf, spec.MANIFEST_NAME)
        manifest = _manifest_json(manifest_bytes)
        spec.check_format_version(manifest)

        if spec.SIGNATURE_NAME not in seen:
            raise BundleError(
                "bundle is unsigned (no signature.json)",
                code=ErrorCode.BUNDLE_UNSIGNED,
                hint="sign it on the host with `edgekit bundle sign`",
            )
        try:
            sig = json.loads(_read(zf, spec.SIGNATURE_NAME))
            signature = base64.b64decode(sig["signature"], validate=True)
            key_id = sig["key_id"]
            algorithm = sig["algorithm"]
            if not isinstance(key_id, str):
                raise TypeError(f"key_id is a {type(key_id).__name__}")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise BundleError(f"signature.json is malformed ({exc})", code=ErrorCode.BUNDLE_UNSIGNED) from None
        if algorithm != spec.SIGNATURE_ALGORITHM:
            raise BundleError(
                f"signature algorithm {algorithm!r} is not supported", code=ErrorCode.BUNDLE_BAD_SIGNATURE
            )
        (keyring or Keyring.default()).verify(key_id, signature, manifest_bytes)

        typed = Manifest.from_dict(manifest)
        if typed.signing.key_id != key_id:
            raise BundleError(
                "signature key id differs from the manifest's signing.key_id",
                code=ErrorCode.BUNDLE_BAD_SIGNATURE,
            )
        listed = typed.files
        present = seen - spec.RESERVED_NAMES
        for name in sorted(present - set(listed)):
            raise BundleError(
                f"member {name!r} is not listed in the manifest", code=ErrorCode.BUNDLE_UNLISTED_MEMBER
            )
        for name in sorted(set(listed) - present):
            raise BundleError(
                f"member {name!r} listed in the manifest is missing", code=ErrorCode.BUNDLE_MISSING_MEMBER
            )
        members: dict[str, bytes] = {}
        for name, entry in listed.items():
            if zf.getinfo(name).file_size != entry.size:
                # Checked before decompressing, so a swapped-in zip bomb is never inflated.
                raise BundleError(
                    f"member {name!r} does not match its size in the signed manifest",
                    code=ErrorCode.BUNDLE_TAMPERED,
                )
            data = _read(zf, name)
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise BundleError(
                    f"member {name!r} does not match its sha256 in the signed manifest",
                    code=ErrorCode.BUNDLE_TAMPERED,
                )
            members[name] = data
    return VerifiedBundle(path=path, manifest=typed, manifest_json=manifest, key_id=key_id, members=members)
