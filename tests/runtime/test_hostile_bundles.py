"""Hostile bundles signed with the *trusted* key (crafted past the writer's checks): each is refused at
verification with a stable code on the host (`edgekit bundle verify`, `edgekit-runtime verify`, ``load``)
and on the device (`edgekit-agent install`), with no traceback and no temporary folder left behind.

Also: manifest numbers that size memory or work are bounded, a bundle without a health check does not
claim to pass one, ``Model.run`` refuses non-arrays with an InputError, and a second agent on one state
directory is AGENT_ALREADY_RUNNING.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

import edgekit_runtime
from edgekit.cli import app
from edgekit.errors import ExitCode
from edgekit_runtime.agent.cli import main as agent_cli
from edgekit_runtime.agent.state import AgentStateError, StateDir
from edgekit_runtime.bundle import open_bundle
from edgekit_runtime.cli import main as runtime_cli
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, EngineError, ErrorCode, ExitStatus, InputError
from edgekit_runtime.contract.manifest import Manifest

runner = CliRunner()
UNSAFE = ErrorCode.BUNDLE_UNSAFE_MEMBER
BAD_MANIFEST = ErrorCode.BUNDLE_BAD_MANIFEST
LABELS = b"a\nb\nc\n"


# ----------------------------------------------------------------------------- the hostile cases
def _member_cases() -> dict[str, list[tuple[str, bytes]]]:
    """Extra members added to a valid bundle (all listed in its validly signed manifest)."""
    return {
        "file-and-folder": [("labels.txt", LABELS), ("labels.txt/x", b"x")],
        "300-character-name": [("n" * 300, b"x")],
        "long-path": [("/".join(["d" * 200] * 6), b"x")],
        "dot-alias": [("labels.txt", LABELS), ("./labels.txt", b"evil\n")],
        "dot-component": [("health/./extra.npy", b"x")],
        "empty-component": [("health//extra.npy", b"x")],
        "trailing-dot-dot": [("health/..", b"x")],
        "case-alias": [("labels.txt", LABELS), ("Labels.txt", b"evil\n")],
        "not-nfc": [("e\u0301.txt", b"x")],
        "nfc-alias": [("\u00e9.txt", b"x"), ("e\u0301.txt", b"y")],
        "control-character": [("a\nb.txt", b"x")],
        "too-many-members": [(f"m/{i}", b"") for i in range(bundle_spec.MAX_MEMBERS)],
    }


MEMBER_CASES = _member_cases()


def _manifest_cases() -> dict[str, tuple[Callable[[dict], None], str]]:
    """Manifest changes (signed) and the manifest path the refusal must name."""

    def image(size):
        def change(m):
            m["preprocess"] = {"type": "image", "color": "rgb", "size": size}
        return change

    def first_input(shape):
        def change(m):
            m["inputs"][0]["shape"] = shape
        return change

    def set_(section, key, value):
        def change(m):
            m[section] = {**(m.get(section) or {}), key: value}
        return change

    def options(key, value):
        def change(m):
            m["backend"]["options"][key] = value
        return change

    def histogram(bins):
        def change(m):
            m["input_stats"] = {"x": {"histogram": {"edges": [float(i) for i in range(bins + 1)],
                                                    "counts": [1] * bins}}}
        return change

    return {
        "image-size-100000": (image([100000, 100000]), "manifest.preprocess.size"),
        "image-side-over-limit": (image([bundle_spec.MAX_IMAGE_SIDE + 1, 1]), "manifest.preprocess.size"),
        "image-pixels-over-limit": (image([bundle_spec.MAX_IMAGE_SIDE, bundle_spec.MAX_IMAGE_SIDE]),
                                    "manifest.preprocess.size"),
        "input-elements": (first_input(["batch", 100000, 100000]), "manifest.inputs[0].shape"),
        "input-rank": (first_input(["batch"] + [1] * bundle_spec.MAX_RANK), "manifest.inputs[0].shape"),
        "top-k": (set_("postprocess", "top_k", 10**9), "manifest.postprocess.top_k"),
        "threads": (options("threads", 10**6), "manifest.backend.options.threads"),
        "tensorrt-workspace": (options("tensorrt", {"workspace_mb": 10**9}),
                               "manifest.backend.options.tensorrt.workspace_mb"),
        "tensorrt-shapes": (options("tensorrt", {"shapes": {"x": {"min": [1, 4], "opt": [1, 4],
                                                                   "max": [10**6, 10**6]}}}),
                            "manifest.backend.options.tensorrt.shapes['x'].max"),
        "histogram-bins": (histogram(bundle_spec.MAX_HISTOGRAM_BINS + 1), "manifest.input_stats['x'].histogram"),
    }


MANIFEST_CASES = _manifest_cases()


def hostile_member_bundle(kit, case: str) -> Path:
    manifest, members = kit.parts()
    extra = MEMBER_CASES[case]
    if any(name == "labels.txt" for name, _ in extra):
        manifest["labels"] = "labels.txt"
    return kit.craft_signed(f"{case}.ekb", manifest=manifest, entries=[*members.items(), *extra])


def hostile_manifest_bundle(kit, case: str) -> Path:
    manifest, _ = kit.parts()
    MANIFEST_CASES[case][0](manifest)
    return kit.craft_signed(f"{case}.ekb", manifest=manifest)


def pickled_health_bundle(kit) -> Path:
    manifest, members = kit.parts()
    buf = io.BytesIO()
    np.save(buf, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    members["health/input.npy"] = buf.getvalue()
    return kit.craft_signed("pickled.ekb", manifest=manifest, entries=list(members.items()))


# ----------------------------------------------------------------------------- host and device checks
def host_refuses(path: Path, ring, keyfile: Path, code: ErrorCode, capsys, no_temp_leftovers, tmp_path,
                 match: str | None = None) -> None:
    """``open_bundle``, ``load``, `edgekit-runtime verify` and `edgekit bundle verify` all refuse with ``code``."""
    with pytest.raises(BundleError) as info:
        open_bundle(path, ring)
    assert info.value.code == code, info.value
    if match:
        assert match in info.value.message
    with pytest.raises(BundleError):
        edgekit_runtime.load(path, keyring=ring)
    workdir = tmp_path / "workdir"
    with pytest.raises(BundleError):
        edgekit_runtime.load(path, keyring=ring, workdir=workdir)
    assert not workdir.exists()

    capsys.readouterr()
    assert runtime_cli(["verify", str(path), "--keyring", str(keyfile)]) == ExitStatus.RUNTIME_ERROR
    err = capsys.readouterr().err
    assert f"E{int(code)} {code.name}" in err and "Traceback" not in err

    result = runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile), "--json"])
    assert result.exit_code == ExitCode.VERIFY, result.output
    doc = json.loads(result.stdout)["error"]
    assert doc["runtime"]["code"] == int(code) and doc["type"] == "BundleError"
    result = runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile)])
    assert result.exit_code == ExitCode.VERIFY and result.exc_info[0] is SystemExit
    assert "Traceback" not in result.output and f"E{int(code)}" in result.output
    assert list(no_temp_leftovers.iterdir()) == []


def device_refuses(kit, path: Path, tmp_path, capsys, caplog, code: ErrorCode, reason: str, step: str) -> dict:
    """`edgekit-agent install` (no agent running: the CLI runs the transaction) refuses with ``code``."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "tests.pub").write_bytes(kit.public_pem(kit.key))
    config = tmp_path / "agent.json"
    state = tmp_path / "state"
    config.write_text(json.dumps({"device_id": "dev1", "fleet": "f1", "broker_url": "mqtt://127.0.0.1:1",
                                  "state_dir": str(state), "keyring": str(keys), "health_latency_runs": 0}))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        rc = agent_cli(["install", str(path), "--config", str(config), "--json"])
    out, err = capsys.readouterr()
    reply = json.loads(out)
    assert rc == ExitStatus.RUNTIME_ERROR and reply["ok"] is False
    error = reply["error"]
    assert (error["code"], error["reason"], error["step"]) == (int(code), reason, step), error
    assert error["code"] != int(ErrorCode.DEVICE_STORAGE)
    assert "Traceback" not in err and not [r for r in caplog.records if r.exc_info]
    sd = StateDir(state)
    assert sd.read_pointer() is None and sd.read_marker() is None
    assert list(sd.downloads.iterdir()) == []  # the refused download is dropped
    for slot in ("a", "b"):
        folder = sd.slot_dir(slot)
        assert not folder.exists() or [p.name for p in folder.iterdir()] in ([], ["slot.json"])
    return error


