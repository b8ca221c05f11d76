"""firmware/bootstrap.sh, run for real into a throw-away root (``--root DIR --no-systemctl --no-pip``).

With ``--root`` and without ``--device-paths`` the agent.toml it writes names paths inside
DIR, so ``AgentConfig.load`` of the staged file points into the sandbox; ``--device-paths``
writes the device's own paths (for an OS image) and the test maps them into DIR itself.
As a non-root user, or into a DIR without ``etc/passwd``, the user/chown/systemctl steps
are skipped; ``test_os_tree_as_root`` runs them against a minimal OS tree when it can.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit_runtime.agent.config import AgentConfig
from edgekit_runtime.keyring import Keyring

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
BOOTSTRAP = FIRMWARE / "bootstrap.sh"
DEVICE = "cam-01"
FLEET = "factory-a"
BROKER = "mqtts://broker.example.com:8883"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def inputs(tmp_path):
    """The files an operator hands to bootstrap: two public keys, a password, TLS material."""
    d = tmp_path / "inputs"
    d.mkdir()
    for name in ("host.pub", "next.pub"):
        key = Ed25519PrivateKey.generate().public_key()
        (d / name).write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    private = Ed25519PrivateKey.generate()
    (d / "signer.key").write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (d / "password").write_text("s3cret\n")
    (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n")
    (d / "cam-01.crt").write_text("-----BEGIN CERTIFICATE-----\nDEV\n-----END CERTIFICATE-----\n")
    (d / "cam-01.key").write_text("-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n")
    return d


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


def bootstrap(root: Path, *args: str, base: bool = True) -> subprocess.CompletedProcess:
    """Run bootstrap.sh into ``root`` without systemctl or pip; ``base`` adds the device's identity."""
    argv = ["bash", str(BOOTSTRAP), "--root", str(root), "--no-systemctl", "--no-pip"]
    if base:
        argv += ["--device-id", DEVICE, "--fleet", FLEET, "--broker-url", BROKER]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60)


def full_options(inputs: Path) -> list[str]:
    return ["--key", str(inputs / "host.pub"), "--key", str(inputs / "next.pub"),
            "--username", DEVICE, "--password-file", str(inputs / "password"), "--ca", str(inputs / "ca.crt"),
            "--cert", str(inputs / "cam-01.crt"), "--client-key", str(inputs / "cam-01.key")]


def test_bootstrap_stages_a_device(root, inputs):
    out = bootstrap(root, *full_options(inputs))
    assert out.returncode == 0, out.stderr
    etc, state = root / "etc/edgekit", root / "var/lib/edgekit-agent"
    expected = {
        etc: 0o755, etc / "keys": 0o755, etc / "keys/host.pub": 0o644, etc / "keys/next.pub": 0o644,
        etc / "agent.toml": 0o640, etc / "agent.password": 0o640, etc / "ca.crt": 0o644,
        etc / "cam-01.crt": 0o644, etc / "cam-01.key": 0o640,
        state: 0o750, state / "slots/a": 0o750, state / "slots/b": 0o750,
        state / "inbox": 0o770, state / "outbox": 0o770,
        root / "var/tmp/edgekit-uploads": 0o1777,
        root / "etc/systemd/system/edgekit-agent.service": 0o644,
        root / "etc/systemd/system/edgekit-workload.service": 0o644,
        root / "etc/tmpfiles.d/edgekit.conf": 0o644,
    }
    modes = {str(p.relative_to(root)): oct(_mode(p)) for p in expected}
    assert modes == {str(p.relative_to(root)): oct(m) for p, m in expected.items()}
    for name in ("host.pub", "next.pub"):
        assert (etc / "keys" / name).read_bytes() == (inputs / name).read_bytes()
    assert (etc / "cam-01.key").read_bytes() == (inputs / "cam-01.key").read_bytes()
    for unit in ("edgekit-agent.service", "edgekit-workload.service"):
        assert (root / "etc/systemd/system" / unit).read_text() == (FIRMWARE / "systemd" / unit).read_text()
    assert "d /var/tmp/edgekit-uploads 1777" in (root / "etc/tmpfiles.d/edgekit.conf").read_text()
    assert not list(etc.glob(".*")) and not list(etc.glob("*.tmp.*"))  # no temporary files left

    # the staged config is valid and points inside the root
    cfg = AgentConfig.load(etc / "agent.toml")
    assert (cfg.device_id, cfg.fleet, cfg.broker) == (DEVICE, FLEET, ("broker.example.com", 8883, True))
    assert cfg.state_dir == state and cfg.keyring == etc / "keys"
    assert cfg.username == DEVICE and cfg.password() == "s3cret"
    assert (cfg.ca_file, cfg.cert_file, cfg.key_file) == (etc / "ca.crt", etc / "cam-01.crt", etc / "cam-01.key")
    assert len(Keyring.from_paths(cfg.keyring).keys) == 2

    # what it could not do here is listed, and it says what to run next
    assert "skipped:" in out.stdout and "--no-pip" in out.stdout and "--no-systemctl" in out.stdout
    if os.geteuid() != 0 or not (root / "etc/passwd").exists():
        assert "create the system user and group edgekit" in out.stdout
    assert f"edgekit-agent status --config {etc / 'agent.toml'}" in out.stdout


