"""Shadow mode: a candidate bundle runs beside the served one on the same inputs; its results are never served.

Every batch the served model ran is offered to the candidate's thread (a bounded queue of
``max_pending`` batches: when the candidate falls behind, batches are skipped and counted, and the
served path never waits for it). The candidate runs the same input tensors — it must take the same
inputs with the same pre-processing, as a new version of a model does — and each row is compared
with what the served model answered:

* ``cosine`` of the first outputs (when their shapes match);
* ``top1``: the share of rows whose top-1 class agrees (classification);
* ``box_f1``: F1 of the candidate's boxes against the served ones, matched by label at IoU ≥ 0.5, and
  ``box_iou``, the mean IoU of the matched pairs (detection, in network-input pixels);
* ``mask``: the share of pixels whose class agrees (segmentation);
* the candidate's inference time per batch against the served model's.

:meth:`Shadow.report` is what ``GET /v2/models/NAME/shadow`` answers, what ``/metrics`` exposes as
``edgekit_serve_shadow_*``, and what a served state directory gets as ``shadow.json`` for the agent's
telemetry: a rollout judged on live traffic before the switch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from ..agent.metrics import LatencyHistogram
from ..api import Model
from ..contract.errors import ErrorCode, RuntimeConfigError
from .metrics import _esc

log = logging.getLogger("edgekit_runtime.serve")


def check_compatible(active: Model, candidate: Model) -> None:
    """Refuse a candidate that cannot run the served model's input tensors."""
    a = [(s.name, s.dtype, [d if isinstance(d, int) else None for d in s.shape[1:]]) for s in active.inputs]
    c = [(s.name, s.dtype, [d if isinstance(d, int) else None for d in s.shape[1:]]) for s in candidate.inputs]
    if a != c:
        raise RuntimeConfigError(f"the shadow candidate's inputs {c} are not the served model's {a}",
                                 hint="a shadow runs the same input tensors: compile the candidate for the same "
                                      "input shape")
    pa, pc = active.manifest_json.get("preprocess"), candidate.manifest_json.get("preprocess")
    if pa != pc:
        raise RuntimeConfigError("the shadow candidate pre-processes its input differently from the served model",
                                 code=ErrorCode.CONFIG_INVALID,
                                 hint="compile the candidate with the served model's preprocess section")


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where((a == b).all(1), 1.0, 0.0))


def _iou(a: list[float], b: list[float]) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_agreement(served: list[dict], candidate: list[dict], threshold: float = 0.5) -> tuple[float, list[float]]:
    """F1 of ``candidate`` boxes against ``served`` ones (greedy by score, same label, IoU ≥ threshold),
    and the IoUs of the matched pairs. Two empty sets agree (F1 1)."""
    if not served and not candidate:
        return 1.0, []
    used: set[int] = set()
    ious = []
    for c in sorted(candidate, key=lambda d: -d["score"]):
        best, best_j = threshold, None
        for j, s in enumerate(served):
            if j in used or s["label"] != c["label"]:
                continue
            v = _iou(c["box"], s["box"])
            if v >= best:
                best, best_j = v, j
        if best_j is not None:
            used.add(best_j)
            ious.append(best)
    matched = len(ious)
    return 2 * matched / (len(served) + len(candidate)), ious


