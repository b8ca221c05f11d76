"""One black-box suite for every registered target (as ExecuTorch's backends/test/suite).

For each profile in ``targets/``: compile the digits CNN, write the signed bundle,
load it with the device runtime, compare with the FP32 torch reference within the
target's budget, check the manifest, benchmark a few queries, and refuse a
tampered copy. Adding a target (one compiler module, one engine module, one YAML)
adds its cases here automatically. A target whose engines cannot run on this host
is skipped with the reason; where only the primary engine is missing (TensorRT
without a GPU), the bundle still runs through its declared fallback, and the
primary-engine case is skipped with that engine's own reason.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit.build.backends.registry import get_backend
from edgekit.config.targets import available_targets, load_target
from edgekit_runtime.bench import BenchSettings, run_benchmark
from edgekit_runtime.engines import engine_class

from .conftest import marker_name

REPO = Path(__file__).resolve().parents[2]
TARGETS = sorted(available_targets())


def _param(name: str):
    return pytest.param(name, marks=getattr(pytest.mark, marker_name(name)), id=name)


PARAMS = [_param(t) for t in TARGETS]


def _first_available(profile) -> tuple[str | None, list[str]]:
    reasons = []
    for name in profile.engines:
        reason = engine_class(name).unavailable_reason()
        if reason is None:
            return name, reasons
        reasons.append(f"{name}: {reason}")
    return None, reasons


@pytest.fixture(scope="session")
def reference(digits_checkpoint):
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build

    model = build(width=16)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    x, y = digits.validation()
    with torch.no_grad():
        return x, y, model.eval()(torch.from_numpy(x)).numpy()


_BUILT: dict[str, object] = {}


@pytest.fixture()
def built(request, target, digits_checkpoint, signing_key, tmp_path_factory):
    """target → CompileResult, compiled once per session (skipped with the reason where it cannot run)."""
    profile = load_target(target)
    engine, reasons = _first_available(profile)
    if engine is None:
        pytest.skip(f"no engine of {target} runs here: {'; '.join(reasons)}")
    if target not in _BUILT:
        from edgekit.build.pipeline import compile_model
        from edgekit.config import load_build

        out = tmp_path_factory.mktemp("conformance") / f"{target}.ekb"
        cfg = load_build(REPO / "examples" / "digits.yaml", {
            "target": target, "model.checkpoint": digits_checkpoint, "model.kwargs": {"width": 16},
            "output": out, "calibration.source": str(REPO / "calibration/digits/calib.npz")})
        _BUILT[target] = compile_model(cfg, signing_key)
    return _BUILT[target]


@pytest.mark.parametrize("target", PARAMS)
def test_bundle_runs_close_to_the_fp32_reference(target, built, reference, keys):
    x, y, ref = reference
    profile = load_target(target)
    with edgekit_runtime.load(built.bundle, keyring=keys["public"]) as model:
        out = model.run(x)[model.outputs[0].name]
        health = model.health_check()
        engine = model.engine.name
    assert engine in profile.engines
    assert health["ok"], health
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= 0.97, f"{target}: top-1 agrees with FP32 torch on {agreement:.1%}"
    fp32_acc = float((ref.argmax(1) == y).mean() * 100)
    acc = float((out.argmax(1) == y).mean() * 100)
    assert fp32_acc - acc <= profile.accuracy.max_accuracy_drop + 0.3  # budget, plus torch-vs-backend FP32 noise


@pytest.mark.parametrize("target", PARAMS)
def test_manifest_is_complete_and_consistent(target, built, keys):
    profile = load_target(target)
    vb = edgekit_runtime.open_bundle(built.bundle, edgekit_runtime.Keyring.from_paths(keys["public"]))
    m = vb.manifest
    assert m.format_version == edgekit_runtime.contract.bundle_spec.FORMAT_VERSION
    assert m.target.name == target and m.target.device == profile.device.family
    assert m.backend.name == profile.backend and m.backend.engines == profile.engines
    assert m.backend.precision == "int8" and m.backend.artifact in m.files
    # 300 committed samples: the quantizer sees 240, the last 60 are held back for the fidelity gate
    assert m.calibration.count == 240 and len(m.calibration.sha256) == 64
    fid = m.metrics.fidelity
    assert fid.samples == 60 and fid.cosine >= profile.fidelity.min_cosine
    acc = m.metrics.accuracy
    assert acc.fp32 - acc.int8 <= profile.accuracy.max_accuracy_drop == acc.budget_pts
    assert m.input_stats[m.inputs[0].name].count == 240
    for name, entry in m.files.items():
        assert hashlib.sha256(vb.members[name]).hexdigest() == entry.sha256
    for t in m.inputs + m.outputs:
        q = t.quantization
        if q is not None:  # quantized I/O says how to (de)quantize (the types require scale, zero point, dtype)
            assert q.scale > 0 and q.dtype in ("int8", "uint8", "int16")


@pytest.mark.parametrize("target", PARAMS)
def test_benchmark_a_few_queries(target, built, keys):
    with edgekit_runtime.load(built.bundle, keyring=keys["public"]) as model:
        r = run_benchmark(model, settings=BenchSettings(warmup=2, min_queries=20, min_duration_s=0.0,
                                                        offline_batch=None))
    inf = r["single_stream"]["inference"]
    assert inf["count"] >= 20 and 0 < inf["p50_ms"] <= inf["p99_ms"]
    assert r["system"]["model"]["target"] == target


@pytest.mark.parametrize("target", PARAMS)
def test_tampered_copy_is_refused(target, built, keys, tmp_path):
    bad = tmp_path / "tampered.ekb"
    with zipfile.ZipFile(built.bundle) as zin, zipfile.ZipFile(bad, "w") as zout:
        artifact = edgekit_runtime.read_manifest_unverified(built.bundle)["backend"]["artifact"]
        for info in zin.infolist():
            data = bytearray(zin.read(info))
            if info.filename == artifact:
                data[len(data) // 2] ^= 0xFF
            zout.writestr(info, bytes(data))
    with pytest.raises(edgekit_runtime.BundleError) as e:
        edgekit_runtime.load(bad, keyring=keys["public"])
    assert e.value.code == edgekit_runtime.ErrorCode.BUNDLE_TAMPERED


@pytest.mark.parametrize("target", PARAMS)
def test_primary_engine(target, built, keys):
    """The profile's first engine runs the bundle where it exists; elsewhere, skipped with its reason."""
    profile = load_target(target)
    primary = profile.engines[0]
    assert primary == get_backend(profile.backend).engine
    reason = engine_class(primary).unavailable_reason()
    if reason:
        # the fallback is never silent: the runtime records what it skipped and why
        with edgekit_runtime.load(built.bundle, keyring=keys["public"]) as model:
            assert model.engine.fallback_from and model.engine.fallback_from[0].startswith(primary)
        pytest.skip(f"{primary} unavailable here: {reason}")
    with edgekit_runtime.load(built.bundle, keyring=keys["public"], engine=primary) as model:
        out = model.run(np.zeros([1, *model.inputs[0].shape[1:]], np.float32))
    assert np.isfinite(next(iter(out.values()))).all()
