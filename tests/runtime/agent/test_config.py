"""The agent config file: TOML or JSON, relative paths, every problem reported, no silent fixes."""

from __future__ import annotations

import json

import pytest

from edgekit_runtime.agent import AgentConfig, AgentConfigError
from edgekit_runtime.contract.errors import ErrorCode

TOML = """
device_id = "cam-01"
fleet = "factory-a"
broker_url = "mqtts://broker.example.com"
username = "cam-01"
password_file = "secrets/password"
ca_file = "secrets/ca.pem"
state_dir = "state"
telemetry_interval_s = 5
spool_policy = "reject_new"

[workload]
synthetic = true
rate_hz = 4
"""


def test_toml_with_relative_paths_and_defaults(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "password").write_text("s3cret\n")
    (tmp_path / "secrets" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "agent.toml"
    path.write_text(TOML)
    cfg = AgentConfig.load(path)
    assert cfg.broker == ("broker.example.com", 8883, True)
    assert cfg.state_dir == tmp_path / "state" and cfg.ca_file == tmp_path / "secrets" / "ca.pem"
    assert cfg.password() == "s3cret"
    assert cfg.telemetry_interval_s == 5.0 and isinstance(cfg.telemetry_interval_s, float)
    assert cfg.spool_policy == "reject_new" and cfg.drift_psi_threshold == 0.2
    assert cfg.workload.synthetic and cfg.workload.rate_hz == 4.0
    assert cfg.effective_client_id == "edgekit-factory-a-cam-01"
    public = cfg.public_dict()
    assert "s3cret" not in json.dumps(public)
    json.dumps(public)  # JSON-ready


def test_json_config_and_plain_mqtt_port(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"device_id": "d", "fleet": "f", "broker_url": "mqtt://10.0.0.2",
                                "state_dir": "/var/lib/x"}))
    assert AgentConfig.load(path).broker == ("10.0.0.2", 1883, False)


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('device_id = "d"\nfleet = "f"\nbroker_url = "mqtt://h"\nstate_dir = "s"\n'
                    'telemetry_interval = 5\n[workload]\nrate = 1\nsynthetic = true\n')
    with pytest.raises(AgentConfigError) as err:
        AgentConfig.load(path)
    text = str(err.value)
    assert "'telemetry_interval'" in text and "did you mean 'telemetry_interval_s'" in text
    assert "'workload.rate'" in text and "'rate_hz'" in text
    assert err.value.code == ErrorCode.CONFIG_INVALID


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(AgentConfigError) as err:
        AgentConfig.from_dict({"device_id": "bad id!", "fleet": "f", "broker_url": "http://h", "state_dir": "s",
                               "spool_policy": "drop_old", "keepalive_s": "30", "cert_file": "c.pem"},
                              base_dir=tmp_path)
    text = str(err.value)
    for needle in ("device_id", "mqtt:// or mqtts://", "did you mean 'drop_oldest'", "keepalive_s must be int",
                   "cert_file and key_file go together"):
        assert needle in text, (needle, text)


@pytest.mark.parametrize("missing", ["device_id", "fleet", "broker_url", "state_dir"])
def test_required_fields(tmp_path, missing):
    data = {"device_id": "d", "fleet": "f", "broker_url": "mqtt://h", "state_dir": "s"}
    del data[missing]
    with pytest.raises(AgentConfigError, match=f"{missing} is required"):
        AgentConfig.from_dict(data, base_dir=tmp_path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(AgentConfigError, match="cannot read agent config"):
        AgentConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = ")
    with pytest.raises(AgentConfigError, match="not valid TOML"):
        AgentConfig.load(bad)
