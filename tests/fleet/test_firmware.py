"""firmware/systemd and the agent config example: what a device is installed with."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tomllib

import pytest

from edgekit_runtime.agent.config import AgentConfig


def _unit(path):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_agent_and_workload_units(fleet_tools):
    systemd = fleet_tools.REPO / "firmware" / "systemd"
    agent = _unit(systemd / "edgekit-agent.service")
    assert agent["Service"]["ExecStart"] == "/opt/edgekit/venv/bin/edgekit-agent run --config /etc/edgekit/agent.toml"
    assert agent["Service"]["Restart"] == "always"
    assert agent["Service"]["KillSignal"] == "SIGTERM" and agent["Install"]["WantedBy"] == "multi-user.target"
    workload = _unit(systemd / "edgekit-workload.service")
    assert workload["Service"]["Restart"] == "always"
    # a weak dependency: the agent survives the workload failing (and can roll an update back)
    assert workload["Unit"]["Wants"] == "edgekit-agent.service" and "Requires" not in workload["Unit"]
    assert "Requires" not in agent["Unit"]
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", str(systemd / "edgekit-agent.service"),
                              str(systemd / "edgekit-workload.service")], capture_output=True, text=True)
        problems = [line for line in (out.stdout + out.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]  # /opt/edgekit is not installed here
        assert problems == [], problems


def test_agent_config_example_is_valid(fleet_tools, tmp_path):
    data = tomllib.loads((fleet_tools.REPO / "firmware" / "systemd" / "agent.toml").read_text())
    for key in ("ca_file", "cert_file", "key_file"):  # the files exist on a device, not here
        (tmp_path / key).write_text("x")
        data[key] = str(tmp_path / key)
    data["state_dir"] = str(tmp_path / "state")
    cfg = AgentConfig.from_dict(data)
    assert cfg.broker == ("broker.example.com", 8883, True)
    assert cfg.device_id == "cam-01" and cfg.spool_policy == "drop_oldest"


def test_make_certs_issues_a_ca_server_and_device_certificates(tmp_path, fleet_tools):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    script = fleet_tools.REPO / "firmware" / "mosquitto" / "make-certs.sh"
    subprocess.run([str(script), str(tmp_path), "--san", "DNS:broker.example.com", "cam-01"], check=True,
                   capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.crt"),
                             str(tmp_path / "devices" / "cam-01.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "DNS:broker.example.com" in text
    device = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "devices" / "cam-01.crt"), "-noout", "-subject",
                             "-ext", "extendedKeyUsage"], capture_output=True, text=True, check=True).stdout
    assert "CN = cam-01" in device and "Client Authentication" in device
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable
    # re-running keeps the CA and adds a device
    ca = (tmp_path / "ca.crt").read_bytes()
    subprocess.run([str(script), str(tmp_path), "cam-02"], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "devices" / "cam-02.crt").exists()
