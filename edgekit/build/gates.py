"""The gates: the one place a build is refused. Each compares the deployed artifact with the FP32 reference.

* **accuracy** — the task metric (with its direction) on labelled validation data; the
  budget means the same on every backend because both sides run through the device engine;
* **fidelity** — label-free, always on: cosine of outputs and top-1 agreement of INT8 vs
  FP32 on calibration samples the quantizer never saw;
* **latency** — INT8 must beat FP32 on the target's engine by the profile's margin where
  the host's figure carries over to the device; never a slower INT8 bundle in silence;
* **size** — where a profile sets a limit;
* **reference** — an accuracy gate is only meaningful if the FP32 reference is: at or
  below chance, or with a label count that does not fit the model, the build is refused.

Backends receive one :class:`RecoveryGoal` for their fallback, never a raw number.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from ..config import AccuracyBudget, FidelityGate, LatencyGate, Limits
from ..errors import AccuracyBudgetError, ConfigError, GateError

Status = Literal["passed", "failed", "not_checked"]

# An FP32 reference this close to chance says the labels do not match the model's classes.
CHANCE_FACTOR = 1.25
CHANCE_MARGIN_PT = 5.0  # ... but never more than this above chance (two classes: 55 %, not 62.5 %)


def chance_threshold(classes: int) -> float:
    """Top-1 percent at or below which an FP32 reference is no better than guessing."""
    chance = 100.0 / max(classes, 1)
    return min(CHANCE_FACTOR * chance, chance + CHANCE_MARGIN_PT)


def check_labels(labels: list[str] | None, classes: int) -> None:
    """One label per model output, or the bundle would name the wrong classes on the device."""
    if labels is not None and len(labels) != classes:
        raise ConfigError(
            f"the model has {classes} output classes but {len(labels)} labels are given; "
            f"model.labels must list one name per output, in the model's order")


@dataclass
class GateResult:
    """One gate's verdict, as the report and the manifest record it."""

    name: str
    status: Status
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    detail: str = ""
    refuses: bool = True  # False: a failed gate that changes what ships instead of refusing the build
    ships_fp32: bool = False  # the latency gate's verdict: the FP32 artifact ships instead of INT8

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("refuses")
        d.pop("ships_fp32")
        return d


# ----------------------------------------------------------------------------- metrics
def top1_percent(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (higher is better)."""
    return float((outputs.reshape(len(labels), -1).argmax(1) == labels).mean() * 100.0)


def mae(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error in the target's units (lower is better)."""
    return float(np.mean(np.abs(outputs.reshape(len(targets), -1).astype(np.float64)
                                - targets.reshape(len(targets), -1))))


def rmse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error in the target's units (lower is better)."""
    return float(np.sqrt(np.mean((outputs.reshape(len(targets), -1).astype(np.float64)
                                  - targets.reshape(len(targets), -1)) ** 2)))


METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], Literal["higher", "lower"], str]] = {
    # name -> (function of (outputs, labels or targets), direction, unit). Detection adds map50, segmentation miou.
    "top1": (top1_percent, "higher", "pt"),
    "mae": (mae, "lower", ""),
    "rmse": (rmse, "lower", ""),
    # detection and segmentation, in points (percent): they need the model's context (dense_value)
    "map50": (None, "higher", "pt"),
    "map": (None, "higher", "pt"),
    "miou": (None, "higher", "pt"),
}
# metrics whose validation data hold values (float targets), not class indices
REGRESSION_METRICS = frozenset({"mae", "rmse"})
# metrics of boxes and masks: validation targets are padded boxes (N, M, 5) or masks (N, H, W)
DENSE_METRICS = frozenset({"map50", "map", "miou"})


