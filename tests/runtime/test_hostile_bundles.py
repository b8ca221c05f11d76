"""Hostile bundles built in code, for what the committed goldens (tests/golden/hostile/, checked by
test_golden_hostile.py: names, paths, links, duplicates, manifest bounds, pickled health input, no
health check) do not hold: an archive of more than MAX_MEMBERS members (too big to commit), the name
rules and manifest bounds themselves, bounds that still fit real models, a name the device's
filesystem cannot hold. Each refusal: a stable code on the host (`edgekit bundle verify`,
`edgekit-runtime verify`, ``load``) and the device (`edgekit-agent install`), no traceback, no
temporary folder left behind.

Also: ``Model.run`` refuses non-arrays with an InputError, and a second agent on one state directory
is AGENT_ALREADY_RUNNING.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

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
from edgekit_runtime.contract.errors import BundleError, ErrorCode, ExitStatus, InputError
from edgekit_runtime.contract.manifest import Manifest

runner = CliRunner()
UNSAFE = ErrorCode.BUNDLE_UNSAFE_MEMBER
BAD_MANIFEST = ErrorCode.BUNDLE_BAD_MANIFEST


# ----------------------------------------------------------------------------- the hostile cases
def _member_cases() -> dict[str, list[tuple[str, bytes]]]:
    """Extra members added to a valid bundle (all listed in its validly signed manifest).

    The other name cases are committed goldens (tests/golden/hostile/); this one would be ~90 KB.
    """
    return {
        "too-many-members": [(f"m/{i}", b"") for i in range(bundle_spec.MAX_MEMBERS)],
    }


MEMBER_CASES = _member_cases()


def hostile_member_bundle(kit, case: str) -> Path:
    manifest, members = kit.parts()
    return kit.craft_signed(f"{case}.ekb", manifest=manifest, entries=[*members.items(), *MEMBER_CASES[case]])


# ----------------------------------------------------------------------------- host and device checks
def host_refuses(path: Path, ring, keyfile: Path, code: ErrorCode, capsys, no_temp_leftovers, tmp_path) -> None:
    """``open_bundle``, ``load``, `edgekit-runtime verify` and `edgekit bundle verify` all refuse with ``code``."""
    with pytest.raises(BundleError) as info:
        open_bundle(path, ring)
    assert info.value.code == code, info.value
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


@pytest.mark.parametrize("case", list(MEMBER_CASES))
def test_hostile_member_names_are_refused_on_the_device(kit, case, tmp_path, capsys, caplog):
    device_refuses(kit, hostile_member_bundle(kit, case), tmp_path, capsys, caplog, UNSAFE, "verify_failed",
                   "verify")


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
def test_bounds_leave_room_for_real_models(kit, ring):
    manifest, _ = kit.parts()
    manifest["preprocess"] = {"type": "image", "color": "rgb", "size": [4096, 4096]}
    manifest["postprocess"] = {"type": "classification", "top_k": bundle_spec.MAX_TOP_K}
    manifest["inputs"][0]["shape"] = ["batch", 4]
    open_bundle(kit.craft_signed("big-but-fine.ekb", manifest=manifest), ring)
    manifest["preprocess"]["size"] = [bundle_spec.MAX_IMAGE_SIDE, 1024]
    open_bundle(kit.craft_signed("wide.ekb", manifest=manifest), ring)


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
