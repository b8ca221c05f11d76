"""Rollouts (:mod:`edgekit.flash.rollout`): canaries and waves, the abort rule, timeouts, the record, resume
and rollback, over an in-memory fleet on a fake clock (:mod:`tests.flash.fleet_doubles`) and over Mosquitto.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.errors import ConfigError, SigningError
from edgekit.flash.commands import MAX_SIGNED_EXPIRY_S, FleetClient
from edgekit.flash.rollout import Rollout, load_record, outstanding, render, rollback_from_record
from edgekit.fleet.connection import BrokerSettings
from tests.flash.fleet_doubles import (NEW_MODEL, OLD_MODEL, SHA, Crash, FakeAgent, FakeClock, FakeFleet, MqttDevice,
                                       make_plan, names, start, statuses)


# ----------------------------------------------------------------------------- rollouts
def test_rollout_canary_then_waves_all_succeed(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d) for d in names(5)]
    fleet = FakeFleet(agents, keyring, clock)
    seen = []
    rollout = start(make_plan(names(5), canary="1", wave_size=2), fleet, key, tmp_path, clock,
                    on_change=lambda rec: seen.append(rec["phase"]))
    summary = rollout.run()
    assert summary["counts"]["succeeded"] == 5 and not summary["halted"] and summary["phase"] == "done"
    assert summary["failures"] == 0 and summary["halt_reason"] is None
    # three phases: canary (2 s), wave 1 (2 s), wave 2 (2 s); each device answers 2 s after it got the command
    assert summary["fleet_switch_s"] == pytest.approx(6.0, abs=0.01)
    assert [seen.index(p) for p in ("canary", "wave 1", "wave 2", "done")] == sorted(
        seen.index(p) for p in ("canary", "wave 1", "wave 2", "done"))
    # the canary answered before the waves got anything
    order = [b["device"] for b in fleet.sent]
    assert order == names(5)
    assert all(b["command"] == "install" and b["args"]["rollout"] == rollout.id and b["args"]["sha256"] == SHA
               for b in fleet.sent)
    record = load_record(Path(summary["record"]))
    assert Path(summary["record"]) == tmp_path / "rollouts" / f"{rollout.id}.json"
    assert record["phases"] == [["cam-1"], ["cam-2", "cam-3"], ["cam-4", "cam-5"]]
    e = record["devices"]["cam-4"]
    assert e["status"] == "succeeded" and e["phase"] == "wave 2" and e["model"] == "digits 1.1"
    assert e["model_before"] == "digits 1.0" and e["install"]["seconds"] == pytest.approx(2.0)
    assert e["install"]["timings_s"]["switch"] == 0.1 and e["install"]["changed"] is True
    table = render(record, now=clock())
    assert [c.header for c in table.columns] == ["device", "phase", "status", "step", "model", "seconds", "error"]
    assert table.row_count == 5


def test_abort_rule_halts_and_rolls_back_what_succeeded(key, keyring, tmp_path):
    clock = FakeClock()
    behaviour = {"cam-3": "fail", "cam-4": "fail"}
    agents = [FakeAgent(d, behaviour.get(d, "ok")) for d in names(8)]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(8), canary="1", wave_size=3, max_failures=1)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and "2 device(s) failed after the wave 1 phase, more than max_failures 1" in \
        summary["halt_reason"]
    assert "cam-3 (health_check_failed)" in summary["halt_reason"]
    record = load_record(Path(summary["record"]))
    st = statuses(record)
    # the successes of this rollout were rolled back (signed), the failures kept their old model, and wave 2 got nothing
    assert st == {"cam-1": "rolled_back", "cam-2": "rolled_back", "cam-3": "failed", "cam-4": "failed",
                  "cam-5": "pending", "cam-6": "pending", "cam-7": "pending", "cam-8": "pending"}
    assert [(b["device"], b["command"]) for b in fleet.sent if b["command"] == "rollback"] == [
        ("cam-1", "rollback"), ("cam-2", "rollback")]
    assert not {"cam-5", "cam-6", "cam-7", "cam-8"} & {b["device"] for b in fleet.sent}
    err = record["devices"]["cam-3"]["install"]["error"]
    assert err["reason"] == "health_check_failed" and err["code"] == 204 and err["step"] == "health_check"
    assert summary["rolled_back"] == ["cam-1", "cam-2"] and summary["counts"]["failed"] == 2
    assert record["devices"]["cam-1"]["model"] == "digits 1.0"
    assert "halted" in render(record).caption
    # a halted rollout is not continued by a resume
    with pytest.raises(ConfigError, match="halted"):
        Rollout.resume(Path(summary["record"]), FakeFleet(agents, keyring, clock), sign_key=key, clock=clock).run()


def test_failures_within_the_budget_do_not_halt(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, {"cam-3": "fail", "cam-4": "busy"}.get(d, "ok")) for d in names(8)]
    summary = start(make_plan(names(8), canary="1", wave_size=3, max_failures=2),
                    FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    assert not summary["halted"] and summary["counts"]["succeeded"] == 6 and summary["counts"]["failed"] == 2
    record = load_record(Path(summary["record"]))
    assert record["devices"]["cam-4"]["install"]["error"]["reason"] == "busy"
    assert record["devices"]["cam-3"]["install"]["step"] == "health_check"  # where it failed


def test_a_failed_canary_halts_before_any_wave(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1", "fail", reason="download_failed")] + [FakeAgent(d) for d in names(5)[1:]]
    fleet = FakeFleet(agents, keyring, clock)
    summary = start(make_plan(names(5), canary="1", max_failures=0), fleet, key, tmp_path, clock).run()
    assert summary["halted"] and summary["phase"] == "halted" and "cam-1 (download_failed)" in summary["halt_reason"]
    assert [b["device"] for b in fleet.sent] == ["cam-1"]  # nothing else was sent, nothing to roll back
    # with a failure budget, a canary phase without any success still halts
    clock = FakeClock()
    agents = [FakeAgent("cam-1", "fail")] + [FakeAgent(d) for d in names(5)[1:]]
    summary = start(make_plan(names(5), canary="1", max_failures=3), FakeFleet(agents, keyring, clock), key,
                    tmp_path, clock).run()
    assert summary["halted"] and summary["halt_reason"] == "no canary device succeeded (cam-1 failed)"


def test_timed_out_rule_online_silence_fails_offline_waits(key, keyring, tmp_path):
    clock = FakeClock()
    t0 = clock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", "silent"),  # online, never answers: a failure
              FakeAgent("cam-3", online=False),  # offline throughout: pending-offline, not a failure
              FakeAgent("cam-4", online=False, come_online_at=t0 + 10),  # comes back during the rollout, installs
              FakeAgent("cam-5", "silent", online=False, come_online_at=t0 + 10)]  # comes back, never answers
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(5), canary="1", max_failures=2, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    record = load_record(Path(summary["record"]))
    assert statuses(record) == {"cam-1": "succeeded", "cam-2": "timed_out", "cam-3": "pending_offline",
                                "cam-4": "succeeded", "cam-5": "timed_out"}
    assert not summary["halted"] and summary["failures"] == 2 and summary["pending_offline"] == ["cam-3"]
    c5 = record["devices"]["cam-5"]["install"]
    assert c5["online_at_send"] is False and c5["wait_from_ts"] == pytest.approx(t0 + 10)  # the clock started then
    assert c5["error"]["reason"] == "timeout" and "while online" in c5["error"]["message"]
    c4 = record["devices"]["cam-4"]["install"]
    assert c4["status"] == "ok" and c4["seconds"] == pytest.approx(2.0)
    assert record["devices"]["cam-3"]["install"]["wait_from_ts"] is None
    # one more failure than the budget halts
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", "silent"), FakeAgent("cam-3", "silent")]
    summary = start(make_plan(names(3), canary="1", max_failures=1), FakeFleet(agents, keyring, clock), key,
                    tmp_path, clock).run()
    assert summary["halted"] and summary["counts"]["timed_out"] == 2


def test_no_online_device_is_refused_and_a_key_is_required(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, online=False) for d in names(3)]
    with pytest.raises(ConfigError, match="none of the 3 selected devices is online"):
        start(make_plan(names(3)), FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    with pytest.raises(SigningError, match="must be signed"):
        Rollout(make_plan(names(3)), FakeFleet([FakeAgent(d) for d in names(3)], keyring, clock),
                record_dir=tmp_path / "x", clock=clock).run()
    with pytest.raises(ConfigError, match="fleet 'f1'"):
        Rollout(make_plan(names(3)), FakeFleet([], keyring, clock, fleet="other"), record_dir=tmp_path)


def test_record_round_trip_resume_after_a_crash_while_sending(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d) for d in names(6)]
    # the host dies after publishing the canary and the first device of wave 1
    fleet = FakeFleet(agents, keyring, clock, crash_after_sends=2)
    rollout = start(make_plan(names(6), canary="1", wave_size=3), fleet, key, tmp_path, clock)
    with pytest.raises(Crash):
        rollout.run()
    path = rollout.record_path
    record = load_record(path)
    assert record["phase"] == "wave 1" and record["phase_index"] == 1
    # written before publishing: the whole of wave 1 is "sent", although cam-3 and cam-4 never got it
    assert statuses(record) == {"cam-1": "succeeded", "cam-2": "sent", "cam-3": "sent", "cam-4": "sent",
                                "cam-5": "pending", "cam-6": "pending"}
    assert outstanding(record, now=clock()) == {"resend": ["cam-2", "cam-3", "cam-4"], "renew": [],
                                                "pending": ["cam-5", "cam-6"]}
    ids = {d: record["devices"][d]["install"]["request_id"] for d in ("cam-2", "cam-3", "cam-4")}
    # a new process, the same agents (cam-2 already installed: it answers from its ack cache)
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(path, fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 6 and not summary["halted"]
    resent = {b["device"]: b["request_id"] for b in fleet2.sent if b["device"] in ids}
    assert resent == ids  # the same request ids
    assert [b["device"] for b in fleet2.sent] == ["cam-2", "cam-3", "cam-4", "cam-5", "cam-6"]
    assert all(len(a.executed) == 1 for a in agents)  # nothing was installed twice
    assert agents[1].received.count(ids["cam-2"]) == 2  # cam-2 got the duplicate and answered from its cache
    record = load_record(path)
    assert record["devices"]["cam-2"]["install"]["resent"] == 1 and record["phase"] == "done"


def test_resume_after_a_crash_while_waiting_reuses_request_ids(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent(d, delay=5.0) for d in names(4)]
    fleet = FakeFleet(agents, keyring, clock, crash_on_poll=3)
    rollout = start(make_plan(names(4), canary="2"), fleet, key, tmp_path, clock)
    with pytest.raises(Crash):
        rollout.run()
    record = load_record(rollout.record_path)
    assert statuses(record)["cam-1"] == "sent" and record["devices"]["cam-1"]["install"]["step"] is not None
    first_ids = [b["request_id"] for b in fleet.sent]
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(rollout.record_path, fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 4
    assert [b["request_id"] for b in fleet2.sent[:2]] == first_ids
    assert all(len(a.executed) == 1 for a in agents)


def test_resume_renews_an_expired_command(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", online=False)]
    plan = make_plan(names(2), canary="1", command_expiry_s=60.0)
    summary = start(plan, FakeFleet(agents, keyring, clock), key, tmp_path, clock).run()
    assert summary["pending_offline"] == ["cam-2"] and summary["phase"] == "done"
    old = load_record(Path(summary["record"]))["devices"]["cam-2"]["install"]["request_id"]
    clock.t += 3600  # an hour later cam-2 is back; its queued command has expired
    agents[1].online, agents[1].queued = True, []
    record = load_record(Path(summary["record"]))
    assert outstanding(record, now=clock()) == {"resend": [], "renew": ["cam-2"], "pending": []}
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 2 and summary["pending_offline"] == []
    assert [b["device"] for b in fleet2.sent] == ["cam-2"] and fleet2.sent[0]["request_id"] != old
    assert load_record(Path(summary["record"]))["devices"]["cam-2"]["install"]["attempt"] == 2


def test_rollback_from_record_skips_devices_that_already_ran_the_bundle(key, keyring, tmp_path):
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", already_active=True), FakeAgent("cam-3")]
    summary = start(make_plan(names(3), canary="1"), FakeFleet(agents, keyring, clock), key, tmp_path,
                    clock).run()
    assert summary["counts"]["succeeded"] == 3
    fleet2 = FakeFleet(agents, keyring, clock)
    with pytest.raises(SigningError):
        rollback_from_record(Path(summary["record"]), fleet2, clock=clock)
    result = rollback_from_record(Path(summary["record"]), fleet2, sign_key=key, clock=clock, reason="bad model",
                                  poll_s=1.0)
    assert result["rolled_back"] == ["cam-1", "cam-3"] and result["counts"]["succeeded"] == 1
    undo = {"reason": "bad model", "from_sha256": SHA}  # only while the device runs this rollout's bundle
    assert [(b["device"], b["args"]) for b in fleet2.sent] == [("cam-1", undo), ("cam-3", undo)]
    record = load_record(Path(result["record"]))
    assert record["rollback"]["done"] and record["devices"]["cam-1"]["rollback"]["status"] == "ok"
    assert agents[0].model == OLD_MODEL and agents[1].model == NEW_MODEL


def test_a_late_rollback_is_never_repeated_into_a_roll_forward(key, keyring, tmp_path):
    """A halt's rollback that answers after device_timeout_s is recorded rollback_failed although the device
    did roll back; `edgekit rollback --record` then sends a new rollback. A plain rollback toggles between the
    two slots (the device would go forward to the halted release): with from_sha256 it finds nothing to undo."""
    clock = FakeClock()
    agents = [FakeAgent("cam-1", rollback_delay=100.0), FakeAgent("cam-2", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(2), canary="2", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and summary["rollback_failed"] == ["cam-1"]
    assert agents[0].model == OLD_MODEL  # it did roll back; the answer is what came late
    assert [(b["device"], b["args"]) for b in fleet.sent if b["command"] == "rollback"] == [
        ("cam-1", {"reason": f"rollout {Path(summary['record']).stem} halted: {summary['halt_reason']}",
                   "from_sha256": SHA})]
    first = load_record(Path(summary["record"]))["devices"]["cam-1"]["rollback"]["request_id"]

    agents[0].rollback_delay = 1.0
    fleet2 = FakeFleet(agents, keyring, clock)
    result = rollback_from_record(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0)
    sent = [b for b in fleet2.sent if b["command"] == "rollback"]
    assert len(sent) == 1 and sent[0]["request_id"] != first and sent[0]["args"]["from_sha256"] == SHA
    assert agents[0].model == OLD_MODEL and agents[0].previous == NEW_MODEL  # not forward to the halted release
    assert result["rolled_back"] == ["cam-1"] and result["rollback_failed"] == []
    rb = load_record(Path(result["record"]))["devices"]["cam-1"]["rollback"]
    assert rb["status"] == "ok" and rb["changed"] is False and rb["attempt"] == 1
    record = load_record(Path(result["record"]))
    assert record["devices"]["cam-1"]["model"] == "digits 1.0"
    assert any("nothing to undo" in line["message"] for line in record["log"])
    # once more (an operator who is not sure): still nothing to undo, still on the old release
    again = rollback_from_record(Path(summary["record"]), FakeFleet(agents, keyring, clock), sign_key=key,
                                 clock=clock, poll_s=1.0)
    assert again["rolled_back"] == ["cam-1"] and agents[0].model == OLD_MODEL


def test_switched_is_decided_from_the_model_before_not_from_already_active(key, keyring, tmp_path):
    """An agent killed between its pointer switch and its log write answers the re-delivered install with
    already_active although this rollout switched it: the halt must still roll it back."""
    clock = FakeClock()
    agents = [FakeAgent("cam-1", crashed_in_switch=True),  # ran 1.0, now 1.1, says already_active
              FakeAgent("cam-2", crashed_in_switch=True, state_sha256=False),  # the same, its state has no sha256
              FakeAgent("cam-3", already_active=True),  # ran 1.1 before the rollout: not switched by it
              FakeAgent("cam-4", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    summary = start(make_plan(names(4), canary="4", max_failures=0), fleet, key, tmp_path, clock).run()
    assert summary["halted"]
    record = load_record(Path(summary["record"]))
    devices = record["devices"]
    assert devices["cam-1"]["sha_before"] == OLD_MODEL["sha256"] and devices["cam-2"]["sha_before"] is None
    assert devices["cam-3"]["sha_before"] == SHA
    assert all(devices[d]["install"]["already_active"] for d in ("cam-1", "cam-2", "cam-3"))
    assert [devices[d]["install"]["changed"] for d in ("cam-1", "cam-2", "cam-3")] == [True, True, False]
    assert summary["rolled_back"] == ["cam-1", "cam-2"] and statuses(record)["cam-3"] == "succeeded"
    assert agents[0].model == OLD_MODEL and agents[1].model == OLD_MODEL and agents[2].model == NEW_MODEL
    assert {b["device"] for b in fleet.sent if b["command"] == "rollback"} == {"cam-1", "cam-2"}


def test_signed_commands_always_carry_an_expiry(key, keyring, tmp_path):
    for bad in (None, 0, -5.0, "60", float("inf"), True):
        with pytest.raises(ConfigError, match="command_expiry_s: .*positive number of seconds.*always expire"):
            make_plan(names(2), command_expiry_s=bad)
    with pytest.raises(ConfigError, match="command_expiry_s: .*devices refuse signed commands that expire later"):
        make_plan(names(2), command_expiry_s=MAX_SIGNED_EXPIRY_S + 1)
    assert make_plan(names(2), command_expiry_s=MAX_SIGNED_EXPIRY_S).command_expiry_s == MAX_SIGNED_EXPIRY_S
    assert make_plan(names(2)).command_expiry_s == 86400.0  # 1 day unless told
    assert make_plan(names(2), command_expiry_s=60).command_expiry_s == 60.0
    clock = FakeClock()
    agents = [FakeAgent("cam-1"), FakeAgent("cam-2", online=False), FakeAgent("cam-3", "fail")]
    fleet = FakeFleet(agents, keyring, clock)
    plan = make_plan(names(3), canary="1", max_failures=1, command_expiry_s=600.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["counts"]["succeeded"] == 1 and summary["pending_offline"] == ["cam-2"]
    assert fleet.sent and all(isinstance(b["expires_ts"], float) for b in fleet.sent)
    record = load_record(Path(summary["record"]))
    for d in names(3):
        attempt = record["devices"][d]["install"]
        assert attempt["expires_ts"] == pytest.approx(attempt["first_sent_ts"] + 600.0)
    # a record written by an older edgekit (a command sent without an expiry) is renewed, never re-sent as is:
    # a device refuses a signed command without an expiry
    record["devices"]["cam-2"]["install"]["expires_ts"] = None
    Path(summary["record"]).write_text(json.dumps(record))
    assert outstanding(load_record(Path(summary["record"])), now=clock()) == {"resend": [], "renew": ["cam-2"],
                                                                             "pending": []}
    old = record["devices"]["cam-2"]["install"]["request_id"]
    agents[1].online, agents[1].queued = True, []
    fleet2 = FakeFleet(agents, keyring, clock)
    summary = Rollout.resume(Path(summary["record"]), fleet2, sign_key=key, clock=clock, poll_s=1.0).run()
    assert summary["counts"]["succeeded"] == 2
    assert [b["device"] for b in fleet2.sent] == ["cam-2"] and fleet2.sent[0]["request_id"] != old
    assert fleet2.sent[0]["expires_ts"] == pytest.approx(clock() + 600.0, abs=30.0)


def test_record_is_written_atomically_and_checked(key, keyring, tmp_path):
    clock = FakeClock()
    rollout = start(make_plan(names(2), canary="1"), FakeFleet([FakeAgent(d) for d in names(2)], keyring, clock),
                    key, tmp_path, clock)
    rollout.run()
    folder = rollout.record_path.parent
    assert [p.name for p in folder.iterdir() if p.suffix == ".tmp"] == []
    with pytest.raises(ConfigError, match="does not exist"):
        load_record(folder / "nope.json")
    bad = folder / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not an edgekit rollout record"):
        load_record(bad)
    data = json.loads(rollout.record_path.read_text())
    data["plan"]["max_failures"] = "many"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="max_failures"):
        load_record(bad)
    with pytest.raises(ConfigError, match="exists"):
        start(make_plan(names(2), canary="1"), FakeFleet([], keyring, clock), key, tmp_path, clock,
              rollout_id=rollout.id)


def test_rollout_over_mosquitto_with_an_offline_device(mqtt_broker, key, keyring, tmp_path):
    settings = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port, keepalive=10)
    devices = [MqttDevice(mqtt_broker, d, keyring).start() for d in names(3)]
    devices[2].go_offline()
    client = FleetClient(settings, "f1").connect()
    try:
        client.discover(timeout=3.0)
        plan = make_plan(names(3), canary="1", device_timeout_s=10.0)
        summary = Rollout(plan, client, record_dir=tmp_path, sign_key=key, poll_s=0.2).run()
        assert summary["counts"]["succeeded"] == 2 and summary["pending_offline"] == ["cam-3"]
        assert not summary["halted"] and summary["fleet_switch_s"] is not None
        record = load_record(Path(summary["record"]))
        assert record["devices"]["cam-1"]["install"]["step"] is None  # progress cleared by the final answer
        devices[2].start()  # back: the queued install runs; a resume collects its answer (same request id)
        summary = Rollout.resume(Path(summary["record"]), client, sign_key=key, poll_s=0.2).run()
        assert summary["counts"]["succeeded"] == 3 and summary["pending_offline"] == []
        assert len(devices[2].executed) == 1
    finally:
        client.close()
        for d in devices:
            d.stop()


def test_a_canary_that_answers_after_its_timeout_is_rolled_back_too(tmp_path, key, keyring):
    """The canary's install outlives device_timeout_s (a TensorRT engine build, say): the rollout halts on the
    timeout, and its rollback reaches the canary too — "busy" while the install runs, then, once the late
    success arrives, a real rollback. The device must not stay on the halted rollout's bundle."""
    clock = FakeClock()
    slow = FakeAgent("cam-1", delay=45.0, rollback_delay=1.0)
    fleet = FakeFleet([slow, FakeAgent("cam-2")], keyring, clock)
    plan = make_plan(names(2), canary="1", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"] and "cam-2" not in [s["device"] for s in fleet.sent]
    rollbacks = [s for s in fleet.sent if s["command"] == "rollback"]
    assert rollbacks and all(s["device"] == "cam-1" for s in rollbacks)
    assert slow.model.get("sha256") != SHA  # back on what it ran before the rollout
    rec = json.loads(Path(summary["record"]).read_text())
    assert rec["devices"]["cam-1"]["install"]["status"] == "ok"  # the late answer was read
    assert rec["devices"]["cam-1"]["rollback"]["status"] == "ok" and summary["rolled_back"] == ["cam-1"]


def test_a_late_device_that_ran_the_bundle_before_is_not_rolled_back(tmp_path, key, keyring):
    """cam-2 already ran the rollout's bundle (its older release in the other slot); its answer is late and the
    rollout halts on cam-1's failure: a precautionary rollback must not take cam-2 to the older model."""
    clock = FakeClock()
    before = FakeAgent("cam-2", already_active=True, delay=45.0)
    fleet = FakeFleet([FakeAgent("cam-1", "fail"), before], keyring, clock)
    plan = make_plan(names(2), canary="2", max_failures=0, device_timeout_s=30.0)
    summary = start(plan, fleet, key, tmp_path, clock).run()
    assert summary["halted"]
    assert before.model.get("sha256") == SHA  # still on the bundle it ran before the rollout
    assert not [s for s in fleet.sent if s["command"] == "rollback" and s["device"] == "cam-2"]


def test_a_device_that_stays_busy_is_asked_again_at_a_bounded_pace(tmp_path, key, keyring):
    clock = FakeClock()
    slow = FakeAgent("cam-1", delay=1000.0, rollback_delay=0.1)  # installs for longer than the retry window
    fleet = FakeFleet([slow, FakeAgent("cam-2")], keyring, clock)
    plan = make_plan(names(2), canary="1", max_failures=0, device_timeout_s=30.0)
    t0 = clock()
    summary = start(plan, fleet, key, tmp_path, clock).run()
    rollbacks = [s for s in fleet.sent if s["command"] == "rollback"]
    assert summary["halted"] and clock() - t0 < 200  # the loop ends (2 x device_timeout_s of retries)
    assert 10 <= len(rollbacks) <= 40  # about one every BUSY_RETRY_S, not one per poll
