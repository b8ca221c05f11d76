"""Package stage: health sample, manifest, signed bundle under a temporary name, read back as a device would."""

from __future__ import annotations

import io
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edgekit_runtime
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract import manifest as mf
from edgekit_runtime.keyring import Keyring, key_id_of

from ... import __version__
from ...errors import VerificationError
from ..backends.base import feeds
from ..bundle_writer import write_bundle
from ..state import BuildState


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


def optimize_record(report: dict[str, Any]) -> dict[str, Any] | None:
    """``metrics.optimize``: each compression pass with its before/after figures, from the optimize stage."""
    stage = next((s for s in report["stages"] if s["name"] == "optimize"), None)
    if stage is None or not stage.get("passes"):
        return None
    keys = ("params", "macs", "metric", "fp32_p50_ms", "int8_p50_ms")
    passes = [{"kind": p["pass"], "settings": p["settings"], "metric": p["before"].get("metric_name"),
               **{f"{k}_{side}": p[side].get(k) for k in keys for side in ("before", "after")}}
              for p in stage["passes"]]
    return {"passes": passes, "macs_reduction": stage["macs_reduction"],
            "params_reduction": stage["params_reduction"]}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def temporary_bundle_path(output: Path) -> Path:
    """Where the bundle is written until the build has passed everything (same folder: rename is atomic)."""
    return output.parent / f".{output.stem}.{os.getpid()}.partial{output.suffix or bundle_spec.BUNDLE_SUFFIX}"


class PackageStage:
    name = "package"

    def run(self, state: BuildState) -> dict[str, Any]:
        cfg, profile, chosen, m = state.cfg, state.profile, state.chosen, state.measurer
        sig = state.sig
        x = (state.val or state.calib).x if (state.val or state.calib) else state.probe
        sample_x = x[:1]
        expected = m.make(chosen, reference=False).run(feeds(sig, sample_x))[sig.output_name]
        scale = float(np.max(np.abs(expected))) or 1.0
        tol = (0.05 * scale, 0.05) if chosen.precision == "int8" else (1e-3 * scale + 1e-5, 1e-3)
        members = {f: (chosen.directory / f).read_bytes() for f in chosen.files}
        members["health/input.npy"] = _npy(sample_x)
        members["health/expected_output.npy"] = _npy(expected)
        if state.labels:
            members["labels.txt"] = ("\n".join(state.labels) + "\n").encode()
        chosen_sig = state.compiler.signature(chosen, sig)
        ins, outs = chosen_sig.manifest_tensors()
        if state.preprocess and len(ins[0]["shape"]) == 4:
            ins[0]["layout"] = state.preprocess["layout"]  # what the device's preprocessing produces
        calib = state.calib
        latency = state.latency
        metrics = {
            "accuracy": {k: v for k, v in state.report["accuracy"].items() if k != "attempts"},
            "fidelity": state.report.get("fidelity"),
            "latency_ms": {k: v for k, v in latency.items() if k != "measured_on"},
            "latency_measured_on": latency["measured_on"]["cpu"],
            "size_bytes": {"fp32": state.fp32.size_bytes(), chosen.precision: chosen.size_bytes()},
            "gates": [g.to_dict() for g in state.gates],
            "stages": [{"name": s["name"], "seconds": s["seconds"]} for s in state.report["stages"]],
            "optimize": optimize_record(state.report),
        }
        # One typed manifest, the same classes the device parses into; sections that arrive as
        # JSON-like data (the build report, backend details, statistics) go through their parser.
        manifest = mf.Manifest(
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            created_by=f"edgekit {__version__} (python {platform.python_version()})",
            model=mf.ModelInfo(name=cfg.model.name, version=cfg.model.version,
                               release=cfg.model.release if cfg.model.release is not None else int(time.time())),
            target=mf.TargetInfo(name=profile.name, device=profile.device.family,
                                 latency_budget_ms=profile.limits.latency_budget_ms),
            backend=mf.BackendInfo(
                name=state.backend.name, version=state.compiler.library_version(), precision=chosen.precision,
                artifact=chosen.main, engines=list(profile.engines),
                options=mf.BackendOptions.from_dict(m.deploy_options),
                quantization=mf.QuantizationDetails.from_dict(chosen.details) if chosen.details else None),
            inputs=[mf.TensorSpec.from_dict(t, f"manifest.inputs[{i}]") for i, t in enumerate(ins)],
            outputs=[mf.TensorSpec.from_dict(t, f"manifest.outputs[{i}]") for i, t in enumerate(outs)],
            preprocess=mf.Preprocess(**state.preprocess) if state.preprocess else None,
            postprocess=mf.Postprocess(**cfg.postprocess.model_dump()) if cfg.postprocess.type != "none" else None,
            labels="labels.txt" if state.labels else None,
            metrics=mf.BuildMetrics.from_dict(metrics),
            calibration=mf.CalibrationInfo(sha256=calib.sha256(), count=len(calib), source=calib.source)
            if calib is not None and chosen is not state.fp32 else None,
            health_check=mf.HealthCheck(input="health/input.npy", expected_output="health/expected_output.npy",
                                        atol=tol[0], rtol=tol[1]),
            # keyed by the deployed tensor's name (a TFLite artifact may rename the source's input)
            input_stats={name: mf.InputStats.from_dict(input_statistics(values)) for name, values in zip(
                chosen_sig.input_names, feeds(sig, calib.x if calib is not None else x).values())},
        )
        tmp = temporary_bundle_path(cfg.output)
        state.bundle_tmp = tmp
        state.manifest = manifest.to_dict()
        write_bundle(tmp, manifest, members, state.key)
        # Read it back the way a device does: verify, load, health-check.
        ring = Keyring({key_id_of(state.key.public_key()): state.key.public_key()})
        with edgekit_runtime.load(tmp, keyring=ring) as model:
            health = model.health_check()
        state.report["health_check"] = health
        if not health["ok"]:
            raise VerificationError(
                f"the written bundle fails its own health check ({health}); no bundle written. This is a bug in "
                f"edgekit or the backend: keep the work folder with --keep-work and report it")
        return {"bundle_bytes": tmp.stat().st_size, "precision": chosen.precision, "health_check": "ok"}
