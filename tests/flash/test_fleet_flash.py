"""Flashing a fleet as a library call (:mod:`edgekit.flash.fleet_flash`): bundle → plan → rollout, served or not."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from edgekit.errors import ConfigError
from edgekit.flash.fleet_flash import BundleSource, FleetFlash, FleetFlashSettings, read_bundle, rollout_failed
from edgekit.flash.rollout import load_record
from tests.flash.fleet_doubles import FakeAgent, FakeClock, FakeFleet, names

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1.0-onnxruntime-matmul.ekb"
# FleetFlash runs the Rollout on the real clock (commands expire a day after sending); the fake
# fleet's clock starts now, so its agents see those commands as fresh.


def test_read_bundle_names_the_file_and_refuses_what_is_not_a_bundle(tmp_path):
    info = read_bundle(GOLDEN)
    assert info.sha256 == hashlib.sha256(GOLDEN.read_bytes()).hexdigest() and info.size == GOLDEN.stat().st_size
    assert info.manifest["model"]["name"]
    with pytest.raises(ConfigError, match="does not exist"):
        read_bundle(tmp_path / "missing.ekb")
    (tmp_path / "junk.ekb").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not an edgekit bundle"):
        read_bundle(tmp_path / "junk.ekb")


def test_a_source_is_required_and_checked():
    settings = FleetFlashSettings(fleet="f1")
    with pytest.raises(ConfigError, match="--url"):
        FleetFlash(None, None, settings, bundle=GOLDEN, client=object())
    with pytest.raises(ConfigError, match="HOST:PORT"):
        FleetFlash(None, None, settings, bundle=GOLDEN, source=BundleSource(serve="8800"), client=object())


def test_flash_a_fleet_on_a_given_connection_then_resume_the_record(key, keyring, tmp_path):
    fleet = FakeFleet([FakeAgent(d, delay=0.5) for d in names(4)], keyring, FakeClock(time.time()))
    settings = FleetFlashSettings(fleet="f1", devices="cam-*", canary="1", wave_size=2, record_dir=tmp_path)
    url = "http://10.0.0.1:8800/bundles/golden.ekb"
    with FleetFlash(None, key, settings, bundle=GOLDEN, source=BundleSource(url=url), client=fleet) as job:
        plan = job.rollout.plan
        assert plan.devices == names(4) and plan.url == url and plan.sha256 == read_bundle(GOLDEN).sha256
        summary = job.run()
    assert summary["counts"]["succeeded"] == 4 and not rollout_failed(summary) and summary["served_here"] is False
    record = Path(summary["record"])
    assert record.parent == tmp_path / "rollouts" and load_record(record)["phase"] == "done"
    assert [b["device"] for b in fleet.sent] == names(4)
    # a recorded rollout resumes from its record alone (fleet and plan come from it)
    with FleetFlash(None, key, resume=record, client=fleet) as job:
        again = job.run()
    assert again["id"] == summary["id"] and again["counts"]["succeeded"] == 4 and len(fleet.sent) == 4


def test_serve_from_here_while_the_rollout_runs(key, keyring, tmp_path):
    fleet = FakeFleet([FakeAgent(d, delay=0.5) for d in names(2)], keyring, FakeClock(time.time()))
    settings = FleetFlashSettings(fleet="f1", canary="1", record_dir=tmp_path)
    with FleetFlash(None, key, settings, bundle=GOLDEN, source=BundleSource(serve="127.0.0.1:0"),
                    client=fleet) as job:
        server = job.server
        assert job.served_here and job.url.startswith(server.url) and job.url == job.rollout.plan.url
        summary = job.run()
    assert summary["served_here"] and summary["counts"]["succeeded"] == 2
    assert (tmp_path / "served").is_dir()


def test_a_failed_canary_is_a_failed_rollout(key, keyring, tmp_path):
    fleet = FakeFleet([FakeAgent("cam-1", "fail", delay=0.5), FakeAgent("cam-2", delay=0.5)], keyring, FakeClock(time.time()))
    settings = FleetFlashSettings(fleet="f1", canary="1", record_dir=tmp_path)
    with FleetFlash(None, key, settings, bundle=GOLDEN, source=BundleSource(url="http://h:1/b.ekb"),
                    client=fleet) as job:
        summary = job.run()
    assert summary["halted"] and rollout_failed(summary)
