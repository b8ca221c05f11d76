"""Every `edgekit` command with --json: exactly one JSON document on stdout, failures included, and its exit code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import (AccuracyBudgetError, CalibrationError, ConfigError, DeviceError, EdgekitError, ExitCode,
                            GateError, MissingDependencyError, ModelImportError, SigningError, VerificationError,
                            exit_code_for_runtime_code, exit_code_of)
from edgekit_runtime.contract.errors import (BundleError, EngineError, ErrorCode, InputError, RuntimeConfigError,
                                             RuntimeErrorBase)
from tests.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def one_document(stdout: str) -> Any:
    """stdout parsed as exactly one JSON document (json.loads refuses anything before or after it)."""
    assert stdout.strip(), "nothing on stdout"
    return json.loads(stdout)


def cli_json(*args: Any, code: ExitCode = ExitCode.OK) -> Any:
    """`edgekit ARGS --json` in-process: the exit code must be ``code``; returns the one document."""
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    doc = one_document(result.stdout)
    if code != ExitCode.OK:
        err = doc["error"]
        assert (err["code"], err["name"]) == (int(code), code.name), err
        assert set(err) >= {"code", "name", "message", "hint", "type"} and err["message"]
    return doc


def edgekit(*args: Any, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m edgekit.cli ARGS` in its own process (stdout as a user's pipe sees it, file descriptors included)."""
    return subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs)


