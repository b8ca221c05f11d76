"""``edgekit-runtime stream``: a camera, video file or RTSP stream through a bundle, frame by frame.

Two threads and one slot between them. The capture thread reads frames as the source delivers them
(a file is paced at its own frame rate, as a camera would deliver it, unless ``pace="none"``) and
puts each into the slot, replacing the frame there if inference has not taken it yet: that frame
is **dropped**, counted, never queued. The inference thread takes the newest frame, runs
pre-processing, the engine and post-processing, and hands the result to the sinks (JSON lines,
an MQTT topic, an annotated video). Memory is one frame in the slot plus one in flight, however
long the stream runs and however slow the model.

Per-stage latency (capture, preprocess, inference, postprocess, sink) and the drop count are
reported every ``stats_every_s`` (stderr, and the MQTT ``/stats`` topic) and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from .agent.metrics import LatencyHistogram
from .capture import drift_z, plain_result
from .contract.errors import ErrorCode, InputError, RuntimeConfigError, RuntimeErrorBase
from .processing import cv2_module

log = logging.getLogger("edgekit_runtime.stream")

STAGES = ("capture", "preprocess", "inference", "postprocess", "sink")


@dataclass
class StreamSettings:
    source: str
    pace: str = "auto"  # auto: a file at its own fps, live sources as they come; none: every frame, no drops
    max_frames: int | None = None  # stop after this many captured frames
    duration_s: float | None = None
    stats_every_s: float = 5.0
    top_k: int | None = None


def redact(source: str) -> str:
    """A source as it may be written down: an URL without its user and password."""
    if "://" not in source:
        return source
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(source)
    if u.username is None and u.password is None:
        return source
    host = u.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if u.port is not None:
        netloc += f":{u.port}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def open_source(source: str) -> tuple[Any, bool]:
    """``(cv2.VideoCapture, live)``: a camera index ("0"), a file, or a URL (rtsp://, http://)."""
    cv2 = cv2_module()
    live = source.isdigit() or "://" in source
    if source.isdigit():
        cap = cv2.VideoCapture(int(source))
    else:
        if not live and not Path(source).is_file():
            raise InputError(f"video source {source} does not exist", code=ErrorCode.INPUT_MISSING,
                             hint="give a file, a camera index such as 0, or an rtsp:// URL")
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise InputError(f"OpenCV cannot open the video source {redact(source)!r}", code=ErrorCode.INPUT_UNREADABLE,
                         hint="check the camera index, the file's codec, or the stream URL")
    if live:
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a backlog in the driver
    return cap, live


class _Stat:
    """Seconds of one stage, as two sketches (1 % relative error, memory bounded by the range of values,
    never by their number): the current reporting window, and the whole run."""

    def __init__(self) -> None:
        self.window, self.total = LatencyHistogram(), LatencyHistogram()

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.window.add(seconds)
        self.total.add(seconds)

    def summary(self, whole_run: bool = False) -> dict[str, float]:
        h = self.total if whole_run else self.window
        if h.count == 0:
            return {"count": 0}
        return {"count": h.count, "p50_ms": 1000 * h.quantile(0.5), "p90_ms": 1000 * h.quantile(0.9),
                "p99_ms": 1000 * h.quantile(0.99), "mean_ms": 1000 * h.sum / h.count}

    def next_window(self) -> None:
        self.window = LatencyHistogram()


@dataclass
class StreamStats:
    started: float = field(default_factory=time.monotonic)
    captured: int = 0
    processed: int = 0
    dropped: int = 0
    failed: int = 0
    stages: dict[str, _Stat] = field(default_factory=lambda: {s: _Stat() for s in STAGES})
    source_fps: float | None = None
    rss_start_mib: float | None = None
    rss_max_mib: float = 0.0
    pending_max: int = 0  # frames held at once (slot + in flight): stays at most 2

    def snapshot(self, final: bool = False) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out = {"type": "stream_stats", "final": final, "elapsed_s": round(elapsed, 3), "captured": self.captured,
               "processed": self.processed, "dropped": self.dropped, "failed": self.failed,
               "drop_rate": self.dropped / self.captured if self.captured else 0.0,
               "capture_fps": self.captured / elapsed, "processed_fps": self.processed / elapsed,
               "source_fps": self.source_fps, "frames_held_max": self.pending_max,
               "rss_mib": {"start": self.rss_start_mib, "max": self.rss_max_mib},
               "stages": {k: v.summary(whole_run=final) for k, v in self.stages.items()}}
        return out


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


class _Slot:
    """The newest captured frame, or nothing; putting a frame over one not taken yet drops that one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[int, np.ndarray, float] | None = None
        self.closed = False

    def put(self, item: tuple[int, np.ndarray, float]) -> bool:
        """True when a frame not taken yet was replaced (dropped)."""
        with self._cond:
            dropped = self._item is not None
            self._item = item
            self._cond.notify()
            return dropped

    def take(self, timeout: float = 0.5) -> tuple[int, np.ndarray, float] | None:
        with self._cond:
            if self._item is None and not self.closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def wait_taken(self, stop: threading.Event) -> None:
        with self._cond:
            while self._item is not None and not stop.is_set():
                self._cond.wait(0.05)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


Sink = Callable[[dict[str, Any], np.ndarray], None]


def run_stream(model: Any, settings: StreamSettings, sinks: list[Sink], *,
               on_stats: Callable[[dict[str, Any]], None] | None = None,
               stop: threading.Event | None = None) -> dict[str, Any]:
    """Run until the source ends, ``max_frames``/``duration_s``, or ``stop`` is set; the final statistics."""
    cv2 = cv2_module()
    cap, live = open_source(settings.source)
    stats = StreamStats()
    fps = cap.get(cv2.CAP_PROP_FPS)
    stats.source_fps = float(fps) if fps and fps > 0 and math.isfinite(fps) else None
    pace = settings.pace == "auto" and not live and stats.source_fps is not None
    no_drops = settings.pace == "none"
    stop = stop or threading.Event()
    slot = _Slot()
    color = model.manifest.preprocess.color if model.manifest.preprocess is not None else "rgb"
    stats.rss_start_mib = _rss_mib()
    held = [0]
    held_lock = threading.Lock()

    def capture() -> None:
        t_next = time.monotonic()
        try:
            while not stop.is_set():
                if settings.max_frames is not None and stats.captured >= settings.max_frames:
                    break
                if settings.duration_s is not None and time.monotonic() - stats.started >= settings.duration_s:
                    break
                if pace:  # a file plays at its own rate, as the camera that recorded it delivered it
                    t_next += 1.0 / stats.source_fps
                    wait = t_next - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                t = time.monotonic()
                ok, frame = cap.read()
                if not ok:
                    break
                stats.stages["capture"].add(time.monotonic() - t)
                stats.captured += 1
                if no_drops:  # every frame, in order: wait for the slot to be taken
                    slot.wait_taken(stop)
                with held_lock:  # frames waiting or in inference: the slot's and the one in flight
                    if slot.put((stats.captured - 1, frame, time.time())):
                        stats.dropped += 1  # the frame it replaced was never taken
                    else:
                        held[0] += 1
                    stats.pending_max = max(stats.pending_max, held[0])
        finally:
            slot.close()
            cap.release()

    reader = threading.Thread(target=capture, name="edgekit-stream-capture", daemon=True)
    reader.start()
    last_report = time.monotonic()
    try:
        while True:
            item = slot.take()
            if item is None:
                if slot.closed:
                    break
                continue
            index, frame, wall = item
            try:
                result = _infer(model, frame, color, stats, settings.top_k)
                result.update(frame=index, timestamp=wall)
                t = time.monotonic()
                for sink in sinks:
                    sink(result, frame)
                stats.stages["sink"].add(time.monotonic() - t)
                stats.processed += 1
            except RuntimeErrorBase as exc:  # a frame the model refused or failed on: counted, the stream goes on
                stats.failed += 1
                log.warning("frame %d: %s", index, exc)
            finally:
                with held_lock:
                    held[0] -= 1
            rss = _rss_mib()
            if rss == rss:
                stats.rss_max_mib = max(stats.rss_max_mib, rss)
            if on_stats is not None and time.monotonic() - last_report >= settings.stats_every_s:
                on_stats(stats.snapshot())
                last_report = time.monotonic()
                for st in stats.stages.values():
                    st.next_window()
    finally:
        stop.set()
        reader.join(timeout=10)
    final = stats.snapshot(final=True)  # the whole run's figures
    if on_stats is not None:
        on_stats(final)
    return final


def _infer(model: Any, frame: np.ndarray, color: str, stats: StreamStats, top_k: int | None) -> dict[str, Any]:
    cv2 = cv2_module()
    t = time.monotonic()
    image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if color == "rgb" else (
        cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if color == "gray" else frame)
    meta: list = []
    x = model.preprocess([image], meta=meta)
    t1 = time.monotonic()
    stats.stages["preprocess"].add(t1 - t)
    outputs = model.run(x)
    t2 = time.monotonic()
    stats.stages["inference"].add(t2 - t1)
    result = dict(model.postprocess(outputs, top_k=top_k, meta=meta)[0])
    stats.stages["postprocess"].add(time.monotonic() - t2)
    z = drift_z(model, x)
    if z is not None:  # how unlike the calibration set this frame is (capture prefers such frames)
        result["input_z"] = round(float(z[0]), 3)
    return result


# -- sinks ---------------------------------------------------------------------------------------------
# a result as a JSON line: what a capture sidecar keeps (a mask is the annotated video's business)
jsonable = plain_result


def jsonl_sink(stream: TextIO) -> Sink:
    def write(result: dict[str, Any], frame: np.ndarray) -> None:
        stream.write(json.dumps(jsonable(result), separators=(",", ":")) + "\n")
        stream.flush()
    return write


def video_sink(path: Path, fps: float, size: tuple[int, int]) -> tuple[Sink, Callable[[], None]]:
    """An annotated video of the processed frames (boxes and labels, a mask overlay, or the top-1 label)."""
    cv2 = cv2_module()
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix.lower() in (".mp4", ".m4v", ".mov") else "MJPG"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, size)
    if not writer.isOpened():
        raise RuntimeConfigError(f"OpenCV cannot write the video {path}", hint="use .avi (MJPG) or .mp4 (mp4v)")

    def write(result: dict[str, Any], frame: np.ndarray) -> None:
        writer.write(annotate(frame, result))
    return write, writer.release


def annotate(frame: np.ndarray, result: dict[str, Any]) -> np.ndarray:
    """A BGR frame with the result drawn on it."""
    cv2 = cv2_module()
    out = frame.copy()
    if "mask" in result:
        mask = np.asarray(result["mask"])
        palette = (np.random.default_rng(0).integers(0, 255, (256, 3))).astype(np.uint8)
        palette[0] = 0
        colour = palette[mask.astype(np.uint8)]
        fg = mask > 0
        out[fg] = (0.5 * out[fg] + 0.5 * colour[fg]).astype(np.uint8)
    for d in result.get("detections", []):
        x0, y0, x1, y1 = (int(round(v)) for v in d["box"])
        cv2.rectangle(out, (x0, y0), (x1, y1), (0, 255, 0), 2)
        cv2.putText(out, f"{d['label']} {d['score']:.2f}", (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 255, 0), 1, cv2.LINE_AA)
    if result.get("top_k"):
        top = result["top_k"][0]
        cv2.putText(out, f"{top['label']} {top['score']:.2f}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                    (0, 255, 0), 1, cv2.LINE_AA)
    return out


def stats_line(doc: dict[str, Any]) -> str:
    st = doc["stages"]
    parts = [f"{k} {st[k]['p50_ms']:.1f}" for k in STAGES if st[k].get("count")]
    return (f"{'done' if doc['final'] else 'stream'}: {doc['captured']} captured, {doc['processed']} processed, "
            f"{doc['dropped']} dropped ({doc['drop_rate']:.0%}), {doc['processed_fps']:.1f} fps; p50 ms: "
            + ", ".join(parts))


def print_stats(doc: dict[str, Any]) -> None:
    print(stats_line(doc), file=sys.stderr, flush=True)
