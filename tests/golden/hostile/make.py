"""Write the golden hostile bundles (one ``.ekb`` per case) and ``cases.json`` from the case table below.

Each bundle is a valid golden bundle with ONE hostile change, signed by the committed *test* key,
so nothing but that change stands between it and an install: a runtime that stops refusing it has
lost a check. ``tests/runtime/test_golden_hostile.py`` holds every file to the code in
``cases.json`` on the device side (``open_bundle``, ``edgekit-runtime verify``), the host side
(``edgekit bundle verify``) and the agent's install, and checks that this script still writes the
committed files byte for byte, so the files and the table cannot drift apart.

Unlike ``../make_golden.py`` (format bundles, written once by an old edgekit and never again), these
are rebuilt whenever a case is added: the output depends only on this file, the committed
``../v1.0-onnxruntime-matmul.ekb`` (whose members are the model, labels and health arrays) and the
standard library's ``zipfile`` and ``json`` plus ``cryptography``'s ed25519 (deterministic
signatures). Members are stored uncompressed, with fixed times and modes, so no zlib build can
change a byte.

Usage: python tests/golden/hostile/make.py [--out DIR]   (default: this folder)
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import pickle
import stat
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "v1.0-onnxruntime-matmul.ekb"  # frozen: its members never change
PUBLIC_KEY_NAME = "hostile-test.pub"
CASES_NAME = "cases.json"

# The TEST signing key, committed on purpose: it signs nothing but these hostile files, and no
# device or keyring outside the tests trusts it (see README.md). A seed in code rather than a key
# file, so the generator needs nothing else and key scanners have no PEM block to flag.
TEST_KEY_SEED = hashlib.sha256(b"edgekit golden hostile bundles: TEST key, trusted by nothing real").digest()

DATE_TIME = (2026, 1, 1, 0, 0, 0)
REGULAR = stat.S_IFREG | 0o644

# Stable error codes (edgekit_runtime.contract.errors.ErrorCode), restated: the goldens pin them.
UNSAFE = (108, "BUNDLE_UNSAFE_MEMBER")
BAD_MANIFEST = (107, "BUNDLE_BAD_MANIFEST")
TAMPERED = (105, "BUNDLE_TAMPERED")
MISSING = (109, "BUNDLE_MISSING_MEMBER")
UNLISTED = (110, "BUNDLE_UNLISTED_MEMBER")
HEALTH = (204, "ENGINE_HEALTH_CHECK_FAILED")

# Bounds of the bundle format (edgekit_runtime.contract.bundle_spec), restated for the same reason.
MAX_IMAGE_SIDE = 16384
MAX_RANK = 8
MAX_HISTOGRAM_BINS = 4096


@dataclass
class Entry:
    """One archive entry: a name, its bytes and the Unix mode stored with it."""

    name: str
    data: bytes
    mode: int = REGULAR


@dataclass
class Bundle:
    """What a case writes: a manifest (``files`` filled from ``listed``), the entries, the listed members."""

    manifest: dict[str, Any]
    entries: list[Entry]
    listed: dict[str, bytes] | None = None  # None: every entry, as found
    signature_twice: bool = False


@dataclass
class Case:
    """One hostile bundle: how it is made and how every verifier must answer it."""

    file: str
    what: str
    build: Callable[[dict[str, Any], dict[str, bytes]], Bundle]
    code: tuple[int, str] | None  # None: it verifies (a control case)
    message: str  # a fragment of the refusal's message, or of `edgekit bundle verify`'s output
    refused_at: str | None = "verify"  # "verify" (open_bundle), "health_check", or None (it is accepted)


# ----------------------------------------------------------------------------- the base bundle
def base() -> tuple[dict[str, Any], dict[str, bytes]]:
    """A valid format-1.1 manifest and its members (the v1.0 golden's model, labels, health arrays)."""
    with zipfile.ZipFile(SOURCE) as zf:
        members = {n: zf.read(n) for n in ("model.onnx", "labels.txt", "health/input.npy",
                                           "health/expected_output.npy")}
    manifest = {
        "format": "edgekit-bundle",
        "format_version": "1.1",
        "created_at": "2026-01-01T00:00:00+00:00",
        "created_by": "tests/golden/hostile/make.py",
        "model": {"name": "hostile-matmul", "version": "1.0.0", "release": 1},
        "target": {"name": "onnxruntime-cpu", "device": "generic", "latency_budget_ms": 1000.0},
        "backend": {"name": "onnxruntime", "version": "1.20", "precision": "fp32", "artifact": "model.onnx",
                    "engines": ["onnxruntime"], "options": {"threads": 1}, "quantization": None},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 1, 2, 2], "layout": "NCHW",
                    "quantization": None}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "layout": None, "quantization": None}],
        "preprocess": {"type": "image", "color": "gray", "size": [2, 2], "resize": "stretch",
                       "interpolation": "nearest", "scale": 0.00390625, "mean": None, "std": None,
                       "layout": "NCHW", "dtype": "float32"},
        "postprocess": {"type": "classification", "softmax": True, "top_k": 3},
        "labels": "labels.txt",
        "metrics": {},
        "calibration": None,
        "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                         "atol": 1e-5, "rtol": 1e-5},
    }
    return manifest, members


