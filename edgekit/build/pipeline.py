"""Compile = import → export → quantize → validate → package, each step reporting what it did.

The accuracy budget is enforced here, once, for every backend: INT8 is measured
against the FP32 reference on the labelled validation set; over budget, the
backend's own fallback runs; still over, the build fails with a report and no
bundle is written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgekit_runtime
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.bench import BenchSettings, compare, system_description

from .. import __version__
from .backends.registry import get_backend, load_compiler
from .bundle_writer import write_bundle
from ..config import BuildConfig, TargetProfile, resolve_profile
from ..data.sources import Dataset, load_data
from ..errors import AccuracyBudgetError, CalibrationError, ConfigError
from ..models.importer import import_model
from ..config.targets import load_target
from .backends.base import Artifact, Signature, SourceModel, make_engine, predict_logits, top1_accuracy

log = logging.getLogger(__name__)

Step = Callable[[str], None]


@dataclass
class CompileResult:
    bundle: Path
    report_path: Path
    report: dict[str, Any] = field(repr=False)


class _EngineModel:
    """Just enough of ``edgekit_runtime.Model`` for the benchmark loop."""

    def __init__(self, engine, manifest: dict):
        self.engine = engine
        self.inputs = engine.inputs
        self.manifest = manifest

    def describe(self) -> dict:
        return self.engine.describe()


def _signature(onnx_path: Path) -> Signature:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if len(ins) != 1 or len(m.graph.output) < 1:
        raise ConfigError(f"{onnx_path.name}: edgekit compiles models with one input (found {len(ins)})")

    def dims(vi) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch")
                for d in vi.type.tensor_type.shape.dim]

    return Signature(ins[0].name, m.graph.output[0].name, dims(ins[0]), dims(m.graph.output[0]))


def input_statistics(x: np.ndarray, bins: int = 32) -> dict[str, Any]:
    """Reference distribution of one input over the calibration set (for drift monitoring)."""
    flat = x.astype(np.float64).ravel()
    lo, hi = float(flat.min()), float(flat.max())
    counts, edges = np.histogram(flat, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    per_sample_mean = x.reshape(len(x), -1).mean(axis=1)
    return {
        "count": int(len(x)),
        "mean": float(flat.mean()), "std": float(flat.std()), "min": lo, "max": hi,
        "percentiles": {str(p): float(v) for p, v in zip((1, 5, 50, 95, 99), np.percentile(flat, [1, 5, 50, 95, 99]))},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "sample_mean": {"mean": float(per_sample_mean.mean()), "std": float(per_sample_mean.std())},
    }


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _labels(cfg: BuildConfig) -> list[str] | None:
    if cfg.model.labels:
        return list(cfg.model.labels)
    if cfg.model.labels_file:
        try:
            return [line for line in Path(cfg.model.labels_file).read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"labels_file {cfg.model.labels_file} does not exist") from None
    return None


def _latency(engines: dict[str, Any], samples: list[dict], queries: int = 100) -> dict[str, Any]:
    """Single-stream latency of each engine, interleaved (one run, so the ratios are fair)."""
    s = BenchSettings(warmup=10, min_queries=queries, min_duration_s=0.5, max_duration_s=20, offline_batch=None)
    stub = {"input_stats": {}}
    res = compare({name: _EngineModel(eng, stub) for name, eng in engines.items()}, samples, s)
    return {name: {k: r["single_stream"]["inference"][k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "count")}
            for name, r in res["models"].items()}


def _evaluation_engine(profile: TargetProfile, backend) -> str:
    """The first engine of the profile's order that runs on this host (TensorRT usually does not)."""
    from edgekit_runtime.engines import engine_class

    reasons = []
    for name in profile.engines:
        reason = engine_class(name).unavailable_reason()
        if reason is None:
            if name != backend.engine:
                log.warning("measuring %s artifacts with %s: %s", backend.engine, name, "; ".join(reasons))
            return name
        reasons.append(f"{name}: {reason}")
    raise ConfigError(f"no engine of target {profile.name} runs on this host to validate the build: "
                      + "; ".join(reasons))


