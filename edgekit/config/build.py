"""Build files: the model source, data, pre/post-processing, output, and overrides of the profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from edgekit_runtime.contract import bundle_spec, manifest

from ..errors import ConfigError
from .base import Strict, apply_overrides, deep_update, merge, parse, partial, read_yaml
from .target import AccuracyBudget, FidelityGate, LatencyGate, Limits, QuantizeSettings, RuntimeSettings, TargetProfile

# Profile sections a build file (and so a CLI flag) may override.
OVERRIDABLE = ("quantize", "accuracy", "fidelity", "latency", "limits", "runtime")


class ModelSource(Strict):
    source: str = Field(description="'package.module:factory', a .onnx file, or a torch.export .pt2 file")
    checkpoint: Path | None = Field(None, description="State dict or checkpoint for a factory model")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory")
    name: str = Field(description="Model name recorded in the bundle")
    version: str = "0.1.0"
    release: int | None = Field(
        None, ge=0, description="Anti-rollback counter; default: the build's UNIX time"
    )
    input_shape: list[int] | None = Field(
        None, description="Input shape including batch, e.g. [1, 3, 224, 224]: required for torch sources; for an "
                          "ONNX file it fills the dimensions the file leaves open and must agree with the fixed ones")
    input_name: str = "input"
    output_name: str = "logits"
    dynamic_batch: bool = True
    labels: list[str] | None = None
    labels_file: Path | None = None

    @model_validator(mode="after")
    def _shape_for_torch(self) -> "ModelSource":
        if self.input_shape is None and not self.source.endswith(".onnx"):
            raise ValueError(f"model.input_shape is required for the torch source {self.source} (the export needs "
                             f"an example input): set it in the build file or pass --input-shape, e.g. 1,3,224,224")
        return self


class DataSource(Strict):
    source: str = Field(
        description="Image folder (class sub-folders for labels), .npz (x[, y]), .npy, or 'module:factory'"
    )
    count: int | None = Field(None, ge=1, description="Use at most this many samples")
    kwargs: dict[str, Any] = Field(default_factory=dict)


# Defaults come from the bundle format (edgekit_runtime.contract.manifest), so host and device agree.
_PRE = manifest.defaults(manifest.Preprocess)
_POST = manifest.defaults(manifest.Postprocess)


class PreprocessSpec(Strict):
    """What the device does to an input before the model: ``(x * scale - mean) / std`` per channel.

    ``image``: decoded images (colour, resize to ``size``, layout); ``tensor``: arrays shaped like
    the model input (sensor windows, tabular rows, forecasting windows), normalised per channel
    along axis 1, with ``scale`` 1.0 unless given.
    """

    type: Literal["image", "tensor"] = _PRE["type"]
    color: Literal["gray", "rgb", "bgr"] = _PRE["color"]
    size: list[int] | None = Field(_PRE["size"], description="[height, width]; required for image preprocessing")
    resize: Literal["stretch", "shorter_center_crop", "letterbox"] = _PRE["resize"]
    interpolation: Literal["area", "linear", "nearest", "cubic"] = _PRE["interpolation"]
    scale: float = Field(_PRE["scale"], description="Multiplier applied first (default 1/255 for images, 1.0 for tensors)")
    mean: list[float] | None = _PRE["mean"]
    std: list[float] | None = _PRE["std"]
    layout: Literal["NCHW", "NHWC"] = _PRE["layout"]
    dtype: Literal["float32"] = _PRE["dtype"]

    @field_validator("size")
    @classmethod
    def _two(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError("size is [height, width] with positive values")
        # the bundle format's bounds, checked when the build file is read rather than when the bundle is written
        if v is not None and (max(v) > bundle_spec.MAX_IMAGE_SIDE or v[0] * v[1] > bundle_spec.MAX_IMAGE_PIXELS):
            raise ValueError(f"size {v} is over the bundle format's limit (each side ≤ {bundle_spec.MAX_IMAGE_SIDE}, "
                             f"height × width ≤ {bundle_spec.MAX_IMAGE_PIXELS})")
        return v

    @model_validator(mode="after")
    def _kind(self) -> "PreprocessSpec":
        if self.type == "image" and self.size is None:
            raise ValueError("image preprocessing needs size: [height, width] (or set type: tensor for "
                             "sensor windows, tabular rows and other non-image inputs)")
        if self.type == "tensor":
            # a dump of this model (defaults written out) is still valid; a value set on purpose is not
            ignored = [name for name in ("size", "color", "resize", "interpolation", "layout")
                       if getattr(self, name) != _PRE[name]]
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: image settings do not apply to type: tensor; remove them")
            if "scale" not in self.model_fields_set:
                # the format's default (1/255) is for 0-255 images; a tensor is normalised as it comes
                object.__setattr__(self, "scale", 1.0)
        return self


class PostprocessSpec(Strict):
    """What the device makes of the first output (docs/bundle-format.md, ``postprocess``)."""

    type: Literal["classification", "detection", "detections", "segmentation", "none"] = Field(
        _POST["type"], description="detection: raw [B, A, 4+C] head output, decoded and NMS'd on the device; "
                                   "detections: [B, N, 6] rows x0, y0, x1, y1, score, class after the graph's own NMS")
    softmax: bool = _POST["softmax"]
    top_k: int = Field(_POST["top_k"], ge=1, le=bundle_spec.MAX_TOP_K)
    strides: list[int] = Field(list(_POST["strides"]), min_length=1, description="detection: the output's levels")
    score_threshold: float = Field(_POST["score_threshold"], ge=0, le=1, description="detection: least score kept")
    iou_threshold: float = Field(_POST["iou_threshold"], ge=0, le=1, description="detection: class-aware NMS IoU")
    max_detections: int = Field(_POST["max_detections"], ge=1, le=bundle_spec.MAX_DETECTIONS)


class ExportSettings(Strict):
    """The import stage's export to ONNX, checked against torch."""

    atol: float = Field(1e-4, gt=0, description="Max |torch - onnx| allowed after export")