def first_document(proc: subprocess.Popen, timeout: float = 30) -> Any:
    """The first JSON document a long-running command prints (pretty-printed over several lines)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"stdout closed before a JSON document: {text!r}; stderr: {proc.stderr.read()}")
        text += line
        try:
            return json.loads(text)
        except ValueError:
            continue
    raise AssertionError(f"no JSON document within {timeout} s: {text!r}")


def stop(proc: subprocess.Popen) -> str:
    """SIGINT (as Ctrl-C), then what else the process wrote on stdout: a long-running command writes nothing."""
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest


# ----------------------------------------------------------------------------- the exit code table
def test_every_edgekit_error_has_its_exit_code():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5, 130]
    expected = {ConfigError: ExitCode.USAGE, ModelImportError: ExitCode.USAGE, CalibrationError: ExitCode.USAGE,
                SigningError: ExitCode.USAGE, VerificationError: ExitCode.VERIFY, DeviceError: ExitCode.DEVICE,
                GateError: ExitCode.GATE, AccuracyBudgetError: ExitCode.GATE}
    for cls, code in expected.items():
        exc = cls("x", {}) if issubclass(cls, GateError) else cls("x")
        assert exit_code_of(exc) == code, cls
    assert exit_code_of(MissingDependencyError("onnx", "onnx", "export")) == ExitCode.USAGE
    assert exit_code_of(ValueError("a bug")) == ExitCode.INTERNAL
    assert issubclass(AccuracyBudgetError, GateError) and AccuracyBudgetError("x", {"a": 1}).report == {"a": 1}

    from edgekit.flash.ssh import FlashError
    from edgekit.fleet.broker import BrokerError
    from edgekit.fleet.connection import FleetConnectionError
    from edgekit.fleet.store import StoreError

    assert {exit_code_of(e("x")) for e in (FlashError, BrokerError, FleetConnectionError)} == {ExitCode.DEVICE}
    assert exit_code_of(StoreError("x")) == ExitCode.USAGE

    # every EdgekitError subclass in the package says its code (inherited or its own), and it is an ExitCode
    seen: set[type] = set()
    todo = [EdgekitError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        assert isinstance(cls.exit_code, ExitCode) and cls.exit_code != ExitCode.OK, cls
        todo.extend(cls.__subclasses__())
    assert len(seen) >= 10


def test_runtime_errors_map_by_code_range():
    # the range decides: every code the runtime has, and ones appended later
    for code in ErrorCode:
        want = {1: ExitCode.VERIFY, 2: ExitCode.DEVICE, 3: ExitCode.USAGE, 4: ExitCode.DEVICE,
                5: ExitCode.DEVICE}[int(code) // 100]
        assert exit_code_of(RuntimeErrorBase("x", code=code)) == want, code
    assert exit_code_for_runtime_code(199) == ExitCode.VERIFY and exit_code_for_runtime_code(250) == ExitCode.DEVICE
    assert exit_code_for_runtime_code(None) == ExitCode.DEVICE and exit_code_for_runtime_code(999) == ExitCode.DEVICE
    assert exit_code_of(BundleError("x", code=ErrorCode.BUNDLE_TAMPERED)) == ExitCode.VERIFY
    assert exit_code_of(EngineError("x")) == ExitCode.DEVICE
    assert exit_code_of(InputError("x")) == ExitCode.USAGE
    assert exit_code_of(RuntimeConfigError("x")) == ExitCode.DEVICE


def test_no_bare_exit_code_literals_in_the_cli():
    """Exits name their ExitCode: no `Exit(3)`/`sys.exit(2)` with a number in edgekit/."""
    import ast

    for path in (REPO / "edgekit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, int) and not isinstance(node.args[0].value, bool):
                name = ast.unparse(node.func)
                assert not name.endswith(("Exit", "sys.exit", "SystemExit")), f"{path}:{node.lineno} {name}"


def test_every_command_takes_json():
    import typer

    def leaves(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from leaves(sub, (*path, name))
        else:
            yield path, cmd

    commands = dict(leaves(typer.main.get_command(app)))
    assert len(commands) >= 20 and ("bundle", "sign") in commands and ("broker",) in commands
    missing = [" ".join(path) for path, cmd in commands.items()
               if not any("--json" in p.opts for p in cmd.params)]
    assert not missing, f"commands without --json: {missing}"


# ----------------------------------------------------------------------------- commands, in-process
def test_targets_json(tmp_path):
    assert {p["name"] for p in cli_json("targets", "list")} >= {"x86-openvino-cpu", "onnxruntime-cpu"}
    assert cli_json("targets", "show", "onnxruntime-cpu")["backend"] == "onnxruntime"
    err = cli_json("targets", "show", "no-such-target", code=ExitCode.USAGE)["error"]
    assert "no-such-target" in err["message"] and err["type"] == "ConfigError"


def test_usage_errors_are_json_too():
    err = cli_json("targets", "list", "--no-such-option", code=ExitCode.USAGE)["error"]
    assert "--no-such-option" in err["message"]
    cli_json("no-such-command", code=ExitCode.USAGE)
    cli_json("bundle", "inspect", "does-not-exist.ekb", code=ExitCode.USAGE)  # a missing file
    cli_json("compile", "does-not-exist.yaml", code=ExitCode.USAGE)
    cli_json("compile", "examples/digits.yaml", "--target", "no-such-target", code=ExitCode.USAGE)
    cli_json("compile", "m.onnx", "--max-accuracy-drop", "1", "--no-accuracy-check", code=ExitCode.USAGE)


def test_a_bug_is_internal_with_its_traceback_on_stderr(monkeypatch):
    import edgekit.config.targets

    def broken():
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(edgekit.config.targets, "available_targets", broken)
    result = runner.invoke(app, ["targets", "list", "--json"])
    assert result.exit_code == ExitCode.INTERNAL
    err = one_document(result.stdout)["error"]
    assert err["name"] == "INTERNAL" and "ZeroDivisionError" in err["message"] and "bug" in err["hint"]
    assert "Traceback" in result.stderr
    plain = runner.invoke(app, ["targets", "list"])  # without --json the exception is not swallowed
    assert plain.exit_code == ExitCode.INTERNAL and isinstance(plain.exception, ZeroDivisionError)


def test_a_refused_build_exits_gate_with_its_report(monkeypatch, keys, tmp_path):
    import edgekit.build.pipeline

    def refuse(cfg, key, on_step=None):
        raise GateError("fidelity cosine 0.91 is below 0.99", {"fidelity": {"cosine": 0.91}}, hint="lower it")

    monkeypatch.setattr(edgekit.build.pipeline, "compile_model", refuse)
    err = cli_json("compile", "examples/digits.yaml", "--key", keys["private"], "--output", tmp_path / "x.ekb",
                   code=ExitCode.GATE)["error"]
    assert err["report"] == {"fidelity": {"cosine": 0.91}} and err["hint"] == "lower it"
    plain = runner.invoke(app, ["compile", "examples/digits.yaml", "--key", str(keys["private"])])
    assert plain.exit_code == ExitCode.GATE and "cosine 0.91" in plain.stderr and not plain.stdout.strip()


def test_keys_generate_json_and_the_git_warning(tmp_path):
    out = cli_json("keys", "generate", "--out", tmp_path / "outside")
    assert out["warning"] is None and Path(out["private_key"]).exists()
    cli_json("keys", "generate", "--out", tmp_path / "outside", code=ExitCode.USAGE)  # refuses to overwrite

    tree = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    result = runner.invoke(app, ["keys", "generate", "--out", str(tree / "keys"), "--json"])
    doc = one_document(result.stdout)
    assert result.exit_code == 0 and "git work tree" in doc["warning"] and "does not ignore" in doc["warning"]
    assert "warning" in result.stderr
    (tree / ".gitignore").write_text("keys/\n")
    doc = cli_json("keys", "generate", "--out", tree / "keys", "--name", "second")
    assert "git ignores it" in doc["warning"]
    # the repository itself ignores keys/ and *.key
    assert {"keys/", "*.key"} <= set((REPO / ".gitignore").read_text().split())


def test_bundle_run_bench_json(int8_bundles, keys, tmp_path):
    import cv2

    from edgekit.data import digits

    good = int8_bundles["onnxruntime-cpu"].bundle
    assert cli_json("bundle", "inspect", good)["model"]["name"]
    assert cli_json("bundle", "verify", good, "--keyring", keys["public"])["ok"]

    tampered = tmp_path / "tampered.ekb"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data.replace(b"7", b"1") if info.filename == "labels.txt" else data)
    err = cli_json("bundle", "verify", tampered, "--keyring", keys["public"], code=ExitCode.VERIFY)["error"]
    assert err["runtime"] == {"code": 105, "name": "BUNDLE_TAMPERED"} and "labels.txt" in err["message"]

    signed = cli_json("bundle", "sign", good, "--key", keys["private"], "--out", tmp_path / "resigned.ekb",
                      "--keyring", keys["public"])
    assert signed["key_id"] == keys["key_id"] and Path(signed["bundle"]).exists()
    cli_json("keys", "generate", "--out", tmp_path, "--name", "other")
    err = cli_json("bundle", "sign", good, "--key", keys["private"], "--out", tmp_path / "x.ekb",
                   "--keyring", tmp_path / "other.pub", code=ExitCode.VERIFY)["error"]
    assert err["runtime"]["name"] == "BUNDLE_UNTRUSTED_KEY"

    img = tmp_path / "img"
    img.mkdir()
    cv2.imwrite(str(img / "0.png"), digits.splits()["test"].images[0])
    assert len(cli_json("run", good, img, "--keyring", keys["public"])) == 1
    cli_json("run", good, tmp_path / "missing.png", "--keyring", keys["public"], code=ExitCode.USAGE)
    bench = cli_json("bench", good, "--keyring", keys["public"], "--queries", "10", "--seconds", "0.05",
                     "--batch", "0")
    assert bench["single_stream"]["inference"]["count"] >= 10
    cli_json("bench", good, "--device", "cam-1", code=ExitCode.USAGE)  # --device needs --fleet


def test_fleet_store_commands_json(tmp_path):
    from edgekit.fleet.store import FleetStore

    missing = tmp_path / "missing.db"
    for args in (("ls",), ("show", "cam-1"), ("history", "cam-1"), ("plot", "cam-1", "--out", tmp_path / "p.png")):
        err = cli_json("fleet", *args, "--db", missing, code=ExitCode.USAGE)["error"]
        assert "no fleet store" in err["message"]
    db = tmp_path / "empty.db"
    FleetStore(db).close()
    assert cli_json("fleet", "ls", "--db", db) == []
    cli_json("fleet", "history", "cam-1", "--db", db, "--since", "yesterday", code=ExitCode.USAGE)


def test_flash_and_rollback_refusals_json(int8_bundles, keys, tmp_path):
    from edgekit.fleet.broker import free_port

    good = int8_bundles["onnxruntime-cpu"].bundle
    cli_json("flash", good, code=ExitCode.USAGE)  # neither --host nor --fleet
    cli_json("flash", tmp_path / "missing.ekb", "--fleet", "f1", code=ExitCode.USAGE)
    cli_json("flash", good, "--fleet", "f1", "--key", keys["private"], code=ExitCode.USAGE)  # no --url/--serve
    # nobody listens on the broker port: the fleet cannot be reached
    err = cli_json("flash", good, "--fleet", "f1", "--key", keys["private"], "--url", "http://127.0.0.1:9/b.ekb",
                   "--broker", f"mqtt://127.0.0.1:{free_port()}", "--record-dir", tmp_path,
                   code=ExitCode.DEVICE)["error"]
    assert err["type"] == "FleetConnectionError"
    cli_json("rollback", "--fleet", "f1", code=ExitCode.USAGE)  # neither --record nor --devices
    cli_json("serve", tmp_path / "no-such-dir", code=ExitCode.USAGE)
    cli_json("broker", "--dir", tmp_path / "b", "--print-config")["text"].startswith("#")


# ----------------------------------------------------------------------------- long-running commands
def test_serve_prints_what_it_serves_then_nothing(int8_bundles, tmp_path):
    import shutil

    from edgekit.fleet.broker import free_port

    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(int8_bundles["onnxruntime-cpu"].bundle, served / "m.ekb")
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", str(served), "--host", "127.0.0.1",
                             "--port", str(free_port()), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        doc = first_document(proc)
        assert doc["url"].startswith("http://127.0.0.1:") and doc["pid"] == proc.pid
        assert [b["name"] for b in doc["bundles"]] == ["m.ekb"] and doc["bundles"][0]["url"].endswith(".ekb")
    finally:
        rest = stop(proc)
    assert rest.strip() == ""


def test_monitor_unbounded_prints_what_it_started_bounded_prints_its_summary(mqtt_broker, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "fleet", "monitor", "--broker", mqtt_broker.url,
                             "--db", str(tmp_path / "f.db"), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        doc = first_document(proc)
        assert doc["monitoring"] and doc["broker"] == mqtt_broker.url and doc["pid"] == proc.pid
    finally:
        rest = stop(proc)
    assert rest.strip() == ""
    bounded = edgekit("fleet", "monitor", "--broker", mqtt_broker.url, "--db", tmp_path / "g.db", "--duration",
                      "0.5", "--json")
    assert bounded.returncode == 0, bounded.stderr
    assert one_document(bounded.stdout)["stored"] == 0
    sim = edgekit("fleet", "simulate", "--broker", mqtt_broker.url, "--devices", "1", "--duration", "0.5", "--json")
    assert sim.returncode == 0 and one_document(sim.stdout)["devices"] == 1


def test_broker_prints_what_it_starts_then_only_mosquitto_on_stderr(mqtt_broker, tmp_path):
    # (mqtt_broker: skips where mosquitto is not installed)
    from edgekit.fleet.broker import free_port, port_open

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "broker", "--port", str(port), "--dir",
                             str(tmp_path / "b"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc = first_document(proc)
        assert doc["broker"] == f"mqtt://127.0.0.1:{port}" and doc["pid"] == proc.pid
        wait_until(lambda: proc.poll() is not None or port_open("127.0.0.1", port), 15, "mosquitto listening")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
    assert rest.strip() == ""


def test_broker_on_a_busy_port_is_one_error_document(mqtt_broker, tmp_path):
    out = edgekit("broker", "--port", str(mqtt_broker.port), "--dir", tmp_path / "b", "--json")
    assert out.returncode == ExitCode.DEVICE
    assert "already listens" in one_document(out.stdout)["error"]["message"]


# ----------------------------------------------------------------------------- compile, as a user runs it
@pytest.fixture(scope="module")
def digits_default_checkpoint(tmp_path_factory) -> Path:
    """The digits CNN as examples/digits.yaml builds it (default width), trained briefly."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build
    from edgekit.train_minimal import train_classifier

    torch.manual_seed(0)
    s = digits.splits()
    model, _ = train_classifier(build(), digits.to_tensor(s["train"].images), s["train"].labels,
                                digits.to_tensor(s["val"].images), s["val"].labels, epochs=3)
    path = tmp_path_factory.mktemp("digits") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


