"""Training files (``edgekit train CONFIG.yaml``): data, split, model, optimisation, augmentation, run.

Every field has a default a practitioner would pick; ``edgekit train --data D --task T --out runs/N``
is a complete training file. Flags override fields through dotted paths and the result is
validated again, like build files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Strict, apply_overrides, parse, read_yaml

Task = Literal["classification", "regression", "forecast", "detection", "segmentation"]


class DataConfig(Strict):
    """What to learn from. The kind (image, sequence, tabular, forecast) follows from the data."""

    path: Path = Field(description="Image folder (class sub-folders), .npz (x, y[, x_test, y_test, group, meta]), "
                                   ".csv or .parquet")
    task: Task = "classification"
    kind: Literal["auto", "image", "sequence", "tabular", "forecast"] = "auto"
    target: str | None = Field(None, description="CSV/Parquet: the label or value column")
    time: str | None = Field(None, description="CSV/Parquet: the time column (a time series; split by time)")
    group: str | None = Field(None, description="Column (or .npz array) of group ids: no group in two splits")
    meta: str | None = Field(None, description="Column (or .npz array) to report metrics per slice of")
    features: list[str] | None = Field(None, description="CSV/Parquet: input columns (default: all others)")
    lookback: int | None = Field(None, ge=2, description="forecast: past steps the model sees (default 2 seasons or 24)")
    horizon: int | None = Field(None, ge=1, description="forecast: steps ahead to predict (default 6)")
    season: int | None = Field(None, ge=2, description="forecast: seasonal period for the seasonal-naive baseline")
    image_size: list[int] | None = Field(None, description="image folder: [height, width] to resize to "
                                                           "(default: the median size)")
    color: Literal["auto", "gray", "rgb"] = "auto"


class SplitConfig(Strict):
    """How train/validation/test are cut. ``auto``: temporal for time series and forecasts, grouped when
    a group is given, stratified for classification, random otherwise."""

    method: Literal["auto", "stratified", "grouped", "temporal", "random"] = "auto"
    val: float = Field(0.15, gt=0, lt=0.5, description="Fraction for validation (early stopping, model selection)")
    test: float = Field(0.15, ge=0, lt=0.5, description="Fraction held out for the report (ignored when the data "
                                                        "has its own test split)")


class ModelConfig(Strict):
    arch: str | None = Field(None, description="Architecture name (edgekit train --list-archs); default: "
                                               "picked for the data")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the architecture")
    pretrained: Path | None = Field(None, description="Local state dict to start from (nothing is downloaded)")
    freeze_backbone: bool = Field(False, description="Train only the new head (fine-tuning)")
    checkpointing: bool = Field(False, description="Activation checkpointing: less memory, more compute")


class OptimConfig(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov)")
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up before cosine/step")
    step_size: int = Field(10, ge=1, description="step schedule: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: float | None = Field(None, gt=0, lt=1, description="EMA of weights with this decay (e.g. 0.999); "
                                                             "evaluation and model.pt use the average")


class LossConfig(Strict):
    name: Literal["auto", "cross_entropy", "focal", "mse", "huber"] = "auto"
    class_weights: Literal["none", "inverse", "inverse_sqrt", "effective"] = "none"
    focal_gamma: float = Field(2.0, ge=0)
    sampler: Literal["none", "weighted"] = Field("none", description="weighted: draw classes evenly")


class AugmentConfig(Strict):
    """Training split only. Images: torchvision v2; sequences: jitter, scaling, time warp, window slice."""

    enabled: bool = True
    hflip: float = Field(0.0, ge=0, le=1, description="Probability of a horizontal flip (off: digits/text)")
    vflip: float = Field(0.0, ge=0, le=1)
    rotation: float = Field(10.0, ge=0, le=180, description="Max degrees")
    resized_crop: float = Field(0.85, gt=0, le=1, description="Min area kept by random resized crop (1: off)")
    color_jitter: float = Field(0.2, ge=0, le=1, description="Brightness/contrast/saturation strength")
    erasing: float = Field(0.0, ge=0, le=1, description="Probability of random erasing (cutout)")
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0: off)")
    jitter: float = Field(0.03, ge=0, description="Sequences: Gaussian noise, in standard deviations")
    scaling: float = Field(0.1, ge=0, description="Sequences: per-channel scale factor spread")
    time_warp: float = Field(0.0, ge=0, description="Sequences: warp strength (0: off)")
    window_slice: float = Field(1.0, gt=0, le=1, description="Sequences: fraction kept by a random slice, "
                                                             "stretched back (1: off)")


class TrainLoop(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="Global batch (split across DDP processes)")
    accumulate: int = Field(1, ge=1, description="Gradient accumulation steps")
    clip_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp16 with a grad scaler on CUDA, fp32 on CPU; bf16: autocast (CPU or CUDA)")
    early_stopping: int | None = Field(10, ge=1, description="Stop after this many epochs without improvement")
    monitor: str | None = Field(None, description="Validation metric to select on (default: accuracy or rmse)")
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)


class DistillConfig(Strict):
    """Knowledge distillation from a frozen teacher (docs/train.md, "Distillation")."""

    teacher: str = Field(description="A run folder written by edgekit train (runs/NAME), or "
                                      "package.module:factory returning an nn.Module; it must predict the same "
                                      "classes (or outputs) from the same inputs")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets (loss scaled by T²)")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the teacher's term; 1 - alpha weighs the labels")
    features: bool = Field(False, description="Also match the student's features() to the teacher's through a "
                                              "learned projection (models built by edgekit train)")


class TrainConfig(Strict):
    data: DataConfig
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainLoop = TrainLoop()
    out: Path = Field(description="Run folder (runs/NAME)")
    name: str | None = Field(None, description="Model name (default: the run folder's name)")
    nproc: int = Field(1, ge=1, description="DDP processes on this machine (torch.distributed.run)")
    evaluate: bool = Field(True, description="Evaluate on the test split at the end (report.md, PNGs)")
    robustness: bool = Field(True, description="Robustness table in the evaluation")
    distill: DistillConfig | None = Field(None, description="Distil from a teacher (default: no teacher)")

    @model_validator(mode="after")
    def _batch_fits(self) -> "TrainConfig":
        if self.train.batch_size % self.nproc:
            raise ValueError(f"train.batch_size {self.train.batch_size} must divide evenly over nproc {self.nproc}")
        return self

    @property
    def run_name(self) -> str:
        return self.name or self.out.name


def load_train(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A training file with CLI overrides (dotted paths) applied, validated."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or {})
    return parse(TrainConfig, data, str(path) if path else "training settings")
