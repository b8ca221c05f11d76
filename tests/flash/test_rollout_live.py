"""Rollout rate control over live MQTT with real agents: pause/resume, and the percentage abort rule.

Real Mosquitto, real `edgekit-agent run` processes (each with its own state directory, serving
the tests' one-MatMul bundle, release 1), the rollout as ``edgekit flash --fleet`` runs it
(:class:`~edgekit.flash.fleet_flash.FleetFlash`, serving release 2 from its own bundle server).
A watcher subscribed to the devices' ``cmd`` topics counts every install command the host
published, so "not sent again" is checked on the wire, and each device's ``installs.jsonl``
says how many installs it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgekit.flash.commands import FleetClient
from edgekit.flash.fleet_flash import BundleSource, FleetFlash, FleetFlashSettings
from edgekit.flash.rollout import Rollout, load_record, request_pause
from edgekit.flash.server import BundleServer
from edgekit.fleet.connection import BrokerSettings
from tests.polling import wait_until

FLEET = "live"
# far below any inference: the health check's latency gate refuses every new model on such a device
REFUSING_BUDGET_MS = 0.0001


class LiveFleet:
    """N real agents on this machine, release 1 installed; ``refusing`` devices refuse any new model."""

    def __init__(self, root: Path, broker_url: str, keyring: Path, n: int, refusing: frozenset[str] = frozenset()):
        self.root, self.url = root, broker_url
        self.names = [f"dev{i:03d}" for i in range(n)]
        self.refusing = refusing
        self.settings = {d: {"device_id": d, "fleet": FLEET, "broker_url": broker_url,
                             "state_dir": str(root / f"state-{d}"), "keyring": str(keyring), "threads": 1,
                             "telemetry_interval_s": 30.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                             "shutdown_flush_s": 2.0, "spool_sync": "normal"} for d in self.names}
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}  # device -> request ids of the install commands published to it
        self._lock = threading.Lock()
        self._cmd_watch: Any = None

    def install(self, bundle: Path) -> None:
        """Release 1 by the agent's own install transaction (what `edgekit-agent install` runs with no agent up)."""
        from edgekit_runtime.agent.config import AgentConfig
        from edgekit_runtime.agent.daemon import make_installer
        from edgekit_runtime.agent.install import InstallRequest
        from edgekit_runtime.agent.state import StateDir

        for d in self.names:
            config = AgentConfig.from_dict(self.settings[d])
            sd = StateDir(config.state_dir).ensure()
            sd.lock()
            try:
                installer = make_installer(sd, config)
                _, model = installer.install(InstallRequest(str(bundle), None, None, False, f"setup-{d}"))
                model.close()
            finally:
                sd.unlock()

    def start(self) -> None:
        """Watch the cmd topics, then start every agent (refusing ones with their budget) and wait until all
        serve release 1."""
        settings = BrokerSettings.from_url(self.url)
        watch = settings.paho_client(f"cmd-watch-{os.getpid()}")
        subscribed = threading.Event()
        watch.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgekit/v1/{FLEET}/+/cmd", qos=1)
        watch.on_subscribe = lambda *a: subscribed.set()
        watch.on_message = self._on_cmd
        watch.connect(settings.host, settings.port, 30, clean_start=True)
        watch.loop_start()
        self._cmd_watch = watch
        assert subscribed.wait(10), "the command watcher could not subscribe"
        for d in self.names:
            s = dict(self.settings[d])
            if d in self.refusing:
                s["health_latency_budget_ms"] = REFUSING_BUDGET_MS
            config = self.root / f"agent-{d}.json"
            config.write_text(json.dumps(s))
            with open(self.root / f"agent-{d}.log", "ab") as log:
                self.procs[d] = subprocess.Popen(
                    [sys.executable, "-m", "edgekit_runtime.agent.cli", "run", "--config", str(config),
                     "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def online() -> bool:
            for d, p in self.procs.items():
                assert p.poll() is None, f"agent {d} exited: {self.log(d)}"
            return all(self.reported_release(d) == 1 and self.agent_json(d).get("state") == "online"
                       for d in self.names)

        wait_until(online, 120, f"{len(self.names)} agents online serving release 1")

    def _on_cmd(self, client, userdata, message) -> None:
        body = json.loads(message.payload)["body"]
        if body.get("command") == "install":
            device = message.topic.split("/")[3]
            with self._lock:
                self.commands.setdefault(device, []).append(body["request_id"])

    def install_commands(self) -> dict[str, list[str]]:
        with self._lock:
            return {d: list(v) for d, v in self.commands.items()}

    def agent_json(self, d: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / f"state-{d}" / "agent.json").read_text())
        except (OSError, ValueError):
            return {}

    def reported_release(self, d: str) -> Any:
        return (self.agent_json(d).get("model") or {}).get("release")

    def installs_run(self, d: str) -> list[dict[str, Any]]:
        """The installs this device's agent ran for the host (its installs.jsonl, setup left out)."""
        path = self.root / f"state-{d}" / "installs.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return [x for x in lines if x.get("command") == "install" and not x["request_id"].startswith("setup-")]

    def serves(self, d: str, release: int) -> bool:
        from edgekit_runtime.agent.state import StateDir

        sd = StateDir(self.root / f"state-{d}")
        rec = sd.read_slot(sd.active_slot())
        return (self.procs[d].poll() is None and rec.get("state") == "good"
                and (rec.get("model") or {}).get("release") == release and self.reported_release(d) == release)

    def log(self, d: str) -> str:
        path = self.root / f"agent-{d}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._cmd_watch is not None:
            self._cmd_watch.disconnect()
            self._cmd_watch.loop_stop()


@pytest.fixture
def live_fleet(tmp_path, mqtt_broker, device):
    """Factory: ``live_fleet(n, refusing=...)`` → a started :class:`LiveFleet` on release 1, and release 2 as
    ``(path, url)`` served by a bundle server that outlives a paused rollout (as `edgekit serve` would)."""
    made: list[LiveFleet] = []
    (tmp_path / "served").mkdir()
    served = BundleServer(tmp_path / "served").start()

    def make(n: int, refusing: frozenset[str] = frozenset()) -> tuple[LiveFleet, tuple[Path, str]]:
        v1, v2 = device.bundle("v1.ekb", release=1, padding=0), device.bundle("v2.ekb", release=2, padding=0)
        fleet = LiveFleet(tmp_path / "fleet", mqtt_broker.url, device.keyring, n, refusing)
        (tmp_path / "fleet").mkdir()
        made.append(fleet)
        fleet.install(v1)
        fleet.start()
        return fleet, (v2, served.add(v2)["url"])

    yield make
    for fleet in made:
        fleet.close()
    served.stop()


def _flash(key, settings: FleetFlashSettings | None, client: FleetClient, *, bundle: tuple[Path, str] | None = None,
           resume: Path | None = None, on_change=None) -> dict[str, Any]:
    path, url = bundle or (None, None)
    with FleetFlash(None, key, settings, bundle=path, resume=resume, client=client, on_change=on_change,
                    source=BundleSource(url=url)) as job:
        return job.run()


def test_pause_over_mqtt_stops_new_installs_and_resume_finishes_without_reinstalling(live_fleet, flash_signing_key,
                                                                                       tmp_path):
    fleet, v2 = live_fleet(6)
    settings = FleetFlashSettings(fleet=FLEET, canary="1", wave_size=1, wave_factor=2.0, device_timeout_s=60.0,
                                  record_dir=tmp_path / "records")
    paused_at: list[float] = []

    def pause_after_two(record: dict[str, Any]) -> None:
        done = sum(1 for e in record["devices"].values() if (e["install"] or {}).get("status") == "ok")
        if done >= 2 and not paused_at:
            paused_at.append(time.time())
            request_pause(Path(settings.record_dir) / "rollouts" / f"{record['id']}.json")

    with FleetClient(BrokerSettings.from_url(fleet.url), FLEET) as client:
        summary = _flash(flash_signing_key, settings, client, bundle=v2, on_change=pause_after_two)
        record_path = Path(summary["record"])
        # paused after the canary and wave 1 (waves: 1 canary, then 1, 2, 2): nothing sent to the other four
        assert summary["paused"] and summary["phase"] == "paused" and not summary["halted"], summary
        assert summary["counts"]["succeeded"] == 2 and summary["counts"]["pending"] == 4, summary["counts"]
        switched = [d for d, e in load_record(record_path)["devices"].items() if e["install"]]
        assert switched == ["dev000", "dev001"]
        time.sleep(1.0)  # nothing more goes out while paused, and the other devices install nothing
        assert sorted(fleet.install_commands()) == switched
        for d in fleet.names:
            assert len(fleet.installs_run(d)) == (1 if d in switched else 0), d
            assert fleet.serves(d, 2 if d in switched else 1), (d, fleet.log(d))

        again = _flash(flash_signing_key, None, client, resume=record_path)
    assert again["phase"] == "done" and again["counts"]["succeeded"] == 6 and not again["paused"], again
    commands = fleet.install_commands()
    # one install command per device on the wire: the two that switched before the pause were not sent it again
    assert {d: len(v) for d, v in commands.items()} == {d: 1 for d in fleet.names}
    for d in fleet.names:
        runs = fleet.installs_run(d)
        assert len(runs) == 1 and runs[0]["ok"] and runs[0]["request_id"] == commands[d][0], (d, runs)
        assert fleet.serves(d, 2), (d, fleet.log(d))
    record = load_record(record_path)
    assert record["phase"] == "done" and not record["paused"]
    assert all(e["install"]["resent"] == 0 for e in record["devices"].values())


def test_abort_at_10_percent_after_20_devices_halts_and_rolls_back_live(live_fleet, flash_signing_key, tmp_path):
    refusing = frozenset({"dev009", "dev019"})  # every tenth device refuses the new model at its health check
    fleet, v2 = live_fleet(24, refusing)
    settings = FleetFlashSettings(fleet=FLEET, canary="5", wave_size=5, wave_factor=2.0, abort_percent=10.0,
                                  abort_min_devices=20, device_timeout_s=60.0, record_dir=tmp_path / "records")
    with FleetClient(BrokerSettings.from_url(fleet.url), FLEET) as client:
        summary = _flash(flash_signing_key, settings, client, bundle=v2)
    # canary 5, wave 1 (5: dev009 fails, 1 of 10 but fewer than 20 finished), wave 2 (10: dev019 fails, 2 of 20)
    assert summary["halted"] and "2 of 20 finished device(s) failed (10.0 %)" in summary["halt_reason"], summary
    record = load_record(Path(summary["record"]))
    sent = sorted(d for d, e in record["devices"].items() if e["install"])
    assert sent == fleet.names[:20] and sorted(fleet.install_commands()) == sent  # nothing after the rule tripped
    for d in refusing:
        err = record["devices"][d]["install"]["error"]
        assert (err["reason"], err["step"]) == ("health_check_failed", "health_check"), err
    assert sorted(summary["rolled_back"]) == sorted(set(sent) - refusing) and not summary["rollback_failed"]
    for d in fleet.names:  # the whole fleet serves release 1 again, the refusing devices never left it
        wait_until(lambda: fleet.serves(d, 1), 20, f"{d} serving release 1")
        assert len(fleet.installs_run(d)) == (1 if d in sent else 0), d


# ----------------------------------------------------------------------------- batched record writes
def test_answers_held_back_from_the_record_are_asked_for_again_after_a_crash(key, keyring, tmp_path):
    """FleetFlash writes answers to the record at most every RECORD_WRITE_INTERVAL_S (a hundred answers, each
    a write of the whole fsync'd record, cost more than the rollout's waves). A crash before the next write
    loses them from the record only: the resume sends the same request ids, and nobody installs twice."""
    from tests.flash.fleet_doubles import Crash, FakeAgent, FakeClock, FakeFleet, make_plan, names, start, statuses

    def fleet_of(clock, **kw):
        return FakeFleet([FakeAgent(d, delay=1.0 + 0.5 * i) for i, d in enumerate(names(8))], keyring, clock, **kw)

    plan = make_plan(names(8), canary="2")
    every = start(plan, fleet_of(FakeClock()), key, tmp_path / "every", FakeClock())
    batched = start(plan, fleet_of(FakeClock()), key, tmp_path / "batched", FakeClock(), write_interval_s=3600.0)
    assert every.run()["counts"]["succeeded"] == batched.run()["counts"]["succeeded"] == 8
    # written before each phase's commands and when done, not once per answer
    assert batched.writes < every.writes / 2, (batched.writes, every.writes)
    assert statuses(load_record(batched.record_path)) == {d: "succeeded" for d in names(8)}

    clock = FakeClock()
    fleet = fleet_of(clock, crash_on_poll=12)
    rollout = start(plan, fleet, key, tmp_path / "crash", clock, write_interval_s=3600.0)
    with pytest.raises(Crash):
        rollout.run()
    in_memory, on_disk = statuses(rollout.record), statuses(load_record(rollout.record_path))
    held = [d for d in names(8) if in_memory[d] == "succeeded" and on_disk[d] == "sent"]
    assert held, (in_memory, on_disk)  # answered, but the record still says "sent"
    ids = {d: rollout.record["devices"][d]["install"]["request_id"] for d in held}
    again = FakeFleet(list(fleet.agents.values()), keyring, clock)
    summary = Rollout.resume(rollout.record_path, again, sign_key=key, clock=clock, poll_s=1.0,
                             write_interval_s=3600.0).run()
    assert summary["counts"]["succeeded"] == 8
    assert {b["device"]: b["request_id"] for b in again.sent if b["device"] in held} == ids
    assert all(len(a.executed) == 1 for a in fleet.agents.values())
    assert statuses(load_record(rollout.record_path)) == {d: "succeeded" for d in names(8)}


def test_shadow_on_chosen_devices_installs_without_switching(live_fleet, flash_signing_key, tmp_path):
    """`edgekit flash --fleet --devices --shadow` as a library call, live: the chosen devices get release 2 in
    their idle slot as a shadow candidate and keep serving release 1; the others get nothing."""
    from edgekit.flash.fleet_flash import shadow_devices
    from edgekit_runtime.agent.state import StateDir

    fleet, (v2, url) = live_fleet(3)
    with FleetClient(BrokerSettings.from_url(fleet.url), FLEET) as client:
        answers = shadow_devices(v2, None, FLEET, "dev000,dev002", flash_signing_key, source=BundleSource(url=url),
                                 client=client, timeout_s=60.0)
    assert sorted(answers) == ["dev000", "dev002"] and all(a["ok"] for a in answers.values()), answers
    for d in fleet.names:
        sd = StateDir(fleet.root / f"state-{d}")
        shadow = sd.read_shadow()
        if d == "dev001":
            assert shadow is None and not fleet.installs_run(d)
        else:
            assert shadow is not None and sd.read_slot(shadow["slot"])["model"]["release"] == 2
            assert answers[d]["result"]["shadow_slot"] == shadow["slot"]
        assert fleet.serves(d, 1), (d, fleet.log(d))
