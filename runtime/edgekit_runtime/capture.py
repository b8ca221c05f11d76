"""Sample capture for the retraining loop: some inputs the device saw, with what the model said about them.

Off unless a capture folder is given (the privacy switch: nothing is kept by default). Then each
image the device runs is *offered*; it is kept when

* the model was unsure of it — top-1 score (classification) or best detection score below
  ``low_confidence`` — the inputs a retraining set needs most; or
* its input is unlike the calibration set the bundle was built with — the mean of its pre-processed
  tensor more than ``drift_z`` standard deviations from the calibration samples' means (the
  manifest's ``input_stats[...].sample_mean``): a dark, washed-out or unfamiliar scene; or
* it wins the random draw of ``sample_rate`` (a uniform sample of ordinary traffic),

and, either way, only while the rate limit allows (``max_per_minute``, a token bucket: a burst of
unsure frames cannot fill the disk). The folder is bounded by ``max_files`` and ``max_mb``: when
full, the oldest randomly drawn samples go first, then the oldest unsure ones.

Each sample is two files in ``DIR/YYYY-MM-DD/``: the image (``.jpg``, or the bytes the client sent
when they already were an encoded image) and ``.json`` beside it — model name, version and
release, the result (top-k, detections or segmentation classes), the confidence, why it was kept,
and when. The image is written first and both by rename, so a ``.json`` always has its image.
``edgekit fleet samples pull`` fetches them into a folder that ``edgekit train`` reads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_write
from .processing import cv2_module

log = logging.getLogger("edgekit_runtime.capture")


@dataclass
class CaptureSettings:
    folder: Path
    sample_rate: float = 0.01  # share of ordinary inputs kept at random
    low_confidence: float | None = 0.5  # inputs whose confidence is below this are kept (None: never preferred)
    drift_z: float | None = 3.0  # inputs this far (in std of the calibration's sample means) are kept
    max_per_minute: float = 30.0
    max_files: int = 5000  # samples (image + JSON) kept at most
    max_mb: float = 512.0
    jpeg_quality: int = 90

    def check(self) -> None:
        from .contract.errors import RuntimeConfigError

        if not 0 <= self.sample_rate <= 1:
            raise RuntimeConfigError(f"the capture sample rate {self.sample_rate} is not within 0..1")
        if self.max_per_minute <= 0 or self.max_files < 1 or self.max_mb <= 0:
            raise RuntimeConfigError("capture limits (per minute, files, MB) must be positive")


def confidence_of(result: dict[str, Any]) -> float | None:
    """How sure the model was: top-1 score, the best detection's score (0 with none), or None (segmentation,
    raw outputs)."""
    if result.get("top_k"):
        return float(result["top_k"][0]["score"])
    if "detections" in result:
        return max((float(d["score"]) for d in result["detections"]), default=0.0)
    return None


class SampleCapture:
    """Thread-safe: serve's handler threads and stream's inference thread offer to one instance."""

    def __init__(self, settings: CaptureSettings, *, seed: int | None = None):
        settings.check()
        self.s = settings
        self.folder = Path(settings.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._tokens = min(settings.max_per_minute, 10.0)
        self._refilled = time.monotonic()
        self.kept = {"low_confidence": 0, "drift": 0, "random": 0}
        self.skipped_rate = 0
        self.evicted = 0
        self._index = self._scan()

    def _scan(self) -> list[tuple[float, str, Path, int]]:
        """(time, reason, sidecar, bytes) of the samples already on disk, oldest first."""
        out = []
        for side in self.folder.glob("*/*.json"):
            try:
                doc = json.loads(side.read_text())
                image = side.with_name(doc["image"])
                out.append((float(doc["captured_at"]), doc.get("reason", "random"), side,
                            side.stat().st_size + image.stat().st_size))
            except (OSError, ValueError, KeyError):
                continue  # half a sample (or another file): not ours to count
        return sorted(out)

    def _take_token(self) -> bool:
        now = time.monotonic()
        rate = self.s.max_per_minute / 60.0
        self._tokens = min(self.s.max_per_minute, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def decide(self, result: dict[str, Any], drift_z: float | None = None) -> str | None:
        """Why this input would be kept ("low_confidence", "drift" or "random"), or None."""
        conf = confidence_of(result)
        if self.s.low_confidence is not None and conf is not None and conf < self.s.low_confidence:
            return "low_confidence"
        if self.s.drift_z is not None and drift_z is not None and abs(drift_z) > self.s.drift_z:
            return "drift"
        with self._lock:
            return "random" if self._rng.random() < self.s.sample_rate else None

    def offer(self, image: np.ndarray | bytes, result: dict[str, Any], model: dict[str, Any],
              *, source: str | None = None, bgr: bool = False, drift_z: float | None = None) -> Path | None:
        """Keep ``image`` (RGB/gray uint8 — BGR with ``bgr`` — or encoded bytes) with ``result`` when the policy
        says so; the sidecar's path, or None. Never raises for a disk problem: a failed write is logged and counted
        as not kept."""
        reason = self.decide(result, drift_z)
        if reason is None:
            return None
        with self._lock:
            if not self._take_token():
                self.skipped_rate += 1
                return None
        try:
            data, suffix = self._encode(image, bgr)
        except Exception as exc:  # noqa: BLE001 - a frame that does not encode is not worth failing a request
            log.warning("capture: cannot encode the input (%s)", exc)
            return None
        now = time.time()
        day = self.folder / time.strftime("%Y-%m-%d", time.gmtime(now))
        stem = f"{time.strftime('%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:10]}"
        doc = {"image": stem + suffix, "captured_at": now, "reason": reason, "confidence": confidence_of(result),
               "drift_z": drift_z, "model": model, "result": plain_result(result)}
        if source:
            doc["source"] = source
        side, image_path = day / f"{stem}.json", day / (stem + suffix)
        sidecar = json.dumps(doc, separators=(",", ":")).encode()
        try:
            day.mkdir(exist_ok=True)
            atomic_write(image_path, data, durable=False)  # samples: a crash may lose the last few
            atomic_write(side, sidecar, durable=False)
        except OSError as exc:
            log.warning("capture: cannot write %s (%s)", side, exc)
            image_path.unlink(missing_ok=True)  # an image without its sidecar is not a sample: not left behind
            return None
        with self._lock:
            self.kept[reason] += 1
            self._index.append((now, reason, side, len(data) + len(sidecar)))
            self._evict()
        return side

    def _encode(self, image: np.ndarray | bytes, bgr: bool = False) -> tuple[bytes, str]:
        if isinstance(image, (bytes, bytearray, memoryview)):
            b = bytes(image)
            if b[:3] == b"\xff\xd8\xff":
                return b, ".jpg"
            if b[:8] == b"\x89PNG\r\n\x1a\n":
                return b, ".png"
            cv2 = cv2_module()
            decoded = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
            if decoded is None:
                raise ValueError("not an image OpenCV decodes")
            frame = decoded
        else:
            cv2 = cv2_module()
            frame = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and not bgr else image
        cv2 = cv2_module()
        ok, enc = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.s.jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return enc.tobytes(), ".jpg"

    def _evict(self) -> None:
        """Drop samples until within max_files and max_mb: random ones first, oldest first."""
        limit = self.s.max_mb * 2**20
        total = sum(n for *_, n in self._index)
        while self._index and (len(self._index) > self.s.max_files or total > limit):
            victim = next((e for e in self._index if e[1] == "random"), self._index[0])
            self._index.remove(victim)
            total -= victim[3]
            side = victim[2]
            try:
                image = side.with_name(json.loads(side.read_text())["image"])
                side.unlink()  # the sidecar first: an image without one is not a sample
                image.unlink(missing_ok=True)
            except (OSError, ValueError, KeyError):
                pass
            self.evicted += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"folder": str(self.folder), "kept": dict(self.kept), "on_disk": len(self._index),
                    "bytes": sum(n for *_, n in self._index), "skipped_rate_limit": self.skipped_rate,
                    "evicted": self.evicted}


def drift_z(model: Any, x: np.ndarray) -> np.ndarray | None:
    """Per row of ``x`` (the model's first input, pre-processed): how many standard deviations its mean lies from
    the calibration samples' means (``input_stats[...].sample_mean``); None when the bundle has no reference."""
    stats = model.manifest.input_stats.get(model.inputs[0].name)
    ref = stats.sample_mean if stats is not None else None
    if ref is None or not ref.std or ref.std <= 0:
        return None
    return (x.reshape(len(x), -1).astype(np.float64).mean(1) - ref.mean) / ref.std


def plain_result(result: dict[str, Any]) -> dict[str, Any]:
    """A device result as JSON-ready values, without its mask (as large as the image; the classes stay)."""
    out = {}
    for k, v in result.items():
        if k == "mask":
            continue  # a mask is as large as the image: the segmentation's classes are kept instead
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def settings_from_args(folder: Path | None, rate: float, low: float | None, per_minute: float, max_files: int,
                       max_mb: float, drift: float | None = 3.0) -> CaptureSettings | None:
    """The CLIs' ``--capture-*`` flags → settings, or None when capture is off (no folder)."""
    if folder is None:
        return None
    return CaptureSettings(folder=Path(os.path.expanduser(str(folder))), sample_rate=rate, low_confidence=low,
                           drift_z=drift, max_per_minute=per_minute, max_files=max_files, max_mb=max_mb)
