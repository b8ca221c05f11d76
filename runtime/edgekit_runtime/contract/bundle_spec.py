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

import unicodedata
from typing import TYPE_CHECKING, Any, Iterable

from .errors import BundleError, ErrorCode

if TYPE_CHECKING:
    from .manifest import Manifest

FORMAT_NAME = "edgekit-bundle"
# 1.1 appended optional fields (the build report: fidelity, gates, stages, latency gating,
# accuracy direction); a 1.0 bundle still parses, a 1.0 reader ignores what 1.1 added.
# 1.2 added the "tensor" preprocessing kind (preprocess.size is then absent): a 1.1 reader
# refuses such a bundle (size missing) instead of misreading it; image bundles are unchanged.
# 1.3 appended metrics.optimize (the compression passes: pruning, distillation, and what each changed),
# a record only: a 1.2 reader ignores it.
# 1.4 added the "detection" and "segmentation" postprocessing kinds (postprocess.strides, score_threshold,
# iou_threshold, max_detections) and preprocess.resize "letterbox". A 1.3 reader (from 1.1 on) refuses a
# letterbox bundle (resize is not one it knows) instead of misreading it, and gives a detection or
# segmentation bundle's raw outputs, as for any postprocess type it does not know.
FORMAT_VERSION = "1.4"
SUPPORTED_MAJOR = 1

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
SIGNATURE_ALGORITHM = "ed25519"
BUNDLE_SUFFIX = ".ekb"

# Member names (docs/bundle-format.md §1): limits every filesystem a device may extract to can hold.
MAX_MEMBERS = 1024  # members in one archive, manifest.json and signature.json included
MAX_NAME_COMPONENT_BYTES = 255  # one path component, UTF-8 (NAME_MAX on Linux, ext4, FAT/exFAT)
MAX_NAME_BYTES = 1024  # a whole member name, UTF-8

# Numbers in the manifest that size memory or work on the device (docs/bundle-format.md §2).
MAX_IMAGE_SIDE = 16384  # preprocess.size: each of height and width
MAX_IMAGE_PIXELS = 4096 * 4096  # preprocess.size: height * width
MAX_RANK = 8  # dimensions of a tensor
MAX_TENSOR_ELEMENTS = 1 << 28  # product of a tensor's fixed dimensions (1 GiB of float32)
MAX_TENSORS = 256  # inputs, outputs, input_stats entries
MAX_TOP_K = 1000  # postprocess.top_k
MAX_DETECTIONS = 10000  # postprocess.max_detections (each kept box is one greedy NMS step)
MAX_DETECTION_LEVELS = 8  # postprocess.strides length
MAX_THREADS = 1024  # backend.options.threads
MAX_WORKSPACE_MB = 65536  # backend.options.tensorrt.workspace_mb
MAX_HISTOGRAM_BINS = 4096  # input_stats[].histogram counts

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


def member_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a member name in canonical form, or None when it is one.

    Canonical: a non-empty relative POSIX path in Unicode NFC, ``/``-separated, with no
    empty, ``.`` or ``..`` component, no ``\\``, no drive letter, no control character,
    each component at most :data:`MAX_NAME_COMPONENT_BYTES` and the whole at most
    :data:`MAX_NAME_BYTES` bytes of UTF-8. One file has exactly one such name, so two
    members can never name the same file.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds a control character"
    if "\\" in name:
        return "holds a backslash (the separator is /)"
    if name.startswith("/"):
        return "is absolute"
    if len(name) > 1 and name[1] == ":":
        return "starts with a drive letter"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if unicodedata.normalize("NFC", name) != name:
        return "is not in Unicode NFC"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (at most {MAX_NAME_BYTES})"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"has a{'n empty' if not part else ' ' + repr(part)} path component"
        if len(part.encode("utf-8")) > MAX_NAME_COMPONENT_BYTES:
            return f"has a component of {len(part.encode('utf-8'))} bytes (at most {MAX_NAME_COMPONENT_BYTES})"
    return None


def canonical_member_name(name: str) -> str:
    """The name a lenient extractor would write ``name`` to (``./a//b`` → ``a/b``), case-folded: the key
    under which two members would be the same file on some filesystem."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return unicodedata.normalize("NFC", "/".join(parts)).casefold()


def member_set_problem(names: Iterable[str]) -> str | None:
    """Why a set of canonical member names cannot all be extracted side by side, or None.

    Refused: more than :data:`MAX_MEMBERS`; two names for one file (equal but for case or
    Unicode normalization, which case-insensitive filesystems merge); a name that is also a
    folder of another (``labels.txt`` and ``labels.txt/x``).
    """
    names = list(names)
    if len(names) > MAX_MEMBERS:
        return f"the bundle has {len(names)} members (at most {MAX_MEMBERS})"
    seen: dict[str, str] = {}
    for name in names:
        key = canonical_member_name(name)
        if key in seen:
            return f"members {seen[key]!r} and {name!r} name the same file"
        seen[key] = name
    for name in names:
        parts = canonical_member_name(name).split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in seen:
                return f"member {seen[folder]!r} is a file but {name!r} needs it as a folder"
    return None
