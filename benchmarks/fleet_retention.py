"""Fleet store size under retention: a 24-hour fleet in compressed time, pruned every simulated hour.

``D`` devices each send one telemetry message every ``I`` seconds of device
time for ``H`` hours. Bodies are the device agent's own (``AgentCore.tick()``
via :func:`edgekit.fleet.loadgen.agent_bodies`, ~1.1 KB with a latency sketch),
rows are built as ingest builds them (:func:`edgekit.fleet.ingest.telemetry_figures`,
the envelope text as payload) and written with :meth:`FleetStore.insert_batch`,
one batch per device-time tick, by a writer whose WAL is checkpointed like the
monitor's (``store.checkpoint()``, PASSIVE, here every 10 batches). At each
simulated hour a second connection runs :func:`edgekit.fleet.retention.prune`
with ``keep_raw`` (default 2 h), as a cron job would.

Recorded per hour: the file and its ``-wal`` (bytes), free pages, raw rows,
hour rows, and the prune's CPU seconds and longest write transaction. The
store's size must plateau once the first prune removes rows: freed pages are
reused by new rows (no VACUUM). The bound printed is the largest size after
the warm-up hours divided by the size at the end of the warm-up.

    python benchmarks/fleet_retention.py              # 200 devices x 10 s x 24 h (1.73 M messages)
    python benchmarks/fleet_retention.py --quick      # 20 devices x 60 s x 12 h
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from edgekit.fleet.ingest import telemetry_figures  # noqa: E402
from edgekit.fleet.loadgen import agent_bodies  # noqa: E402
from edgekit.fleet.retention import BATCH_ROWS, HOUR_S, prune, store_bytes  # noqa: E402
from edgekit.fleet.store import FleetStore  # noqa: E402

T0 = 1_780_000_000.0 - 1_780_000_000.0 % HOUR_S  # an hour boundary


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def simulate(path: Path, devices: int = 200, interval_s: float = 10.0, hours: int = 24, keep_raw_s: float = 7200.0,
             keep_rollups_s: float = 400 * 86400.0, templates: int = 32, checkpoint_every: int = 10,
             batch_rows: int = BATCH_ROWS, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Write ``hours`` of telemetry into the store at ``path``, prune every hour; returns per-hour figures."""
    bodies = [(b, telemetry_figures(json.loads(b))) for b in agent_bodies(templates)]
    writer = FleetStore(path, autocheckpoint=False)  # (as an ingest worker: the checkpoints below are the monitor's)
    pruner = FleetStore(path)
    names = [f"dev{i:04d}" for i in range(devices)]
    heads = ['{"schema":1,"kind":"telemetry","fleet":"sim","device":"%s","boot":1,"seq":' % n for n in names]
    ticks_per_hour = int(round(HOUR_S / interval_s))
    per_hour: list[dict[str, Any]] = []
    seq = 0
    insert_cpu = 0.0
    try:
        for hour in range(1, hours + 1):
            c0 = time.process_time()
            for tick in range(ticks_per_hour):
                seq += 1
                ts = T0 + (hour - 1) * HOUR_S + tick * interval_s
                rows = []
                for i, name in enumerate(names):
                    body, figures = bodies[(seq + i) % len(bodies)]
                    t = ts + i * interval_s / devices  # devices spread over the tick
                    payload = '%s%d,"ts":%.3f,"historical":false,"body":%s}' % (heads[i], seq, t, body)
                    rows.append(("sim", name, "telemetry", 1, seq, t, t, 0, 0, *figures, payload))
                writer.insert_batch(rows)
                if seq % checkpoint_every == 0:
                    writer.checkpoint()
            insert_cpu += time.process_time() - c0
            now = T0 + hour * HOUR_S
            c0, w0 = time.process_time(), time.perf_counter()
            result = prune(pruner, keep_raw_s, keep_rollups_s, now, batch_rows=batch_rows)
            prune_cpu, prune_wall = time.process_time() - c0, time.perf_counter() - w0
            writer.checkpoint()
            db = pruner.db
            page = db.execute("PRAGMA page_size").fetchone()[0]
            rec = {"hour": hour, "bytes": store_bytes(path), "db_bytes": path.stat().st_size,
                   "wal_bytes": Path(f"{path}-wal").stat().st_size if Path(f"{path}-wal").exists() else 0,
                   "free_pages": db.execute("PRAGMA freelist_count").fetchone()[0], "page_size": page,
                   "raw_rows": db.execute("SELECT COUNT(*) FROM messages").fetchone()[0],
                   "hour_rows": db.execute("SELECT COUNT(*) FROM telemetry_hourly").fetchone()[0],
                   "rolled_up": result.rolled_up, "prune_cpu_s": round(prune_cpu, 3),
                   "prune_wall_s": round(prune_wall, 3),
                   "longest_transaction_s": round(result.longest_transaction_s, 4),
                   "transactions": result.transactions}
            per_hour.append(rec)
            if log:
                log(f"hour {hour:2d}: {rec['bytes'] / 2**20:7.1f} MiB (wal {rec['wal_bytes'] / 2**20:5.1f}), "
                    f"{rec['raw_rows']} raw rows, {rec['hour_rows']} hour rows, free pages {rec['free_pages']}, "
                    f"prune {prune_cpu:.2f} CPU s for {result.rolled_up} rows, longest transaction "
                    f"{result.longest_transaction_s * 1e3:.0f} ms")
    finally:
        writer.close()
        pruner.close()
    messages = devices * ticks_per_hour * hours
    rolled = sum(r["rolled_up"] for r in per_hour)
    return {"per_hour": per_hour, "messages": messages, "rolled_up": rolled,
            "insert_cpu_us_per_message": round(insert_cpu / messages * 1e6, 2),
            "prune_cpu_us_per_rolled_row": round(sum(r["prune_cpu_s"] for r in per_hour) / max(rolled, 1) * 1e6, 2)}


