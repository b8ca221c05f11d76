"""The on-disk spool (bound, drop policies, order, durability) and the state directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgekit_runtime.agent import AgentState, Spool, StateDir
from edgekit_runtime.agent.spool import ROW_OVERHEAD, read_stats
from edgekit_runtime.agent.state import AgentStateError, check_transition

TOPIC = "edgekit/v1/f/d/telemetry"
SIZE = len(TOPIC) + 100 + ROW_OVERHEAD  # what one 100-byte message counts


def _put(spool, seq, boot=1, live=None):
    return spool.put(TOPIC, b"%03d" % seq + b"x" * 97, kind="telemetry", boot=boot, seq=seq, live=live)


def test_fifo_until_acked_and_durable_across_reopen(tmp_path):
    s = Spool(tmp_path / "spool.db", 1_000_000)
    for seq in range(1, 6):
        assert _put(s, seq).accepted
    rows = s.next_unsent(3)
    assert [r.seq for r in rows] == [1, 2, 3]
    for r in rows:
        s.mark_inflight(r.id)
    assert [r.seq for r in s.next_unsent(10)] == [4, 5]  # in-flight ones are not handed out twice
    s.ack([rows[0].id, rows[1].id])
    s.release([rows[2].id])  # e.g. a transient PUBACK failure: back in line, still first
    assert [r.seq for r in s.next_unsent(10)] == [3, 4, 5]
    assert len(s) == 3 and s.stats()["bytes"] == 3 * SIZE
    s.close()
    again = Spool(tmp_path / "spool.db", 1_000_000)
    assert [r.seq for r in again.next_unsent(10)] == [3, 4, 5] and again.stats()["bytes"] == 3 * SIZE
    assert again.max_boot() == 1
    again.close()


def test_drop_oldest_counts_and_keeps_in_flight_messages(tmp_path):
    s = Spool(tmp_path / "spool.db", 5 * SIZE, "drop_oldest")
    for seq in range(1, 6):
        assert _put(s, seq).accepted
    first = s.next_unsent(1)[0]
    s.mark_inflight(first.id)  # handed to the MQTT client: it may be delivered, so it is not dropped
    r = _put(s, 6)
    assert r.accepted and r.dropped == 1
    assert [m.seq for m in s.next_unsent(10)] == [3, 4, 5, 6]
    assert s.stats()["pending"] == 5 and s.stats()["dropped_oldest_total"] == 1
    s.close()
    assert read_stats(tmp_path / "spool.db")["dropped_oldest_total"] == 1  # persisted


def test_reject_new_counts_and_keeps_the_old(tmp_path):
    s = Spool(tmp_path / "spool.db", 3 * SIZE, "reject_new")
    for seq in range(1, 4):
        assert _put(s, seq).accepted
    assert not _put(s, 4).accepted and not _put(s, 5).accepted
    assert [m.seq for m in s.next_unsent(10)] == [1, 2, 3]
    assert s.stats()["rejected_new_total"] == 2 and s.counters["accepted"] == 3
    s.close()
    reopened = Spool(tmp_path / "spool.db", 3 * SIZE, "reject_new")
    assert reopened.stats()["rejected_new_total"] == 2
    reopened.close()


def test_a_message_larger_than_the_spool_is_rejected(tmp_path):
    s = Spool(tmp_path / "spool.db", 4096)
    assert not s.put(TOPIC, b"x" * 5000, kind="event", boot=1, seq=1, live=None).accepted
    assert s.stats()["rejected_new_total"] == 1
    s.close()


def test_broker_rejections_are_counted(tmp_path):
    s = Spool(tmp_path / "spool.db", 100_000)
    _put(s, 1)
    s.ack([s.next_unsent(1)[0].id], rejected=1)
    assert len(s) == 0 and s.stats()["broker_rejected_total"] == 1
    s.close()


def test_forget_live(tmp_path):
    s = Spool(tmp_path / "spool.db", 100_000)
    _put(s, 1, boot=3, live=1)
    _put(s, 2, boot=3, live=2)
    s.forget_live(3, 1)
    assert [r.live for r in s.next_unsent(5)] == [None, 2]
    s.close()


def test_boot_counter_increments_and_never_goes_back(tmp_path):
    sd = StateDir(tmp_path / "state").ensure()
    assert sd.read_boot() is None
    assert [sd.next_boot() for _ in range(3)] == [1, 2, 3]
    assert sd.boot_file.read_text() == "3\n"
    sd.boot_file.write_text("garbage")  # damaged: the spool's highest boot is the floor
    assert sd.next_boot(floor=7) == 8
    assert not [p for p in sd.root.iterdir() if p.name.startswith(".boot")]  # no temp files left


def test_boot_counter_survives_a_crash_right_after_the_increment(tmp_path):
    sd = StateDir(tmp_path / "state").ensure()
    sd.next_boot()
    code = ("import os, sys; from edgekit_runtime.agent.state import StateDir; "
            f"sd = StateDir({str(sd.root)!r}); print(sd.next_boot()); sys.stdout.flush(); os._exit(9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 9 and out.stdout.strip() == "2"
    assert sd.next_boot() == 3


def test_layout_lock_and_active_pointer(tmp_path):
    sd = StateDir(tmp_path / "state").ensure()
    assert (sd.root / "slots" / "a").is_dir() and (sd.root / "slots" / "b").is_dir()
    assert sd.active_slot() is None and sd.active_bundle() is None
    src = tmp_path / "b.ekb"
    src.write_bytes(b"bundle bytes")
    dest = sd.place_bundle(src, "a")
    assert dest == sd.root / "slots" / "a" / "bundle.ekb" and dest.read_bytes() == b"bundle bytes"
    assert sd.active_slot() is None  # placing a bundle does not switch to it
    sd.write_pointer("a", None)
    assert json.loads(sd.active_file.read_text())["slot"] == "a" and sd.active_bundle() == dest
    assert sd.idle_slot() == "b" and sd.read_slot("a")["state"] == "good"  # a bundle without a record
    sd.active_file.write_text("a\n")  # the plain pointer older agents wrote still reads
    assert sd.read_pointer() == {"slot": "a", "previous": None}
    sd.lock()
    other = StateDir(sd.root)
    assert other.is_locked()
    with pytest.raises(AgentStateError, match="another agent is running"):
        other.lock()
    sd.unlock()
    assert not other.is_locked()
    sd.active_file.write_text("c\n")
    with pytest.raises(AgentStateError, match="does not name a slot"):
        sd.active_slot()
    assert os.access(sd.lock_file, os.R_OK)


def test_state_transitions_are_explicit():
    check_transition(AgentState.ONLINE, AgentState.OFFLINE_SPOOLING)
    check_transition(AgentState.OFFLINE_SPOOLING, AgentState.ONLINE)
    with pytest.raises(AgentStateError, match="cannot go from stopped to online"):
        check_transition(AgentState.STOPPED, AgentState.ONLINE)
    with pytest.raises(AgentStateError):
        check_transition(AgentState.STARTING, AgentState.ONLINE)
