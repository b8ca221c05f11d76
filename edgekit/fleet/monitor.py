"""``edgekit fleet monitor``: subscribe to a fleet, store every message, track devices, raise alerts.

Layout of one monitor::

    state reader (thread)   normal subscription to edgekit/v1/<fleet>/+/state (retained copies included)
    ingest workers          $share/<group>/edgekit/v1/<fleet>/+/{telemetry,event,ack}
                            --workers 0: one thread here; N: N processes
         │ batches (one transaction each, PUBACK after commit)
         ▼
    SQLite store (WAL) ──tail by id──▶ tracker (this process): status, gaps, alerts ──▶ dashboard

Several monitors with the same ``--group`` split the fleet's messages (MQTT v5
shared subscriptions); each one still reads every ``state`` message, and the
store's unique key drops the copies.

With a PostgreSQL store (``--db postgresql://…``) those monitors may run on
several machines, all writing one store; only one of them runs the tracker
(devices, gaps, alerts and their notifications): the one holding the store's
leader lock (:meth:`.store_pg.PgFleetStore.try_lead`). The others ingest and ask
for the lock every tick; when the leader's process or connection dies, the next
to ask takes over and restores the tracker from the store at the position the
old leader saved with its device rows. A SQLite store has one tracker per
monitor, as it always had.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import DeviceError, EdgekitError
from .connection import BrokerSettings, FleetConnectionError
from .ingest import INGEST_KINDS, IngestStats, run_ingest
from .store import FleetStore, StoreConnectionLost, StoreError
from .stores import describe, open_store
from .tracker import FleetTracker, Thresholds

log = logging.getLogger("edgekit.fleet.monitor")


@dataclass
class MonitorOptions:
    fleet: str = "+"
    group: str = "edgekit-monitor"
    workers: int = 0  # 0: ingest in a thread of this process; N: N processes
    share: bool = True  # False: plain subscriptions (a broker without shared subscriptions; one monitor only)
    client_id: Optional[str] = None  # prefix of this monitor's client ids (default: host and pid)
    session_expiry: int = 0  # > 0 with a fixed client_id: the broker keeps messages while we are away
    batch_max: int = 4000
    flush_s: float = 0.05
    tick_s: float = 0.25
    persist_every_s: float = 1.0  # how often device rows are written (alerts and gaps: at once)
    thresholds: Thresholds = field(default_factory=Thresholds)
    # called with each alert opened/closed by this monitor's tracker (see FleetTracker.listeners)
    alert_listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    # called with the monitor when it takes over the tracker of a PostgreSQL store from another monitor's
    # (after restoring it: e.g. tell the alert sinks which alerts are open); not called for a SQLite store,
    # whose tracker is restored in start()
    lead_listeners: list[Callable[["Monitor"], None]] = field(default_factory=list)


def _worker_main(settings: BrokerSettings, store_path: str, fleet: str, client_id: str, group: Optional[str],
                 batch_max: int, flush_s: float, session_expiry: int, stop, ready, errors) -> None:
    """An ingest worker process (spawned): runs until ``stop`` is set."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s ingest %(process)d %(levelname)s %(message)s")
    parent = os.getppid()

    def should_stop() -> bool:  # asked to, or the monitor died without asking (SIGKILL)
        return stop.is_set() or os.getppid() != parent

    try:
        run_ingest(settings, store_path, fleet, client_id=client_id, group=group, should_stop=should_stop,
                   batch_max=batch_max, flush_s=flush_s, session_expiry=session_expiry, on_connected=ready.set)
    except EdgekitError as exc:
        errors.put(str(exc))
    except BaseException as exc:  # a bug: the parent reports it and stops
        errors.put(f"ingest worker crashed: {type(exc).__name__}: {exc}")
        raise


