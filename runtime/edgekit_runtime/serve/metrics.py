"""What ``/metrics`` says, in Prometheus' text exposition format (no client library on the device).

Per model: requests by HTTP status, the queue's depth, batch sizes (a histogram), and per stage
(decode, preprocess, queue, inference, postprocess, total) a summary whose quantiles cover the
last one to two minutes (two rotating :class:`~..agent.metrics.LatencyHistogram` sketches, 1 %
relative error) and whose ``_sum``/``_count`` run since the start, as Prometheus summaries do.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterable

from ..agent.metrics import LatencyHistogram

STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "total")
QUANTILES = (0.5, 0.95, 0.99)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SHADOW_FAMILIES = (
    ("edgekit_serve_shadow_rows_total", "counter", "Rows the shadow candidate ran and compared."),
    ("edgekit_serve_shadow_skipped_batches_total", "counter", "Served batches the candidate was too busy for."),
    ("edgekit_serve_shadow_failed_batches_total", "counter", "Batches the candidate failed on."),
    ("edgekit_serve_shadow_agreement", "gauge",
     "Candidate vs served, mean since the start: cosine, top1, box_f1, box_iou, mask."),
    ("edgekit_serve_shadow_inference_seconds", "summary", "Inference per batch, served model and candidate."),
)


class _Window:
    """Quantiles over the last ``window_s`` to ``2·window_s`` seconds, sum and count since the start."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.current, self.previous = LatencyHistogram(), LatencyHistogram()
        self.rotated = time.monotonic()
        self.count, self.sum = 0, 0.0

    def _rotate(self, now: float) -> None:
        if now - self.rotated >= self.window_s:
            stale = now - self.rotated >= 2 * self.window_s
            self.previous = LatencyHistogram() if stale else self.current
            self.current, self.rotated = LatencyHistogram(), now

    def add(self, seconds: float, now: float) -> None:
        self._rotate(now)
        self.current.add(max(seconds, 0.0))
        self.count += 1
        self.sum += seconds

    def quantiles(self, now: float) -> dict[float, float]:
        self._rotate(now)
        merged = LatencyHistogram()
        merged.merge(self.previous)
        merged.merge(self.current)
        if merged.count == 0:
            return {}
        return {q: merged.quantile(q) for q in QUANTILES}


