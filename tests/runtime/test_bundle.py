"""Bundle format v1: what a device accepts, what it refuses, and with which stable code.

Each malicious archive is signed with a trusted key wherever possible, so the
refusal comes from the one check the test is about, not from an earlier one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest

import edgekit_runtime
from edgekit.build.bundle_writer import resign_bundle, write_bundle
from edgekit.errors import EdgekitError, ExitCode, VerificationError
from edgekit_runtime import BundleError, ErrorCode, Keyring, open_bundle
from edgekit_runtime.contract import bundle_spec as spec
from edgekit_runtime.contract.manifest import Signing
from edgekit_runtime.keyring import key_id_of


def refused(path, keyring, code: ErrorCode, workdir) -> BundleError:
    """Both entry points refuse ``path`` with ``code`` and write nothing."""
    with pytest.raises(BundleError) as info:
        open_bundle(path, keyring)
    assert info.value.code == code, str(info.value)
    with pytest.raises(BundleError) as info2:
        edgekit_runtime.load(path, keyring=keyring, workdir=workdir)
    assert info2.value.code == code, str(info2.value)
    assert not workdir.exists(), "a refused bundle must not be extracted"
    return info.value


# ----------------------------------------------------------------------------- happy path
def test_round_trip_write_verify_load_run(kit, ring, key, tmp_path, no_temp_leftovers):
    path = kit.write()
    vb = open_bundle(path, ring)
    assert vb.key_id == key_id_of(key.public_key())
    assert set(vb.members) == {"model.onnx", "health/input.npy", "health/expected_output.npy"}
    assert vb.members["model.onnx"] == kit.model
    for name, entry in vb.manifest_json["files"].items():
        assert entry == {"sha256": hashlib.sha256(vb.members[name]).hexdigest(), "size": len(vb.members[name])}
    assert vb.manifest_json["signing"] == {"algorithm": "ed25519", "key_id": vb.key_id}
    assert vb.manifest.signing == Signing(algorithm="ed25519", key_id=vb.key_id)

    workdir = tmp_path / "work"
    with edgekit_runtime.load(path, keyring=ring, workdir=workdir) as model:
        assert (workdir / "model.onnx").read_bytes() == kit.model
        assert model.health_check()["ok"] is True
        x = np.array([[1, -2, 0.5, 8], [0, 0, 0, 0], [3, 3, 3, 3]], dtype=np.float32)
        np.testing.assert_array_equal(model.run(x)["y"], x @ kit.WEIGHTS)
        assert model.describe()["key_id"] == vb.key_id
    # the default temp workdir is removed on close
    with edgekit_runtime.load(path, keyring=ring) as model:
        tmp_workdir = model.workdir
        assert tmp_workdir.is_dir()
    assert not tmp_workdir.exists()
    assert list(no_temp_leftovers.iterdir()) == []


def test_writer_is_deterministic(kit):
    a, b = kit.write("a.ekb"), kit.write("b.ekb")
    # ed25519 signatures are deterministic and member timestamps are fixed
    assert a.read_bytes() == b.read_bytes()


def test_archive_layout(kit):
    with zipfile.ZipFile(kit.write()) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos[:2]] == ["manifest.json", "signature.json"]
        assert all(stat.S_ISREG(i.external_attr >> 16) for i in infos)
        sig = json.loads(zf.read("signature.json"))
        assert set(sig) == {"algorithm", "key_id", "signature"} and sig["algorithm"] == "ed25519"


def test_health_check_detects_wrong_expected_output(kit, ring, tmp_path):
    manifest, members = kit.parts()
    members["health/expected_output.npy"] = kit.npy(kit.SAMPLE @ kit.WEIGHTS + 1)
    with edgekit_runtime.load(kit.write(manifest=manifest, members=members), keyring=ring) as model:
        assert model.health_check()["ok"] is False


@pytest.mark.parametrize("offset, ok", [
    (0.0, True), (0.5e-5, True), (0.9e-5, True),  # within atol = 1e-5 where the output is 0
    (1.1e-5, False), (2e-5, False), (1e-4, False),  # just over, and ~10x atol
])
def test_health_check_holds_the_output_to_atol(kit, ring, offset, ok):
    """The sample's first output is exactly 0, so there the tolerance is atol alone (1e-5)."""
    manifest, members = kit.parts()
    expected = kit.SAMPLE @ kit.WEIGHTS
    assert expected[0, 0] == 0.0 and manifest["health_check"]["atol"] == 1e-5
    members["health/expected_output.npy"] = kit.npy((expected + offset).astype(np.float32))
    with edgekit_runtime.load(kit.write(manifest=manifest, members=members), keyring=ring) as model:
        health = model.health_check()
    assert health["ok"] is ok and health["checked"] and health["finite"]
    assert health["max_abs_diff"] == pytest.approx(offset, abs=2.5e-7)  # float32 rounding at outputs ~2.5


