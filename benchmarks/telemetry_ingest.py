"""Fleet telemetry ingest, end to end: N devices → local Mosquitto → monitor → SQLite (and PostgreSQL).

Each run gets a fresh Mosquitto (the config ``edgekit broker`` writes: raised
in-flight and queue limits; persistence off) on a free loopback port, a fresh
store, and ``N`` device connections from :mod:`edgekit.fleet.loadgen` (one MQTT
connection per device, retained state + ``M`` telemetry envelopes at QoS 1,
bodies made by the device agent's own ``AgentCore``; a message counts as
published when its PUBACK says success). The monitor is
:class:`~edgekit.fleet.monitor.Monitor`: shared subscription, ``W`` ingest
worker processes, one store transaction per batch, PUBACK after commit, the
tracker in the main process.

Two modes:

* ``live`` — devices publish while the monitor ingests; everything (broker,
  monitor, the load generator standing in for the devices) shares this
  machine's cores;
* ``catch-up`` — the monitor's workers hold persistent sessions
  (``--client-id``/``--session-expiry``) and are away while the devices
  publish, so the broker queues everything; then the monitor starts and drains
  the backlog alone — its ingest capacity without the load generator's CPU.

Reported per run: rows stored per second end to end (rows / time from the
first publish — catch-up: from the monitor's start — to the last row stored),
messages **lost** (PUBACK success but no row), duplicates dropped, and the CPU
each process used (psutil) with the share other processes took meanwhile.
The script exits with status 1 when a run lost a message (or, live, stored a
duplicate).

    python benchmarks/telemetry_ingest.py            # the target run: 1,000 devices, QoS 1, live, 1 worker, SQLite
    python benchmarks/telemetry_ingest.py --pg       # ... and the same on a throwaway PostgreSQL server beside it
    python benchmarks/telemetry_ingest.py --db postgresql://user@host/empty_db   # ... on a server of yours
    python benchmarks/telemetry_ingest.py --runs live:1,live:2,live:1:20000,catch-up:1,catch-up:2   # the study
    python benchmarks/telemetry_ingest.py --quick    # 200 devices x 50 messages (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MONITOR_ROLE = "monitor (tracker, state reader, checkpoints)"
PG_ROLE = "postgres server"
TARGET = 30000.0  # stored/s live with 0 lost: the goal this benchmark checks (issue 17)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class CpuSampler:
    """CPU seconds per role (psutil) until stopped, this process's threads by name, and the machine's total."""

    def __init__(self, roles: dict[str, list[int]], interval: float = 0.5):
        import psutil

        self.psutil = psutil
        self.procs = {role: [psutil.Process(p) for p in pids] for role, pids in roles.items()}
        self.base = {(role, p.pid): self._cpu(p) for role, procs in self.procs.items() for p in procs}
        self.last: dict[tuple[str, int], float] = dict.fromkeys(self.base, 0.0)
        self.thread0 = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
        self.thread_cpu: dict[tuple[str, int], float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self.t0 = time.monotonic()
        self.sys0 = psutil.cpu_times()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self._thread.start()

    @staticmethod
    def _cpu(p) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _sample(self) -> None:
        for role, procs in self.procs.items():
            for p in procs:
                try:
                    self.last[(role, p.pid)] = self._cpu(p) - self.base[(role, p.pid)]
                except self.psutil.NoSuchProcess:
                    pass  # it exited: its last sample stands
        names = {t.native_id: t.name for t in threading.enumerate()}
        for t in self.psutil.Process().threads():
            if t.id in names:
                self.thread_cpu[(names[t.id], t.id)] = t.user_time + t.system_time - self.thread0.get(t.id, 0.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop_sampling(self) -> None:
        if not self._stop.is_set():
            self._sample()
            self._stop.set()
            self._thread.join()
            self.t1 = time.monotonic()
            self.sys1 = self.psutil.cpu_times()

    def stop(self) -> dict[str, Any]:
        self.stop_sampling()
        wall = self.t1 - self.t0
        sys1 = self.sys1
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0)  # noqa: E731
        machine = busy(sys1) - busy(self.sys0)
        cpu = {role: sum(v for (r, _), v in self.last.items() if r == role) for role in self.procs}
        threads: dict[str, float] = {}
        for (name, _), v in self.thread_cpu.items():
            if name != "cpu-sampler":
                threads[name] = round(threads.get(name, 0.0) + v, 2)
        other = max(machine - sum(cpu.values()), 0.0)
        return {"wall_s": round(wall, 3), "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                "cpu_percent_of_one_core": {k: round(100 * v / wall, 1) for k, v in cpu.items()},
                "monitor_threads_cpu_s": threads, "machine_busy_percent": round(100 * machine / (wall * cores()), 1),
                "other_processes_percent_of_machine": round(100 * other / (wall * cores()), 1)}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def postgres_pids(data_dir: Path) -> list[int]:
    """The server's processes (postmaster, its backends and helpers) of a cluster in ``data_dir``."""
    import psutil

    try:
        main = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
        return [main.pid] + [c.pid for c in main.children(recursive=True)]
    except (OSError, ValueError, IndexError, psutil.Error):
        return []  # (then the server's CPU is not reported)