def compile_model(cfg: BuildConfig, key: Ed25519PrivateKey, on_step: Step | None = None) -> CompileResult:
    """Run the whole pipeline for one build config; returns the signed bundle's path."""
    step = on_step or (lambda name: log.info("%s", name))
    t_start = time.perf_counter()
    profile: TargetProfile = resolve_profile(load_target(cfg.target), cfg)
    backend = get_backend(profile.backend)
    compiler = load_compiler(profile.backend)
    q = profile.quantize
    budget = profile.accuracy.max_accuracy_drop
    workdir = cfg.workdir or cfg.output.parent / f"{cfg.output.stem}.work"
    workdir.mkdir(parents=True, exist_ok=True)
    labels = _labels(cfg)
    pre = cfg.preprocess.model_dump() if cfg.preprocess else None
    report: dict[str, Any] = {"target": profile.name, "backend": backend.name,
                              "backend_version": compiler.library_version(), "steps": {}}

    # -- data -------------------------------------------------------------------------------
    step("load data")
    calib: Dataset | None = load_data(cfg.calibration, pre, labels) if cfg.calibration else None
    if calib is not None and len(calib) > q.calibration_count:
        # hash and statistics describe exactly the samples the quantizer sees
        calib = Dataset(calib.x[: q.calibration_count], None, calib.source)
    val: Dataset | None = load_data(cfg.validation, pre, labels) if cfg.validation else None
    if q.enabled and calib is None:
        raise ConfigError("INT8 needs calibration data: add a 'calibration' section (or set quantize.enabled: false)")
    if val is not None and val.y is None:
        raise CalibrationError(f"validation source {val.source!r} has no labels (use class sub-folders or x/y arrays)")
    if q.enabled and budget is not None and val is None:
        raise ConfigError(
            "an accuracy budget needs a labelled 'validation' set; add one, or set "
            "accuracy.max_accuracy_drop: null to ship without the check"
        )
    if val is not None and calib is not None and val.sha256() == calib.sha256():
        raise ConfigError("validation and calibration data are identical; validate on held-out data")
    probe = (val or calib).x[:8] if (val or calib) else np.random.default_rng(0).normal(
        size=[8, *cfg.model.input_shape[1:]]).astype(np.float32)

    # -- import / export --------------------------------------------------------------------
    step("export to ONNX")
    export = import_model(cfg.model, workdir, probe, cfg.export_atol)
    report["steps"]["export"] = export.as_dict()
    sig = _signature(export.onnx_path)
    if compiler.needs_torch and export.torch_model is None:
        raise ConfigError(
            f"target {profile.name} converts from PyTorch ({backend.name}); give a torch model "
            f"(module:factory or .pt2) instead of an ONNX file"
        )
    src = SourceModel(export.onnx_path, export.torch_model, list(cfg.model.input_shape))
    eval_engine = _evaluation_engine(profile, backend)

    def evaluate(art: Artifact, options: dict[str, Any]) -> float:
        art_sig = compiler.signature(art, sig)
        eng = make_engine(art, eval_engine, art_sig, options)
        return top1_accuracy(predict_logits(eng, art_sig, val.x), val.y)

    deploy_opts = compiler.deploy_options(profile.runtime, sig)
    fp32 = compiler.fp32(src, workdir)
    accuracy: dict[str, Any] = {"metric": "top1_percent", "dataset": val.source if val else None,
                                "count": len(val) if val else 0}
    if val is not None:
        step("measure FP32 reference")
        ref_opts = compiler.reference_options(profile.runtime)
        accuracy["fp32"] = evaluate(fp32, ref_opts)
        accuracy["fp32_measured_with"] = {"engine": eval_engine, **ref_opts}

    # -- quantize ---------------------------------------------------------------------------
    chosen = fp32
    attempts: list[dict[str, Any]] = []
    if q.enabled:
        step("quantize INT8")
        chosen = compiler.quantize(src, calib.x, q, workdir)
        if val is not None:
            acc = evaluate(chosen, deploy_opts)
            attempts.append({"strategy": "ptq", **chosen.details, "accuracy": acc,
                             "drop_pts": accuracy["fp32"] - acc})
            if budget is not None and accuracy["fp32"] - acc > budget:
                step("accuracy fallback")
                recovered, more = compiler.recover(
                    src, calib.x, val.x, val.y, q, workdir, budget,
                    lambda art: evaluate(art, deploy_opts), accuracy["fp32"])
                attempts += more
                recovered_acc = evaluate(recovered, deploy_opts)
                if recovered_acc > acc:
                    chosen, acc = recovered, recovered_acc
                if accuracy["fp32"] - acc > budget:
                    report["accuracy"] = {**accuracy, "int8_best": acc, "budget_pts": budget, "attempts": attempts}
                    report["result"] = "failed: accuracy budget"
                    path = _write_report(cfg, report)
                    raise AccuracyBudgetError(
                        f"INT8 loses {accuracy['fp32'] - acc:.2f} pt of top-1 on {val.source} "
                        f"(budget {budget} pt) after {len(attempts)} attempt(s); no bundle written. "
                        f"Report: {path}. Options: more or better calibration data, quantize.preset: mixed, "
                        f"a larger quantize.max_excluded_nodes, or a looser accuracy.max_accuracy_drop",
                        report,
                    )
            accuracy["int8"] = acc
            accuracy["drop_pts"] = accuracy["fp32"] - acc
            accuracy["int8_measured_with"] = {"engine": eval_engine, **deploy_opts}
    elif val is not None:
        accuracy["deployed"] = evaluate(chosen, deploy_opts)
    accuracy["budget_pts"] = budget if q.enabled else None
    accuracy["attempts"] = attempts
    report["accuracy"] = accuracy

    # -- validate: latency, health sample, statistics ---------------------------------------
    step("measure latency")
    samples_src = (val or calib).x if (val or calib) else probe
    samples = [{sig.input_name: samples_src[i : i + 1]} for i in range(min(32, len(samples_src)))]
    latency = {"measured_on": system_description(), "engine": eval_engine, "batch": 1,
               "threads": profile.runtime.threads or f"engine default ({os.cpu_count()} cores)",
               "interleaved": q.enabled}
    chosen_sig = compiler.signature(chosen, sig)
    eng = make_engine(chosen, eval_engine, chosen_sig, {**deploy_opts, "spin_wait": False})
    engines = {chosen.precision: eng}
    if q.enabled:
        engines["fp32"] = make_engine(fp32, eval_engine, compiler.signature(fp32, sig),
                                      {**compiler.reference_options(profile.runtime), "spin_wait": False})
    latency.update(_latency(engines, samples))
    report["latency_ms"] = latency

    sample_x = samples_src[:1]
    expected = eng.run({sig.input_name: sample_x})[sig.output_name]
    if eval_engine not in (backend.engine,):
        report["note"] = (f"{backend.engine} is not available on this host: accuracy, latency and the health-check "
                          f"reference were measured with {eval_engine}")
    scale = float(np.max(np.abs(expected))) or 1.0
    tol = (0.05 * scale, 0.05) if chosen.precision == "int8" else (1e-3 * scale + 1e-5, 1e-3)

    # -- package ----------------------------------------------------------------------------
    step("write signed bundle")
    members = {f: (chosen.directory / f).read_bytes() for f in chosen.files}
    members["health/input.npy"] = _npy(sample_x)
    members["health/expected_output.npy"] = _npy(expected)
    if labels:
        members["labels.txt"] = ("\n".join(labels) + "\n").encode()
    ins, outs = chosen_sig.manifest_tensors()
    manifest = {
        "format": bundle_spec.FORMAT_NAME,
        "format_version": bundle_spec.FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"edgekit {__version__} (python {platform.python_version()})",
        "model": {"name": cfg.model.name, "version": cfg.model.version,
                  "release": cfg.model.release if cfg.model.release is not None else int(time.time())},
        "target": {"name": profile.name, "device": profile.device.family,
                   "latency_budget_ms": profile.limits.latency_budget_ms},
        "backend": {"name": backend.name, "version": compiler.library_version(), "precision": chosen.precision,
                    "artifact": chosen.main, "engines": list(profile.engines), "options": deploy_opts,
                    "quantization": chosen.details or None},
        "inputs": ins,
        "outputs": outs,
        "preprocess": pre,
        "postprocess": cfg.postprocess.model_dump() if cfg.postprocess.type != "none" else None,
        "labels": "labels.txt" if labels else None,
        "metrics": {"accuracy": {k: v for k, v in accuracy.items() if k != "attempts"},
                    "latency_ms": {k: v for k, v in latency.items() if k != "measured_on"},
                    "latency_measured_on": latency["measured_on"]["cpu"],
                    "size_bytes": {"fp32": fp32.size_bytes(), chosen.precision: chosen.size_bytes()}},
        "calibration": {"sha256": calib.sha256(), "count": len(calib),
                        "source": calib.source} if calib is not None and q.enabled else None,
        "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                         "atol": tol[0], "rtol": tol[1]},
        "input_stats": {sig.input_name: input_statistics(calib.x if calib is not None else samples_src)},
    }
    write_bundle(cfg.output, manifest, members, key)

    # Read it back the way a device does: verify, load, health-check.
    step("verify bundle")
    from edgekit_runtime.keyring import Keyring, key_id_of

    ring = Keyring({key_id_of(key.public_key()): key.public_key()})
    with edgekit_runtime.load(cfg.output, keyring=ring) as model:
        health = model.health_check()
    if not health["ok"]:
        raise ConfigError(f"the written bundle fails its own health check: {health}")
    report.update({
        "result": "ok",
        "bundle": str(cfg.output),
        "bundle_bytes": cfg.output.stat().st_size,
        "sizes": manifest["metrics"]["size_bytes"],
        "precision": chosen.precision,
        "health_check": health,
        "manifest": {k: manifest[k] for k in ("model", "target", "backend", "calibration")},
        "seconds": time.perf_counter() - t_start,
    })
    report_path = _write_report(cfg, report)
    return CompileResult(cfg.output, report_path, report)


def _write_report(cfg: BuildConfig, report: dict) -> Path:
    path = cfg.output.with_suffix(".report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