def bound(per_hour: list[dict[str, Any]], warmup_hours: int) -> dict[str, Any]:
    """Largest size after the warm-up over the size at its end (1.0: no growth at all)."""
    base = per_hour[warmup_hours - 1]["bytes"]
    after = max(r["bytes"] for r in per_hour[warmup_hours:])
    return {"warmup_hours": warmup_hours, "bytes_at_warmup": base, "max_bytes_after": after,
            "growth_after_warmup": round(after / base, 4), "final_bytes": per_hour[-1]["bytes"]}


def write_markdown(out: dict[str, Any], path: Path) -> None:
    """The per-hour sizes as a short Markdown table next to the JSON."""
    s, b = out["setup"], out["bound"]
    lines = [f"# Fleet store size under retention ({s['devices']} devices, a message every {s['interval_s']:g} s, "
             f"{s['hours']} h, prune hourly, keep raw {s['keep_raw_h']:g} h)", "",
             f"Machine: {s['machine']}. {s['how']}.", "",
             f"After hour {b['warmup_hours']}: {b['bytes_at_warmup'] / 2**20:.1f} MiB; largest after it: "
             f"{b['max_bytes_after'] / 2**20:.1f} MiB (x{b['growth_after_warmup']}); the growth is the hour rows. "
             f"Insert {out['insert_cpu_us_per_message']} CPU us/message; prune {out['prune_cpu_us_per_rolled_row']} "
             "CPU us per rolled-up row.", "",
             "| hour | store MiB (db + wal) | wal MiB | free pages | raw rows | hour rows | prune CPU s | "
             "longest transaction ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out["per_hour"]:
        lines.append(f"| {r['hour']} | {r['bytes'] / 2**20:.1f} | {r['wal_bytes'] / 2**20:.1f} | {r['free_pages']} | "
                     f"{r['raw_rows']} | {r['hour_rows']} | {r['prune_cpu_s']} | "
                     f"{r['longest_transaction_s'] * 1e3:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--interval", type=float, default=10.0, help="device seconds between telemetry messages")
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--keep-raw-h", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="20 devices, a message a minute, 12 h")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_retention.json")
    args = ap.parse_args()
    if args.quick:
        args.devices, args.interval, args.hours = 20, 60.0, 12
    with tempfile.TemporaryDirectory(prefix="edgekit-retention-") as tmp:
        path = Path(tmp) / "fleet.db"
        _log(f"{args.devices} devices x one message per {args.interval:g} s x {args.hours} h, prune hourly "
             f"(keep raw {args.keep_raw_h:g} h) -> {path}")
        t0 = time.perf_counter()
        out = simulate(path, args.devices, args.interval, args.hours, args.keep_raw_h * HOUR_S, log=_log)
        wall = time.perf_counter() - t0
    warmup = min(int(args.keep_raw_h) + 2, args.hours - 1)
    out["bound"] = bound(out["per_hour"], warmup)
    out["setup"] = {"devices": args.devices, "interval_s": args.interval, "hours": args.hours,
                    "keep_raw_h": args.keep_raw_h, "wall_s": round(wall, 1),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
                               f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
                    "how": "bytes = db + -wal + -shm after each hourly prune and a PASSIVE checkpoint; CPU from "
                           "process_time (the host was shared: wall times are noisy)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(out, args.out.with_suffix(".md"))
    b = out["bound"]
    print(f"store size after hour {b['warmup_hours']}: {b['bytes_at_warmup'] / 2**20:.1f} MiB; largest after: "
          f"{b['max_bytes_after'] / 2**20:.1f} MiB (x{b['growth_after_warmup']}); at the end "
          f"{b['final_bytes'] / 2**20:.1f} MiB; insert {out['insert_cpu_us_per_message']} CPU us/message, prune "
          f"{out['prune_cpu_us_per_rolled_row']} CPU us/rolled row -> {args.out}")


if __name__ == "__main__":
    main()