def run_one(mode: str, devices: int, messages: int, workers: int, rate: Optional[float], window: int,
            batch_max: int, timeout_s: float, pub_procs: int, inflight: int = 1000, db: Optional[str] = None,
            pg_data: Optional[Path] = None) -> dict[str, Any]:
    """One run; ``db`` a PostgreSQL URL (an empty database) or None for a fresh SQLite file;
    ``pg_data``: that server's data folder on this machine, to measure its CPU."""
    from edgekit.fleet.broker import BrokerConfig, free_port, start_broker
    from edgekit.fleet.connection import BrokerSettings
    from edgekit.fleet.loadgen import LoadGenerator, LoadPlan
    from edgekit.fleet.monitor import Monitor, MonitorOptions
    from edgekit.fleet.stores import open_store

    tmp = Path(tempfile.mkdtemp(prefix="edgekit-ingest-bench-"))
    engine = "postgresql" if db else "sqlite"
    db = db or str(tmp / "fleet.db")
    if engine == "postgresql":
        with open_store(db) as store:
            if store.message_count():
                raise SystemExit(f"{db} already holds messages: give the benchmark an empty database")
    broker = start_broker(BrokerConfig(dir=tmp / "broker", port=free_port(), persistence=False,
                                       max_inflight_messages=inflight))
    settings = BrokerSettings(port=broker.config.port, keepalive=60)
    catch_up = mode == "catch-up"
    options = lambda: MonitorOptions(fleet="bench", group="bench", workers=workers, batch_max=batch_max,  # noqa: E731
                                     client_id="bench-monitor" if catch_up else None,
                                     session_expiry=600 if catch_up else 0)
    plan = LoadPlan(fleet="bench", devices=devices, messages_per_device=messages, processes=pub_procs, window=window,
                    rate=rate, timeout_s=timeout_s)
    result: dict[str, Any] = {}
    monitor = None
    try:
        if catch_up:  # make the sessions (and the group's subscriptions), then leave
            Monitor(settings, db, options()).run(duration=0.0)
        monitor = Monitor(settings, db, options())
        if not catch_up:
            monitor.start()
        load = LoadGenerator(settings, plan)
        load.ready(timeout=120)
        roles = {"broker": [broker.pid], MONITOR_ROLE: [os.getpid()], "publishers": load.pids}
        if pg_data is not None:
            roles[PG_ROLE] = postgres_pids(pg_data)
        if not catch_up:
            roles["ingest workers"] = monitor.worker_pids
            sampler = CpuSampler(roles)
        waiter = threading.Thread(target=lambda: result.__setitem__("load", load.wait(timeout_s + 60)), daemon=True)
        load.go()
        waiter.start()
        if catch_up:
            waiter.join(timeout_s + 60)
            result["monitor_started"] = time.time()
            monitor.start()
            roles.pop("publishers")
            roles["ingest workers"] = monitor.worker_pids
            if pg_data is not None:  # (the workers' backends are new)
                roles[PG_ROLE] = postgres_pids(pg_data)
            sampler = CpuSampler(roles)
        last = {"stored": -1, "since": time.monotonic()}

        def on_tick(m: Monitor) -> None:
            if m.stored != last["stored"]:
                last["stored"], last["since"] = m.stored, time.monotonic()
            if "load" in result and (m.stored >= load.expected or time.monotonic() - last["since"] > 3.0):
                sampler.stop_sampling()  # while the workers still run
                m.stop()

        summary = monitor.run(duration=timeout_s + 30, on_tick=on_tick)
        cpu = sampler.stop()
        waiter.join(5)
    finally:
        if monitor is not None:
            monitor.stop()
        broker.stop()
    pub = result["load"]
    if not catch_up:  # measured inside the publisher processes (they exit before the last sample)
        cpu["cpu_s"]["publishers"] = round(pub.cpu_s, 2)
        cpu["cpu_percent_of_one_core"]["publishers"] = round(100 * pub.cpu_s / cpu["wall_s"], 1)
    with open_store(db) as store:
        stored = store.message_count()
        last_rx = store.db.execute("SELECT MAX(received) FROM messages").fetchone()[0]
        counters = store.counters()
    shutil.rmtree(tmp, ignore_errors=True)
    start = result.get("monitor_started", pub.started)
    elapsed = (last_rx - start) if last_rx else None
    return {
        "mode": mode, "store": engine, "broker_max_inflight_messages": inflight, "devices": devices, "messages_per_device": messages + 1, "ingest_workers": workers,
        "publisher_processes": pub_procs, "target_rate": rate, "window_per_device": window, "batch_max": batch_max,
        "payload_bytes_avg": load.payload_bytes, "published": pub.published, "acked": pub.acked,
        "refused_by_broker": pub.refused, "stored": stored, "lost": pub.acked - stored,
        "duplicates_dropped": counters.get("duplicates", 0),
        "publish_rate": round(pub.acked / (pub.finished - pub.started), 1) if pub.finished else None,
        "stored_per_s_end_to_end": round(stored / elapsed, 1) if elapsed else None,
        "end_to_end_s": round(elapsed, 3) if elapsed else None,
        "monitor_summary": {k: summary[k] for k in ("stored", "devices", "online", "missing", "malformed")},
        "cpu": cpu,
        "cpu_us_per_stored_message": {k: round(1e6 * v / stored, 1) for k, v in cpu["cpu_s"].items()} if stored else {},
    }


