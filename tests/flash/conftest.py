"""Fixtures for ``edgekit flash``: a real OpenSSH server on a loopback port, and a "device"
(agent config, state dir, keyring, signed bundles) that lives on this same machine.

* ``sshd`` — Debian openssh-server's ``/usr/sbin/sshd`` with a throw-away ed25519 host key
  and user key, public-key login only. ``make test`` installs the package in CI; elsewhere
  the tests are skipped with the apt command as the reason (CI fails instead).
* ``device`` — what ``edgekit-agent install`` needs on the device side, signed bundles,
  a tampered one, and agent commands (the real agent through a wrapper, or a stub).
* ``flaky_proxy`` — a TCP relay that cuts chosen connections after N bytes (a dropped link).

pytest runs with ``--import-mode=importlib``: tests reach the helpers through fixtures.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
APT = "apt-get install openssh-server openssh-client (`make test` does it when run as root)"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so ``sshd`` can print its log when a test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A fresh OpenSSH key pair at ``path`` / ``path.pub`` (no passphrase)."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", f"edgekit-tests-{path.name}", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def fingerprint(pub: Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it (independent of paramiko)."""
    out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True,
                         text=True).stdout
    return out.split()[1]


class Sshd:
    """One sshd with its own config, keys and log; ``target`` logs in as the current user."""

    host = "127.0.0.1"
    keygen = staticmethod(keygen)
    fingerprint_of = staticmethod(fingerprint)

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(root / "ssh_host_ed25519_key")
        self.identity = keygen(root / "id_ed25519")
        self.authorized_keys = root / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.identity}.pub").read_text())
        self.host_key_pub = Path(f"{self.host_key}.pub").read_text().split()[:2]  # [type, base64]
        self.fingerprint = fingerprint(Path(f"{self.host_key}.pub"))
        self.known_hosts = self.known_hosts_file()
        self.log_path = root / "sshd.log"
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "UsePAM no",
            "StrictModes no",
            f"PidFile {root / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",  # CI runs the tests as root
            "Subsystem sftp internal-sftp",
            "PrintMotd no",
            "LogLevel VERBOSE",
        ]) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_line(self) -> str:
        return self.line_for(self.port)

    def line_for(self, port: int, key: tuple[str, str] | list[str] | None = None) -> str:
        kind, b64 = key or self.host_key_pub
        return f"[{self.host}]:{port} {kind} {b64}\n"

    def known_hosts_file(self, port: int | None = None, name: str | None = None) -> Path:
        """A known_hosts file holding this server's key under ``[127.0.0.1]:port`` (default: its own port)."""
        port = port or self.port
        path = self.root / (name or f"known_hosts-{port}")
        path.write_text(self.line_for(port))
        return path

    def start(self, timeout: float = 10.0) -> "Sshd":
        if os.geteuid() == 0:
            # sshd's privilege separation needs this empty root-owned folder (the package's unit makes it)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._banner():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start on port {self.port}:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _require(binary: str) -> None:
    if not Path(binary).exists():
        why = f"{binary} is not installed: {APT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)  # CI must run the SSH tests, never skip them
        pytest.skip(why)


@pytest.fixture
def sshd(request, tmp_path):
    """A started sshd on a free loopback port (public-key login for the current user only).

    Attributes: ``port``, ``host`` ("127.0.0.1"), ``user``, ``target`` ("user@127.0.0.1:port"),
    ``identity`` (the user's private key), ``known_hosts`` (a file with ``[127.0.0.1]:port``
    and the host key), ``known_hosts_line``, ``fingerprint`` ("SHA256:..." of the host key),
    ``host_key_pub`` ([type, base64]); helpers ``known_hosts_file(port)``, ``line_for(port, key)``,
    ``keygen(path, kind)``, ``fingerprint_of(pub)``, ``log()``. Its log is printed when the test fails.
    """
    _require(SSHD)
    _require(SSH_KEYGEN)
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    if failed:
        sys.stderr.write(f"\n----- sshd log ({server.log_path}) -----\n{server.log()}\n")


# ----------------------------------------------------------------------------- the device side
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 8 - 0.75
SAMPLE = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
PADDING = 768 * 1024  # incompressible bytes, so a copy takes many SFTP writes and can be cut and resumed


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _matmul_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHTS, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="edgekit-tests")
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="session")
def flash_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def flash_model() -> bytes:
    return _matmul_onnx()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


