"""The bundle format: the one contract between the host compiler and the device.

Written down for people in ``docs/bundle-format.md``; this module is the
machine-checked version of the same text. Rules (as ExecuTorch keeps for its
flatbuffer schema):

* fields are only ever appended; a field is never repurposed or retyped;
* a reader accepts any ``1.x`` bundle and ignores fields it does not know;
* a new *major* version is for changes an old reader would misread, and an old
  reader refuses it (``BUNDLE_UNSUPPORTED_VERSION``) instead of guessing.

A bundle (``*.ekb``) is a ZIP archive with exactly these members:

* ``manifest.json`` — UTF-8 JSON, typed by :class:`~edgekit_runtime.contract.manifest.Manifest`;
* ``signature.json`` — ``{"algorithm": "ed25519", "key_id": ..., "signature": base64}``
  over the exact bytes of ``manifest.json``;
* every file named in ``manifest["files"]`` (with its sha256 and size), and
  nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import BundleError, ErrorCode

if TYPE_CHECKING:
    from .manifest import Manifest

FORMAT_NAME = "edgekit-bundle"
# 1.1 appended optional fields (the build report: fidelity, gates, stages, latency gating,
# accuracy direction); a 1.0 bundle still parses, a 1.0 reader ignores what 1.1 added.
# 1.2 added the "tensor" preprocessing kind (preprocess.size is then absent): a 1.1 reader
# refuses such a bundle (size missing) instead of misreading it; image bundles are unchanged.
FORMAT_VERSION = "1.2"
SUPPORTED_MAJOR = 1

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
SIGNATURE_ALGORITHM = "ed25519"
BUNDLE_SUFFIX = ".ekb"

DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int32", "int64", "bool"})
PRECISIONS = frozenset({"fp32", "fp16", "bf16", "int8", "mixed"})


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` → ``(1, 0)``; a malformed version is a bad manifest."""
    try:
        major, minor = text.split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        raise BundleError(
            f"format_version {text!r} is not MAJOR.MINOR", code=ErrorCode.BUNDLE_BAD_MANIFEST
        ) from None


def check_format_version(manifest: dict[str, Any]) -> None:
    """Refuse a bundle of another format or of a newer major version."""
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(
            f"not an edgekit bundle (format={manifest.get('format')!r})",
            code=ErrorCode.BUNDLE_BAD_MANIFEST,
        )
    major, _ = parse_version(manifest.get("format_version", ""))
    if major > SUPPORTED_MAJOR:
        raise BundleError(
            f"bundle format {manifest['format_version']} is newer than this runtime reads "
            f"({SUPPORTED_MAJOR}.x)",
            code=ErrorCode.BUNDLE_UNSUPPORTED_VERSION,
            hint="upgrade edgekit-runtime on the device, or recompile with an older edgekit",
        )


def validate_manifest(manifest: dict[str, Any]) -> "Manifest":
    """Check a v1 manifest (a JSON object) and return it typed; raises :class:`BundleError`.

    A thin call of :meth:`~edgekit_runtime.contract.manifest.Manifest.from_dict`, where the
    structure is defined.
    """
    from .manifest import Manifest

    return Manifest.from_dict(manifest)
