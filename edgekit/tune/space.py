"""The search space as Optuna suggestions, and one trial's sample as training overrides and compile passes.

Training keys keep their dotted names as Optuna parameter names (``optim.lr``); compile keys are
prefixed ``compile.`` (``compile.prune.ratio``), since ``distill`` names a section on both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .config import PASS_SECTIONS, Param, TuneConfig, normalise

COMPILE_PREFIX = "compile."
# a sampled prune ratio below this means "no pruning" (a prune pass needs a ratio > 0)
NO_PRUNE_BELOW = 0.01


@dataclass
class TrialSettings:
    """What one trial trains and compiles with: the sampled values laid over the tune file's fixed ones."""

    params: dict[str, Any]  # as Optuna names them, the values as sampled
    train: dict[str, Any] = field(default_factory=dict)  # dotted training overrides
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)  # load_build(passes=...)
    build: dict[str, Any] = field(default_factory=dict)  # dotted build overrides (quantize.qat, accuracy.*)


def _scalar(values: list[Any]) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def suggest(trial: Any, name: str, p: Param) -> Any:
    """One value from ``trial`` (an Optuna trial): lists in a choice travel as JSON text (Optuna keeps scalars)."""
    kind = p.kind
    if kind == "choice":
        choices = list(p.choice or [])
        if _scalar(choices):
            return trial.suggest_categorical(name, choices)
        return json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in choices]))
    lo, hi = p.values()
    if kind == "int":
        return trial.suggest_int(name, int(lo), int(hi), step=int(p.step or 1))
    return trial.suggest_float(name, float(lo), float(hi), log=kind == "log_float", step=p.step)


def sample(trial: Any, cfg: TuneConfig) -> TrialSettings:
    """The trial's settings: fixed settings first, sampled ones over them."""
    out = TrialSettings(params={})
    for key, p in cfg.search.train.items():
        value = normalise(key, suggest(trial, key, p))
        out.params[key] = value
        out.train[key] = value
    compile_values: dict[str, Any] = dict(cfg.fixed.compile)
    for key, p in cfg.search.compile.items():
        value = normalise(key, suggest(trial, COMPILE_PREFIX + key, p))
        out.params[COMPILE_PREFIX + key] = value
        compile_values[key] = value
    split_compile(compile_values, out)
    return out


def split_compile(values: dict[str, Any], out: TrialSettings) -> None:
    """Pass settings to ``out.passes`` (prune dropped at a ratio of ~0), the rest to ``out.build``."""
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section in PASS_SECTIONS:
            out.passes.setdefault(section, {})[name] = normalise(key, value)
        else:
            out.build[key] = normalise(key, value)
    prune = out.passes.get("prune")
    if prune is not None and float(prune.get("ratio", 0.5)) < NO_PRUNE_BELOW:
        del out.passes["prune"]
    if "distill" in out.passes:
        out.passes["distill"].setdefault("teacher", "self")