def system_info() -> dict[str, Any]:
    import paho.mqtt
    import psutil

    from edgekit.fleet.broker import find_mosquitto
    from edgekit.fleet.ingest import JSON_BACKEND

    version = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: the CPU model stays unknown
    json_parser = JSON_BACKEND
    if JSON_BACKEND == "orjson":
        import orjson

        json_parser = f"orjson {orjson.__version__}"
    return {"cpu": cpu, "cores": cores(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "mosquitto": version,
            "paho_mqtt": paho.mqtt.__version__, "sqlite": __import__("sqlite3").sqlite_version,
            "json_parser": json_parser, "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def _label(r: dict[str, Any]) -> str:
    return r["mode"] + (f" at {r['target_rate']:,.0f}/s" if r["target_rate"] else "")


def analysis(report: dict[str, Any]) -> list[str]:
    """What limited each kind of run, from its own figures."""
    out = ["What limited it:", ""]
    for engine in ("sqlite", "postgresql"):
        runs = [r for r in report["runs"] if r.get("store", "sqlite") == engine]
        live = [r for r in runs if r["mode"] == "live" and not r["target_rate"]]
        name = "SQLite" if engine == "sqlite" else "PostgreSQL"
        if live:
            best = max(live, key=lambda r: r["stored_per_s_end_to_end"] or 0)
            u = best["cpu_us_per_stored_message"]
            total = sum(u.values())
            pg = f", the PostgreSQL server {u[PG_ROLE]:.0f}" if PG_ROLE in u else ""
            out.append(
                f"- **live, {name}** (best {best['stored_per_s_end_to_end']:,.0f}/s, {best['ingest_workers']} "
                f"worker(s)): the machine was {best['cpu']['machine_busy_percent']:.0f} % busy. Of {total:.0f} µs "
                f"of CPU per stored message, the broker took {u['broker']:.0f} (1,000 connections: receive, route, "
                f"two PUBACK flows) and the load generator {u.get('publishers', 0):.0f}{pg}; the monitor used "
                f"{u['ingest workers'] + u[MONITOR_ROLE]:.0f} (ingest workers {u['ingest workers']:.0f}: MQTT "
                f"framing, JSON, envelope checks, the insert; tracker and WAL checkpoints {u[MONITOR_ROLE]:.0f}). "
                "With the devices on their own machines, the broker and the monitor get both cores: that is what "
                "catch-up measures.")
        catch = [r for r in runs if r["mode"] == "catch-up"]
        if catch:
            best = max(catch, key=lambda r: r["stored_per_s_end_to_end"] or 0)
            u = best["cpu_us_per_stored_message"]
            out.append(
                f"- **catch-up, {name}** (best {best['stored_per_s_end_to_end']:,.0f}/s, {best['ingest_workers']} "
                f"worker(s)): the broker only delivers ({u['broker']:.0f} µs/message), the ingest workers spend "
                f"{u['ingest workers']:.0f} µs/message, the tracker and checkpoints {u[MONITOR_ROLE]:.0f}; the "
                f"machine was {best['cpu']['machine_busy_percent']:.0f} % busy.")
        for r in (r for r in runs if r["target_rate"]):
            out.append(f"- **live at {r['target_rate']:,.0f}/s, {name}**: {r['stored_per_s_end_to_end']:,.0f}/s "
                       f"stored, {r['lost']} lost, the machine {r['cpu']['machine_busy_percent']:.0f} % busy.")
    return out


def target_lines(report: dict[str, Any]) -> list[str]:
    """Whether the goal was met: live (as fast as the devices go) ≥ TARGET stored/s with 0 lost, per store."""
    out = []
    for engine, name in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        live = [r for r in report["runs"] if r.get("store", "sqlite") == engine and r["mode"] == "live"
                and not r["target_rate"] and r["devices"] >= 1000]
        if live:
            best = max(live, key=lambda r: r["stored_per_s_end_to_end"] or 0)
            met = (best["stored_per_s_end_to_end"] or 0) >= TARGET and best["lost"] == 0
            out.append(f"- **Target** (live, 1,000 devices, QoS 1, ≥ {TARGET:,.0f} stored/s, 0 lost), {name}: "
                       f"{'met' if met else 'not met'} — {best['stored_per_s_end_to_end']:,.0f}/s, "
                       f"{best['lost']} lost, {best['ingest_workers']} worker(s).")
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["system"]
    runs = report["runs"]
    has_pg = any(r.get("store") == "postgresql" for r in runs)
    lines = [
        "# Fleet telemetry ingest: devices → Mosquitto → monitor → store",
        "",
        f"- **Machine**: {s['cpu']}, {s['cores']} cores, {s['memory_gb']} GiB; {s['platform']}",
        f"- **Software**: {s['mosquitto']}; Python {s['python']}; SQLite {s['sqlite']}; ingest JSON parser "
        f"{s['json_parser']}; paho-mqtt {s['paho_mqtt']} (devices, simulator; the load generator and the "
        "monitor's ingest use `edgekit.fleet.wire`)" + (f"; {s['postgresql']}" if s.get("postgresql") else ""),
        "- **Setup**: one machine runs everything: one Mosquitto (`edgekit broker`'s config, persistence off), the "
        "monitor (`$share/bench/...`, W ingest worker processes, a transaction per batch, PUBACK after commit, "
        "WAL checkpoints in a thread of the main process), and the load generator standing in for N devices, one "
        "MQTT connection each (retained state, then telemetry at QoS 1, agent-made bodies with their latency "
        "sketch). **The load generator runs on the same cores** as the broker and the monitor: its CPU "
        "(`publishers`) is what 1,000 real devices would spend on their own machines.",
        "- **live**: devices publish while the monitor ingests (all share the cores). **catch-up**: the monitor's "
        "persistent sessions are away while the devices publish (the broker queues), then it drains the backlog "
        "alone: its capacity without the load generator.",
        "- **stored/s** = rows stored / (last row's receive time − first publish, or the monitor's start for "
        "catch-up). **lost** = messages whose PUBACK said success − rows stored.",
    ]
    if has_pg:
        lines.append(f"- **PostgreSQL**: {report.get('postgresql_setup', 'a server of the user (--db)')}.")
    lines += [""] + target_lines(report) + [
        "",
        "| store | mode | ingest workers | devices | messages | published (PUBACK ok) | stored | lost | stored/s | "
        "broker CPU | workers CPU | monitor main CPU | publishers CPU |" + (" PostgreSQL CPU |" if has_pg else "")
        + " machine busy | other processes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_pg else "") + "---|---|",
    ]
    for r in runs:
        c = r["cpu"]["cpu_percent_of_one_core"]
        pg = (f" {c[PG_ROLE]:.0f} % |" if PG_ROLE in c else " – |") if has_pg else ""
        lines.append(
            f"| {r.get('store', 'sqlite')} | {_label(r)} | "
            f"{r['ingest_workers']} | {r['devices']} | {r['devices'] * r['messages_per_device']:,} | "
            f"{r['acked']:,} | {r['stored']:,} | **{r['lost']}** | **{r['stored_per_s_end_to_end']:,.0f}** | "
            f"{c['broker']:.0f} % | {c['ingest workers']:.0f} % | {c[MONITOR_ROLE]:.0f} % | "
            f"{c.get('publishers', 0):.0f} % |{pg} {r['cpu']['machine_busy_percent']:.0f} % | "
            f"{r['cpu']['other_processes_percent_of_machine']:.0f} % |")
    lines += ["", "CPU columns: percent of one core over the run (this machine has "
                  f"{s['cores']}: {100 * s['cores']} % in all); catch-up runs sample the drain only.", "",
              "CPU time per stored message (µs):", "",
              "| store | mode | workers | broker | ingest workers | monitor main | publishers |"
              + (" PostgreSQL |" if has_pg else "") + " total |",
              "|---|---|---|---|---|---|---|" + ("---|" if has_pg else "") + "---|"]
    for r in runs:
        u = r["cpu_us_per_stored_message"]
        pg = (f" {u[PG_ROLE]:.1f} |" if PG_ROLE in u else " – |") if has_pg else ""
        lines.append(f"| {r.get('store', 'sqlite')} | {_label(r)} | {r['ingest_workers']} | {u['broker']:.1f} | "
                     f"{u['ingest workers']:.1f} | {u[MONITOR_ROLE]:.1f} | {u.get('publishers', 0):.1f} |{pg} "
                     f"{sum(u.values()):.1f} |")
    lines.append("")
    lines += analysis(report) + [""] + report.get("notes", [])
    argv, skip = [], False
    for a in report["argv"]:  # (the notes are above)
        if not skip and a != "--note" and not a.startswith("--note="):
            argv.append(a)
        skip = a == "--note"
    lines += ["", f"Generated {report['generated']} by `python benchmarks/telemetry_ingest.py "
                  f"{' '.join(argv)}`" + (" with the notes above" if "--note" in report["argv"] else "")
              + f" in {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def failures(runs: list[dict[str, Any]]) -> list[str]:
    """What no run may show: an acknowledged message not stored, a live duplicate (catch-up re-reads the
    retained states once more: those are expected)."""
    out = []
    for r in runs:
        if r["lost"]:
            out.append(f"{r['store']} {_label(r)}: {r['lost']} acknowledged message(s) not stored")
        if r["mode"] == "live" and r["duplicates_dropped"]:
            out.append(f"{r['store']} {_label(r)}: {r['duplicates_dropped']} duplicate(s) in a live run")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=300, help="telemetry messages per device")
    ap.add_argument("--runs", default="live:1",
                    help="MODE:WORKERS[:RATE] comma-separated (MODE live or catch-up; RATE total msg/s); the "
                         "default is the target run")
    ap.add_argument("--window", type=int, default=32, help="PUBACKs outstanding per device")
    ap.add_argument("--batch", type=int, default=4000, help="messages per store transaction (most)")
    ap.add_argument("--inflight", type=int, default=1000, help="the broker's max_inflight_messages")
    ap.add_argument("--publishers", type=int, default=1, help="publisher processes")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    ap.add_argument("--pg", action="store_true",
                    help="run each configuration again on a throwaway PostgreSQL server (needs the postgresql "
                         "package and psycopg)")
    ap.add_argument("--pg-commit", choices=("off", "on"), default="off",
                    help="the throwaway server's synchronous_commit: off (default; like SQLite's WAL at "
                         "synchronous=NORMAL, a power loss can lose the last commits, never corrupt the store); "
                         "on fsyncs each commit")
    ap.add_argument("--db", help="run each configuration again on this PostgreSQL database (postgresql://..., "
                                 "empty; one run only)")
    ap.add_argument("--quick", action="store_true", help="200 devices x 50 messages, live with 1 worker")
    ap.add_argument("--out", type=Path, default=RESULTS / "telemetry_ingest", help="results path without suffix")
    ap.add_argument("--note", action="append", default=[], help="a line for the Markdown (repeatable)")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.messages, args.runs = 200, 50, "live:1"
        args.out = args.out.with_name(args.out.name + "_quick")
    specs = []
    for spec in args.runs.split(","):
        parts = spec.split(":")
        if parts[0] not in ("live", "catch-up") or len(parts) not in (2, 3):
            ap.error(f"--runs: {spec!r} is not MODE:WORKERS[:RATE] with MODE live or catch-up")
        specs.append((parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else None))
    if args.db and len(specs) > 1:
        ap.error("--db: one run only (each run needs an empty database); use --pg for several")
    if args.pg and args.db:
        ap.error("--pg and --db: choose one")
    if args.db:
        from edgekit.fleet.stores import is_pg_url, open_store

        if not is_pg_url(args.db):
            ap.error("--db: a postgresql:// URL (the SQLite runs use a fresh file of their own)")
        with open_store(args.db) as store:
            if store.message_count():
                ap.error(f"--db: {args.db} already holds messages; give the benchmark an empty database")
    temp_pg = None
    if args.pg:
        try:
            from edgekit.fleet.pgserver import TempPostgres, find_bindir
        except ImportError as exc:
            ap.error(f"--pg needs edgekit.fleet.pgserver and psycopg ({exc})")
        temp_pg = TempPostgres
    t0 = time.time()
    shown = list(argv if argv is not None else sys.argv[1:])
    if args.db:  # (no password in the results)
        from edgekit.fleet.stores import describe

        shown = [describe(a) if a == args.db else a.replace(args.db, describe(args.db)) for a in shown]
    report: dict[str, Any] = {"system": system_info(), "runs": [], "argv": shown}
    if args.pg:
        bindir = find_bindir()
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout \
            if bindir else ""
        report["system"]["postgresql"] = version.strip()
        report["postgresql_setup"] = (
            f"a throwaway local server (`edgekit.fleet.pgserver.TempPostgres`: loopback TCP, shared_buffers 128MB, "
            f"fsync on, synchronous_commit {args.pg_commit}), a fresh database per run, on the same cores")
    elif args.db:
        report["postgresql_setup"] = "the database given with --db (its server's CPU is not measured)"
    common = (args.window, args.batch, args.timeout, args.publishers, args.inflight)
    for mode, workers, rate in specs:
        engines = ["sqlite"] + (["postgresql"] if (args.pg or args.db) else [])
        for engine in engines:
            log(f"{mode}, {engine}: {args.devices} devices x {args.messages + 1} messages, {workers} ingest "
                f"worker(s)" + (f", {rate:,.0f} msg/s" if rate else "") + " ...")
            if engine == "sqlite":
                r = run_one(mode, args.devices, args.messages, workers, rate, *common)
            elif args.db:
                r = run_one(mode, args.devices, args.messages, workers, rate, *common, db=args.db)
            else:
                with temp_pg(durable=True, settings={"synchronous_commit": args.pg_commit}) as pg:
                    r = run_one(mode, args.devices, args.messages, workers, rate, *common, db=pg.url,
                                pg_data=pg.data)
            log(f"  stored {r['stored']}/{r['acked']} acknowledged, lost {r['lost']}, "
                f"{r['stored_per_s_end_to_end']:,} stored/s; CPU µs per message {r['cpu_us_per_stored_message']}; "
                f"machine busy {r['cpu']['machine_busy_percent']} %, other processes "
                f"{r['cpu']['other_processes_percent_of_machine']} %")
            report["runs"].append(r)
    report["notes"] = args.note
    report["generated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    for line in target_lines(report):
        log(line.lstrip("- ").replace("**", ""))
    log(f"wrote {args.out.with_suffix('.json')} and .md")
    bad = failures(report["runs"])
    for line in bad:
        log(f"FAILED: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
