"""The committed hostile bundles (tests/golden/hostile/) are refused with the code ``cases.json`` names,
by every reader: the runtime's ``open_bundle``/``load``, `edgekit-runtime verify` (a subprocess, as on a
device), `edgekit bundle verify` on the host and `edgekit-agent install`; with no traceback and nothing
left behind. And ``make.py`` still writes those files byte for byte, so they cannot drift from its table.

If a case here fails, a check that keeps a device safe is gone: fix the reader, not the golden file.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import edgekit_runtime
from edgekit.cli import app
from edgekit.errors import ExitCode
from edgekit_runtime.agent.cli import main as agent_cli
from edgekit_runtime.agent.state import StateDir
from edgekit_runtime.bundle import open_bundle
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, EngineError, ErrorCode, ExitStatus
from edgekit_runtime.keyring import Keyring

HOSTILE = Path(__file__).resolve().parents[1] / "golden" / "hostile"
DOC = json.loads((HOSTILE / "cases.json").read_text(encoding="utf-8"))
CASES: dict[str, dict] = DOC["cases"]
PUBLIC_KEY = HOSTILE / DOC["public_key"]
runner = CliRunner()


def expected(file: str) -> tuple[dict, ErrorCode | None]:
    case = CASES[file]
    return case, (ErrorCode(case["code"]) if case["code"] is not None else None)


@pytest.fixture
def ring() -> Keyring:
    return Keyring.from_paths(PUBLIC_KEY)


# ----------------------------------------------------------------------------- the files themselves
def test_the_folder_holds_one_small_file_per_case():
    assert sorted(p.name for p in HOSTILE.glob("*.ekb")) == sorted(CASES)
    for path in HOSTILE.glob("*.ekb"):
        assert path.stat().st_size < 50_000, path.name
    for case in CASES.values():  # the stable codes are the contract: a renamed code is a broken golden
        if case["code"] is not None:
            assert ErrorCode(case["code"]).name == case["name"]
        assert case["refused_at"] in ("verify", "health_check", None)
        assert (case["code"] is None) == (case["refused_at"] is None)
    # the issue's own cases are all here
    assert {"file-and-folder.ekb", "name-300-characters.ekb", "dot-alias.ekb", "pickled-health-input.ekb",
            "image-size-100000.ekb", "no-health-check.ekb"} <= set(CASES)
    # a test key's seed lives in make.py; no private key file sits beside the bundles
    assert not [p for p in HOSTILE.iterdir() if b"PRIVATE KEY" in p.read_bytes()]


@pytest.mark.parametrize("file", list(CASES))
def test_each_bundle_is_validly_signed_by_the_test_key(file, ring):
    """So the signature never refuses one: only the hostile change stands between it and an install."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name")
        with zipfile.ZipFile(HOSTILE / file) as zf:
            names = zf.namelist()
            manifest_bytes = zf.read("manifest.json")
            sig = json.loads(zf.read("signature.json"))
    ring.verify(sig["key_id"], base64.b64decode(sig["signature"]), manifest_bytes)  # raises if not
    listed = set(json.loads(manifest_bytes)["files"])
    present = set(names) - bundle_spec.RESERVED_NAMES
    if file not in ("unlisted-member.ekb", "missing-member.ekb", "directory-entry.ekb"):
        assert listed == present, "every member is listed and signed"
    assert CASES[file]["code"] is not None or len(names) == len(set(names))


def test_the_generator_writes_the_committed_files_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, str(HOSTILE / "make.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in HOSTILE.iterdir() if p.name not in ("make.py", "README.md", "__pycache__"))
    assert written == committed
    drifted = [n for n in written if (tmp_path / n).read_bytes() != (HOSTILE / n).read_bytes()]
    assert drifted == [], f"run `python tests/golden/hostile/make.py` and commit: {drifted} differ from make.py"


# ----------------------------------------------------------------------------- device side: the runtime
@pytest.mark.parametrize("file", list(CASES))
def test_the_runtime_refuses_with_the_stable_code(file, ring, tmp_path, no_temp_leftovers):
    case, code = expected(file)
    path = HOSTILE / file
    workdir = tmp_path / "workdir"
    if case["refused_at"] == "verify":
        with pytest.raises(BundleError) as info:
            open_bundle(path, ring)
        assert info.value.code == code and case["message"] in info.value.message, info.value
        for where in (None, workdir):  # a temporary folder, or the caller's
            with pytest.raises(BundleError) as info:
                edgekit_runtime.load(path, keyring=ring, workdir=where)
            assert info.value.code == code
        assert not workdir.exists()  # refused before anything was written
    else:
        open_bundle(path, ring)  # what was signed is what is there
        with edgekit_runtime.load(path, keyring=ring, workdir=workdir) as model:
            if case["refused_at"] == "health_check":
                with pytest.raises(EngineError) as info:
                    model.health_check()
                assert info.value.code == code and case["message"] in info.value.message, info.value
            else:
                health = model.health_check()
                assert health["ok"] is True
                assert health["checked"] is (file == "baseline.ekb")
    assert list(no_temp_leftovers.iterdir()) == []


@pytest.mark.parametrize("file", list(CASES))
def test_edgekit_runtime_verify_refuses_with_the_stable_code(file):
    case, code = expected(file)
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "verify", str(HOSTILE / file),
                           "--keyring", str(PUBLIC_KEY), "--json"], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    reply = json.loads(proc.stdout)
    if case["refused_at"] == "verify":
        assert proc.returncode == ExitStatus.RUNTIME_ERROR and reply["ok"] is False
        assert (reply["error"]["code"], reply["error"]["name"]) == (case["code"], case["name"])
        assert case["message"] in reply["error"]["message"]
        assert f"E{case['code']} {case['name']}" in proc.stderr
    else:  # `verify` checks signature, names and manifest; it runs no model, so no health check
        assert proc.returncode == ExitStatus.OK and reply["ok"] is True, proc.stderr