class Shadow:
    """The candidate's thread, its queue and what it has measured."""

    def __init__(self, route: str, candidate: Model, *, max_pending: int = 4):
        self.route = route
        self.candidate = candidate
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self.rows = 0
        self.batches = 0
        self.skipped = 0
        self.failed = 0
        self.last_error: str | None = None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.cosine_min: float | None = None
        self.served_latency, self.candidate_latency = LatencyHistogram(), LatencyHistogram()
        self.served_model: dict[str, Any] | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"edgekit-serve-shadow-{route}", daemon=True)
        self._thread.start()

    def offer(self, served: Any, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], seconds: float) -> None:
        """A batch the served model ran (never blocks: a full queue skips the batch)."""
        try:
            self._queue.put_nowait((served, feeds, outputs, seconds))
        except queue.Full:
            with self._lock:
                self.skipped += 1

    def _add(self, measure: str, values: Any) -> None:
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if values.size:
            self.sums[measure] = self.sums.get(measure, 0.0) + float(values.sum())
            self.counts[measure] = self.counts.get(measure, 0) + int(values.size)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                served, feeds, outputs, seconds = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                t = time.monotonic()
                got = self.candidate.run(feeds)
                took = time.monotonic() - t
                self._compare(served, outputs, got, seconds, took)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a finding, not a crash of the server
                with self._lock:
                    self.failed += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("shadow candidate failed on a batch: %s", exc)

    def _compare(self, served: Any, outputs: dict[str, np.ndarray], got: dict[str, np.ndarray], seconds: float,
                 took: float) -> None:
        sm = served.model
        a_name, c_name = sm.outputs[0].name, self.candidate.outputs[0].name
        a, c = outputs[a_name], got[c_name]
        rows = len(a)
        found: dict[str, Any] = {}
        if a.shape == c.shape:
            found["cosine"] = _cosine_rows(a, c)
        post = sm.manifest.postprocess
        kind = post.type if post is not None else None
        if kind in (None, "classification") and a.ndim == 2 and a.shape == c.shape:
            found["top1"] = (a.argmax(1) == c.argmax(1)).astype(np.float64)
        elif kind == "detection" or kind == "detections":
            ra, rc = sm.postprocess({a_name: a}), self.candidate.postprocess({c_name: c})
            f1s, ious = [], []
            for x, y in zip(ra, rc):
                f1, pair = box_agreement(x["detections"], y["detections"])
                f1s.append(f1)
                ious += pair
            found["box_f1"] = f1s
            found["box_iou"] = ious
        elif kind == "segmentation" and a.shape == c.shape:
            found["mask"] = (a.argmax(1) == c.argmax(1)).reshape(rows, -1).mean(1)
        with self._lock:
            self.rows += rows
            self.batches += 1
            for k, v in found.items():
                self._add(k, v)
            if "cosine" in found and len(found["cosine"]):
                low = float(np.min(found["cosine"]))
                self.cosine_min = low if self.cosine_min is None else min(self.cosine_min, low)
            self.served_latency.add(max(seconds, 0.0))
            self.candidate_latency.add(max(took, 0.0))
            self.served_model = {"name": sm.manifest.model.name, "version": sm.manifest.model.version,
                                 "release": sm.manifest.model.release}

    def report(self) -> dict[str, Any]:
        cm = self.candidate.manifest
        with self._lock:
            agreement = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts.get(k)}
            if self.cosine_min is not None:
                agreement["cosine_min"] = self.cosine_min
            sp = self.served_latency.quantile(0.5)
            cp = self.candidate_latency.quantile(0.5)
            return {
                "route": self.route,
                "candidate": {"name": cm.model.name, "version": cm.model.version, "release": cm.model.release,
                              "precision": cm.backend.precision, "key_id": self.candidate.bundle.key_id},
                "served": self.served_model,
                "since": self.started, "batches": self.batches, "rows": self.rows, "skipped_batches": self.skipped,
                "failed_batches": self.failed, "last_error": self.last_error, "agreement": agreement,
                "latency_ms": {"served_p50": 1000 * sp if sp is not None else None,
                               "candidate_p50": 1000 * cp if cp is not None else None,
                               "candidate_p99": 1000 * self.candidate_latency.quantile(0.99) if cp is not None
                               else None,
                               "ratio": cp / sp if sp and cp is not None else None},
            }

    def metric_lines(self) -> list[str]:
        """Prometheus samples (the families are declared by :class:`~.metrics.ServeMetrics`)."""
        r = self.report()
        m = f'model="{_esc(self.route)}",candidate="{_esc(str(r["candidate"]["version"]))}"'
        lines = [f"edgekit_serve_shadow_rows_total{{{m}}} {r['rows']}",
                 f"edgekit_serve_shadow_skipped_batches_total{{{m}}} {r['skipped_batches']}",
                 f"edgekit_serve_shadow_failed_batches_total{{{m}}} {r['failed_batches']}"]
        lines += [f'edgekit_serve_shadow_agreement{{{m},measure="{k}"}} {v:.6f}' for k, v in r["agreement"].items()]
        for k in ("served_p50", "candidate_p50"):
            if r["latency_ms"][k] is not None:
                lines.append(f'edgekit_serve_shadow_inference_seconds{{{m},which="{k[:-4]}",quantile="0.5"}} '
                             f'{r["latency_ms"][k] / 1000:.9f}')
        return lines

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.candidate.close()