STUB_AGENT = r'''
import hashlib, json, sys
args = sys.argv[1:]
with open(RECORD, "a") as fh:
    fh.write(json.dumps(args) + "\n")
if not args or args[0] != "install" or "--json" not in args or "--sha256" not in args:
    print("usage: stub-agent install PATH --config CFG --json --sha256 HEX", file=sys.stderr)
    sys.exit(2)
path, want = args[1], args[args.index("--sha256") + 1]
got = hashlib.sha256(open(path, "rb").read()).hexdigest()
if got != want:
    print(json.dumps({"ok": False, "error": {"reason": "checksum_mismatch", "step": "verify", "code": 113,
                      "name": "BUNDLE_CHECKSUM_MISMATCH", "message": f"{path} has sha256 {got}"}}))
    sys.exit(3)
print(json.dumps({"ok": True, "slot": "a", "previous_slot": None, "sha256": got, "stub": True}))
'''


class Device:
    """The device side of a flash, on this machine: config, state dir, keyring, upload folder, agents."""

    sha256_of = staticmethod(sha256_of)

    def __init__(self, root: Path, key: Ed25519PrivateKey, model: bytes):
        self.root = root
        self.key = key
        self.model = model
        self.keyring = root / "keys"
        self.keyring.mkdir(parents=True)
        (self.keyring / "tests.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.state_dir = root / "state"
        self.remote_dir = root / "uploads"
        self.bundles = root / "bundles"
        self.config = self.config_file()
        self.agent = self._script("edgekit-agent", "#!/bin/sh\n"
                                  f'exec "{sys.executable}" -m edgekit_runtime.agent.cli "$@"\n')
        self.stub_record = root / "stub-agent.calls"
        self.stub_agent = self._script("stub-agent", f"#!{sys.executable}\nRECORD = {str(self.stub_record)!r}\n"
                                       + STUB_AGENT)

    # -- agent ------------------------------------------------------------------------
    def settings(self, **overrides) -> dict[str, Any]:
        s = {"device_id": "desk-01", "fleet": "lab", "broker_url": "mqtt://127.0.0.1:1",
             "state_dir": str(self.state_dir), "keyring": str(self.keyring)}
        s.update(overrides)
        return s

    def config_file(self, name: str = "agent.json", **overrides) -> Path:
        path = self.root / name
        path.write_text(json.dumps(self.settings(**overrides), indent=2))
        return path

    def _script(self, name: str, text: str) -> Path:
        path = self.root / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        return path

    @property
    def agent_supports_sha256(self) -> bool:
        """Whether this checkout's ``edgekit-agent install`` takes ``--sha256`` (the spec's flash contract)."""
        return "--sha256" in (REPO / "runtime" / "edgekit_runtime" / "agent" / "cli.py").read_text()

    def stub_calls(self) -> list[list[str]]:
        """The argv of every call of the stub agent."""
        if not self.stub_record.exists():
            return []
        return [json.loads(line) for line in self.stub_record.read_text().splitlines()]

    def flash_kwargs(self, agent: Path | None = None, **overrides) -> dict[str, Any]:
        """``flash_over_ssh`` keywords that point at this device (the stub agent unless ``agent``)."""
        kw = {"agent_command": str(agent or self.stub_agent), "agent_config": str(self.config),
              "remote_dir": str(self.remote_dir), "timeout": 10.0, "install_timeout": 60.0, "retry_delay": 0.05}
        kw.update(overrides)
        return kw

    # -- state ---------------------------------------------------------------------
    def active_bundle(self) -> Path | None:
        """The active slot's bundle (``active`` is JSON {"slot": ...} or, from older agents, "a\\n")."""
        active = self.state_dir / "active"
        if not active.exists():
            return None
        text = active.read_text().strip()
        slot = json.loads(text)["slot"] if text.startswith("{") else text
        bundle = self.state_dir / "slots" / slot / "bundle.ekb"
        return bundle if bundle.exists() else None

    def slot_bundles(self) -> list[Path]:
        return sorted(self.state_dir.glob("slots/*/bundle.ekb"))

    # -- bundles -------------------------------------------------------------------
    def parts(self, release: int = 1, padding: int = PADDING) -> tuple[dict[str, Any], dict[str, bytes]]:
        from edgekit_runtime.contract import bundle_spec

        members = {"model.onnx": self.model, "health/input.npy": _npy(SAMPLE),
                   "health/expected_output.npy": _npy(SAMPLE @ WEIGHTS)}
        if padding:
            members["extra/padding.bin"] = np.random.default_rng(release).bytes(padding)
        manifest = {
            "format": bundle_spec.FORMAT_NAME, "format_version": bundle_spec.FORMAT_VERSION,
            "created_at": "2020-01-01T00:00:00+00:00", "created_by": "edgekit tests",
            "model": {"name": "matmul", "version": f"1.0.{release}", "release": release},
            "target": {"name": "onnxruntime-cpu", "device": "generic"},
            "backend": {"name": "onnxruntime", "version": "test", "precision": "fp32", "artifact": "model.onnx",
                        "engines": ["onnxruntime"], "options": {"threads": 1}},
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": None,
                        "quantization": None}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "layout": None,
                         "quantization": None}],
            "preprocess": None, "postprocess": None, "labels": None, "metrics": {}, "calibration": None,
            "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                             "atol": 1e-5, "rtol": 1e-5},
            "files": {}, "signing": {},
        }
        return manifest, members

    def bundle(self, name: str = "ok.ekb", release: int = 1, padding: int = PADDING) -> Path:
        """A valid bundle signed with the key in the device's keyring (~0.8 MB with the default padding)."""
        from edgekit.build.bundle_writer import write_bundle

        manifest, members = self.parts(release, padding)
        return write_bundle(self.bundles / name, manifest, members, self.key)

    def tampered(self, name: str = "tampered.ekb", member: str = "model.onnx") -> Path:
        """A valid bundle with one byte flipped inside ``member`` (a well-formed ZIP: only its sha256 differs)."""
        good = self.bundle(f"untampered-{name}")
        out = self.bundles / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == member:
                    data = data[:20] + bytes([data[20] ^ 0x01]) + data[21:]
                dst.writestr(info, data)
        return out


