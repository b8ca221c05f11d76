"""Bytes the agent's spool writes per telemetry message, and the size of its files on disk.

The agent (``AgentCore``, no model, no broker) makes real telemetry messages
(~1.5 KB: a window of 400 latencies with its sketch) and spools them; a fake
sender takes them with ``next_unsent`` and acknowledges them with ``ack`` as
:class:`MqttLink` does on PUBACK. Three scenarios, each with a fresh state folder:

* ``live``: connected, every message acknowledged right after it was spooled
  (what a device does all day: nothing pending);
* ``outage``: ``spool_max_bytes`` = 16384, N messages with nothing acknowledged
  (``drop_oldest`` keeps the newest that fit), then everything drained 20 at a time;
* ``outage_1mb``: the same with a 1 MiB spool, so the backlog spans many pages.

For each: bytes written per message as the kernel counts them for this process
(``/proc/self/io``: ``wchar``, the bytes handed to write calls, which does not depend
on the file system's caching; ``write_bytes``, what reached the block layer, shown
too but 0 on tmpfs and delayed by the page cache elsewhere), write calls per message,
and the largest total size of the spool's files (db + ``-wal`` + ``-shm``) seen after
any operation, beside ``spool_max_bytes``.

    .venv/bin/python benchmarks/spool_writes.py --label after

Merges ``{label: figures}`` into ``--out``/spool_writes.json (``before`` was measured
with the spool of commit f263fbe, before the WAL was bounded).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ensure_importable, log, provenance  # noqa: E402


def proc_io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def files_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


def make_core(folder: Path, max_bytes: int, sync: str):
    from edgekit_runtime.agent.config import AgentConfig
    from edgekit_runtime.agent.core import AgentCore

    cfg = AgentConfig.from_dict({"device_id": "cam-01", "fleet": "factory-a", "broker_url": "mqtt://127.0.0.1:1",
                                 "state_dir": str(folder), "keyring": str(folder), "spool_max_bytes": max_bytes,
                                 "spool_sync": sync})
    return AgentCore(cfg, None, system_stats=False)


def scenario(name: str, *, messages: int, max_bytes: int, acked_live: bool, sync: str, rng: random.Random
             ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as tmp:
        core = make_core(Path(tmp), max_bytes, sync)
        db = core.spool.path
        peak = files_size(db)
        sizes_payload = []
        sent_seqs: list[int] = []
        start_io, t0 = proc_io(), time.perf_counter()

        def drain(batch: int) -> None:
            nonlocal peak
            while True:
                rows = core.spool.next_unsent(batch)
                if not rows:
                    return
                for r in rows:
                    core.spool.mark_inflight(r.id)
                sent_seqs.extend(r.seq for r in rows)
                core.spool.ack([r.id for r in rows])
                peak = max(peak, files_size(db))

        for _ in range(messages):
            for _ in range(400):
                core.record_inference(rng.uniform(0.005, 0.02))
            msg = core.tick()
            sizes_payload.append(len(json.dumps(msg)))
            peak = max(peak, files_size(db))
            if acked_live:
                drain(20)
        drain(20)
        elapsed = time.perf_counter() - t0
        end_io = proc_io()
        made = core.seq
        dropped = core.spool.counters["dropped_oldest"]
        final = files_size(db)
        core.close()
        closed = files_size(db)
    assert len(sent_seqs) == len(set(sent_seqs)), "a message was sent twice"
    assert sent_seqs == sorted(sent_seqs), "not sent in creation order"
    return {
        "scenario": name, "messages_made": made, "sent": len(sent_seqs), "dropped_oldest": dropped,
        "spool_max_bytes": max_bytes, "sync": sync,
        "mean_message_bytes": round(sum(sizes_payload) / len(sizes_payload)),
        "wchar_per_message": round((end_io["wchar"] - start_io["wchar"]) / made),
        "write_bytes_per_message": round((end_io["write_bytes"] - start_io["write_bytes"]) / made),
        "write_calls_per_message": round((end_io["syscw"] - start_io["syscw"]) / made, 2),
        "peak_files_bytes": peak, "peak_over_max_bytes": peak - max_bytes,
        "files_bytes_at_end": final, "files_bytes_after_close": closed,
        "ms_per_message": round(elapsed * 1000 / made, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after", help="key under which the figures are stored (before/after)")
    ap.add_argument("--messages", type=int, default=600)
    ap.add_argument("--sync", default="full", choices=("full", "normal"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    ensure_importable()
    rng = random.Random(0)
    runs = [
        scenario("live", messages=args.messages, max_bytes=16384, acked_live=True, sync=args.sync, rng=rng),
        scenario("outage", messages=args.messages, max_bytes=16384, acked_live=False, sync=args.sync, rng=rng),
        scenario("outage_1mb", messages=args.messages * 2, max_bytes=1 << 20, acked_live=False, sync=args.sync,
                 rng=rng),
    ]
    for r in runs:
        log(f"[{args.label}] {r['scenario']:<11} {r['wchar_per_message']:>7} B written/msg "
            f"({r['write_calls_per_message']} writes), peak files {r['peak_files_bytes']:>9} B "
            f"for spool_max_bytes {r['spool_max_bytes']}, {r['ms_per_message']} ms/msg")
    out = args.out / "spool_writes.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "provenance": provenance(), "scenarios": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