def entries_of(members: dict[str, bytes]) -> list[Entry]:
    return [Entry(n, d) for n, d in sorted(members.items())]


def pickled_npy() -> bytes:
    """An ``.npy`` whose header says object array: reading it takes unpickling the payload.

    Written by hand (not ``np.save``) so the bytes depend on no numpy version. The payload is a
    harmless pickled list: a reader that did unpickle it would run no code, only break the rule.
    """
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return (b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")
            + pickle.dumps(["edgekit never unpickles a bundle member"], protocol=2))


# ----------------------------------------------------------------------------- case builders
def extra(*added: tuple[str, bytes] | Entry) -> Callable[[dict, dict], Bundle]:
    """The base bundle plus ``added`` entries, all listed and signed: only the reader's name rules refuse it."""
    def build(manifest: dict, members: dict) -> Bundle:
        more = [a if isinstance(a, Entry) else Entry(*a) for a in added]
        return Bundle(manifest, entries_of(members) + more)
    return build


def replace(name: str, entry: Entry) -> Callable[[dict, dict], Bundle]:
    """The base bundle with member ``name`` swapped for ``entry`` (listed with the entry's own bytes)."""
    def build(manifest: dict, members: dict) -> Bundle:
        return Bundle(manifest, [e for e in entries_of(members) if e.name != name] + [entry])
    return build


def manifest_change(change: Callable[[dict], None]) -> Callable[[dict, dict], Bundle]:
    """The base members under a changed (and validly signed) manifest."""
    def build(manifest: dict, members: dict) -> Bundle:
        change(manifest)
        return Bundle(manifest, entries_of(members))
    return build


def setter(*path_and_value: Any) -> Callable[[dict], None]:
    """``setter("a", "b", v)`` sets ``manifest["a"]["b"] = v``."""
    *path, key, value = path_and_value

    def change(m: dict) -> None:
        for p in path:
            m = m[p]
        m[key] = value
    return change


def histogram(bins: int) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        m["input_stats"] = {"x": {"histogram": {"edges": list(range(bins + 1)), "counts": [1] * bins}}}
    return change


def duplicate_model(manifest: dict, members: dict) -> Bundle:
    # listed once with the genuine hash; the second copy is what a last-entry-wins reader would unpack
    return Bundle(manifest, entries_of(members) + [Entry("model.onnx", b"not the model the manifest signed")],
                  listed=members)


def duplicate_signature(manifest: dict, members: dict) -> Bundle:
    return Bundle(manifest, entries_of(members), signature_twice=True)


def directory_entry(manifest: dict, members: dict) -> Bundle:
    return Bundle(manifest, [Entry("health/", b"", stat.S_IFDIR | 0o755)] + entries_of(members), listed=members)


def unlisted(manifest: dict, members: dict) -> Bundle:
    return Bundle(manifest, entries_of(members) + [Entry("extra.bin", b"payload")], listed=members)


def missing(manifest: dict, members: dict) -> Bundle:
    return Bundle(manifest, [e for e in entries_of(members) if e.name != "health/expected_output.npy"],
                  listed=members)