@pytest.fixture
def keyfile(kit, tmp_path) -> Path:
    path = tmp_path / "trusted.pub"
    path.write_bytes(kit.public_pem(kit.key))
    return path


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", list(MEMBER_CASES))
def test_hostile_member_names_are_refused_on_host(kit, ring, keyfile, case, capsys, no_temp_leftovers, tmp_path):
    path = hostile_member_bundle(kit, case)
    with zipfile.ZipFile(path) as zf:  # the archive really holds the hostile names, listed and signed
        names = set(zf.namelist())
        assert {n for n, _ in MEMBER_CASES[case]} <= names
        assert set(json.loads(zf.read("manifest.json"))["files"]) == names - bundle_spec.RESERVED_NAMES
    host_refuses(path, ring, keyfile, UNSAFE, capsys, no_temp_leftovers, tmp_path)


@pytest.mark.parametrize("case", ["file-and-folder", "300-character-name", "dot-alias", "too-many-members"])
def test_hostile_member_names_are_refused_on_the_device(kit, case, tmp_path, capsys, caplog):
    device_refuses(kit, hostile_member_bundle(kit, case), tmp_path, capsys, caplog, UNSAFE, "verify_failed",
                   "verify")


def test_dot_alias_never_overwrites_the_listed_file(kit, ring):
    with pytest.raises(BundleError, match=r"'\./labels\.txt'"):
        open_bundle(hostile_member_bundle(kit, "dot-alias"), ring)