def test_compile_digits_json_stdout_parses(digits_default_checkpoint, keys, tmp_path):
    """`edgekit compile examples/digits.yaml --target x86-openvino-cpu --json` in its own process: NNCF's
    progress bars and torch's "No CUDA runtime" line stay off stdout, which holds the report alone."""
    out = tmp_path / "digits.ekb"
    proc = edgekit("compile", "examples/digits.yaml", "--target", "x86-openvino-cpu", "--checkpoint",
                   digits_default_checkpoint, "--key", keys["private"], "--output", out, "--json")
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    report = one_document(proc.stdout)
    assert report["target"] == "x86-openvino-cpu" and out.exists()
    assert "No CUDA runtime" not in proc.stderr  # quiet unless -v


@pytest.mark.slow
def test_demo_json_stdout_parses(tmp_path):
    """`edgekit demo --json`: training, four compiles and the benchmarks print their steps on stderr only."""
    proc = edgekit("demo", "--workdir", tmp_path / "demo", "--epochs", "2", "--seconds", "0.2", "--json", timeout=900)
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    summary = one_document(proc.stdout)
    assert len(summary["rows"]) == 4 and "1/4 train" in proc.stderr


def test_a_path_that_cannot_be_written_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = cli_json("keys", "generate", "--out", str(blocker / "keys"), code=ExitCode.USAGE)["error"]
    assert err["type"] in ("FileExistsError", "NotADirectoryError", "FileNotFoundError") and str(blocker) in err["message"]


def test_resume_with_host_is_refused_before_anything_is_read():
    err = cli_json("flash", "--resume", "/nonexistent.json", "--host", "a@127.0.0.1", code=ExitCode.USAGE)["error"]
    assert "does not go with --host" in err["message"]


@pytest.mark.parametrize("manifest", [None, b"{not json", b"[1, 2]"])
def test_a_bundle_without_a_readable_manifest_fails_verification(tmp_path, manifest):
    path = tmp_path / "odd.ekb"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model.onnx", b"x")
        if manifest is not None:
            zf.writestr("manifest.json", manifest)
    err = cli_json("bundle", "inspect", str(path), code=ExitCode.VERIFY)["error"]
    assert err["runtime"]["name"] == "BUNDLE_BAD_MANIFEST"
