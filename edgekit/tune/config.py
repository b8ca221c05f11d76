"""The tune file (``edgekit tune CONFIG.yaml``): a base training file, a search space, objectives, budgets.

Every key in ``search:`` is checked when the file is read, against the training file's fields
(``search.train``) or the compile settings (``search.compile``: ``prune.*``, ``distill.*``,
``quantize.*`` ...), so a typo fails before the first trial trains for minutes, with "did you mean".
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config.base import Strict, apply_overrides, parse, read_yaml
from ..errors import ConfigError

# Compile settings a trial may search or fix: a pass's settings, or an override section of the build file.
PASS_SECTIONS = ("prune", "distill")
BUILD_SECTIONS = ("quantize", "accuracy", "fidelity", "latency", "limits", "runtime", "export", "finetune")
# what every trial's training run gets unless the tune file says otherwise: no report, PNGs or robustness
# table per trial (they cost more than a tiny trial trains)
TRIAL_TRAIN_DEFAULTS: dict[str, Any] = {"evaluate": False, "robustness": False}


class Param(Strict):
    """One searched setting: exactly one of ``float``, ``log_float``, ``int`` (ranges, bounds included) or
    ``choice`` (a list of values)."""

    float_: list[float] | None = Field(None, alias="float", description="[low, high], sampled uniformly")
    log_float: list[float] | None = Field(None, description="[low, high], sampled on a log scale (low > 0)")
    int_: list[int] | None = Field(None, alias="int", description="[low, high], integers")
    choice: list[Any] | None = Field(None, description="The values to pick from")
    step: float | None = Field(None, gt=0, description="float/int: sample on this grid")

    model_config = {**Strict.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _one(self) -> "Param":
        kinds = [k for k in ("float_", "log_float", "int_", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a searched setting names one kind: {float: [lo, hi]}, {log_float: [lo, hi]}, "
                             "{int: [lo, hi]} or {choice: [a, b, ...]}")
        rng = getattr(self, kinds[0])
        if kinds[0] == "choice":
            if not rng:
                raise ValueError("choice needs at least one value")
        elif len(rng) != 2 or rng[0] > rng[1]:
            raise ValueError(f"a range is [low, high] with low <= high, not {rng}")
        if kinds[0] == "log_float" and rng[0] <= 0:
            raise ValueError(f"log_float needs low > 0 (a log scale has no 0), not {rng[0]}")
        if self.step is not None and kinds[0] == "log_float":
            raise ValueError("log_float takes no step (a log scale has no even grid)")
        return self

    @property
    def kind(self) -> str:
        return next(k.rstrip("_") for k in ("float_", "log_float", "int_", "choice") if getattr(self, k) is not None)

    def values(self) -> list[Any]:
        """The range's ends, or every choice: what the file is validated with before any trial runs."""
        return list(next(v for v in (self.choice, self.float_, self.log_float, self.int_) if v is not None))


class Search(Strict):
    train: dict[str, Param] = Field(default_factory=dict, description="Dotted training-file fields "
                                                                      "(optim.lr, train.epochs, data.image_size)")
    compile: dict[str, Param] = Field(default_factory=dict, description="prune.ratio, distill.temperature, "
                                                                        "distill.alpha, quantize.qat, ...")


class Fixed(Strict):
    train: dict[str, Any] = Field(default_factory=dict, description="Dotted training fields every trial shares")
    compile: dict[str, Any] = Field(default_factory=dict, description="Dotted compile settings every trial "
                                                                      "shares (prune.finetune_epochs: 1)")


class Objectives(Strict):
    """Two objectives: the deployed model's task metric (from the compile report) and its latency."""

    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="The task metric's direction: maximize top-1, minimize MAE")
    latency: Literal["p50", "p99"] = Field("p50", description="Which single-stream percentile is the latency")
    budgets_ms: list[float] = Field(default_factory=list, description="Latency budgets for the best-bundle table")

    @field_validator("budgets_ms")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(b <= 0 for b in v):
            raise ValueError(f"latency budgets are positive milliseconds, not {v}")
        return sorted(v)


class Pruner(Strict):
    """Stop a trial early when its validation metric at an epoch is worse than most trials' at that epoch.

    Optuna's own pruners refuse multi-objective studies (Trial.report raises NotImplementedError), so
    this rule reads the per-epoch curves that trials store as user attributes instead.
    """

    type: Literal["median", "percentile", "none"] = "median"
    percentile: float = Field(50.0, gt=0, lt=100, description="percentile: keep the trials in the top this "
                                                              "percent at each epoch (median: 50)")
    startup_trials: int = Field(4, ge=0, description="No pruning until this many complete trials reached the "
                                                     "epoch")
    warmup_epochs: int = Field(1, ge=0, description="No pruning before this many epochs finished")
    monitor: str = Field("accuracy", description="Validation metric of the training loop (val_<monitor>)")
    monitor_direction: Literal["maximize", "minimize"] = "maximize"