def test_device_paths_for_an_image(root, inputs):
    out = bootstrap(root, "--key", str(inputs / "host.pub"), "--username", DEVICE,
                    "--password-file", str(inputs / "password"), "--device-paths")
    assert out.returncode == 0, out.stderr
    data = tomllib.loads((root / "etc/edgekit/agent.toml").read_text())
    assert data["state_dir"] == "/var/lib/edgekit-agent" and data["keyring"] == "/etc/edgekit/keys"
    assert data["password_file"] == "/etc/edgekit/agent.password"
    # what the device will see once DIR is its /
    mapped = {k: (str(root) + v if isinstance(v, str) and v.startswith("/") else v) for k, v in data.items()}
    cfg = AgentConfig.from_dict(mapped)
    assert cfg.password() == "s3cret" and cfg.state_dir == root / "var/lib/edgekit-agent"
    assert "status --config /etc/edgekit/agent.toml" in out.stdout


def test_rerun_keeps_agent_toml_and_force_rewrites_it(root, inputs):
    key = ["--key", str(inputs / "host.pub")]
    assert bootstrap(root, *key).returncode == 0
    conf = root / "etc/edgekit/agent.toml"
    before, mtime = conf.read_bytes(), conf.stat().st_mtime_ns

    same = bootstrap(root, *key)
    assert same.returncode == 0, same.stderr
    assert conf.read_bytes() == before and conf.stat().st_mtime_ns == mtime
    assert "unchanged:" in same.stdout and str(conf) in same.stdout

    # different options, no --force: kept (and the summary says so)
    other = ["--device-id", DEVICE, "--fleet", "factory-b", "--broker-url", BROKER] + key
    kept = bootstrap(root, *other, base=False)
    assert kept.returncode == 0, kept.stderr
    assert conf.read_bytes() == before and conf.stat().st_mtime_ns == mtime
    assert "kept:" in kept.stdout and "--force" in kept.stdout

    forced = bootstrap(root, *other, "--force", base=False)
    assert forced.returncode == 0, forced.stderr
    assert AgentConfig.load(conf).fleet == "factory-b"
    assert (root / "etc/edgekit/agent.toml.bak").read_bytes() == before
    assert _mode(conf) == 0o640


def test_rerun_keeps_a_changed_key_unless_forced(root, inputs):
    assert bootstrap(root, "--key", str(inputs / "host.pub")).returncode == 0
    staged = root / "etc/edgekit/keys/host.pub"
    original = staged.read_bytes()
    (inputs / "host.pub").write_bytes((inputs / "next.pub").read_bytes())
    kept = bootstrap(root, "--key", str(inputs / "host.pub"))
    assert kept.returncode == 0 and staged.read_bytes() == original and "kept:" in kept.stdout
    forced = bootstrap(root, "--key", str(inputs / "host.pub"), "--force")
    assert forced.returncode == 0 and staged.read_bytes() == (inputs / "next.pub").read_bytes()