# ----------------------------------------------------------------------------- host side: edgekit bundle verify
@pytest.mark.parametrize("file", list(CASES))
def test_edgekit_bundle_verify_refuses_with_the_same_code(file, no_temp_leftovers):
    case, code = expected(file)
    args = ["bundle", "verify", str(HOSTILE / file), "--keyring", str(PUBLIC_KEY)]
    as_json = runner.invoke(app, [*args, "--json"])
    text = runner.invoke(app, args)
    for result in (as_json, text):
        assert "Traceback" not in result.output
        assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    words = " ".join(text.output.split())  # the console wraps long lines
    if code is None:
        assert as_json.exit_code == text.exit_code == 0, text.output
        assert case["message"] in words
        if file == "no-health-check.ekb":
            assert "passed" not in words
            assert json.loads(as_json.stdout)["health_check"] == {"ok": True, "checked": False}
    else:
        exit_code = ExitCode.VERIFY if case["refused_at"] == "verify" else ExitCode.DEVICE
        assert as_json.exit_code == text.exit_code == exit_code, text.output
        error = json.loads(as_json.stdout)["error"]
        assert error["type"] == ("BundleError" if case["refused_at"] == "verify" else "EngineError")
        assert (error["runtime"]["code"], error["runtime"]["name"]) == (case["code"], case["name"])
        assert case["message"] in error["message"]
        assert f"E{case['code']}" in text.output and text.exc_info[0] is SystemExit
    assert list(no_temp_leftovers.iterdir()) == []


# ----------------------------------------------------------------------------- device side: the agent's install
def agent_install(tmp_path: Path, file: str, capsys, *, as_json: bool = True) -> tuple[int, str, str, StateDir]:
    """`edgekit-agent install` with no agent running: the CLI runs the install transaction itself."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / PUBLIC_KEY.name).write_bytes(PUBLIC_KEY.read_bytes())
    config = tmp_path / "agent.json"
    state = tmp_path / "state"
    config.write_text(json.dumps({"device_id": "dev1", "fleet": "f1", "broker_url": "mqtt://127.0.0.1:1",
                                  "state_dir": str(state), "keyring": str(keys), "health_latency_runs": 0}))
    capsys.readouterr()
    rc = agent_cli(["install", str(HOSTILE / file), "--config", str(config), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    return rc, out, err, StateDir(state)


@pytest.mark.parametrize("file", [f for f, c in CASES.items() if c["code"] is not None])
def test_the_agent_refuses_to_install_it(file, tmp_path, capsys, caplog):
    case, code = expected(file)
    with caplog.at_level(logging.WARNING):
        rc, out, err, sd = agent_install(tmp_path, file, capsys)
    error = json.loads(out)["error"]
    step = case["refused_at"]
    reason = "verify_failed" if step == "verify" else "health_check_failed"
    assert rc == ExitStatus.RUNTIME_ERROR
    assert (error["code"], error["reason"], error["step"]) == (case["code"], reason, step), error
    assert error["code"] != int(ErrorCode.DEVICE_STORAGE)  # the bundle's fault, not the device's disk
    assert "Traceback" not in err and not [r for r in caplog.records if r.exc_info]
    assert sd.read_pointer() is None and sd.read_marker() is None  # nothing switched, no install pending
    assert list(sd.downloads.iterdir()) == []
    for slot in ("a", "b"):
        folder = sd.slot_dir(slot)
        assert not folder.exists() or [p.name for p in folder.iterdir()] in ([], ["slot.json"])


@pytest.mark.parametrize("file", [f for f, c in CASES.items() if c["code"] is None])
def test_the_agent_installs_the_control_cases(file, tmp_path, capsys):
    rc, out, _, sd = agent_install(tmp_path, file, capsys)
    reply = json.loads(out)
    assert rc == ExitStatus.OK and reply["ok"] is True, reply
    assert reply["health"]["checked"] is (file == "baseline.ekb")
    assert sd.read_pointer() is not None


def test_the_agent_says_when_an_installed_bundle_has_no_health_check(tmp_path, capsys):
    rc, out, _, _ = agent_install(tmp_path, "no-health-check.ekb", capsys, as_json=False)
    assert rc == ExitStatus.OK
    assert "no health check" in out and "passed" not in out, out