def tampered(manifest: dict, members: dict) -> Bundle:
    data = bytearray(members["health/expected_output.npy"])
    data[-1] ^= 0x01  # same size, one bit: only the sha256 tells
    return Bundle(manifest, entries_of({**members, "health/expected_output.npy": bytes(data)}), listed=members)


def no_health_check(manifest: dict, members: dict) -> Bundle:
    manifest["health_check"] = None
    return Bundle(manifest, entries_of({n: d for n, d in members.items() if not n.startswith("health/")}))


def baseline(manifest: dict, members: dict) -> Bundle:
    return Bundle(manifest, entries_of(members))


EVIL = b"evil\n"
CASES: list[Case] = [
    Case("baseline.ekb", "control: the unchanged base bundle verifies and passes its health check", baseline,
         None, "health check passed", refused_at=None),
    # --- member names: one canonical form, no aliases, no file/folder clash, length limits
    Case("file-and-folder.ekb", "a file labels.txt and a member labels.txt/x", extra(("labels.txt/x", b"x")),
         UNSAFE, "'labels.txt/x' needs it as a folder"),
    Case("name-300-characters.ekb", "a member name of 300 characters", extra(("n" * 300, b"x")),
         UNSAFE, "300 bytes (at most 255)"),
    Case("path-over-1024-bytes.ekb", "a member path of 1205 bytes (six 200-byte folders)",
         extra(("/".join(["d" * 200] * 6), b"x")), UNSAFE, "is 1205 bytes long (at most 1024)"),
    Case("dot-alias.ekb", "./labels.txt beside labels.txt", extra(("./labels.txt", EVIL)),
         UNSAFE, "'./labels.txt'"),
    Case("dot-component.ekb", "a '.' component: health/./extra.npy", extra(("health/./extra.npy", b"x")),
         UNSAFE, "'health/./extra.npy'"),
    Case("empty-component.ekb", "an empty component: health//extra.npy", extra(("health//extra.npy", b"x")),
         UNSAFE, "'health//extra.npy'"),
    Case("trailing-dot-dot.ekb", "a name ending in '..': health/..", extra(("health/..", b"x")),
         UNSAFE, "'health/..'"),
    Case("case-alias.ekb", "Labels.txt beside labels.txt (one file on a case-insensitive filesystem)",
         extra(("Labels.txt", EVIL)), UNSAFE, "same file"),
    Case("not-nfc.ekb", "a name not in Unicode NFC (e + combining acute)", extra(("e\u0301.txt", b"x")),
         UNSAFE, "not in Unicode NFC"),
    Case("nfc-alias.ekb", "two spellings of é.txt (NFC and NFD)", extra(("\u00e9.txt", b"x"), ("e\u0301.txt", b"y")),
         UNSAFE, "not in Unicode NFC"),
    Case("control-character.ekb", "a newline inside a member name", extra(("a\nb.txt", b"x")), UNSAFE,
         "control character"),
    # --- paths out of the slot, links, special files, duplicates
    Case("absolute-path.ekb", "an absolute path: /etc/passwd", extra(("/etc/passwd", b"pwned")), UNSAFE,
         "'/etc/passwd'"),
    Case("parent-path.ekb", "a path up and out: ../evil.onnx", extra(("../evil.onnx", b"pwned")), UNSAFE,
         "'../evil.onnx'"),
    Case("nested-parent-path.ekb", "a path up and out from a folder: health/../../evil.onnx",
         extra(("health/../../evil.onnx", b"pwned")), UNSAFE, "'health/../../evil.onnx'"),
    Case("drive-path.ekb", "a Windows drive path: C:/evil.onnx", extra(("C:/evil.onnx", b"pwned")), UNSAFE,
         "'C:/evil.onnx'"),
    Case("backslash-path.ekb", "a backslash separator: health\\evil.onnx", extra(("health\\evil.onnx", b"pwned")),
         UNSAFE, "evil.onnx"),
    Case("symlink.ekb", "labels.txt is a symlink to /etc/passwd",
         replace("labels.txt", Entry("labels.txt", b"/etc/passwd", stat.S_IFLNK | 0o777)), UNSAFE,
         "link or special file"),
    Case("fifo.ekb", "a member with the FIFO file type", extra(Entry("special", b"x", stat.S_IFIFO | 0o644)),
         UNSAFE, "link or special file"),
    Case("char-device.ekb", "a member with the character-device file type",
         extra(Entry("special", b"x", stat.S_IFCHR | 0o644)), UNSAFE, "link or special file"),
    Case("directory-mode.ekb", "a member with the directory file type but no trailing slash",
         extra(Entry("special", b"x", stat.S_IFDIR | 0o755)), UNSAFE, "link or special file"),
    Case("directory-entry.ekb", "a directory entry health/", directory_entry, UNSAFE, "directory entry"),
    Case("duplicate-member.ekb", "model.onnx twice, the second copy not the signed one", duplicate_model, UNSAFE,
         "duplicate member 'model.onnx'"),
    Case("duplicate-signature.ekb", "signature.json twice", duplicate_signature, UNSAFE,
         "duplicate member 'signature.json'"),
    # --- the member list and integrity
    Case("unlisted-member.ekb", "a member the signed manifest does not list", unlisted, UNLISTED, "'extra.bin'"),
    Case("missing-member.ekb", "a listed member absent from the archive", missing, MISSING,
         "'health/expected_output.npy'"),
    Case("tampered-member.ekb", "one bit of a listed member flipped after signing", tampered, TAMPERED,
         "'health/expected_output.npy'"),
    # --- manifest numbers that size memory or work
    Case("image-size-100000.ekb", "preprocess.size [100000, 100000]",
         manifest_change(setter("preprocess", "size", [100000, 100000])), BAD_MANIFEST, "manifest.preprocess.size"),
    Case("image-side-over-limit.ekb", f"preprocess.size [{MAX_IMAGE_SIDE + 1}, 1]",
         manifest_change(setter("preprocess", "size", [MAX_IMAGE_SIDE + 1, 1])), BAD_MANIFEST,
         "manifest.preprocess.size"),
    Case("image-pixels-over-limit.ekb", f"preprocess.size [{MAX_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]",
         manifest_change(setter("preprocess", "size", [MAX_IMAGE_SIDE, MAX_IMAGE_SIDE])), BAD_MANIFEST,
         "manifest.preprocess.size"),
    Case("input-elements.ekb", "an input of [batch, 100000, 100000] elements",
         manifest_change(lambda m: m["inputs"][0].update(shape=["batch", 100000, 100000])), BAD_MANIFEST,
         "manifest.inputs[0].shape"),
    Case("input-rank.ekb", f"an input of rank {MAX_RANK + 1}",
         manifest_change(lambda m: m["inputs"][0].update(shape=["batch"] + [1] * MAX_RANK)), BAD_MANIFEST,
         "manifest.inputs[0].shape"),
    Case("top-k.ekb", "postprocess.top_k 10**9", manifest_change(setter("postprocess", "top_k", 10**9)),
         BAD_MANIFEST, "manifest.postprocess.top_k"),
    Case("threads.ekb", "backend.options.threads 10**6",
         manifest_change(setter("backend", "options", "threads", 10**6)), BAD_MANIFEST,
         "manifest.backend.options.threads"),
    Case("tensorrt-workspace.ekb", "backend.options.tensorrt.workspace_mb 10**9",
         manifest_change(setter("backend", "options", "tensorrt", {"workspace_mb": 10**9})), BAD_MANIFEST,
         "manifest.backend.options.tensorrt.workspace_mb"),
    Case("tensorrt-shapes.ekb", "a TensorRT optimisation profile max of [1, 1, 100000, 100000]",
         manifest_change(setter("backend", "options", "tensorrt",
                                {"shapes": {"x": {"min": [1, 1, 2, 2], "opt": [1, 1, 2, 2],
                                                  "max": [1, 1, 10**5, 10**5]}}})),
         BAD_MANIFEST, "manifest.backend.options.tensorrt.shapes['x'].max"),
    Case("histogram-bins.ekb", f"an input_stats histogram of {MAX_HISTOGRAM_BINS + 1} bins",
         manifest_change(histogram(MAX_HISTOGRAM_BINS + 1)), BAD_MANIFEST, "manifest.input_stats['x'].histogram"),
    # --- the health check
    Case("pickled-health-input.ekb", "health/input.npy is a pickled object array",
         replace("health/input.npy", Entry("health/input.npy", pickled_npy())), HEALTH, "pickle",
         refused_at="health_check"),
    Case("no-health-check.ekb", "no health check: verifies, and says so instead of 'passed'", no_health_check,
         None, "no health check", refused_at=None),
]