@pytest.mark.parametrize("bad", ["-cam", "cam 01", "cam/01", 'ca"m', "x" * 65, "kamera-\u00e9"])
def test_bad_device_id_exits_2_and_writes_nothing(root, inputs, bad):
    out = bootstrap(root, "--device-id", bad, "--fleet", FLEET, "--broker-url", BROKER,
                    "--key", str(inputs / "host.pub"), base=False)
    assert out.returncode == 2
    assert "device id" in out.stderr and "[A-Za-z0-9_.-]" in out.stderr
    assert _tree(root) == []


def test_missing_key_file_is_named(root, inputs):
    missing = inputs / "nope.pub"
    out = bootstrap(root, "--key", str(inputs / "host.pub"), "--key", str(missing))
    assert out.returncode == 2
    assert str(missing) in out.stderr and "no such file" in out.stderr
    assert _tree(root) == []


def test_missing_options_are_all_reported(root):
    out = bootstrap(root, base=False)
    assert out.returncode == 2
    for option in ("--device-id", "--fleet", "--broker-url", "--key"):
        assert f"missing {option}" in out.stderr
    assert _tree(root) == []


@pytest.mark.parametrize("args, message", [
    (["--key", "{inputs}/signer.key"], "*.pub"),
    (["--key", "{inputs}/password"], "*.pub"),
    (["--key", "{inputs}/host.pub", "--fleet", "bad fleet"], "fleet 'bad fleet'"),
    (["--key", "{inputs}/host.pub", "--broker-url", "http://broker:80"], "--broker-url"),
    (["--key", "{inputs}/host.pub", "--broker-url", "mqtts://broker:70000"], "1-65535"),
    (["--key", "{inputs}/host.pub", "--broker-url", "mqtt://broker:1883", "--ca", "{inputs}/ca.crt"], "mqtts"),
    (["--key", "{inputs}/host.pub", "--cert", "{inputs}/cam-01.crt"], "--client-key"),
    (["--key", "{inputs}/host.pub", "--password-file", "{inputs}/password"], "--username"),
    (["--key", "{inputs}/host.pub", "--engine", "tensorflow"], "--engine tensorflow"),
    (["--key", "{inputs}/host.pub", "--runtime-wheel", "x.whl", "--runtime-spec", "edgekit-runtime"], "alternatives"),
    (["--key", "{inputs}/host.pub", "--bogus"], "unknown option --bogus"),
    (["--key"], "--key needs a value"),
])
def test_usage_errors_exit_2_and_write_nothing(root, inputs, args, message):
    out = bootstrap(root, *[a.format(inputs=inputs) for a in args])
    assert out.returncode == 2, out.stdout
    assert message in out.stderr
    assert _tree(root) == []


def test_private_key_is_refused_as_a_trusted_key(root, inputs):
    signer = inputs / "signer.pub"
    shutil.copy(inputs / "signer.key", signer)
    out = bootstrap(root, "--key", str(signer))
    assert out.returncode == 2 and "PRIVATE key" in out.stderr
    assert _tree(root) == []


