"""Target profiles: the device, its backend and engines, and one typed section per build stage and gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekit_runtime.contract import manifest

from .base import Strict


class DeviceInfo(Strict):
    family: Literal["x86", "arm64", "jetson", "generic"] = Field(description="Device family")
    arch: str = Field("x86_64", description="CPU architecture")
    memory_mb: int | None = Field(None, description="RAM available to the model process")
    gpu: str | None = Field(None, description="GPU, e.g. 'Ampere, 1024 CUDA cores, 32 tensor cores'")
    compute_capability: str | None = Field(None, description="CUDA compute capability, e.g. '8.7'")
    dla_cores: int = Field(0, ge=0, description="NVIDIA Deep Learning Accelerator cores")
    power_mode: int | None = Field(None, ge=0, description="nvpmodel mode benchmarks run at (Jetson)")
    power_modes: dict[int, str] = Field(default_factory=dict, description="nvpmodel mode → name")
    notes: str | None = None


# What the device's engine does by default is the bundle format's to say (one default, not two).
_TRT = manifest.defaults(manifest.TensorRTOptions)


class TensorRTBuild(Strict):
    precision: list[Literal["int8", "fp16", "fp32"]] = Field(
        default_factory=lambda: list(_TRT["precision"]), description="Builder precision flags (INT8 honours Q/DQ)")
    workspace_mb: int = Field(_TRT["workspace_mb"], ge=16, description="Builder workspace memory pool")
    dla_core: int | None = Field(_TRT["dla_core"], ge=0, description="Build for this DLA core (None: GPU)")
    gpu_fallback: bool = Field(_TRT["gpu_fallback"], description="Let layers DLA cannot run fall back to the GPU")
    max_batch: int = Field(1, ge=1, description="Largest batch of the optimization profile (dynamic batch)")


class RuntimeSettings(Strict):
    threads: int | None = Field(None, ge=1, description="Inference threads (None: the engine's default)")
    inference_precision: Literal["f32", "bf16", "f16"] | None = Field(
        None, description="OpenVINO INFERENCE_PRECISION_HINT; f32 keeps FP32 math on bf16-capable CPUs"
    )
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    providers: list[str] | None = Field(
        None, description="ONNX Runtime execution providers in order; missing ones are skipped and reported"
    )
    tensorrt: TensorRTBuild | None = Field(None, description="TensorRT build settings (Jetson targets)")


class QuantizeSettings(Strict):
    """The quantize stage: post-training INT8 and the backend's fallback when a gate fails."""

    enabled: bool = Field(True, description="Quantize to INT8 (False: ship FP32)")
    calibration_count: int = Field(300, ge=1, description="Most calibration samples the quantizer sees")
    # ONNX Runtime
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = Field(True, description="Per-channel weight scales")
    activation_type: Literal["int8", "uint8"] = "uint8"
    # OpenVINO / NNCF
    preset: Literal["performance", "mixed"] = Field("performance", description="NNCF preset")
    fast_bias_correction: bool = True
    # quantization-aware training (edgekit.compress.qat): fine-tunes with fake quantization, needs the training run
    qat: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: QAT only when post-training INT8 breaks a quality gate; on: always; off: never")
    qat_epochs: int = Field(2, ge=1, description="QAT fine-tuning epochs (the run's recipe at finetune.lr_scale)")
    # fallback when a gate fails
    max_excluded_nodes: int = Field(
        8, ge=0, description="Most layers the fallback may keep in float to pass the gates"
    )


# ----------------------------------------------------------------------------- gates
class AccuracyBudget(Strict):
    """Accuracy gate: the task metric of the deployed artifact against the FP32 reference, on labelled data."""

    metric: Literal["top1", "mae", "rmse", "map50", "map", "miou"] = Field(
        "top1", description="Task metric: top1 (percent, higher is better); mae or rmse (regression and forecasts, "
                            "in the target's units, lower is better); map50 or map (detection, COCO mAP in "
                            "points) or miou (segmentation, points), higher is better")
    max_accuracy_drop: float | None = Field(
        0.5, ge=0, description="Largest allowed loss FP32 → deployed, in the metric's units (None: no check): "
                               "top-1 points, or how much MAE/RMSE may grow"
    )


class FidelityGate(Strict):
    """Fidelity gate: label-free agreement of INT8 with FP32 on calibration samples the quantizer never saw."""

    min_cosine: float | None = Field(
        0.99, ge=-1, le=1, description="Least mean cosine of INT8 vs FP32 outputs (None: report only)")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Least share of samples whose top-1 class INT8 and FP32 agree on")
    samples: int = Field(
        64, ge=1, description="Calibration samples held back (at most a fifth of the set) to measure fidelity")


class LatencyGate(Strict):
    """Latency gate: INT8 must beat FP32 on the target's engine; never a slower INT8 bundle in silence."""

    min_int8_speedup: float = Field(
        1.0, gt=0, description="FP32 p50 / INT8 p50 the INT8 artifact must reach, measured interleaved")
    on_slower: Literal["ship_faster", "fail", "keep_int8"] = Field(
        "ship_faster",
        description="When INT8 misses it: ship the FP32 artifact, fail the build, or ship INT8 with a warning")
    noise_ms: float = Field(
        0.02, ge=0, description="p50 differences below this are timer noise, not a slower INT8")
    noise_fraction: float = Field(
        0.05, ge=0, le=1, description="... but never more than this share of the p50 INT8 must reach (0.02 ms is "
                                      "noise on a 1 ms model, 60 % of a 0.033 ms one)")


class Limits(Strict):
    latency_budget_ms: float | None = Field(None, gt=0, description="p99 budget on the device")
    max_model_mb: float | None = Field(None, gt=0, description="Size gate: largest model artifact allowed")


class OptimizeDefaults(Strict):
    """What the optimize passes (pruning) must respect on this device."""

    round_to: int = Field(1, ge=1, description="Pruned channel counts are kept multiples of this: the channel "
                                               "block the device's INT8 kernels work in (VNNI 16, NEON/TensorRT 8)")


class TargetProfile(Strict):
    name: str
    description: str = ""
    device: DeviceInfo
    backend: str = Field(description="Backend name in the registry (edgekit.build.backends.registry)")
    engines: list[str] = Field(description="Runtime engine order on the device")
    runtime: RuntimeSettings = RuntimeSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    accuracy: AccuracyBudget = AccuracyBudget()
    fidelity: FidelityGate = FidelityGate()
    latency: LatencyGate = LatencyGate()
    limits: Limits = Limits()
    optimize: OptimizeDefaults = OptimizeDefaults()