class ServeMetrics:
    """Thread-safe counters of one server, labelled by model."""

    def __init__(self, window_s: float = 60.0):
        self._lock = threading.Lock()
        self.window_s = window_s
        self.requests: Counter[tuple[str, int]] = Counter()
        self.stages: dict[tuple[str, str], _Window] = {}
        self.batches: dict[str, Counter[int]] = {}
        self.batch_sum: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.switches: Counter[str] = Counter()
        self.load_failures: Counter[str] = Counter()
        self.queue_depth: dict[str, Callable[[], int]] = {}
        self.model_info: dict[str, Callable[[], dict]] = {}
        self.shadows: dict[str, Callable[[], list[str]]] = {}  # route → its Shadow's sample lines
        self.started = time.time()

    def request(self, model: str, status: int) -> None:
        with self._lock:
            self.requests[(model, status)] += 1

    def stage(self, model: str, stage: str, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            w = self.stages.get((model, stage))
            if w is None:
                w = self.stages[(model, stage)] = _Window(self.window_s)
            w.add(seconds, now)

    def count(self, counter: str, model: str) -> None:
        """Add one to ``cancelled``, ``switches`` or ``load_failures`` of ``model``."""
        with self._lock:
            getattr(self, counter)[model] += 1

    def batch(self, model: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(model, Counter())[size] += 1
            self.batch_sum[model] += size

    def stage_quantiles(self, model: str, stage: str) -> dict[float, float]:
        """Seconds at the 0.5/0.95/0.99 quantiles over the recent window ({} before any sample)."""
        with self._lock:
            w = self.stages.get((model, stage))
            return w.quantiles(time.monotonic()) if w else {}

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        now = time.monotonic()
        lines: list[str] = []

        def family(name: str, kind: str, help_: str, samples: Iterable[str]) -> None:
            samples = list(samples)
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            family("edgekit_serve_requests_total", "counter", "Inference requests answered, by HTTP status.",
                   (f'edgekit_serve_requests_total{{model="{_esc(m)}",code="{c}"}} {n}'
                    for (m, c), n in sorted(self.requests.items())))
            family("edgekit_serve_queue_depth", "gauge", "Requests waiting for a batch.",
                   (f'edgekit_serve_queue_depth{{model="{_esc(m)}"}} {fn()}'
                    for m, fn in sorted(self.queue_depth.items())))
            samples = []
            for m, sizes in sorted(self.batches.items()):
                total = 0
                for le in BATCH_BUCKETS:
                    total = sum(n for s, n in sizes.items() if s <= le)
                    samples.append(f'edgekit_serve_batch_size_bucket{{model="{_esc(m)}",le="{le}"}} {total}')
                count = sum(sizes.values())
                samples += [f'edgekit_serve_batch_size_bucket{{model="{_esc(m)}",le="+Inf"}} {count}',
                            f'edgekit_serve_batch_size_sum{{model="{_esc(m)}"}} {self.batch_sum[m]}',
                            f'edgekit_serve_batch_size_count{{model="{_esc(m)}"}} {count}']
            family("edgekit_serve_batch_size", "histogram", "Rows in each batch the engine ran.", samples)
            samples = []
            for (m, stage), w in sorted(self.stages.items(), key=lambda kv: (kv[0][0], STAGES.index(kv[0][1]))):
                labels = f'model="{_esc(m)}",stage="{stage}"'
                for q, v in w.quantiles(now).items():
                    samples.append(f'edgekit_serve_stage_seconds{{{labels},quantile="{q}"}} {v:.9f}')
                samples += [f"edgekit_serve_stage_seconds_sum{{{labels}}} {w.sum:.9f}",
                            f"edgekit_serve_stage_seconds_count{{{labels}}} {w.count}"]
            family("edgekit_serve_stage_seconds", "summary",
                   "Seconds per stage (quantiles over the last 1-2 minutes; per request, inference per batch).",
                   samples)
            family("edgekit_serve_cancelled_total", "counter", "Requests dropped because their client went away.",
                   (f'edgekit_serve_cancelled_total{{model="{_esc(m)}"}} {n}' for m, n in sorted(self.cancelled.items())))
            family("edgekit_serve_model_switches_total", "counter", "Models swapped in while serving (OTA, rollback).",
                   (f'edgekit_serve_model_switches_total{{model="{_esc(m)}"}} {n}'
                    for m, n in sorted(self.switches.items())))
            family("edgekit_serve_model_load_failures_total", "counter",
                   "New models that did not load or warm up (the old one kept serving).",
                   (f'edgekit_serve_model_load_failures_total{{model="{_esc(m)}"}} {n}'
                    for m, n in sorted(self.load_failures.items())))
            info = []
            for m, fn in sorted(self.model_info.items()):
                d = fn()
                if d:
                    labels = ",".join(f'{k}="{_esc(str(v))}"' for k, v in sorted(d.items()))
                    info.append(f'edgekit_serve_model_info{{model="{_esc(m)}",{labels}}} 1')
            family("edgekit_serve_model_info", "gauge", "The model version each route serves now.", info)
            shadow_lines = [ln for fn in self.shadows.values() for ln in fn()]
            for name, kind, help_ in SHADOW_FAMILIES:
                family(name, kind, help_, (ln for ln in shadow_lines if ln.startswith(name + "{")))
            family("edgekit_serve_start_time_seconds", "gauge", "When the server started (Unix time).",
                   [f"edgekit_serve_start_time_seconds {self.started:.3f}"])
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