def test_member_name_rules():
    ok = ["model.onnx", "health/input.npy", "a/b/c.bin", "n" * 255, "é.txt", "/".join(["d" * 200] * 5)]
    assert [bundle_spec.member_name_problem(n) for n in ok] == [None] * len(ok)
    bad = ["", "/abs", "./a", "a/./b", "a//b", "a/", "..", "a/../b", "a\\b", "C:/x", "n" * 256, "e\u0301",
           "a\x00b", "/".join(["d" * 200] * 6)]
    assert all(bundle_spec.member_name_problem(n) for n in bad)
    assert bundle_spec.member_set_problem(["a/b", "a/c", "b"]) is None
    assert "folder" in bundle_spec.member_set_problem(["a", "a/b"])
    assert "same file" in bundle_spec.member_set_problem(["A.txt", "a.txt"])


def test_the_manifest_refuses_what_the_reader_refuses(kit):
    manifest, members = kit.parts()
    files = {n: {"sha256": "0" * 64, "size": 0} for n in members}
    signing = {"algorithm": "ed25519", "key_id": "0" * 16}
    for bad in (["./labels.txt"], ["labels.txt", "labels.txt/x"], ["n" * 300]):
        with pytest.raises(BundleError) as info:
            Manifest.from_dict({**manifest, "signing": signing,
                                "files": {**files, **{n: {"sha256": "0" * 64, "size": 0} for n in bad}}})
        assert info.value.code == BAD_MANIFEST and "manifest.files" in info.value.message


# ----------------------------------------------------------------------------- manifest bounds
@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_numbers_are_bounded(kit, ring, keyfile, case, capsys, no_temp_leftovers, tmp_path):
    host_refuses(hostile_manifest_bundle(kit, case), ring, keyfile, BAD_MANIFEST, capsys, no_temp_leftovers,
                 tmp_path, match=MANIFEST_CASES[case][1])


def test_image_size_100000_is_refused_on_the_device(kit, tmp_path, capsys, caplog):
    error = device_refuses(kit, hostile_manifest_bundle(kit, "image-size-100000"), tmp_path, capsys, caplog,
                           BAD_MANIFEST, "verify_failed", "verify")
    assert "manifest.preprocess.size" in error["message"]


def test_bounds_leave_room_for_real_models(kit, ring):
    manifest, _ = kit.parts()
    manifest["preprocess"] = {"type": "image", "color": "rgb", "size": [4096, 4096]}
    manifest["postprocess"] = {"type": "classification", "top_k": bundle_spec.MAX_TOP_K}
    manifest["inputs"][0]["shape"] = ["batch", 4]
    open_bundle(kit.craft_signed("big-but-fine.ekb", manifest=manifest), ring)
    manifest["preprocess"]["size"] = [bundle_spec.MAX_IMAGE_SIDE, 1024]
    open_bundle(kit.craft_signed("wide.ekb", manifest=manifest), ring)


