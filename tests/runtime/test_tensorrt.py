"""TensorRT support on the device that can be checked without a GPU: cache keys, plan cache,
JetPack detection, and the ONNX Runtime provider fallback. Building and running a real
engine needs TensorRT and a CUDA GPU; that case is skipped here with the reason."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.engines.tensorrt_engine import (
    EngineCache, TensorRTEngine, build_settings, cache_key, parse_tegra_release,
)
from edgekit_runtime.contract.manifest import BackendOptions, TensorSpec
from edgekit_runtime.engines.base import EngineOptions

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
KEY = GOLDEN / "golden.pub"
DEVICE = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "l4t": "R36.4.0", "jetpack": "6.2"}


def test_tegra_release_parsing():
    text = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025"
    assert parse_tegra_release(text) == "R36.4.3"
    assert parse_tegra_release("garbage") is None


def test_cache_key_changes_with_everything_an_engine_depends_on():
    settings = {"precision": ["int8", "fp16"], "workspace_mb": 1024, "dla_core": None, "gpu_fallback": True,
                "shapes": {"x": {"min": [1, 3], "opt": [1, 3], "max": [8, 3]}}}
    base = cache_key(DEVICE, "a" * 64, settings)
    assert base == cache_key(dict(DEVICE), "a" * 64, json.loads(json.dumps(settings)))  # stable
    variants = [
        cache_key({**DEVICE, "tensorrt": "10.7.0"}, "a" * 64, settings),   # TensorRT upgrade
        cache_key({**DEVICE, "l4t": "R36.5.0"}, "a" * 64, settings),       # JetPack upgrade
        cache_key({**DEVICE, "gpu": "Xavier", "compute_capability": "7.2"}, "a" * 64, settings),
        cache_key(DEVICE, "b" * 64, settings),                             # new model
        cache_key(DEVICE, "a" * 64, {**settings, "dla_core": 0}),          # build for DLA
    ]
    assert len({base, *variants}) == 6


def test_engine_cache_store_load_and_corruption(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    assert cache.load("k1") is None
    cache.store("k1", b"PLAN" * 100, {"device": DEVICE})
    assert cache.load("k1") == b"PLAN" * 100
    meta = json.loads((tmp_path / "engines" / "k1.json").read_text())
    assert meta["device"] == DEVICE and len(meta["plan_sha256"]) == 64
    (tmp_path / "engines" / "k1.plan").write_bytes(b"half a plan")  # e.g. a disk error
    assert cache.load("k1") is None  # corrupt → rebuild instead of crashing TensorRT
    assert not list((tmp_path / "engines").glob(".*"))  # no temp files left


def test_engine_cache_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_ENGINE_CACHE", str(tmp_path / "c"))
    assert EngineCache().directory == tmp_path / "c"


def test_build_settings_default_to_the_model_shape():
    inputs = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, 8, 8])]
    s = build_settings(EngineOptions(), inputs)
    assert s["precision"] == ["int8", "fp16"] and s["dla_core"] is None
    assert s["shapes"] == {"x": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}}
    # options as a bundle carries them: parsed by the manifest's types, then handed to the engine
    options = BackendOptions.from_dict({"tensorrt": {"dla_core": 1, "workspace_mb": 256,
                                                     "shapes": {"x": {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8],
                                                                      "max": [4, 3, 8, 8]}}}})
    custom = build_settings(EngineOptions.from_backend(options), inputs)
    assert custom["dla_core"] == 1 and custom["workspace_mb"] == 256 and custom["precision"] == ["int8", "fp16"]
    assert custom["shapes"]["x"]["max"] == [4, 3, 8, 8]


def test_unavailable_tensorrt_says_what_to_install():
    reason = TensorRTEngine.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present: the real engine tests apply")
    assert "install" in reason or "CUDA" in reason


def test_onnxruntime_providers_fall_back_in_order_and_say_so(tmp_path):
    """A Jetson bundle asks for TensorRT EP → CUDA EP → CPU EP; here only CPU exists."""
    import onnxruntime as ort

    from edgekit_runtime.engines import create_engine

    with edgekit_runtime.load(BUNDLE, keyring=KEY) as model:
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        backend = replace(model.manifest.backend, options=BackendOptions(providers=wanted))
        eng = create_engine(model.workdir, replace(model.manifest, backend=backend))
    available = set(ort.get_available_providers())
    assert eng.describe()["providers"] == [p for p in wanted if p in available]
    assert eng.describe()["skipped_providers"] == [p for p in wanted if p not in available]
    x = np.zeros((1, 1, 2, 2), np.float32)
    assert np.isfinite(eng.run({"x": x})["y"]).all()


def test_no_usable_provider_is_an_error():
    from edgekit_runtime.engines import EngineError, create_engine

    with edgekit_runtime.load(BUNDLE, keyring=KEY) as model:
        backend = replace(model.manifest.backend, options=BackendOptions(providers=["NoSuchExecutionProvider"]))
        with pytest.raises(EngineError, match="none of the execution providers"):
            create_engine(model.workdir, replace(model.manifest, backend=backend))


@pytest.mark.skipif(TensorRTEngine.unavailable_reason() is not None,
                    reason=f"needs TensorRT and a CUDA GPU: {TensorRTEngine.unavailable_reason()}")
def test_real_engine_builds_caches_and_runs(tmp_path, monkeypatch):  # pragma: no cover - GPU only
    monkeypatch.setenv("EDGEKIT_ENGINE_CACHE", str(tmp_path))
    x = np.ones((1, 1, 2, 2), np.float32)
    with edgekit_runtime.load(BUNDLE, keyring=KEY, engine="tensorrt") as first:
        np.testing.assert_allclose(first.run(x)["y"], [[-0.25, -0.5, 0.375]], atol=1e-2)  # fp16 tolerance
        assert first.engine.describe()["built_now"] is True
    with edgekit_runtime.load(BUNDLE, keyring=KEY, engine="tensorrt") as second:
        assert second.engine.describe()["built_now"] is False  # reused from the cache
        assert second.engine.key == first.engine.key
    assert len(list(tmp_path.glob("*.plan"))) == 1