@pytest.fixture
def device(tmp_path, flash_signing_key, flash_model) -> Device:
    """This machine playing the device: ``config`` (agent config JSON), ``state_dir``, ``keyring``,
    ``remote_dir`` (upload folder, not created), ``agent`` (wrapper running this checkout's
    ``edgekit-agent``), ``stub_agent`` (checks ``--sha256`` and records its argv: ``stub_calls()``),
    ``bundle()``, ``tampered()``, ``active_bundle()``, ``slot_bundles()``, ``flash_kwargs()``."""
    return Device(tmp_path / "device", flash_signing_key, flash_model)


# ----------------------------------------------------------------------------- a link that drops
class FlakyProxy:
    """Relays loopback TCP to ``port``; connection number i is cut after ``cuts[i]`` client bytes (None: never)."""

    LINGER_S = 0.3

    def __init__(self, port: int, cuts: list[int | None]):
        self.upstream = port
        self.cuts = list(cuts)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            cut = self.cuts[self.connections] if self.connections < len(self.cuts) else None
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, server]
            state = {"sent": 0}
            for a, b, limit in ((client, server, cut), (server, client, None)):
                t = threading.Thread(target=self._pump, args=(a, b, limit, state, client, server), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src, dst, limit, state, client, server) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None:
                    state["sent"] += len(data)
                    if state["sent"] > limit:
                        # Stall, then die: what was relayed before gets processed (the way back still flows),
                        # so the device holds a known prefix when the client reconnects.
                        time.sleep(FlakyProxy.LINGER_S)
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (client, server):  # a cut closes both sides at once, like a dead link
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def flaky_proxy():
    """Factory: ``flaky_proxy(port, cuts=[300_000, None])`` → a started :class:`FlakyProxy` (``.port``)."""
    made: list[FlakyProxy] = []

    def make(port: int, cuts: list[int | None]) -> FlakyProxy:
        proxy = FlakyProxy(port, cuts)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


# ----------------------------------------------------------------------------- fleet commands
@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """The key the host signs fleet commands with (one per test module)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keyring(key):
    """The devices' keyring: trusts ``key``."""
    from edgekit_runtime.keyring import Keyring, key_id_of

    pub = key.public_key()
    return Keyring({key_id_of(pub): pub})