@pytest.mark.parametrize("diff, ok", [(0.0095, True), (0.0105, False)])
def test_health_check_tolerance_grows_with_rtol(diff, ok):
    """|got - expected| <= atol + rtol*|expected|: at 1000 with rtol 1e-5 the tolerance is 0.01001."""
    from edgekit_runtime.api import compare_health

    expected = np.array([[0.0, 1000.0]], np.float32)
    got = expected + np.array([[0.0, diff]], np.float32)
    assert compare_health(got, expected, atol=1e-5, rtol=1e-5)["ok"] is ok
    assert compare_health(got, expected, atol=1e-5, rtol=0.0)["ok"] is False  # atol alone is far too tight


def test_health_check_refuses_non_finite_output():
    from edgekit_runtime.api import compare_health

    result = compare_health(np.array([np.nan, 0.0]), np.array([np.nan, 0.0]), atol=1.0, rtol=1.0)
    assert result["ok"] is False and result["finite"] is False


# ----------------------------------------------------------------------------- signature
def test_unsigned_bundle_is_refused(kit, ring, tmp_path):
    path = kit.craft_signed("unsigned.ekb", signature=False)
    err = refused(path, ring, ErrorCode.BUNDLE_UNSIGNED, tmp_path / "x")
    assert "unsigned" in err.message


def test_manifest_modified_after_signing_is_refused(kit, ring, tmp_path):
    src = kit.write()
    with zipfile.ZipFile(src) as zf:
        entries = [(kit.zipinfo(i.filename), zf.read(i)) for i in zf.infolist()]
    manifest = json.loads(entries[0][1])
    manifest["model"]["release"] += 1
    entries[0] = (entries[0][0], json.dumps(manifest, indent=2, sort_keys=True).encode())
    path = kit.craft("modified.ekb", entries)
    refused(path, ring, ErrorCode.BUNDLE_BAD_SIGNATURE, tmp_path / "x")


def test_one_byte_of_whitespace_in_manifest_breaks_the_signature(kit, ring, tmp_path):
    # the signature covers the exact bytes, not the parsed JSON
    src = kit.write()
    with zipfile.ZipFile(src) as zf:
        entries = [(kit.zipinfo(i.filename), zf.read(i)) for i in zf.infolist()]
    entries[0] = (entries[0][0], entries[0][1] + b"\n")
    refused(kit.craft("ws.ekb", entries), ring, ErrorCode.BUNDLE_BAD_SIGNATURE, tmp_path / "x")


def test_untrusted_key_is_refused(kit, key, key2, tmp_path):
    path = kit.write(key=key2)
    err = refused(path, kit.ring_of(key), ErrorCode.BUNDLE_UNTRUSTED_KEY, tmp_path / "x")
    assert key_id_of(key2.public_key()) in err.message


def test_empty_keyring_trusts_nothing(kit, tmp_path):
    refused(kit.write(), Keyring(), ErrorCode.BUNDLE_UNTRUSTED_KEY, tmp_path / "x")


