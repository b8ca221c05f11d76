"""Dynamic batching: requests queue, one thread per model joins them into batches and runs them.

A batch closes when it holds ``max_batch`` rows, or ``max_delay_s`` after its oldest request
arrived, whichever comes first (a request that waited through the previous batch does not wait
again). With ``delay="arriving"`` (the default) a batch waits only while other requests for the
model are being received or pre-processed: a lone client never waits for company that is not
coming, and under load the batch still fills while the engine is busy with the previous one.
``delay="fixed"`` always waits up to ``max_delay_s`` (Triton's ``max_queue_delay``), for clients
whose requests arrive spread out in time. Only requests admitted to the same model, with the same input names, dtypes and
per-row shapes, are joined; the rest keep their place in the queue. The queue is bounded
(``SERVE_OVERLOADED`` when it is full, HTTP 429); a request whose deadline passes while it
waits, or whose client went away, is dropped before it runs, never after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..contract.errors import ErrorCode, RuntimeErrorBase
from .metrics import ServeMetrics
from .models import Loaded
from .protocol import ProtocolError

log = logging.getLogger("edgekit_runtime.serve")


@dataclass(eq=False)
class Pending:
    """One request in the queue: its model's input feeds (rows along axis 0) and what came of it."""

    loaded: Loaded
    feeds: dict[str, np.ndarray]
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    outputs: dict[str, np.ndarray] | None = None
    error: Exception | None = None
    cancelled: bool = False
    started: float | None = None  # when its batch began to run
    batch_size: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(next(iter(self.feeds.values())))

    @property
    def key(self) -> tuple:
        return (self.loaded.generation,
                tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in self.feeds.items())))

    def finish(self, outputs: dict[str, np.ndarray] | None = None, error: Exception | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.done.set()


class _Arrival:
    open = True


class Batcher:
    """The queue and batching thread of one route."""

    def __init__(self, route_name: str, metrics: ServeMetrics, *, max_batch: int = 8, max_delay_s: float = 0.002,
                 max_queue: int = 64, delay: str = "arriving"):
        if delay not in ("arriving", "fixed"):
            raise ValueError(f"delay must be 'arriving' or 'fixed', not {delay!r}")
        self.delay = delay
        self._arriving = 0  # requests being received or pre-processed, not queued yet
        self.shadow: Any = None  # a Shadow the served batches are offered to
        self.name = route_name
        self.metrics = metrics
        self.max_batch = max(1, max_batch)
        self.max_delay_s = max(0.0, max_delay_s)
        self.max_queue = max(1, max_queue)
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"edgekit-serve-batch-{route_name}", daemon=True)
        metrics.queue_depth[route_name] = self.depth
        self._thread.start()

    def depth(self) -> int:
        return len(self._queue)

    @contextmanager
    def arrival(self) -> Iterator["_Arrival"]:
        """While a request for this model is received and pre-processed: a forming batch may wait for it
        (``delay="arriving"``). :meth:`submit` with it ends the arrival; leaving the block ends it otherwise."""
        a = _Arrival()
        with self._cond:
            self._arriving += 1
        try:
            yield a
        finally:
            if a.open:
                with self._cond:
                    a.open = False
                    self._arriving -= 1
                    self._cond.notify()

    def submit(self, p: Pending, arrival: "_Arrival | None" = None) -> None:
        """Queue ``p``; ``SERVE_OVERLOADED`` (429) when the queue already holds ``max_queue`` requests."""
        with self._cond:
            if arrival is not None and arrival.open:
                arrival.open = False
                self._arriving -= 1
            if not self._running:
                raise ProtocolError("the server is stopping", status=503, code=ErrorCode.SERVE_NOT_READY)
            if len(self._queue) >= self.max_queue:
                raise ProtocolError(f"{len(self._queue)} requests are queued for {self.name!r} (the limit)",
                                    status=429, code=ErrorCode.SERVE_OVERLOADED, hint="retry after a moment",
                                    headers={"Retry-After": "1"})
            self._queue.append(p)
            self._cond.notify()

    def _drop_dead(self, now: float) -> None:
        """Answer (without running) the queued requests that expired or were cancelled."""
        alive: deque[Pending] = deque()
        for p in self._queue:
            if p.cancelled:
                self.metrics.count("cancelled", self.name)
                p.finish(error=ProtocolError("the client went away", status=499, code=ErrorCode.SERVE_BAD_REQUEST))
            elif now >= p.deadline:
                p.finish(error=ProtocolError(
                    f"the request waited {1000 * (now - p.enqueued):.0f} ms in the queue, past its deadline",
                    status=504, code=ErrorCode.SERVE_DEADLINE_EXCEEDED,
                    hint="give it a longer timeout, or lower the load"))
            else:
                alive.append(p)
        self._queue = alive

    def _take(self) -> list[Pending] | None:
        """Wait for a batch and take it off the queue (None once stopped and drained)."""
        with self._cond:
            while True:
                self._drop_dead(time.monotonic())
                if self._queue:
                    break
                if not self._running:
                    return None
                self._cond.wait(timeout=0.05)
            head = self._queue[0]
            close_at = head.enqueued + self.max_delay_s
            joinable = head.loaded.batchable and self.max_batch > 1
            while joinable and self._running:
                rows = sum(p.rows for p in self._queue if p.key == head.key)
                now = time.monotonic()
                if rows >= self.max_batch or now >= close_at or (self.delay == "arriving" and not self._arriving):
                    break
                self._cond.wait(timeout=close_at - now)
            self._drop_dead(time.monotonic())
            if not self._queue:
                return []
            head = self._queue[0]
            batch, rows, rest = [head], head.rows, deque()
            for p in list(self._queue)[1:]:
                if joinable and p.key == head.key and rows + p.rows <= self.max_batch:
                    batch.append(p)
                    rows += p.rows
                else:
                    rest.append(p)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                try:
                    self._run(batch)
                except Exception as exc:  # noqa: BLE001 - a bug of ours must not leave requests waiting forever
                    log.exception("batch of %d failed", len(batch))
                    for p in batch:
                        if not p.done.is_set():
                            p.finish(error=RuntimeErrorBase(f"{type(exc).__name__}: {exc}",
                                                            code=ErrorCode.ENGINE_INFERENCE_FAILED))

    def _run(self, batch: list[Pending]) -> None:
        loaded = batch[0].loaded
        start = time.monotonic()
        rows = [p.rows for p in batch]
        for p in batch:
            p.started, p.batch_size = start, sum(rows)
            self.metrics.stage(self.name, "queue", start - p.enqueued)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            n = sum(rows)
            if getattr(loaded, "row_by_row", False) and n > 1:
                parts = [loaded.model.run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
                outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            else:
                outputs = loaded.model.run(feeds)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, the thread lives on
            err = exc if isinstance(exc, RuntimeErrorBase) else RuntimeErrorBase(
                f"{type(exc).__name__}: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED)
            if len(batch) > 1 and isinstance(exc, RuntimeErrorBase) and exc.code.name.startswith("INPUT_"):
                for p in batch:  # one request's bad input must not fail the others: run them one by one
                    self._run([p])
                return
            for p in batch:
                p.finish(error=err)
            return
        took = time.monotonic() - start
        self.metrics.stage(self.name, "inference", took)
        self.metrics.batch(self.name, sum(rows))
        shadow = self.shadow  # (read once: it may be removed meanwhile)
        if shadow is not None:
            shadow.offer(loaded, feeds, outputs, took)
        at = 0
        for p, n in zip(batch, rows):
            p.finish(outputs={k: v[at:at + n] for k, v in outputs.items()})
            at += n

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop taking requests; the queued ones run (up to ``drain_s``), then the thread ends."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=drain_s)
        with self._cond:  # anything still queued after the drain time
            for p in self._queue:
                p.finish(error=ProtocolError("the server stopped", status=503, code=ErrorCode.SERVE_NOT_READY))
            self._queue.clear()

    def settings(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch, "max_delay_ms": 1000 * self.max_delay_s, "delay": self.delay,
                "max_queue": self.max_queue}