def test_help():
    out = subprocess.run(["bash", str(BOOTSTRAP), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--device-id" in out.stdout and "--root" in out.stdout


def _shell_scripts() -> list[Path]:
    scripts = []
    for path in sorted(FIRMWARE.rglob("*")):
        if path.is_file() and (path.suffix == ".sh" or path.read_bytes()[:64].startswith(b"#!/usr/bin/env bash")):
            scripts.append(path)
    return scripts


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(FIRMWARE)))
def test_firmware_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_firmware_scripts_pass_shellcheck():
    """Every finding, down to style: the scripts run as root on devices nobody watches."""
    if not shutil.which("shellcheck"):
        why = "shellcheck is not installed (apt-get install shellcheck; `make test` does it when run as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)  # CI must lint the firmware, never skip it
        pytest.skip(why)
    scripts = _shell_scripts()
    assert {p.name for p in scripts} >= {"bootstrap.sh", "install-runtime.sh", "add-user.sh", "make-certs.sh"}
    out = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def test_os_tree_as_root(root, inputs):
    """As root into a (minimal) OS tree: the user, the group memberships and the owners are real."""
    if os.geteuid() != 0:
        pytest.skip("needs root (useradd --root, chown)")
    if not (shutil.which("useradd") and shutil.which("groupadd") and shutil.which("usermod")):
        pytest.skip("useradd/groupadd/usermod are not installed")
    etc = root / "etc"
    etc.mkdir()
    _write(etc / "passwd", "root:x:0:0:root:/root:/bin/bash\ndeploy:x:1000:1000::/home/deploy:/bin/bash\n")
    _write(etc / "group", "root:x:0:\nvideo:x:44:\ndeploy:x:1000:\n")
    _write(etc / "shadow", "root:*:19000:0:99999:7:::\ndeploy:*:19000:0:99999:7:::\n", 0o640)
    _write(etc / "gshadow", "root:*::\nvideo:!::\ndeploy:!::\n", 0o640)
    _write(etc / "nv_tegra_release", "# R36 (release), REVISION: 4.0\n")  # a Jetson: edgekit joins video
    out = bootstrap(root, "--key", str(inputs / "host.pub"), "--username", DEVICE,
                    "--password-file", str(inputs / "password"), "--admin-user", "deploy", "--device-paths")
    assert out.returncode == 0, out.stderr
    users = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (etc / "group").read_text().splitlines()}
    uid, gid = int(users["edgekit"][2]), int(groups["edgekit"][2])
    assert users["edgekit"][6] == "/usr/sbin/nologin" and int(users["edgekit"][3]) == gid
    assert "edgekit" in groups["video"][3].split(",") and "deploy" in groups["edgekit"][3].split(",")
    state = root / "var/lib/edgekit-agent"
    for path in (state, state / "slots/a", state / "inbox", state / "outbox"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    for name in ("agent.toml", "agent.password"):
        st = (etc / "edgekit" / name).stat()
        assert (st.st_uid, st.st_gid) == (0, gid), name
    assert (etc / "edgekit/keys/host.pub").stat().st_uid == 0
    # a second run finds the user and changes nothing about it
    again = bootstrap(root, "--key", str(inputs / "host.pub"), "--username", DEVICE,
                      "--password-file", str(inputs / "password"), "--device-paths")
    assert again.returncode == 0, again.stderr
    assert (etc / "passwd").read_text().count("edgekit:") == 1


@pytest.mark.parametrize("source", ["wheel", "spec"])
def test_runtime_is_installed_through_install_runtime(tmp_path, root, inputs, source):
    """Without --no-pip, bootstrap hands install-runtime.sh the engine, the source and paths under --root
    (a stand-in install-runtime.sh records its arguments: no pip runs here)."""
    firmware = tmp_path / "firmware"
    shutil.copytree(FIRMWARE, firmware)
    record = tmp_path / "install-runtime.args"
    stub = firmware / "install-runtime.sh"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    stub.chmod(0o755)
    wheel = inputs / "edgekit_runtime-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    chosen = ["--runtime-wheel", str(wheel)] if source == "wheel" else ["--runtime-spec", "edgekit-runtime==0.1.0"]
    out = subprocess.run(["bash", str(firmware / "bootstrap.sh"), "--root", str(root), "--no-systemctl",
                          "--device-id", DEVICE, "--fleet", FLEET, "--broker-url", BROKER,
                          "--key", str(inputs / "host.pub"), "--engine", "tflite", *chosen],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = record.read_text().splitlines()
    assert "--agent" in args  # the device runs edgekit-agent.service: the runtime's [agent] extra
    args.remove("--agent")
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--engine"] == "tflite"
    assert pairs["--prefix"] == str(root / "opt/edgekit") and pairs["--keyring"] == str(root / "etc/edgekit/keys")
    assert pairs["--bindir"] == str(root / "usr/local/bin")
    if source == "wheel":
        assert pairs["--source"] == str(wheel)
    else:
        assert pairs["--spec"] == "edgekit-runtime==0.1.0"