# ----------------------------------------------------------------------------- health check
def test_pickled_health_input_is_refused_with_e204(kit, ring, keyfile, no_temp_leftovers):
    path = pickled_health_bundle(kit)
    open_bundle(path, ring)  # the signature and hashes are fine: the member is what it was signed as
    with edgekit_runtime.load(path, keyring=ring) as model:
        with pytest.raises(EngineError) as info:
            model.health_check()
    assert info.value.code == ErrorCode.ENGINE_HEALTH_CHECK_FAILED and "pickle" in info.value.message
    result = runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile), "--json"])
    assert result.exit_code == ExitCode.DEVICE, result.output
    assert json.loads(result.stdout)["error"]["runtime"]["code"] == 204
    result = runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile)])
    assert result.exit_code == ExitCode.DEVICE and "Traceback" not in result.output and "E204" in result.output
    assert list(no_temp_leftovers.iterdir()) == []


def test_pickled_health_input_is_refused_on_the_device_with_e204(kit, tmp_path, capsys, caplog):
    device_refuses(kit, pickled_health_bundle(kit), tmp_path, capsys, caplog,
                   ErrorCode.ENGINE_HEALTH_CHECK_FAILED, "health_check_failed", "health_check")


def test_verify_says_when_a_bundle_has_no_health_check(kit, keyfile):
    manifest, members = kit.parts()
    manifest["health_check"] = None
    del members["health/input.npy"], members["health/expected_output.npy"]
    path = kit.write("nohealth.ekb", manifest=manifest, members=members)
    result = runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile)])
    assert result.exit_code == 0, result.output
    assert "no health check" in result.output and "passed" not in result.output
    doc = json.loads(runner.invoke(app, ["bundle", "verify", str(path), "--keyring", str(keyfile), "--json"]).stdout)
    assert doc["health_check"] == {"ok": True, "checked": False}
    result = runner.invoke(app, ["bundle", "verify", str(kit.write()), "--keyring", str(keyfile)])
    assert result.exit_code == 0 and "health check passed" in result.output


# ----------------------------------------------------------------------------- run() inputs, agent lock
@pytest.mark.parametrize("feeds,code", [
    (None, ErrorCode.INPUT_MISSING), ("x.npy", ErrorCode.INPUT_BAD_DTYPE), ([[1.0, 2.0, 3.0, 4.0]],
                                                                           ErrorCode.INPUT_BAD_DTYPE),
    (3.0, ErrorCode.INPUT_BAD_DTYPE), ({"x": None}, ErrorCode.INPUT_MISSING),
    ({"x": [[1.0, 2.0, 3.0, 4.0]]}, ErrorCode.INPUT_BAD_DTYPE),
], ids=["none", "str", "list", "float", "dict-none", "dict-list"])
def test_run_refuses_non_arrays_with_an_input_error(kit, ring, feeds, code):
    with edgekit_runtime.load(kit.write(), keyring=ring) as model:
        with pytest.raises(InputError) as info:
            model.run(feeds)
        assert info.value.code == code
        assert np.array_equal(model.run(kit.SAMPLE)["y"], kit.SAMPLE @ kit.WEIGHTS)


def test_a_second_agent_is_already_running_not_config_invalid(tmp_path):
    first = StateDir(tmp_path / "state").ensure()
    first.lock()
    try:
        with pytest.raises(AgentStateError) as info:
            StateDir(tmp_path / "state").lock()
        assert info.value.code == ErrorCode.AGENT_ALREADY_RUNNING == 404
        assert "another agent is running" in info.value.message
    finally:
        first.unlock()
    StateDir(tmp_path / "state").lock()  # free again once the first lets go


def test_a_name_the_device_filesystem_cannot_hold_is_not_a_storage_error(kit, tmp_path, capsys, caplog, monkeypatch):
    import errno

    from edgekit_runtime.bundle import VerifiedBundle

    def too_long(self, dest):
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(Path(dest) / "x"))

    monkeypatch.setattr(VerifiedBundle, "extract", too_long)  # as on eCryptfs (143-byte names)
    error = device_refuses(kit, kit.write(), tmp_path, capsys, caplog, UNSAFE, "prepare_failed", "prepare")
    assert "filesystem" in error["message"]