class PrunePass(Strict):
    """Structured pruning (Torch-Pruning DepGraph): whole channels go, so dense INT8 kernels get faster."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    ratio: float | Literal["auto"] = Field(
        0.5, description="Share of channels removed (per layer, or over the model with global: true), or 'auto': "
                         "the least ratio whose INT8 p99, measured on the target's engine, meets "
                         "limits.latency_budget_ms")
    max_ratio: float = Field(0.75, gt=0, lt=1, description="ratio: auto searches ratios up to this one")
    search_points: int = Field(6, ge=2, le=20, description="ratio: auto measures this many ratios from 0 to "
                                                          "max_ratio, interleaved in one run")
    iterations: int = Field(1, ge=1, le=100, description="Prune in this many steps, fine-tuning between them")
    importance: Literal["magnitude", "taylor"] = Field(
        "magnitude", description="Channel ranking: weight magnitude, or Taylor (|weight × gradient|, needs the run's "
                                 "training data)")
    global_pruning: bool = Field(False, alias="global", description="Rank channels over the whole model instead "
                                                                    "of per layer (uneven widths)")
    round_to: int | None = Field(None, ge=1, description="Channel counts kept multiples of this (default: the "
                                                         "profile's optimize.round_to)")
    ignore: list[str] = Field(default_factory=list, description="Module names never pruned (the head always is)")
    finetune_epochs: int = Field(3, ge=0, description="Fine-tuning epochs in all, split over the iterations")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 < v < 1:
            raise ValueError(f"ratio must lie between 0 and 1 (exclusive), or be 'auto'; got {v}")
        return v


class DistillPass(Strict):
    """Knowledge distillation into the model being compiled (soft targets at a temperature)."""

    teacher: str = Field("self", description="'self' (the model before the optimize passes), a run folder, "
                                             "or 'package.module:factory'")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft-target loss (1 - alpha: the labels)")
    features: bool = Field(False, description="Also match pooled features (through a learned projection)")
    epochs: int = Field(3, ge=1)


class OptimizePass(Strict):
    """One entry of ``optimize:``: a one-key mapping naming the pass and its settings."""

    prune: PrunePass | None = None
    distill: DistillPass | None = None

    @model_validator(mode="after")
    def _one(self) -> "OptimizePass":
        named = [k for k in ("prune", "distill") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError("each optimize entry names one pass: '- prune: {ratio: 0.5}' or "
                             "'- distill: {teacher: self}'")
        return self

    @property
    def kind(self) -> str:
        return "prune" if self.prune is not None else "distill"

    @property
    def settings(self) -> PrunePass | DistillPass:
        return self.prune if self.prune is not None else self.distill


class FinetuneSettings(Strict):
    """The training run whose splits and recipe (train.yaml) the optimize passes fine-tune with."""

    run: Path | None = Field(None, description="Run folder (edgekit train --out); set when compiling a run folder")
    lr_scale: float = Field(0.1, gt=0, description="Fine-tuning learning rate = the run's optim.lr × this")
    batch_size: int | None = Field(None, ge=1, description="Fine-tuning batch (default: the run's)")


class BuildConfig(Strict):
    model: ModelSource
    target: str = Field(description="Profile name (targets/NAME.yaml) or a path to a profile YAML")
    calibration: DataSource | None = None
    validation: DataSource | None = Field(None, description="Labelled data for the accuracy check")
    preprocess: PreprocessSpec | None = None
    postprocess: PostprocessSpec = PostprocessSpec()
    export: ExportSettings = ExportSettings()
    optimize: list[OptimizePass] = Field(default_factory=list,
                                         description="Compression passes run on the torch model before export")
    finetune: FinetuneSettings = FinetuneSettings()
    # Overrides of the profile's sections: typed, so a typo fails here and not after the export.
    quantize: partial(QuantizeSettings) | None = Field(None, description="Overrides of the profile's quantize")
    accuracy: partial(AccuracyBudget) | None = Field(None, description="Overrides of the profile's accuracy gate")
    fidelity: partial(FidelityGate) | None = Field(None, description="Overrides of the profile's fidelity gate")
    latency: partial(LatencyGate) | None = Field(None, description="Overrides of the profile's latency gate")
    limits: partial(Limits) | None = Field(None, description="Overrides of the profile's limits")
    runtime: partial(RuntimeSettings) | None = Field(None, description="Overrides of the profile's runtime")
    output: Path = Field(Path("build/model.ekb"), description="Bundle to write")
    workdir: Path | None = Field(None, description="Where intermediate files go (default: next to output)")
    signing_key: Path | None = Field(None, description="ed25519 private key (default: $EDGEKIT_SIGNING_KEY)")
    keep_work: bool = Field(False, description="Keep the work folder after the build (it is removed otherwise)")
    skip_bad_images: bool = Field(False, description="Skip images that cannot be decoded in the calibration and "
                                                     "validation folders (counted and named in the report) instead "
                                                     "of refusing the build")



def apply_pass_overrides(data: dict[str, Any], passes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``data`` with flag settings laid over the first pass of each kind (a pass is added if there is none).

    ``passes`` maps a pass name to the settings its flags set; a pass that is added goes in pass order
    (prune before distill, so "self" distils a pruned student from its unpruned model).
    """
    out = dict(data)
    steps = [dict(s) if isinstance(s, dict) else s for s in (out.get("optimize") or [])]
    for kind in ("prune", "distill"):
        settings = {k: v for k, v in (passes.get(kind) or {}).items() if v is not None}
        if not settings:
            continue
        for step in steps:
            if isinstance(step, dict) and kind in step:
                step[kind] = {**(step[kind] or {}), **settings}
                break
        else:
            steps.append({kind: settings})
    out["optimize"] = steps
    return out


def load_build(path: Path | None, overrides: dict[str, Any] | None = None,
               base: dict[str, Any] | None = None, passes: dict[str, dict[str, Any]] | None = None) -> BuildConfig:
    """A build file (over ``base``, e.g. a run folder's settings) with CLI overrides applied, validated.

    ``passes``: optimize-pass settings from flags (``{"prune": {"ratio": 0.5}}``), see :func:`apply_pass_overrides`.
    """
    data = deep_update(base or {}, read_yaml(path) if path else {})
    data = apply_overrides(data, overrides or {})
    if passes:
        data = apply_pass_overrides(data, passes)
    cfg = parse(BuildConfig, data, str(path) if path else "build settings")
    if cfg.model.labels and cfg.model.labels_file:
        raise ConfigError("give model.labels or model.labels_file, not both")
    return cfg


def resolve_profile(profile: TargetProfile, cfg: BuildConfig) -> TargetProfile:
    """The profile with the build file's quantize/accuracy/runtime overrides applied (validated)."""
    where = f"target {profile.name} with the build's overrides"
    updates = {s: merge(getattr(profile, s), getattr(cfg, s), where) for s in OVERRIDABLE}
    return profile.model_copy(update=updates)

