"""The build as a short list of typed stages over one build state; the bundle appears only if all pass.

data → import → optimize → export → quantize → evaluate → package. Each stage has its own config
section, reports what it did and what it cost, and may be refused only by a gate
(:mod:`edgekit.build.gates`). The bundle is written under a temporary name and renamed
to the output only after every gate and the bundle's own health check passed; a failed
build leaves no bundle and removes the work folder it made (``keep_work`` keeps it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit_runtime.contract.errors import RuntimeErrorBase

from ..config import BuildConfig, deep_update, resolve_profile
from ..config.targets import load_target
from ..errors import ConfigError, EdgekitError
from .backends.registry import get_backend, load_compiler
from .gates import METRICS
from .stages.data import DataStage
from .stages.evaluate import EvaluateStage
from .stages.export import ExportStage
from .stages.import_model import ImportStage
from .stages.optimize import OptimizeStage
from .stages.package import PackageStage
from .stages.quantize import QuantizeStage
from .state import BuildState, Progress, Stage

log = logging.getLogger(__name__)

# Adding a stage: one module in stages/, its config section, and one entry here.
STAGES: tuple[Stage, ...] = (DataStage(), ImportStage(), OptimizeStage(), ExportStage(), QuantizeStage(),
                             EvaluateStage(), PackageStage())


@dataclass
class CompileResult:
    bundle: Path
    report_path: Path
    report: dict[str, Any] = field(repr=False)


def compile_model(cfg: BuildConfig, key: Ed25519PrivateKey, on_step: Progress | None = None) -> CompileResult:
    """Run every stage for one build config; returns the signed bundle's path and the report."""
    progress = on_step or (lambda name: log.info("%s", name))
    t_start = time.perf_counter()
    profile = resolve_profile(load_target(cfg.target), cfg)
    backend = get_backend(profile.backend)
    compiler = load_compiler(profile.backend)
    workdir = cfg.workdir or cfg.output.parent / f"{cfg.output.stem}.work"
    if cfg.output.resolve().is_relative_to(workdir.resolve()):
        raise ConfigError(f"output {cfg.output} lies inside the work folder {workdir}, which the build removes; "
                          f"write the bundle elsewhere or choose another workdir")
    made_workdir = not workdir.exists()  # never delete a folder the user had before the build
    metric = profile.accuracy
    report: dict[str, Any] = {
        "target": profile.name, "backend": backend.name, "backend_version": compiler.library_version(),
        "steps": {}, "stages": [],
        "accuracy": {"metric": f"{metric.metric}_percent" if metric.metric == "top1" else metric.metric,
                     "direction": METRICS[metric.metric][1], "dataset": None, "count": 0,
                     "checked": False, "budget_pts": metric.max_accuracy_drop if profile.quantize.enabled else None},
    }
    state = BuildState(cfg, profile, backend, compiler, workdir, key, progress, report)
    stage, t0 = None, t_start
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            progress(stage.name)
            t0 = time.perf_counter()
            summary = stage.run(state)
            report["stages"].append({"name": stage.name, "seconds": round(time.perf_counter() - t0, 3), **summary})
            _after(stage.name, state)
        os.replace(state.bundle_tmp, cfg.output)  # the only write to -o: after every stage passed
    except (EdgekitError, RuntimeErrorBase) as exc:  # ours, or the runtime's (reading back the bundle)
        if getattr(exc, "report", None) is not None and exc.report is not report:
            report.update(deep_update(report, exc.report))  # what the refusing gate measured, beside the rest
            exc.report = report
        report.setdefault("result", f"failed: {type(exc).__name__}")
        report["error"] = str(exc)
        if stage is not None:  # where it stopped and what that stage cost before it did (a gate's recovery can be long)
            report["stages"].append({"name": stage.name, "seconds": round(time.perf_counter() - t0, 3),
                                     "failed": type(exc).__name__})
        report["seconds"] = time.perf_counter() - t_start
        log.info("build failed; report at %s", write_report(cfg, report))
        raise
    finally:
        if state.bundle_tmp is not None and state.bundle_tmp.exists():
            state.bundle_tmp.unlink()
        if made_workdir and not cfg.keep_work:
            shutil.rmtree(workdir, ignore_errors=True)
    chosen = state.chosen
    report.update({
        "result": "ok",
        "bundle": str(cfg.output),
        "bundle_bytes": cfg.output.stat().st_size,
        "sizes": state.manifest["metrics"]["size_bytes"],
        "precision": chosen.precision,
        "manifest": {k: state.manifest[k] for k in ("model", "target", "backend", "calibration")},
        "seconds": time.perf_counter() - t_start,
    })
    if not report["accuracy"]["checked"]:
        why = ("the build has no labelled validation data" if state.val is None else
               "FP32 ships (quantize.enabled: false)" if not state.quantize else "accuracy.max_accuracy_drop is null")
        report["accuracy_not_checked"] = f"accuracy not checked: {why}"
    return CompileResult(cfg.output, write_report(cfg, report), report)


def _after(stage: str, state: BuildState) -> None:
    """Report fields kept from 0.1 reports (their readers): dataset figures after the stage that has them."""
    acc = state.report["accuracy"]
    if stage == "data" and state.val is not None:
        acc.update(dataset=state.val.source, count=len(state.val))
    if stage == "export" and "accuracy" in state.reference:
        acc["fp32"] = state.reference["accuracy"]
        acc["fp32_measured_with"] = {"engine": state.measurer.engine, **state.measurer.reference_options}
        acc["checked"] = state.profile.accuracy.max_accuracy_drop is not None and state.quantize


def write_report(cfg: BuildConfig, report: dict) -> Path:
    """``<output>.report.json``: written for failed builds too, so the attempts can be read."""
    path = cfg.output.with_suffix(".report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
