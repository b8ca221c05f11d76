"""The bundle format: the one contract between the host compiler and the device.

Written down for people in ``docs/bundle-format.md``; this module is the
machine-checked version of the same text. Rules (as ExecuTorch keeps for its
flatbuffer schema):

* fields are only ever appended; a field is never repurposed or retyped;
* a reader accepts any ``1.x`` bundle and ignores fields it does not know;
* a new *major* version is for changes an old reader would misread, and an old
  reader refuses it (``BUNDLE_UNSUPPORTED_VERSION``) instead of guessing.

A bundle (``*.ekb``) is a ZIP archive with exactly these members:

* ``manifest.json`` — UTF-8 JSON described by :data:`MANIFEST_FIELDS`;
* ``signature.json`` — ``{"algorithm": "ed25519", "key_id": ..., "signature": base64}``
  over the exact bytes of ``manifest.json``;
* every file named in ``manifest["files"]`` (with its sha256 and size), and
  nothing else.
"""

from __future__ import annotations

from typing import Any

from .errors import BundleError, ErrorCode

FORMAT_NAME = "edgekit-bundle"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
SIGNATURE_ALGORITHM = "ed25519"
BUNDLE_SUFFIX = ".ekb"

# field -> (type, required). Nested objects are checked by their own tables.
MANIFEST_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "format": (str, True),
    "format_version": (str, True),
    "created_at": (str, True),
    "created_by": (str, True),
    "model": (dict, True),
    "target": (dict, True),
    "backend": (dict, True),
    "inputs": (list, True),
    "outputs": (list, True),
    "preprocess": ((dict, type(None)), True),
    "postprocess": ((dict, type(None)), True),
    "labels": ((str, type(None)), False),
    "metrics": (dict, True),
    "calibration": ((dict, type(None)), True),
    "health_check": ((dict, type(None)), True),
    "input_stats": (dict, False),
    "files": (dict, True),
    "signing": (dict, True),
}
MODEL_FIELDS = {"name": (str, True), "version": (str, True), "release": (int, True)}
TARGET_FIELDS = {"name": (str, True), "device": (str, False)}
BACKEND_FIELDS = {
    "name": (str, True),
    "version": (str, True),
    "precision": (str, True),
    "artifact": (str, True),
    "engines": (list, True),
    "options": (dict, False),
}
TENSOR_FIELDS = {
    "name": (str, True),
    "dtype": (str, True),
    "shape": (list, True),
    "layout": ((str, type(None)), False),
    "quantization": ((dict, type(None)), False),
}
FILE_FIELDS = {"sha256": (str, True), "size": (int, True)}
SIGNING_FIELDS = {"algorithm": (str, True), "key_id": (str, True)}
HEALTH_FIELDS = {"input": (str, True), "expected_output": (str, True), "atol": (float, True), "rtol": (float, True)}

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


def _check_fields(obj: Any, table: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise BundleError(f"{where} must be an object", code=ErrorCode.BUNDLE_BAD_MANIFEST)
    for key, (kind, required) in table.items():
        if key not in obj:
            if required:
                raise BundleError(f"{where}.{key} is missing", code=ErrorCode.BUNDLE_BAD_MANIFEST)
            continue
        value = obj[key]
        # JSON has one number type: accept ints where floats are declared.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise BundleError(
                f"{where}.{key} has type {type(value).__name__}", code=ErrorCode.BUNDLE_BAD_MANIFEST
            )


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Check the structure of a v1 manifest; raises :class:`BundleError`."""
    check_format_version(manifest)
    _check_fields(manifest, MANIFEST_FIELDS, "manifest")
    _check_fields(manifest["model"], MODEL_FIELDS, "model")
    _check_fields(manifest["target"], TARGET_FIELDS, "target")
    _check_fields(manifest["backend"], BACKEND_FIELDS, "backend")
    _check_fields(manifest["signing"], SIGNING_FIELDS, "signing")
    for group in ("inputs", "outputs"):
        if not manifest[group]:
            raise BundleError(f"manifest.{group} is empty", code=ErrorCode.BUNDLE_BAD_MANIFEST)
        for i, tensor in enumerate(manifest[group]):
            _check_fields(tensor, TENSOR_FIELDS, f"{group}[{i}]")
            if tensor["dtype"] not in DTYPES:
                raise BundleError(
                    f"{group}[{i}].dtype {tensor['dtype']!r} unknown", code=ErrorCode.BUNDLE_BAD_MANIFEST
                )
    for name, entry in manifest["files"].items():
        _check_fields(entry, FILE_FIELDS, f"files[{name!r}]")
        if name in RESERVED_NAMES:
            raise BundleError(f"files lists reserved name {name!r}", code=ErrorCode.BUNDLE_BAD_MANIFEST)
    if manifest["health_check"] is not None:
        _check_fields(manifest["health_check"], HEALTH_FIELDS, "health_check")
    referenced = [manifest["backend"]["artifact"]]
    if manifest.get("labels"):
        referenced.append(manifest["labels"])
    if manifest["health_check"]:
        referenced += [manifest["health_check"]["input"], manifest["health_check"]["expected_output"]]
    for name in referenced:
        if name not in manifest["files"]:
            raise BundleError(
                f"manifest refers to {name!r}, which is not in manifest.files",
                code=ErrorCode.BUNDLE_BAD_MANIFEST,
            )
