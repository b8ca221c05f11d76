"""TensorRT engine: builds the engine *on the device* from the bundle's Q/DQ ONNX, and caches it.

A serialized TensorRT engine only runs on the TensorRT version, GPU and (on a
Jetson) L4T/JetPack release it was built with, so bundles ship the
explicit-quantization ONNX and each device builds its own plan once. The plan is
cached under a key made of the TensorRT version, GPU name and compute
capability, the L4T release, the ONNX file's sha256 and the build settings: a
JetPack upgrade or a new model changes the key and triggers a rebuild; the same
device and model reuse the cache.

Needs the ``tensorrt`` Python package (JetPack ships it) and ``cuda-python`` for
device buffers. Where either is missing, :meth:`unavailable_reason` says so and
``create_engine`` moves on to the next engine of the manifest (ONNX Runtime),
logging why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import EngineError, ErrorCode, RuntimeConfigError
from ..contract.manifest import TensorRTOptions, TensorSpec
from .base import Engine, EngineOptions, ProfiledRun

log = logging.getLogger(__name__)

CACHE_ENV = "EDGEKIT_ENGINE_CACHE"
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


# ----------------------------------------------------------------------------- pure helpers
def parse_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, GCID: ...`` → ``"R36.4.0"`` (the L4T release)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def l4t_release() -> str | None:
    """The L4T release of a Jetson (``/etc/nv_tegra_release``), else None (a dGPU host)."""
    try:
        return parse_tegra_release(_TEGRA_RELEASE.read_text())
    except OSError:
        return None


def jetpack_version() -> str | None:
    """The installed ``nvidia-jetpack`` package version, where dpkg knows it."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_settings(options: EngineOptions, inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The TensorRT builder settings recorded in the bundle (``backend.options.tensorrt``), as plain JSON.

    Absent settings take the format's defaults (``TensorRTOptions``); absent shapes fix
    every input at its manifest shape. The result is part of the plan cache key.
    """
    trt_opts = options.tensorrt or TensorRTOptions()
    shapes = ({name: r.to_dict() for name, r in trt_opts.shapes.items()} if trt_opts.shapes
              else _default_shapes(inputs))
    return {
        "precision": list(trt_opts.precision),
        "workspace_mb": trt_opts.workspace_mb,
        "dla_core": trt_opts.dla_core,
        "gpu_fallback": trt_opts.gpu_fallback,
        "shapes": shapes,
    }


def _default_shapes(inputs: Sequence[TensorSpec]) -> dict[str, dict[str, list[int]]]:
    shapes = {}
    for t in inputs:
        fixed = [d if isinstance(d, int) else 1 for d in t.shape]
        shapes[t.name] = {"min": fixed, "opt": fixed, "max": fixed}
    return shapes


def cache_key(fingerprint: dict[str, Any], onnx_sha256: str, settings: dict[str, Any]) -> str:
    """What an engine plan depends on; any change means a rebuild."""
    blob = json.dumps({"device": fingerprint, "onnx": onnx_sha256, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class EngineCache:
    """Plans on disk: ``<dir>/<key>.plan`` plus ``<key>.json`` describing what built it."""

    def __init__(self, directory: str | os.PathLike | None = None):
        default = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "edgekit" / "engines"))
        self.directory = Path(directory) if directory else default

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.plan", self.directory / f"{key}.json"

    def load(self, key: str) -> bytes | None:
        plan, meta = self.paths(key)
        if not (plan.is_file() and meta.is_file()):
            return None
        info = json.loads(meta.read_text())
        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != info.get("plan_sha256"):
            log.warning("cached engine %s is corrupt; rebuilding", plan)
            return None
        return data

    def store(self, key: str, plan_bytes: bytes, info: dict[str, Any]) -> Path:
        """Write plan then metadata, each atomically, so a crash never leaves a half plan in use."""
        self.directory.mkdir(parents=True, exist_ok=True)
        plan, meta = self.paths(key)
        for path, data in ((plan, plan_bytes),
                           (meta, json.dumps({**info, "plan_sha256": hashlib.sha256(plan_bytes).hexdigest()},
                                             indent=2).encode())):
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return plan


# ----------------------------------------------------------------------------- CUDA + TensorRT
def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}", code=ErrorCode.ENGINE_INFERENCE_FAILED)
    return rest[0] if len(rest) == 1 else rest


def device_fingerprint() -> dict[str, Any]:
    import tensorrt as trt

    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt": trt.__version__,
        "gpu": name.strip("\x00 "),
        "compute_capability": f"{props.major}.{props.minor}",
        "l4t": l4t_release(),
        "jetpack": jetpack_version(),
    }


class TensorRTEngine(Engine):
    name = "tensorrt"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return (f"TensorRT is not installed ({exc}); on a Jetson it comes with JetPack "
                    f"(python3-libnvinfer), on a GPU host: pip install tensorrt")
        try:
            cudart = _cudart()
            count = _check(cudart.cudaGetDeviceCount())
        except ImportError as exc:
            return f"cuda-python is not installed ({exc}); pip install cuda-python"
        except EngineError as exc:
            return f"no usable CUDA device ({exc})"
        if not count:
            return "no CUDA device found"
        return None

    @classmethod
    def library_version(cls) -> str:
        import tensorrt

        return tensorrt.__version__

    def __init__(self, model_dir: Path, artifact: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions, **kwargs: Any):
        super().__init__(model_dir, artifact, inputs, outputs, options, **kwargs)
        import tensorrt as trt

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        onnx_path = self.artifact
        onnx_bytes = onnx_path.read_bytes()
        self.settings = build_settings(options, self.inputs)
        self.fingerprint = device_fingerprint()
        self.key = cache_key(self.fingerprint, hashlib.sha256(onnx_bytes).hexdigest(), self.settings)
        self.cache = EngineCache(options.engine_cache_dir)
        plan = self.cache.load(self.key)
        self.built = plan is None
        if plan is None:
            log.info("building TensorRT engine for %s (key %s)", self.fingerprint["gpu"], self.key)
            plan = self._build(onnx_bytes)
            self.cache.store(self.key, plan, {"device": self.fingerprint, "settings": self.settings,
                                              "model": self.model.to_dict() if self.model else None})
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("TensorRT could not deserialize the engine plan")
        self.context = self.engine.create_execution_context()
        self.stream = _check(_cudart().cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _build(self, onnx_bytes: bytes) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings["workspace_mb"] << 20)
        if "int8" in self.settings["precision"]:
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ nodes make this explicit quantization
        if "fp16" in self.settings["precision"] and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if self.settings["dla_core"] is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(self.settings["dla_core"])
            if self.settings["gpu_fallback"]:
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        profile = builder.create_optimization_profile()
        for name, s in self.settings["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError("TensorRT failed to build the engine (see the TensorRT log above)")
        return bytes(plan)

    def _buffer(self, name: str, nbytes: int) -> int:
        cudart = _cudart()
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(cudart.cudaFree(ptr))
            ptr = _check(cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, _cudart()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            host = np.ascontiguousarray(feeds[spec.name])
            self.context.set_input_shape(spec.name, host.shape)
            ptr = self._buffer(spec.name, host.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream))
            self.context.set_tensor_address(spec.name, ptr)
        outputs: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(spec.name))
            outputs[spec.name] = np.empty(shape, dtype=dtype)
            self.context.set_tensor_address(spec.name, self._buffer(spec.name, outputs[spec.name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT inference failed", code=ErrorCode.ENGINE_INFERENCE_FAILED)
        for name, host in outputs.items():
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    @classmethod
    def profiling_unavailable_reason(cls) -> str | None:
        # TensorRT has an IProfiler for Python, but it has not been run against a GPU here, so it is not
        # offered: a per-layer table that nobody has checked would be worse than none.
        return ("per-layer TensorRT timings are not wired into edgekit-runtime yet; "
                "trtexec gives them from the cached engine plan (trtexec --loadEngine=PLAN --dumpProfile "
                "--separateProfileRun)")

    def profile(self, feeds: Sequence[dict[str, np.ndarray]], warmup: int) -> ProfiledRun:
        """Refused, naming this device's cached plan for ``trtexec --dumpProfile`` (see the class reason)."""
        plan, _ = self.cache.paths(self.key)
        raise RuntimeConfigError(
            f"per-layer profiling is not available: {self.profiling_unavailable_reason()}",
            code=ErrorCode.CONFIG_INVALID,
            hint=f"trtexec --loadEngine={plan} --dumpProfile --separateProfileRun",
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine_cache_key": self.key, "built_now": self.built,
                "device": self.fingerprint, "settings": self.settings}

    def __del__(self):  # pragma: no cover - needs a GPU
        try:
            cudart = _cudart()
            for ptr, _ in self._buffers.values():
                cudart.cudaFree(ptr)
        except Exception:
            pass
