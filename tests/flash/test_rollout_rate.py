"""Rollout rate control (:mod:`edgekit.flash.rollout`): growing waves, a cap on installs in flight, the
failure-percentage abort rule, and pause/resume, over the in-memory fleet on a fake clock."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgekit.errors import ConfigError
from edgekit.flash.fleet_flash import BundleInfo, FleetFlashSettings, plan_for_bundle
from edgekit.flash.rollout import Rollout, load_record, pause_file, request_pause
from tests.flash.fleet_doubles import FakeAgent, FakeClock, FakeFleet, make_plan, names, start, statuses


def test_waves_grow_by_the_factor_up_to_the_cap_in_order(key, keyring, tmp_path):
    plan = make_plan(names(40), canary="1", wave_size=2, wave_factor=2.0, wave_max=10)
    assert plan.wave_sizes(39) == [2, 4, 8, 10, 10, 5]
    assert make_plan(names(10), canary="1", wave_size=3).wave_sizes(9) == [3, 3, 3]  # factor 1: today's waves
    assert make_plan(names(10), canary="1").wave_sizes(9) == [9]  # the default: canary, then all the rest
    clock = FakeClock()
    fleet = FakeFleet([FakeAgent(d) for d in names(40)], keyring, clock)
    first_send: dict[str, float] = {}
    rollout = start(plan, fleet, key, tmp_path, clock)
    summary = rollout.run()
    assert summary["counts"]["succeeded"] == 40 and summary["phase"] == "done"
    record = load_record(Path(summary["record"]))
    assert [len(p) for p in record["phases"]] == [1, 2, 4, 8, 10, 10, 5]
    assert [b["device"] for b in fleet.sent] == names(40)  # plan order, wave after wave
    for d, e in record["devices"].items():
        first_send[d] = e["install"]["first_sent_ts"]
    # each wave starts when the one before has answered (2 s per device): 7 phases, 14 s
    starts = [first_send[p[0]] for p in record["phases"]]
    assert [round(b - a, 3) for a, b in zip(starts, starts[1:])] == [2.0] * 6
    assert summary["fleet_switch_s"] == pytest.approx(14.0, abs=0.01)


def test_wave_settings_are_checked():
    with pytest.raises(ConfigError, match="--wave-start"):
        make_plan(names(10), wave_factor=2.0)
    with pytest.raises(ConfigError, match="larger than wave_max"):
        make_plan(names(10), wave_size=5, wave_max=3)
    with pytest.raises(ConfigError, match="wave_factor"):
        make_plan(names(10), wave_size=2, wave_factor=0.5)
    with pytest.raises(ConfigError, match="abort_percent"):
        make_plan(names(10), abort_percent=150.0)


def test_never_more_than_max_in_flight_installs(key, keyring, tmp_path):
    clock = FakeClock()
    delays = [1.0, 3.0, 2.0, 0.5, 4.0, 1.5]
    fleet = FakeFleet([FakeAgent(d, delay=delays[i % len(delays)]) for i, d in enumerate(names(25))], keyring, clock)
    in_flight: list[int] = []
    plan = make_plan(names(25), canary="2", wave_size=5, wave_factor=3.0, max_in_flight=4)
    rollout = start(plan, fleet, key, tmp_path, clock,
                    on_change=lambda rec: in_flight.append(sum(
                        1 for e in rec["devices"].values() if (e["install"] or {}).get("status") == "sent")))
    summary = rollout.run()
    assert summary["counts"]["succeeded"] == 25 and not summary["halted"]
    assert max(in_flight) == 4  # the cap is reached and never passed
    assert [b["device"] for b in fleet.sent] == names(25)
    assert all(len(a.executed) == 1 for a in fleet.agents.values())


@pytest.mark.parametrize("rate", [{"max_in_flight": 5}, {"wave_size": 10, "wave_factor": 2.0}],
                         ids=["one-wave-max-in-flight-5", "waves-of-10-growing"])
def test_abort_at_10_percent_failures_after_20_devices_halts_and_rolls_back(key, keyring, tmp_path, rate):
    clock = FakeClock()
    failing = {f"cam-{i}" for i in range(3, 41, 10)}  # the 3rd of every 10
    fleet = FakeFleet([FakeAgent(d, "fail" if d in failing else "ok") for d in names(40)], keyring, clock)
    plan = make_plan(names(40), canary="10", max_failures=None, abort_percent=10.0, abort_min_devices=20, **rate)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    # after the 10 canaries 1 of 10 failed (10 %, but fewer than 20 devices): go on; at 20 devices 2 failed: halt
    assert summary["halted"] and "2 of 20 finished device(s) failed (10.0 %)" in summary["halt_reason"]
    installs = [b["device"] for b in fleet.sent if b["command"] == "install"]
    assert installs == names(20)  # nothing sent after the rule tripped
    st = statuses(load_record(Path(summary["record"])))
    assert {d for d, s in st.items() if s == "failed"} == {"cam-3", "cam-13"}
    assert sorted(summary["rolled_back"]) == sorted(set(names(20)) - {"cam-3", "cam-13"})
    assert all(st[d] == "pending" for d in names(40)[20:])
    assert all(fleet.agents[d].model["version"] == "1.0" for d in names(40))  # the whole fleet runs the old model


def test_the_count_rule_still_applies_beside_the_percentage(key, keyring, tmp_path):
    clock = FakeClock()
    fleet = FakeFleet([FakeAgent(d, "fail" if d in ("cam-2", "cam-3") else "ok") for d in names(30)], keyring, clock)
    plan = make_plan(names(30), canary="1", max_failures=1, abort_percent=50.0, abort_min_devices=20,
                     max_in_flight=2)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and "more than max_failures 1" in summary["halt_reason"]
    assert [b["device"] for b in fleet.sent if b["command"] == "install"] == names(3)


def test_settings_keep_the_count_rule_unless_a_percentage_is_given():
    info = BundleInfo(Path("m.ekb"), {"model": {"name": "m", "version": "1"}}, hashlib.sha256(b"x").hexdigest(), 1)
    url = "http://h:1/b.ekb"
    plan = plan_for_bundle(info, names(3), url, FleetFlashSettings(fleet="f1"))
    assert plan.max_failures == 0 and plan.abort_percent is None and plan.wave_sizes(2) == [2]
    plan = plan_for_bundle(info, names(30), url, FleetFlashSettings(
        fleet="f1", abort_percent=10, abort_min_devices=20, wave_size=2, wave_factor=2, wave_max=8, max_in_flight=4))
    assert plan.max_failures is None and plan.abort_percent == 10.0 and plan.wave_sizes(27) == [2, 4, 8, 8, 5]
    assert plan.max_in_flight == 4
    plan = plan_for_bundle(info, names(3), url, FleetFlashSettings(fleet="f1", max_failures=2, abort_percent=10))
    assert plan.max_failures == 2


def test_pause_then_resume_completes_without_reinstalling(key, keyring, tmp_path):
    clock = FakeClock()
    fleet = FakeFleet([FakeAgent(d) for d in names(20)], keyring, clock)
    plan = make_plan(names(20), canary="1", wave_size=2, wave_factor=2.0, max_in_flight=3)
    asked: list[Path] = []

    def on_change(rec):
        done = sum(1 for e in rec["devices"].values() if (e["install"] or {}).get("status") == "ok")
        if done >= 5 and not asked:
            asked.append(request_pause(rollout.record_path))

    rollout = start(plan, fleet, key, tmp_path, clock, on_change=on_change)
    summary = rollout.run()
    record_path = Path(summary["record"])
    assert asked == [pause_file(record_path)] and not asked[0].exists()  # the request was taken
    assert summary["paused"] and not summary["halted"] and summary["phase"] == "paused"
    # wave 2 (cam-4..7) was cut after the 3 in flight answered: cam-7 and the later waves got nothing
    assert summary["counts"]["succeeded"] == 6 and summary["counts"]["pending"] == 14
    assert [b["device"] for b in fleet.sent] == names(6)
    record = load_record(record_path)
    assert record["paused"] and record["phase_index"] == 2
    # resumed from the record: the rest goes out, the 6 that switched are never sent the install again
    again = Rollout.resume(record_path, fleet, sign_key=key, clock=clock, poll_s=1.0).run()
    assert again["counts"]["succeeded"] == 20 and not again["paused"] and again["phase"] == "done"
    assert [b["device"] for b in fleet.sent] == names(20)
    assert all(len(a.executed) == 1 for a in fleet.agents.values())
    assert not load_record(record_path)["paused"]
    with pytest.raises(ConfigError, match="nothing left to pause"):
        request_pause(record_path)


def test_cli_pause_writes_the_request_and_flags_reach_the_settings(key, keyring, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.cli.flash import _fleet_settings

    clock = FakeClock()
    fleet = FakeFleet([FakeAgent(d) for d in names(3)], keyring, clock)
    rollout = start(make_plan(names(3), canary="1"), fleet, key, tmp_path, clock)
    runner = CliRunner()
    result = runner.invoke(app, ["flash", "--pause", str(rollout.record_path) + ".missing"])
    assert result.exit_code != 0 and "does not exist" in " ".join(result.output.split())
    rollout._write()  # the record as a rollout that has started writes it
    result = runner.invoke(app, ["flash", "--pause", str(rollout.record_path), "--json"])
    assert result.exit_code == 0, result.output
    assert pause_file(rollout.record_path).exists()
    summary = rollout.run()
    assert summary["paused"], summary
    assert not fleet.sent  # paused before its first command
    result = runner.invoke(app, ["flash", "--pause", str(rollout.record_path), "--fleet", "f1"])
    assert result.exit_code != 0 and "pass it alone" in " ".join(result.output.split())
    settings = _fleet_settings("f1", None, "1", None, 2, True, 30.0, 3600.0, False, tmp_path, abort_percent=10.0,
                               abort_min_devices=20, wave_factor=2.0, wave_max=8, max_in_flight=4)
    assert (settings.wave_size, settings.wave_factor, settings.wave_max, settings.max_in_flight,
            settings.abort_percent, settings.abort_min_devices, settings.max_failures) == (2, 2.0, 8, 4, 10.0, 20, None)