def test_signature_key_id_must_match_manifest_signing(kit, key, key2, ring, tmp_path):
    manifest, members = kit.parts()
    manifest_bytes, _ = kit.sign(manifest, members, key2)  # manifest: signing.key_id = key2 ...
    assert json.loads(manifest_bytes)["signing"]["key_id"] == key_id_of(key2.public_key())
    sig = {"algorithm": "ed25519", "key_id": key_id_of(key.public_key()),  # ... signature.json: key (trusted)
           "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
    path = kit.craft("mismatch.ekb", [("manifest.json", manifest_bytes), ("signature.json", json.dumps(sig).encode()),
                                      *members.items()])
    refused(path, ring, ErrorCode.BUNDLE_BAD_SIGNATURE, tmp_path / "x")


@pytest.mark.parametrize(
    "signature_json",
    [b"not json", b"[]", b'"x"', b'{"algorithm": "ed25519"}',
     b'{"algorithm": "ed25519", "key_id": ["a"], "signature": ""}',
     b'{"algorithm": "ed25519", "key_id": "0123456789abcdef", "signature": "***"}'],
    ids=["not-json", "list", "string", "no-fields", "key-id-not-a-string", "bad-base64"],
)
def test_malformed_signature_json_is_refused(kit, ring, tmp_path, signature_json):
    manifest, members = kit.parts()
    manifest_bytes, _ = kit.sign(manifest, members)
    path = kit.craft("badsig.ekb", [("manifest.json", manifest_bytes), ("signature.json", signature_json),
                                    *members.items()])
    refused(path, ring, ErrorCode.BUNDLE_UNSIGNED, tmp_path / "x")


def test_other_signature_algorithm_is_refused(kit, ring, key, tmp_path):
    manifest, members = kit.parts()
    manifest_bytes, sig = kit.sign(manifest, members)
    sig = {**json.loads(sig), "algorithm": "rsa"}
    path = kit.craft("rsa.ekb", [("manifest.json", manifest_bytes), ("signature.json", json.dumps(sig).encode()),
                                 *members.items()])
    refused(path, ring, ErrorCode.BUNDLE_BAD_SIGNATURE, tmp_path / "x")


# ----------------------------------------------------------------------------- integrity
def test_tampered_member_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    tampered = dict(members)
    tampered["model.onnx"] = kit.matmul_onnx(kit.WEIGHTS * 2)  # a different, valid model
    path = kit.craft_signed("tampered.ekb", manifest=manifest, entries=list(tampered.items()), listed=members)
    refused(path, ring, ErrorCode.BUNDLE_TAMPERED, tmp_path / "x")


def test_tampered_member_of_same_size_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    data = bytearray(members["health/expected_output.npy"])
    data[-1] ^= 0x01
    tampered = {**members, "health/expected_output.npy": bytes(data)}
    path = kit.craft_signed("tampered2.ekb", manifest=manifest, entries=list(tampered.items()), listed=members)
    refused(path, ring, ErrorCode.BUNDLE_TAMPERED, tmp_path / "x")


def test_swapped_in_zip_bomb_is_not_inflated(kit, ring, tmp_path):
    manifest, members = kit.parts()
    bomb = bytes(64 << 20)  # 64 MiB of zeros, ~64 KiB deflated
    path = kit.craft_signed("bomb.ekb", manifest=manifest,
                            entries=list({**members, "model.onnx": bomb}.items()), listed=members)
    del bomb
    tracemalloc.start()
    try:
        with pytest.raises(BundleError) as info:
            open_bundle(path, ring)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == ErrorCode.BUNDLE_TAMPERED
    assert peak < 8 << 20, f"verification allocated {peak / 2**20:.1f} MiB"


def test_bytes_flipped_in_the_archive_are_refused(kit, ring, tmp_path):
    path = kit.write()
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model.onnx")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for delta in (0, 5, info.compress_size // 2, info.compress_size - 1):
        damaged = bytearray(data)
        damaged[start + delta] ^= 0xFF
        target = tmp_path / f"flip{delta}.ekb"
        target.write_bytes(bytes(damaged))
        with pytest.raises(BundleError) as err:
            open_bundle(target, ring)
        # a bad CRC or a corrupt deflate stream: damaged in transit
        assert err.value.code == ErrorCode.BUNDLE_TRUNCATED, (delta, str(err.value))


@pytest.mark.parametrize("where", ["1 byte", "3 bytes", "30 bytes", "quarter", "half", "three quarters",
                                   "inside the directory", "last 22 bytes", "last byte"])
def test_truncated_archive_is_refused(kit, ring, tmp_path, where):
    data = kit.write().read_bytes()
    n = len(data)
    cut = {"1 byte": 1, "3 bytes": 3, "30 bytes": 30, "quarter": n // 4, "half": n // 2,
           "three quarters": 3 * n // 4, "inside the directory": n - 60, "last 22 bytes": n - 22,
           "last byte": n - 1}[where]
    path = tmp_path / "cut.ekb"
    path.write_bytes(data[:cut])
    refused(path, ring, ErrorCode.BUNDLE_TRUNCATED, tmp_path / "x")


def test_not_a_zip_and_missing_file_are_unreadable(kit, ring, tmp_path):
    junk = tmp_path / "junk.ekb"
    junk.write_bytes(b"hello, this is not a zip file at all" * 10)
    refused(junk, ring, ErrorCode.BUNDLE_UNREADABLE, tmp_path / "x")
    empty = tmp_path / "empty.ekb"
    empty.write_bytes(b"")
    refused(empty, ring, ErrorCode.BUNDLE_UNREADABLE, tmp_path / "x")
    refused(tmp_path / "nope.ekb", ring, ErrorCode.BUNDLE_UNREADABLE, tmp_path / "x")


# ----------------------------------------------------------------------------- format version
def test_newer_major_version_is_refused_even_if_signed(kit, ring, tmp_path):
    manifest, _ = kit.parts()
    manifest["format_version"] = "2.0"
    with pytest.raises(BundleError) as info:
        spec.validate_manifest({**manifest, "files": {}, "signing": {}})
    assert info.value.code == ErrorCode.BUNDLE_UNSUPPORTED_VERSION
    path = kit.craft_signed("v2.ekb", manifest=manifest)
    # the signature itself is fine: the refusal is about the version
    with zipfile.ZipFile(path) as zf:
        manifest_bytes, sig = zf.read("manifest.json"), json.loads(zf.read("signature.json"))
    ring.keys[sig["key_id"]].verify(base64.b64decode(sig["signature"]), manifest_bytes)  # raises if invalid
    err = refused(path, ring, ErrorCode.BUNDLE_UNSUPPORTED_VERSION, tmp_path / "x")
    assert "2.0" in err.message


def test_newer_major_version_is_refused_before_its_signature_is_read(kit, key2, ring, tmp_path):
    # A 2.x bundle may sign differently: an old reader says "upgrade", not "bad signature".
    manifest, members = kit.parts()
    manifest["format_version"] = "2.0"
    manifest_bytes, _ = kit.sign(manifest, members, key2)
    for sig in (None, b'{"algorithm": "ed448", "key_id": "x", "signature": "AAAA"}'):
        entries = [("manifest.json", manifest_bytes), *([("signature.json", sig)] if sig else []), *members.items()]
        refused(kit.craft("v2.ekb", entries), ring, ErrorCode.BUNDLE_UNSUPPORTED_VERSION, tmp_path / "x")


@pytest.mark.parametrize("version", ["1", "1.0.0", "one.zero", "", 1.0])
def test_malformed_format_version_is_a_bad_manifest(kit, ring, tmp_path, version):
    manifest, _ = kit.parts()
    manifest["format_version"] = version
    refused(kit.craft_signed("badver.ekb", manifest=manifest), ring, ErrorCode.BUNDLE_BAD_MANIFEST, tmp_path / "x")


def test_other_format_name_is_a_bad_manifest(kit, ring, tmp_path):
    manifest, _ = kit.parts()
    manifest["format"] = "something-else"
    refused(kit.craft_signed("other.ekb", manifest=manifest), ring, ErrorCode.BUNDLE_BAD_MANIFEST, tmp_path / "x")


def test_newer_minor_version_with_unknown_fields_loads(kit, ring, tmp_path):
    manifest, members = kit.parts()
    manifest["format_version"] = "1.7"
    manifest["added_in_1_7"] = {"anything": [1, 2, 3]}
    manifest["model"]["also_new"] = "ignored"
    path = kit.write("v17.ekb", manifest=manifest, members=members)
    with edgekit_runtime.load(path, keyring=ring, workdir=tmp_path / "w") as model:
        assert model.manifest.format_version == "1.7"
        assert model.manifest_json["added_in_1_7"] == {"anything": [1, 2, 3]}  # kept, though not understood
        assert model.manifest_json["model"]["also_new"] == "ignored"
        assert model.health_check()["ok"]
        np.testing.assert_array_equal(model.run(kit.SAMPLE)["y"], kit.SAMPLE @ kit.WEIGHTS)


def test_manifest_missing_a_required_field_is_refused(kit, ring, tmp_path):
    manifest, _ = kit.parts()
    del manifest["metrics"]
    refused(kit.craft_signed("nometrics.ekb", manifest=manifest), ring, ErrorCode.BUNDLE_BAD_MANIFEST, tmp_path / "x")


def test_manifest_json_missing_is_refused(kit, ring, tmp_path):
    _, members = kit.parts()
    refused(kit.craft("nomanifest.ekb", list(members.items())), ring, ErrorCode.BUNDLE_BAD_MANIFEST, tmp_path / "x")


# ----------------------------------------------------------------------------- member list
def test_unlisted_extra_member_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    path = kit.craft_signed("extra.ekb", manifest=manifest, entries=[*members.items(), ("extra.bin", b"payload")],
                            listed=members)
    err = refused(path, ring, ErrorCode.BUNDLE_UNLISTED_MEMBER, tmp_path / "x")
    assert "extra.bin" in err.message


def test_missing_member_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    present = {k: v for k, v in members.items() if k != "health/expected_output.npy"}
    path = kit.craft_signed("missing.ekb", manifest=manifest, entries=list(present.items()), listed=members)
    err = refused(path, ring, ErrorCode.BUNDLE_MISSING_MEMBER, tmp_path / "x")
    assert "health/expected_output.npy" in err.message


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns; that is the point
def test_duplicate_member_name_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    evil = kit.matmul_onnx(kit.WEIGHTS * 3)
    # listed once with the genuine hash; the second copy is what a naive reader would pick
    path = kit.craft_signed("dup.ekb", manifest=manifest, entries=[*members.items(), ("model.onnx", evil)],
                            listed=members)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist().count("model.onnx") == 2
    refused(path, ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns; that is the point
def test_duplicate_signature_json_is_refused(kit, ring, key2, tmp_path):
    src = kit.write()
    with zipfile.ZipFile(src) as zf:
        entries = [(kit.zipinfo(i.filename), zf.read(i)) for i in zf.infolist()]
    entries.append((kit.zipinfo("signature.json"), entries[1][1]))
    refused(kit.craft("dupsig.ekb", entries), ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil.onnx", "health/../../evil.onnx", "C:/evil.onnx",
                                  "health\\evil.onnx"])
def test_unsafe_member_path_is_refused(kit, ring, tmp_path, name):
    manifest, members = kit.parts()
    # listed and hashed in a validly signed manifest: only the path check stands in the way
    path = kit.craft_signed("unsafe.ekb", manifest=manifest, entries=[*members.items(), (name, b"pwned")])
    with zipfile.ZipFile(path) as zf:
        assert name in zf.namelist()
    refused(path, ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")
    assert not (tmp_path / "evil.onnx").exists()


def test_symlink_member_is_refused(kit, ring, tmp_path):
    manifest, members = kit.parts()
    link = kit.zipinfo("labels.txt", mode=(stat.S_IFLNK | 0o777) << 16)
    manifest["labels"] = "labels.txt"
    path = kit.craft_signed("link.ekb", manifest=manifest, entries=[*members.items(), (link, b"/etc/passwd")])
    refused(path, ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")


@pytest.mark.parametrize("mode", [stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o644, stat.S_IFDIR | 0o755],
                         ids=["fifo", "char-device", "directory-mode"])
def test_special_file_member_is_refused(kit, ring, tmp_path, mode):
    manifest, members = kit.parts()
    path = kit.craft_signed("special.ekb", manifest=manifest,
                            entries=[*members.items(), (kit.zipinfo("special", mode=mode << 16), b"x")])
    refused(path, ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")


@pytest.mark.parametrize("mode", [(stat.S_IFDIR | 0o755) << 16 | 0x10, 0x10, 0],
                         ids=["unix-directory", "msdos-directory-flag", "no-mode"])
def test_directory_entry_is_refused(kit, ring, tmp_path, mode):
    manifest, members = kit.parts()
    directory = kit.zipinfo("health/", mode=mode)
    path = kit.craft_signed("dir.ekb", manifest=manifest, entries=[(directory, b""), *members.items()],
                            listed=members)
    refused(path, ring, ErrorCode.BUNDLE_UNSAFE_MEMBER, tmp_path / "x")


def test_member_with_permission_bits_only_is_a_regular_file(kit, ring, tmp_path):
    # Python's zipfile.writestr(name, data) stores 0o600 with no file-type bits, and
    # archives made on Windows store no Unix mode at all: both are plain files.
    manifest, members = kit.parts()
    entries = [(kit.zipinfo(n, mode=0o600 << 16 if i % 2 else 0), d) for i, (n, d) in enumerate(members.items())]
    path = kit.craft_signed("perm.ekb", manifest=manifest, entries=entries)
    vb = open_bundle(path, ring)
    assert vb.members == members


# ----------------------------------------------------------------------------- nothing written on refusal
def test_refused_bundle_writes_nothing_anywhere(kit, key2, tmp_path, no_temp_leftovers):
    workdir = tmp_path / "x"
    with pytest.raises(BundleError):
        edgekit_runtime.load(kit.write(key=key2), keyring=kit.ring_of(kit.key), workdir=workdir)
    assert not workdir.exists()
    with pytest.raises(BundleError):
        edgekit_runtime.load(kit.write(key=key2), keyring=kit.ring_of(kit.key))
    assert list(no_temp_leftovers.iterdir()) == []


def test_refused_bundle_leaves_existing_workdir_untouched(kit, key2, tmp_path):
    workdir = tmp_path / "existing"
    workdir.mkdir()
    with pytest.raises(BundleError):
        edgekit_runtime.load(kit.write(key=key2), keyring=kit.ring_of(kit.key), workdir=workdir)
    assert list(workdir.iterdir()) == []


# ----------------------------------------------------------------------------- keys
def test_key_rotation_keyring_directory_with_two_keys(kit, key, key2, tmp_path):
    ring_dir = tmp_path / "keys"
    ring_dir.mkdir()
    (ring_dir / "old.pub").write_bytes(kit.public_pem(key))
    (ring_dir / "new.pub").write_bytes(kit.public_pem(key2))
    (ring_dir / "README").write_text("not a key, ignored")
    ring = Keyring.from_paths(ring_dir)
    assert set(ring.keys) == {key_id_of(key.public_key()), key_id_of(key2.public_key())}
    new = kit.write("new.ekb", key=key2)
    with edgekit_runtime.load(new, keyring=ring_dir, workdir=tmp_path / "w") as model:  # path form
        assert model.bundle.key_id == key_id_of(key2.public_key())
        assert model.health_check()["ok"]
    assert open_bundle(kit.write("old.ekb", key=key), ring).key_id == key_id_of(key.public_key())
    # retiring the old key: old bundles stop loading, new ones keep loading
    (ring_dir / "old.pub").unlink()
    retired = Keyring.from_paths(ring_dir)
    refused(kit.root / "old.ekb", retired, ErrorCode.BUNDLE_UNTRUSTED_KEY, tmp_path / "x")
    assert open_bundle(new, retired).key_id == key_id_of(key2.public_key())


def test_default_keyring_from_environment(kit, key, key2, tmp_path, monkeypatch):
    (tmp_path / "a.pub").write_bytes(kit.public_pem(key))
    (tmp_path / "b.pub").write_bytes(kit.public_pem(key2))
    monkeypatch.setenv("EDGEKIT_KEYRING", os.pathsep.join([str(tmp_path / "a.pub"), str(tmp_path / "b.pub")]))
    assert open_bundle(kit.write(key=key2)).key_id == key_id_of(key2.public_key())
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("EDGEKIT_KEYRING", str(empty))
    with pytest.raises(edgekit_runtime.RuntimeConfigError) as info:
        open_bundle(kit.write(key=key2))
    assert info.value.code == ErrorCode.CONFIG_NO_KEYRING


def test_key_id_is_first_16_hex_of_sha256_of_raw_public_key(key):
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id_of(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


# ----------------------------------------------------------------------------- re-signing
def test_resign_with_a_new_key(kit, key, key2, tmp_path):
    path = kit.write()
    out = tmp_path / "resigned.ekb"
    resign_bundle(path, key2, out)
    vb = open_bundle(out, kit.ring_of(key2))
    assert vb.key_id == key_id_of(key2.public_key())
    assert vb.manifest.signing.key_id == vb.key_id
    assert vb.members == open_bundle(path, kit.ring_of(key)).members
    refused(out, kit.ring_of(key), ErrorCode.BUNDLE_UNTRUSTED_KEY, tmp_path / "x")
    # in place
    resign_bundle(path, key2)
    assert open_bundle(path, kit.ring_of(key2)).key_id == key_id_of(key2.public_key())


def test_resign_refuses_a_tampered_member(kit, key2, tmp_path):
    manifest, members = kit.parts()
    tampered = {**members, "model.onnx": kit.matmul_onnx(kit.WEIGHTS * 2)}
    path = kit.craft_signed("tampered.ekb", manifest=manifest, entries=list(tampered.items()), listed=members)
    before = path.read_bytes()
    with pytest.raises(VerificationError, match="model.onnx") as info:
        resign_bundle(path, key2)
    assert info.value.exit_code == ExitCode.VERIFY  # `edgekit bundle sign` exits 4, like a failed verify
    assert path.read_bytes() == before
    assert not (tmp_path / "out.ekb").exists()
    with pytest.raises(EdgekitError):
        resign_bundle(path, key2, tmp_path / "out.ekb")
    assert not (tmp_path / "out.ekb").exists()
    assert sorted(p.name for p in kit.root.iterdir()) == ["tampered.ekb"]  # no temp file left behind


def test_resign_refuses_extra_member(kit, key2, tmp_path):
    manifest, members = kit.parts()
    path = kit.craft_signed("extra.ekb", manifest=manifest, entries=[*members.items(), ("x.bin", b"1")],
                            listed=members)
    with pytest.raises(EdgekitError):
        resign_bundle(path, key2, tmp_path / "out.ekb")
    assert not (tmp_path / "out.ekb").exists()


def test_resign_refuses_newer_major_version(kit, key2, tmp_path):
    manifest, _ = kit.parts()
    manifest["format_version"] = "2.0"
    with pytest.raises(BundleError) as info:
        resign_bundle(kit.craft_signed("v2.ekb", manifest=manifest), key2, tmp_path / "out.ekb")
    assert info.value.code == ErrorCode.BUNDLE_UNSUPPORTED_VERSION


def test_writer_refuses_unsafe_member_names(kit, key):
    manifest, members = kit.parts()
    for bad in ("/abs", "../up", "a/../../up", "manifest.json", "signature.json"):
        with pytest.raises(EdgekitError):
            write_bundle(kit.root / "w.ekb", manifest, {**members, bad: b"x"}, key)
    assert not (kit.root / "w.ekb").exists()


# ----------------------------------------------------------------------------- stable codes
def test_error_codes_are_stable():
    # Published codes never change meaning; this list is append-only.
    assert {c.name: int(c) for c in ErrorCode if 100 <= c < 200} == {
        "BUNDLE_UNREADABLE": 100, "BUNDLE_TRUNCATED": 101, "BUNDLE_UNSIGNED": 102, "BUNDLE_BAD_SIGNATURE": 103,
        "BUNDLE_UNTRUSTED_KEY": 104, "BUNDLE_TAMPERED": 105, "BUNDLE_UNSUPPORTED_VERSION": 106,
        "BUNDLE_BAD_MANIFEST": 107, "BUNDLE_UNSAFE_MEMBER": 108, "BUNDLE_MISSING_MEMBER": 109,
        "BUNDLE_UNLISTED_MEMBER": 110, "BUNDLE_DOWNGRADE": 111, "BUNDLE_DOWNLOAD_FAILED": 112,
        "BUNDLE_CHECKSUM_MISMATCH": 113,
    }
    assert int(ErrorCode.ENGINE_HEALTH_CHECK_FAILED) == 204 and int(ErrorCode.CONFIG_UNAUTHORIZED) == 402
    assert int(ErrorCode.DEVICE_STORAGE) == 403
    assert int(ErrorCode.CONFIG_NO_KEYRING) == 400
    event = BundleError("x", code=ErrorCode.BUNDLE_TAMPERED).to_event()
    assert event["code"] == 105 and event["name"] == "BUNDLE_TAMPERED"