class Sampler(Strict):
    type: Literal["tpe", "nsga2", "random"] = Field("tpe", description="tpe: multi-objective TPE; nsga2: "
                                                                       "NSGA-II (needs many trials)")
    seed: int = Field(0, description="Seed; worker k samples with seed + k")
    startup_trials: int = Field(6, ge=1, description="tpe: random trials before the model is fitted")


class TuneConfig(Strict):
    train: Path | dict[str, Any] = Field(description="The base training file (a path, relative to this file, "
                                                     "or the file's sections inline)")
    fixed: Fixed = Fixed()
    search: Search
    objectives: Objectives = Objectives()
    pruner: Pruner = Pruner()
    sampler: Sampler = Sampler()
    study: str | None = Field(None, description="Study name (default: the tune file's name)")
    out: Path | None = Field(None, description="Study folder: trials, bundles, study.db, front (default "
                                               "tune/<study>)")
    heartbeat_s: int = Field(10, ge=1, description="Workers beat this often; a trial silent for grace_s is "
                                                   "failed and run again")
    grace_s: int = Field(60, ge=2)
    max_retry: int = Field(2, ge=0, description="How often a trial lost with its worker is run again")

    @model_validator(mode="after")
    def _grace(self) -> "TuneConfig":
        if self.grace_s < 2 * self.heartbeat_s:
            raise ValueError(f"grace_s {self.grace_s} must be at least twice heartbeat_s {self.heartbeat_s}, or "
                             f"a busy but healthy worker's trial is failed")
        if not self.search.train and not self.search.compile:
            raise ValueError("search names no setting: give search.train and/or search.compile")
        return self


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_compile_key(key: str) -> None:
    """``prune.ratio``, ``distill.alpha``, ``quantize.qat`` ...: refused with a suggestion when unknown."""
    from ..config.build import BuildConfig, DistillPass, PrunePass

    section, _, field = key.partition(".")
    if section in PASS_SECTIONS:
        model = PrunePass if section == "prune" else DistillPass
        names = [f.alias or n for n, f in model.model_fields.items()]
        if field not in names:
            raise ConfigError(f"compile setting {key!r}: {section} has no field {field!r}"
                              f"{_suggest(field, names)}; it has {', '.join(names)}")
        return
    if section not in BUILD_SECTIONS or not field:
        raise ConfigError(f"compile setting {key!r} is not a pass setting (prune.*, distill.*) or a build "
                          f"section's field ({', '.join(s + '.*' for s in BUILD_SECTIONS)})"
                          f"{_suggest(section, list(PASS_SECTIONS + BUILD_SECTIONS))}")
    sub = BuildConfig.model_fields[section].annotation
    for cand in getattr(sub, "__args__", ()) or (sub,):
        fields = getattr(cand, "model_fields", None)
        if fields is not None and field.split(".")[0] not in fields:
            raise ConfigError(f"compile setting {key!r}: {section} has no field {field!r}"
                              f"{_suggest(field, list(fields))}")


def base_train(cfg: TuneConfig, where: Path | None) -> dict[str, Any]:
    """The base training file's settings with ``fixed.train`` laid over them (not yet validated)."""
    if isinstance(cfg.train, dict):
        data = dict(cfg.train)
    else:
        path = cfg.train if cfg.train.is_absolute() or where is None else where.parent / cfg.train
        if not path.is_file():
            raise ConfigError(f"train: {path} does not exist; give the training file's path (relative to the "
                              f"tune file) or its sections inline")
        data = read_yaml(path)
    data = apply_overrides(data, TRIAL_TRAIN_DEFAULTS)
    return apply_overrides(data, cfg.fixed.train)


def validate(cfg: TuneConfig, where: Path | None) -> None:
    """Every searched value, at each end of its range, must make a valid training file and compile setting."""
    from ..config.train import TrainConfig

    base = base_train(cfg, where)
    base.setdefault("out", "tune-check")
    source = str(where) if where else "tune settings"
    parse(TrainConfig, base, f"{source} (train + fixed.train)")
    for key, p in cfg.search.train.items():
        for value in p.values():
            parse(TrainConfig, apply_overrides(base, {key: normalise(key, value)}),
                  f"{source}: search.train.{key} = {value!r}")
    for key in [*cfg.fixed.compile, *cfg.search.compile]:
        check_compile_key(key)


def normalise(key: str, value: Any) -> Any:
    """YAML 1.1 reads ``on``/``off`` as booleans; the settings that take ``on``/``off`` get the words back."""
    if key.endswith(".qat") and isinstance(value, bool):
        return "on" if value else "off"
    return value


def load_tune(path: Path | None, data: dict[str, Any] | None = None) -> TuneConfig:
    """The tune file, validated (its training file and every searched key too)."""
    raw = read_yaml(path) if path is not None else dict(data or {})
    cfg = parse(TuneConfig, raw, str(path) if path else "tune settings")
    validate(cfg, path)
    return cfg


def study_name(cfg: TuneConfig, path: Path | None) -> str:
    return cfg.study or (path.stem if path is not None else "tune")
