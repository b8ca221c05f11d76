"""Input drift: the values the model sees now against what it was calibrated on.

The compiler records, per input, a histogram of every tensor value of the
calibration set (``manifest["input_stats"][name]["histogram"]``: ``edges`` and
``counts``). The agent counts the preprocessed input values of live inferences
into the *same* bins (values outside the reference range go to the edge bins)
and compares the two distributions with

* **PSI** (population stability index) ``Σ (q-p)·ln(q/p)`` over the bins, with
  ``p``, ``q`` smoothed as ``(x+ε)/(1+kε)`` so an empty bin does not make it
  infinite; rules of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 drifted;
* **KS**: the largest distance between the two cumulative distributions
  evaluated at the bin edges (a binned Kolmogorov-Smirnov statistic).

A window is judged once it holds ``min_values`` values: with ``k`` bins, PSI
reads about ``(k-1)·(1/n + 1/n_ref)`` from sampling noise alone (reported as
``psi_noise``), so 32 bins need a few thousand values before 0.2 means drift.
Until then values keep accumulating across telemetry windows.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..contract.errors import BundleError
from ..contract.manifest import InputStats

PSI_EPSILON = 1e-4


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index between two histograms over the same bins (counts or shares)."""
    p = _smoothed(expected, epsilon)
    q = _smoothed(actual, epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(expected: np.ndarray, actual: np.ndarray) -> float:
    """Max distance between the cumulative distributions of two histograms over the same bins."""
    p = _shares(expected)
    q = _shares(actual)
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("a histogram with no counts has no distribution")
    return counts / total


def _smoothed(counts: np.ndarray, epsilon: float) -> np.ndarray:
    shares = _shares(counts)
    return (shares + epsilon) / (1 + epsilon * len(shares))


class DriftUnavailable(ValueError):
    """The bundle holds no usable reference for an input (the reason says why)."""


@dataclass
class Reference:
    """One input's reference distribution from the bundle manifest."""

    edges: np.ndarray
    counts: np.ndarray
    mean: float | None
    std: float | None
    uniform: bool

    @classmethod
    def from_stats(cls, name: str, stats: InputStats | Mapping[str, Any] | None) -> "Reference":
        """The reference of input ``name`` from its manifest ``input_stats`` entry (typed, or a JSON object
        that is parsed first); :class:`DriftUnavailable` says why there is none."""
        if stats is None:
            raise DriftUnavailable(f"input_stats has no entry for input {name!r}")
        if not isinstance(stats, InputStats):
            try:
                stats = InputStats.from_dict(stats, f"input_stats[{name!r}]")
            except BundleError as exc:
                raise DriftUnavailable(exc.message) from None
        hist = stats.histogram
        if hist is None:
            raise DriftUnavailable(f"input_stats[{name!r}] has no histogram (bundle made by an older compiler?)")
        edges = np.asarray(hist.edges, dtype=np.float64)
        counts = np.asarray(hist.counts, dtype=np.float64)
        if len(edges) != len(counts) + 1 or len(counts) < 2:
            raise DriftUnavailable(f"input_stats[{name!r}].histogram needs k>=2 counts and k+1 edges")
        if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise DriftUnavailable(f"input_stats[{name!r}].histogram edges are not finite and increasing")
        if np.any(counts < 0) or counts.sum() <= 0:
            raise DriftUnavailable(f"input_stats[{name!r}].histogram has no counts")
        widths = np.diff(edges)
        uniform = bool(np.allclose(widths, widths[0], rtol=1e-6, atol=0))
        return cls(edges, counts, stats.mean, stats.std, uniform)

    def bin_counts(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values`` (finite, float64) in the reference bins; outliers go to the edge bins."""
        k = len(self.counts)
        if self.uniform:
            lo, hi = self.edges[0], self.edges[-1]
            idx = np.floor((values - lo) * (k / (hi - lo)))
            idx = np.clip(idx, 0, k - 1).astype(np.intp)
        else:
            idx = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, k - 1)
        return np.bincount(idx, minlength=k)


class InputDrift:
    """Accumulates one input's live values in the reference bins."""

    def __init__(self, name: str, reference: Reference, max_values_per_inference: int):
        self.name = name
        self.reference = reference
        self.max_values = max_values_per_inference
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros(len(self.reference.counts), dtype=np.int64)
        self.n = 0
        self.non_finite = 0
        self.sum = 0.0
        self.sumsq = 0.0

    def add(self, tensor: np.ndarray) -> None:
        flat = np.asarray(tensor).ravel()
        if flat.size > self.max_values:  # strided subsample bounds the cost per inference
            flat = flat[:: math.ceil(flat.size / self.max_values)]
        flat = flat.astype(np.float64, copy=False)
        finite = np.isfinite(flat)
        if not finite.all():
            self.non_finite += int((~finite).sum())
            flat = flat[finite]
        self.counts += self.reference.bin_counts(flat)
        self.n += flat.size
        self.sum += float(flat.sum())
        self.sumsq += float(np.dot(flat, flat))

    def result(self) -> dict[str, Any]:
        ref = self.reference
        out: dict[str, Any] = {"values": self.n, "non_finite": self.non_finite,
                               "psi": psi(ref.counts, self.counts), "ks": ks_statistic(ref.counts, self.counts),
                               # what PSI reads from sampling alone, with no drift: about (k-1)(1/n + 1/n_ref)
                               "psi_noise": (len(ref.counts) - 1) * (1 / self.n + 1 / ref.counts.sum())}
        mean = self.sum / self.n
        out["mean"] = mean
        out["std"] = math.sqrt(max(self.sumsq / self.n - mean * mean, 0.0))
        if ref.mean is not None:
            out["reference_mean"] = ref.mean
            if ref.std:
                out["mean_shift_sigma"] = (mean - ref.mean) / ref.std
        return out


class DriftMonitor:
    """Drift of every input that has a reference; alarms with hysteresis-free edges (raise/clear).

    ``input_stats``: the manifest's ``input_stats`` (or None); ``input_names``:
    the model's inputs in order (a bare array given to :meth:`add` is the first).
    """

    def __init__(self, input_stats: Mapping[str, InputStats | Mapping[str, Any]] | None, input_names: list[str] | None = None, *,
                 psi_threshold: float = 0.2, ks_threshold: float | None = None, min_values: int = 2000,
                 max_values_per_inference: int = 4096, unavailable_reason: str | None = None):
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.min_values = min_values
        self._lock = threading.Lock()
        self.inputs: dict[str, InputDrift] = {}
        self.unavailable: dict[str, str] = {}
        self.alarm: dict[str, bool] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.reason = unavailable_reason
        names = list(input_names or (input_stats or {}).keys())
        self.input_names = names
        if self.reason is None and not input_stats:
            self.reason = "the bundle manifest has no input_stats"
        if self.reason is None:
            for name in names:
                try:
                    ref = Reference.from_stats(name, input_stats.get(name))
                except DriftUnavailable as exc:
                    self.unavailable[name] = str(exc)
                    continue
                self.inputs[name] = InputDrift(name, ref, max_values_per_inference)
                self.alarm[name] = False
            if not self.inputs:
                self.reason = "; ".join(self.unavailable.values()) or "no input has a reference distribution"

    @property
    def available(self) -> bool:
        return bool(self.inputs)

    def add(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> None:
        """Count one inference's preprocessed input tensor(s)."""
        if not self.inputs:
            return
        if isinstance(inputs, np.ndarray):
            if not self.input_names:
                return
            inputs = {self.input_names[0]: inputs}
        with self._lock:
            for name, tensor in inputs.items():
                acc = self.inputs.get(name)
                if acc is not None:
                    acc.add(tensor)

    def evaluate(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(report, changes)``: the telemetry fragment, and the alarms raised or cleared now.

        An input with fewer than ``min_values`` values keeps accumulating and
        reports its last judged result (``"pending_values"`` says how far it is).
        """
        if not self.inputs:
            return {"available": False, "reason": self.reason}, []
        report: dict[str, Any] = {"available": True, "psi_threshold": self.psi_threshold,
                                  "ks_threshold": self.ks_threshold, "min_values": self.min_values, "inputs": {}}
        changes: list[dict[str, Any]] = []
        with self._lock:
            for name, acc in self.inputs.items():
                if acc.n < self.min_values:
                    entry = dict(self.last.get(name, {}), pending_values=acc.n, judged=False)
                    entry["alarm"] = self.alarm[name]
                    report["inputs"][name] = entry
                    continue
                result = acc.result()
                acc.reset()
                drifted = result["psi"] > self.psi_threshold or (
                    self.ks_threshold is not None and result["ks"] > self.ks_threshold)
                if drifted != self.alarm[name]:
                    changes.append({"type": "drift_alarm" if drifted else "drift_cleared", "input": name,
                                    "psi_threshold": self.psi_threshold, "ks_threshold": self.ks_threshold,
                                    **result})
                self.alarm[name] = drifted
                result["alarm"] = drifted
                self.last[name] = result
                report["inputs"][name] = dict(result, judged=True)
        for name, why in self.unavailable.items():
            report["inputs"][name] = {"available": False, "reason": why}
        return report, changes