class Monitor:
    """One fleet monitor; :meth:`run` blocks until a bound is reached or :meth:`stop` is called."""

    def __init__(self, settings: BrokerSettings, store_path: str | Path, options: Optional[MonitorOptions] = None):
        self.settings = settings
        self.store_path = str(store_path)
        self.options = options or MonitorOptions()
        self.tracker = self._new_tracker()
        self.leader = False  # runs the tracker (always, for a SQLite store; the lock holder for PostgreSQL)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._procs: list[mp.Process] = []
        self._errors: list[str] = []
        self.started_at: Optional[float] = None
        self.stored = 0
        self.rate = 0.0  # messages stored per second (last few seconds)
        self._rate_window: list[tuple[float, int]] = []
        self.ingest_stats: list[IngestStats] = []  # of the in-process threads
        self.last_counts: dict[str, Any] = {}  # duplicates and malformed, from the store (for the dashboard)
        self._counts_at = 0.0

    def _new_tracker(self) -> FleetTracker:
        tracker = FleetTracker(self.options.thresholds)
        tracker.listeners.extend(self.options.alert_listeners)
        return tracker

    def _try_lead(self, store: FleetStore) -> None:
        """Become the tracker if the store's leader lock is free: restore from the store, go on from there."""
        if not store.try_lead():
            return
        if store.engine != "sqlite":
            # (a fresh tracker, from what the previous leader stored: it may have gone on writing for hours)
            self.tracker = self._new_tracker()
            self.tracker.restore(store)
            self.tracker.last_id = store.tracker_position() or 0
            log.info("this monitor now runs the fleet tracker for %s (from message id %d)",
                     describe(self.store_path), self.tracker.last_id)
            self.leader = True
            for listener in self.options.lead_listeners:
                listener(self)
        self.leader = True

    # -- lifecycle -----------------------------------------------------------------------
    def _client_prefix(self) -> str:
        return self.options.client_id or f"edgekit-monitor-{socket.gethostname()}-{os.getpid()}"

    def _start_thread(self, name: str, kinds: tuple[str, ...], group: Optional[str]) -> None:
        ready = threading.Event()
        stats = IngestStats()
        self.ingest_stats.append(stats)
        opts = self.options

        def target() -> None:
            try:
                run_ingest(self.settings, self.store_path, opts.fleet, client_id=f"{self._client_prefix()}-{name}",
                           group=group, kinds=kinds, should_stop=self._stop.is_set, batch_max=opts.batch_max,
                           flush_s=opts.flush_s, session_expiry=opts.session_expiry, on_connected=ready.set,
                           stats=stats)
            except EdgekitError as exc:
                self._errors.append(str(exc))
            except BaseException as exc:  # a bug: reported by run(), with its traceback in the log
                log.exception("ingest thread %s crashed", name)
                self._errors.append(f"ingest thread {name} crashed: {type(exc).__name__}: {exc}")
            finally:
                ready.set()

        t = threading.Thread(target=target, name=f"edgekit-ingest-{name}", daemon=True)
        t.start()
        self._threads.append(t)
        deadline = time.monotonic() + self.settings.connect_timeout + 5
        while not ready.wait(0.05):
            if time.monotonic() > deadline:
                raise FleetConnectionError(f"no answer from the broker at {self.settings.url} in time")
        self._raise_errors()

    def _checkpoints(self, every_s: float = 0.5) -> None:
        """Copy the WAL into the database in the background, so that no writer's commit waits for it."""
        store = open_store(self.store_path, autocheckpoint=False)
        try:
            while not self._stop.wait(every_s):
                store.checkpoint()
        finally:
            store.close()

    def _raise_errors(self) -> None:
        if self._errors:
            self._stop.set()
            raise FleetConnectionError(self._errors[0]) if "crashed" not in self._errors[0] \
                else DeviceError(self._errors[0])

    def start(self) -> None:
        """Connect (errors such as refused credentials are raised here), then start ingesting."""
        opts = self.options
        with open_store(self.store_path) as store:
            engine = store.engine
            if engine == "sqlite":  # (a PostgreSQL tracker restores when it takes the lead, in run())
                self.tracker.restore(store)
        self.started_at = time.time()
        group = opts.group if opts.share else None
        if engine == "sqlite":  # (a server checkpoints on its own)
            checkpointer = threading.Thread(target=self._checkpoints, name="edgekit-checkpoint", daemon=True)
            checkpointer.start()
            self._threads.append(checkpointer)
        self._start_thread("state", ("state",), None)
        if opts.workers <= 0:
            self._start_thread("ingest", INGEST_KINDS, group)
            return
        if not opts.share and opts.workers > 1:
            raise EdgekitError("several ingest workers need shared subscriptions; drop --no-share or use "
                               "--workers 1")
        ctx = mp.get_context("spawn")
        self._mp_stop = ctx.Event()
        self._mp_errors = ctx.Queue()
        readies = []
        for i in range(opts.workers):
            ready = ctx.Event()
            p = ctx.Process(target=_worker_main, name=f"edgekit-ingest-{i}", daemon=True,
                            args=(self.settings, self.store_path, opts.fleet, f"{self._client_prefix()}-w{i}", group,
                                  opts.batch_max, opts.flush_s, opts.session_expiry, self._mp_stop, ready,
                                  self._mp_errors))
            p.start()
            self._procs.append(p)
            readies.append(ready)
        deadline = time.monotonic() + self.settings.connect_timeout + 30  # spawn imports take a moment
        for p, ready in zip(self._procs, readies):
            while not ready.wait(0.05):
                self._collect_worker_errors()
                if not p.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    self._collect_worker_errors()
                    self._raise_errors()
                    raise FleetConnectionError(f"ingest worker {p.name} did not connect to {self.settings.url}")

    def _collect_worker_errors(self) -> None:
        if not self._procs:
            return
        import queue

        while True:
            try:
                self._errors.append(self._mp_errors.get_nowait())
            except (queue.Empty, OSError, ValueError):
                return

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid]

    def stop(self) -> None:
        self._stop.set()
        if self._procs:
            self._mp_stop.set()

    def _join(self) -> None:
        self.stop()
        for t in self._threads:
            t.join(timeout=10)
        for p in self._procs:
            p.join(timeout=15)
            if p.is_alive():
                log.warning("ingest worker %s did not stop; terminating it", p.pid)
                p.terminate()
                p.join(timeout=5)

    # -- main loop ---------------------------------------------------------------------------
    def run(self, duration: Optional[float] = None, max_messages: Optional[int] = None,
            on_tick: Optional[Callable[["Monitor"], None]] = None) -> dict[str, Any]:
        """Start (unless started), track until ``duration`` s passed or ``max_messages`` were stored.

        ``max_messages`` counts messages stored by this run (duplicates and
        refused payloads excluded): those the tracker read, or, while another
        monitor leads a PostgreSQL store, those this monitor's ingest threads stored.
        Returns :meth:`summary`.
        """
        if self.started_at is None:
            self.start()
        store = open_store(self.store_path, autocheckpoint=False)  # (the checkpointer thread does it)
        t_end = None if duration is None else time.monotonic() + duration
        try:
            while True:
                self._collect_worker_errors()
                self._raise_errors()
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise DeviceError(f"ingest worker {dead[0].name} exited ({dead[0].exitcode}); see its log above")
                try:
                    if not self.leader:
                        self._try_lead(store)
                    if self.leader:
                        self._step(store)
                    else:
                        self.stored = sum(s.stored for s in self.ingest_stats)
                except StoreConnectionLost as exc:  # (a server store: restarted, failed over, network)
                    log.warning("%s; reconnecting (another monitor may take over the tracker meanwhile)", exc)
                    self.leader = False  # (the lock went with the session)
                    store.reconnect()
                if on_tick:
                    on_tick(self)
                if max_messages is not None and self.stored >= max_messages:
                    break
                if self._stop.is_set() or (t_end is not None and time.monotonic() >= t_end):
                    break
                time.sleep(self.options.tick_s)
        finally:
            self._join()
            try:
                if self.leader:
                    self._step(store)  # what the workers committed while stopping
                    self.tracker.flush(store)
                    store.checkpoint()
            except StoreError as exc:  # (the next leader goes on from what was saved)
                log.warning("could not save the tracker's last changes: %s", exc)
            store.close()  # (a PostgreSQL leader's lock goes with it: another monitor takes over)
        return self.summary()

    def _step(self, store: FleetStore) -> None:
        while True:
            rows = store.tail(self.tracker.last_id)
            self.tracker.consume(rows)
            self.stored += len(rows)
            if len(rows) < 50000:
                break
        store.position = self.tracker.last_id  # (saved with the device rows, where the engine keeps it)
        self.tracker.flush(store, self.options.persist_every_s)
        now = time.monotonic()
        self._rate_window.append((now, self.stored))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 5:
            self._rate_window.pop(0)
        t0, n0 = self._rate_window[0]
        self.rate = (self.stored - n0) / (now - t0) if now > t0 else 0.0
        if now - self._counts_at >= 1.0:
            self._counts_at = now
            counters = store.counters()
            self.last_counts = {"duplicates": counters.get("duplicates", 0),
                                "malformed": {k: v["count"] for k, v in store.malformed().items()}}

    def summary(self) -> dict[str, Any]:
        with open_store(self.store_path) as store:
            counters = store.counters()
            malformed = store.malformed()
        devices = self.tracker.devices.values()
        return {
            "broker": self.settings.url, "fleet": self.options.fleet, "store": describe(self.store_path),
            "tracker": "leader" if self.leader else "follower",
            "seconds": round(time.time() - (self.started_at or time.time()), 3),
            "stored": self.stored, "duplicates": counters.get("duplicates", 0),
            "stale_wills": counters.get("stale_wills", 0),
            "malformed": {k: v["count"] for k, v in malformed.items()},
            "devices": len(self.tracker.devices),
            "online": sum(1 for d in devices if d.status == "online"),
            "offline": sum(1 for d in devices if d.status == "offline"),
            "missing": sum(d.missing for d in devices),
            "alerts_open": [a for d in devices for a in d.alerts.values()],
            "workers": self.options.workers,
        }