# ----------------------------------------------------------------------------- writing
def test_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED)


def key_id(key: Ed25519PrivateKey) -> str:
    """The runtime's key id: the first 16 hex digits of sha256 of the raw public key."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest: dict[str, Any], listed: dict[str, bytes], key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """``manifest.json`` (listing ``listed``) and ``signature.json``, validly signed by ``key``."""
    manifest = copy.deepcopy(manifest)
    kid = key_id(key)
    manifest["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                         for n, d in sorted(listed.items())}
    manifest["signing"] = {"algorithm": "ed25519", "key_id": kid}
    # compact: the signature covers whatever bytes are there, and the histogram case stays small
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    signature = {"algorithm": "ed25519", "key_id": kid,
                 "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
    return manifest_bytes, json.dumps(signature, sort_keys=True).encode()


def zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, so the mode bits mean what they say on every platform
    info.external_attr = mode << 16 | (0x10 if stat.S_ISDIR(mode) else 0)
    return info


def write_case(case: Case, out: Path, key: Ed25519PrivateKey) -> Path:
    manifest, members = base()
    bundle = case.build(manifest, members)
    listed = bundle.listed if bundle.listed is not None else {e.name: e.data for e in bundle.entries}
    manifest_bytes, signature_bytes = sign(bundle.manifest, listed, key)
    head = [Entry("manifest.json", manifest_bytes), Entry("signature.json", signature_bytes)]
    if bundle.signature_twice:
        head.append(Entry("signature.json", signature_bytes))
    path = out / case.file
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name")  # the duplicate cases want exactly that
        with zipfile.ZipFile(path, "w") as zf:
            for entry in head + bundle.entries:
                zf.writestr(zip_entry(entry.name, entry.mode), entry.data)
    return path


def cases_document() -> dict[str, Any]:
    """``cases.json``: every file's expected answer, for the tests and for anyone testing another reader."""
    return {
        "about": "Golden hostile bundles: each must be refused with `code` at `refused_at` "
                 "(verify: signature, names and manifest checks; health_check: after verifying), "
                 "with `message` in the refusal. Cases with code null must verify (refused_at null), "
                 "`message` then being in `edgekit bundle verify`'s output. Written by make.py: "
                 "edit its case table, never this file.",
        "public_key": PUBLIC_KEY_NAME,
        "cases": {
            c.file: {"what": c.what, "code": c.code[0] if c.code else None, "name": c.code[1] if c.code else None,
                     "refused_at": c.refused_at, "message": c.message}
            for c in CASES
        },
    }


def write_all(out: Path) -> list[Path]:
    """Every golden hostile file into ``out``: the bundles, the public key and ``cases.json``."""
    out.mkdir(parents=True, exist_ok=True)
    key = test_key()
    written = [write_case(case, out, key) for case in CASES]
    pub = out / PUBLIC_KEY_NAME
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    doc = out / CASES_NAME
    doc.write_text(json.dumps(cases_document(), indent=2, ensure_ascii=True) + "\n", encoding="utf-8")
    return [*written, pub, doc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this folder)")
    args = parser.parse_args(argv)
    stale = sorted(set(p.name for p in args.out.glob("*.ekb")) - {c.file for c in CASES}) if args.out.is_dir() else []
    for name in stale:  # a case renamed or dropped from the table: its old file must not linger
        (args.out / name).unlink()
    paths = write_all(args.out)
    print(f"wrote {len(paths)} files into {args.out} ({sum(p.stat().st_size for p in paths)} bytes)"
          + (f"; removed {', '.join(stale)}" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