def dense_value(metric: str, outputs: np.ndarray, y: np.ndarray, context: dict[str, Any],
                labels: list[str] | None) -> float:
    """mAP50 / mAP / mIoU in points of the raw model outputs: the same decode and NMS the device runs
    (``edgekit_runtime.detection``), scored by pycocotools (``edgekit.evaluate.dense_metrics``)."""
    from ..evaluate.dense_metrics import (coco_map, detection_map_raw, detections_from_rows, padded_targets,
                                          segmentation_metrics_raw)

    if not labels:
        raise ConfigError(f"the {metric} gate needs the model's class names (model.labels)")
    post = context.get("postprocess") or {}
    if metric == "miou":
        value = segmentation_metrics_raw(outputs, y, labels)["miou"]
    elif post.get("type") == "detections":  # the graph ran its own NMS: its rows are the detections
        value = coco_map(detections_from_rows(outputs), padded_targets(y), labels)[metric]
    else:
        if post.get("type") != "detection":
            raise ConfigError(f"the {metric} gate scores detections: set postprocess.type: detection (and its "
                              f"strides), or detections for a graph with NMS inside, in the build file")
        value = detection_map_raw(outputs, y, labels, context["input_hw"], post["strides"])[metric]
    return 100.0 * float(value or 0.0)


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened outputs (1.0 where both are all zero)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num == 0, 1.0, 0.0))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose arg-max class is the same in ``a`` and ``b``."""
    return float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean())


# ----------------------------------------------------------------------------- the gates
@dataclass
class AccuracyCheck:
    settings: AccuracyBudget
    labels: list[str] | None
    # detection/segmentation: the model's postprocess section and input (height, width) the metric decodes with
    context: dict[str, Any] | None = None

    @property
    def metric(self):
        return METRICS[self.settings.metric]

    def value(self, outputs: np.ndarray, y: np.ndarray) -> float:
        if self.settings.metric in DENSE_METRICS:
            return dense_value(self.settings.metric, outputs, y, self.context or {}, self.labels)
        return self.metric[0](outputs, y)

    def check_reference(self, fp32_outputs: np.ndarray, y: np.ndarray, fp32_value: float, source: str) -> None:
        """Refuse a reference that cannot make the budget mean anything."""
        if self.settings.metric in DENSE_METRICS:
            if fp32_value < 1.0:
                raise GateError(
                    f"the FP32 model scores {fp32_value:.2f} {self.settings.metric} points on {source}: a budget "
                    f"measured against it means nothing. Check that the model has been trained long enough, that the "
                    f"data's classes are the model's (model.labels, in order) and that the preprocessing is the "
                    f"training run's",
                    {"result": "failed: reference at zero", "accuracy": {"fp32": fp32_value}})
            return
        if self.settings.metric in REGRESSION_METRICS:
            per_sample = int(np.prod(fp32_outputs.shape[1:]))
            if y.reshape(len(y), -1).shape[1] != per_sample:
                raise ConfigError(f"{source} has {y.reshape(len(y), -1).shape[1]} target value(s) per sample but the "
                                  f"model outputs {per_sample}; give targets shaped like the model's output")
            return
        classes = int(np.prod(fp32_outputs.shape[1:]))
        check_labels(self.labels, classes)
        if y.size and int(y.max()) >= classes:
            raise ConfigError(f"{source} has label {int(y.max())} but the model has only {classes} output classes; "
                              f"check that the data's classes are the model's classes, in the model's order")
        chance = 100.0 / max(classes, 1)
        if self.settings.metric == "top1" and classes > 1 and fp32_value <= chance_threshold(classes):
            raise GateError(
                f"the FP32 model scores {fp32_value:.2f} % top-1 on {source}, at or below chance for {classes} "
                f"classes ({chance:.1f} %): an accuracy budget measured against it means nothing. Most often the "
                f"data's labels are not the model's classes: name class folders exactly as model.labels (or give "
                f"model.labels in the model's output order), or check the preprocessing",
                {"result": "failed: reference at chance", "accuracy": {"fp32": fp32_value, "chance": chance}},
            )

    def gate(self, reference: float, value: float) -> GateResult:
        _, direction, unit = self.metric
        drop = (reference - value) if direction == "higher" else (value - reference)
        budget = self.settings.max_accuracy_drop
        if budget is None:
            return GateResult("accuracy", "not_checked", drop, None, unit, "accuracy.max_accuracy_drop is null")
        status: Status = "passed" if drop <= budget else "failed"
        word = "drop" if direction == "higher" else "increase"
        units = f" {unit}" if unit else ""
        return GateResult("accuracy", status, drop, budget, unit,
                          f"{self.settings.metric} {reference:.4g} → {value:.4g} ({word} {drop:.4g}{units}, "
                          f"budget {budget:.4g}{units})")


@dataclass
class FidelityCheck:
    settings: FidelityGate

    def measure(self, fp32_outputs: np.ndarray, outputs: np.ndarray,
                more: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, first: str = "output") -> dict[str, Any]:
        """Cosine and top-1 agreement of the first output; ``more``: the model's other outputs (name →
        (FP32, artifact)), whose cosines are reported by name (``first``: the first output's) and of which the
        worst is the gated cosine."""
        cos = cosine_per_sample(fp32_outputs, outputs)
        out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
               "top1_agreement": top1_agreement(fp32_outputs, outputs), "samples": int(len(cos)),
               "min_cosine": self.settings.min_cosine, "min_top1_agreement": self.settings.min_top1_agreement}
        if more:
            each = {name: cosine_per_sample(a, b) for name, (a, b) in more.items()}
            out["outputs"] = {first: out["cosine"], **{name: float(c.mean()) for name, c in each.items()}}
            out["cosine"] = min(out["outputs"].values())
            out["cosine_min"] = min([out["cosine_min"], *(float(c.min()) for c in each.values())])
        return out

    def check_reference(self, fp32_outputs: np.ndarray) -> None:
        """Refuse a reference that cannot make the fidelity gate mean anything: a float output that is 0 in every
        value of every held-back sample (a model built without its trained weights, whose zero-initialized head
        answers 0, does this), where any INT8 artifact answering 0 agrees at cosine 1.0.

        Only all-zero is refused: a constant non-zero answer can be a real model's (a saturated sigmoid on
        held-back samples of one class answers 1.0 to each), and an integer output (a class index) can be 0
        for every sample of class 0."""
        if self.settings.min_cosine is None and self.settings.min_top1_agreement is None:
            return
        if len(fp32_outputs) < 2 or not np.issubdtype(fp32_outputs.dtype, np.floating) or np.any(fp32_outputs):
            return
        raise GateError(
            f"the FP32 model answers 0 in every value for all {len(fp32_outputs)} held-back calibration samples: INT8 "
            f"fidelity measured against an all-zero output means nothing, no bundle written",
            {"result": "failed: all-zero reference", "fidelity": {"samples": len(fp32_outputs)}},
            hint="load the trained weights (a freshly constructed model's zero-initialized head answers 0), and check "
                 "that the preprocessing does not turn every image into the same input")

    def gates(self, figures: dict[str, Any]) -> list[GateResult]:
        out = []
        for name, threshold in (("cosine", self.settings.min_cosine),
                                ("top1_agreement", self.settings.min_top1_agreement)):
            value = figures[name]
            if threshold is None:
                out.append(GateResult(f"fidelity.{name}", "not_checked", value, None, "",
                                      f"fidelity.min_{name} is null"))
            else:
                worst = (f" (the worst of the outputs: {min(figures['outputs'], key=figures['outputs'].get)})"
                         if name == "cosine" and figures.get("outputs") else "")
                out.append(GateResult(f"fidelity.{name}", "passed" if value >= threshold else "failed", value,
                                      threshold, "", f"{name} {value:.4f}{worst} on {figures['samples']} held-back "
                                                     f"calibration samples (at least {threshold})"))
        return out


def latency_not_representative(device_arch: str, device_family: str, backend_engine: str, eval_engine: str) -> str | None:
    """Why a latency measured on this host says nothing about the device, or None where it does."""
    if eval_engine != backend_engine:
        return (f"{backend_engine} does not run on this host; timings through {eval_engine} do not carry over "
                f"to the device (run `edgekit bench` on it)")
    host = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    dev = device_arch.lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    # a profile for "any" CPU holds this host too: its figure is one of the devices'
    if device_family == "jetson" or dev not in (host, "any"):
        return (f"measured on this {host} host; the device is {device_family}/{device_arch}, where the same kernels "
                f"run at other speeds (run `edgekit bench` on it)")
    return None


@dataclass
class LatencyCheck:
    settings: LatencyGate
    limits: Limits
    not_representative: str | None

    def speedup_gate(self, fp32: dict[str, Any], int8: dict[str, Any]) -> GateResult:
        speedup = fp32["p50_ms"] / int8["p50_ms"] if int8["p50_ms"] > 0 else float("inf")
        margin = self.settings.min_int8_speedup
        if self.not_representative:
            return GateResult("latency.int8_speedup", "not_checked", speedup, margin, "x", self.not_representative)
        needed_ms = fp32["p50_ms"] / margin
        detail = (f"INT8 p50 {int8['p50_ms']:.3f} ms vs FP32 {fp32['p50_ms']:.3f} ms: {speedup:.2f}x "
                  f"(needs {margin}x)")
        if int8["p50_ms"] <= needed_ms:
            return GateResult("latency.int8_speedup", "passed", speedup, margin, "x", detail)
        # Noise is absolute AND relative: 0.02 ms is timer noise on a 1 ms model, but on a 0.033 ms model it is
        # 60 % of the time, and an INT8 at 0.051 ms would ship 1.5x slower "within noise". The smaller bound wins.
        noise_fraction = self.settings.noise_fraction  # noise_ms never covers more than this share of the p50
        noise = min(self.settings.noise_ms, noise_fraction * needed_ms)
        if int8["p50_ms"] - needed_ms <= noise:
            # not judged, and said so: a difference this small is the timer's, not the model's
            return GateResult("latency.int8_speedup", "not_checked", speedup, margin, "x",
                              f"{detail}; the difference is within latency.noise_ms ({self.settings.noise_ms} ms, "
                              f"at most {noise_fraction:.0%} of the needed p50)")
        on_slower = self.settings.on_slower
        if on_slower == "ship_faster" and int8["p50_ms"] <= fp32["p50_ms"]:
            # INT8 misses the margin but is still the faster one: shipping FP32 would be slower
            return GateResult("latency.int8_speedup", "failed", speedup, margin, "x",
                              f"{detail}; INT8 misses the margin but FP32 is slower: shipping INT8", refuses=False)
        action = {"ship_faster": "shipping the faster FP32 artifact", "fail": "refusing the build",
                  "keep_int8": "shipping INT8 anyway (latency.on_slower: keep_int8)"}[on_slower]
        return GateResult("latency.int8_speedup", "failed", speedup, margin, "x", f"{detail}; {action}",
                          refuses=on_slower == "fail", ships_fp32=on_slower == "ship_faster")

    def budget_gate(self, chosen: dict[str, Any]) -> GateResult | None:
        budget = self.limits.latency_budget_ms
        if budget is None:
            return None
        if self.not_representative:
            return GateResult("latency.budget", "not_checked", chosen["p99_ms"], budget, "ms", self.not_representative)
        ok = chosen["p99_ms"] <= budget
        # A warning, not a refusal: a build host's p99 moves with whatever else it runs, and each device
        # holds the bundle to this budget in its own install health check, on its own hardware.
        return GateResult("latency.budget", "passed" if ok else "failed", chosen["p99_ms"], budget, "ms",
                          f"p99 {chosen['p99_ms']:.3f} ms on this host (limits.latency_budget_ms {budget})"
                          + ("" if ok else "; a warning here, enforced by the device's install health check"),
                          refuses=False)


def size_gate(limits: Limits, size_bytes: int) -> GateResult | None:
    if limits.max_model_mb is None:
        return None
    mb = size_bytes / 1e6
    return GateResult("size", "passed" if mb <= limits.max_model_mb else "failed", mb, limits.max_model_mb, "MB",
                      f"model artifact {mb:.3f} MB (limits.max_model_mb {limits.max_model_mb})")


# ----------------------------------------------------------------------------- recovery and refusal
@dataclass
class RecoveryGoal:
    """What a backend's fallback must reach, in one object.

    ``x`` are the inputs the goal is scored on, ``score(outputs)`` is higher-is-better in the
    units of ``max_drop`` (top-1 points, or cosine to FP32), ``reference`` is FP32's score, and
    ``evaluate(artifact)`` runs every quality gate through the device engine and returns an
    :class:`Attempt`. NNCF's accuracy control takes ``score`` and ``max_drop`` directly.
    """

    gate: str
    x: np.ndarray
    score: Callable[[np.ndarray], float]
    reference: float
    max_drop: float
    evaluate: Callable[[Any], "Attempt"]


@dataclass
class Attempt:
    """One candidate artifact and its quality gates."""

    strategy: str
    artifact: Any
    results: list[GateResult]
    figures: dict[str, Any] = field(default_factory=dict)  # accuracy, fidelity
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(r.failed and r.refuses for r in self.results)

    @property
    def score(self) -> tuple:
        """Order of preference: fewer failed gates, then a smaller accuracy drop, then a higher cosine."""
        failed = sum(r.failed for r in self.results)
        acc = next((r.value for r in self.results if r.name == "accuracy" and r.value is not None), 0.0)
        cos = self.figures.get("fidelity", {}).get("cosine", 1.0)
        return (-failed, -acc, cos)

    def to_dict(self) -> dict[str, Any]:
        out = {"strategy": self.strategy, **self.details, "passed": self.passed,
               "gates": [r.to_dict() for r in self.results]}
        if "accuracy" in self.figures:
            out["accuracy"] = self.figures["accuracy"]
            out["drop_pts"] = self.figures["drop"]
        if "fidelity" in self.figures:
            out["fidelity"] = {k: self.figures["fidelity"][k] for k in ("cosine", "cosine_min", "top1_agreement")}
        return out


def refuse(results: list[GateResult], report: dict[str, Any], hint: str) -> None:
    """Raise :class:`GateError` naming every failed gate that refuses the build; no bundle is written."""
    failed = [r for r in results if r.failed and r.refuses]
    if not failed:
        return
    names = ", ".join(r.name for r in failed)
    report["result"] = f"failed: {failed[0].name.split('.')[0]} gate"
    lines = "; ".join(r.detail for r in failed)
    error = AccuracyBudgetError if any(r.name == "accuracy" for r in failed) else GateError
    raise error(f"{names} gate failed, no bundle written: {lines}. {hint}", report)
