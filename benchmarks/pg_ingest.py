"""CPU per stored message of the fleet store's batch insert: SQLite file vs PostgreSQL server, same rows.

The rows are what an ingest worker makes of the device agent's own telemetry
(:func:`edgekit.fleet.loadgen.agent_bodies` through :class:`~edgekit.fleet.ingest.Ingestor`),
``--batches`` batches of ``--batch`` rows (the monitor's default batch is 4,000),
inserted by :meth:`FleetStore.insert_batch`, one transaction each. Reported per
engine: client CPU µs per stored row (this process: driver, parameter encoding),
server CPU µs per row (PostgreSQL: the cluster's processes, psutil; SQLite has
none, its work is in the client figure), and wall-clock rows/s — which on a shared
machine is only an upper bound of the time; the CPU figures hold.

The PostgreSQL server is a :class:`~edgekit.fleet.pgserver.TempPostgres` with
``--durable`` (fsync on, as a production server) or without (fsync off). SQLite
runs as the monitor runs it (WAL, synchronous=NORMAL: no fsync per commit).

    python benchmarks/pg_ingest.py                      # 20 batches of 4,000 rows, both engines
    python benchmarks/pg_ingest.py --durable --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_rows(n: int, device_count: int = 1000, offset: int = 0) -> list[tuple]:
    from edgekit.fleet.ingest import Ingestor
    from edgekit.fleet.loadgen import agent_bodies
    from edgekit_runtime.contract import fleet_protocol as fp

    bodies = [json.loads(b) for b in agent_bodies(8)]
    ing = Ingestor(fleet="bench")
    now = time.time()
    for i in range(offset, offset + n):
        dev = f"dev{i % device_count:05d}"
        msg = fp.envelope("telemetry", "bench", dev, 1, 2 + i // device_count, bodies[i % len(bodies)], ts=now)
        ing.add(fp.topic("bench", dev, "telemetry"), fp.encode(msg), False, now)
    rows, bad = ing.take()
    assert not bad and len(rows) == n
    return rows


def _server_cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _cluster_pids(root_pid: int) -> list[int]:
    import psutil

    parent = psutil.Process(root_pid)
    return [parent.pid] + [c.pid for c in parent.children(recursive=True)]


def measure(db: str, batches: list[list[tuple]], server_pid: int | None = None) -> dict[str, Any]:
    from edgekit.fleet.stores import open_store

    store = open_store(db, autocheckpoint=False)
    try:
        store.insert_batch(batches[0])  # warm-up (connection, prepared statements, first pages)
        pids = _cluster_pids(server_pid) if server_pid else []
        s0, c0, w0 = _server_cpu(pids), os.times(), time.perf_counter()
        stored = 0
        for rows in batches[1:]:
            stored += store.insert_batch(rows)
            store.checkpoint()
        w1, c1 = time.perf_counter(), os.times()
        # (backends that served this connection exit with it; read before closing)
        s1 = _server_cpu(pids + [p for p in _cluster_pids(server_pid) if p not in pids]) if server_pid else 0.0
    finally:
        store.close()
    client = (c1.user - c0.user) + (c1.system - c0.system)
    return {"engine": store.engine, "rows": stored, "client_cpu_us_per_row": round(client / stored * 1e6, 1),
            "server_cpu_us_per_row": round((s1 - s0) / stored * 1e6, 1) if server_pid else None,
            "rows_per_s_wall": round(stored / (w1 - w0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4000)
    ap.add_argument("--durable", action="store_true", help="PostgreSQL with fsync on")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    from edgekit.fleet.pgserver import TempPostgres

    n = args.batches + 1
    all_rows = make_rows(n * args.batch)
    batches = [all_rows[i * args.batch:(i + 1) * args.batch] for i in range(n)]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        results.append(measure(str(Path(tmp) / "fleet.db"), batches))
    with TempPostgres(durable=args.durable) as pg:
        pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        results.append(measure(pg.url, batches, pid))
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()},
           "batch": args.batch, "batches": args.batches,
           "payload_bytes": sum(len(r[-1]) for r in all_rows) // len(all_rows),
           "postgres_durable": args.durable, "results": results}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
