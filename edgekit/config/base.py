"""Typed configuration: target profiles and build files (pydantic, unknown keys refused).

A build is described by one YAML file; CLI flags override individual fields
through :func:`apply_overrides` (dotted paths), and the result is validated
again, so a flag can never smuggle in a value the file could not hold. Nothing
here changes a user's setting behind their back: an invalid combination is an
error that says what to change.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- target profiles
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


class TensorRTBuild(Strict):
    precision: list[Literal["int8", "fp16", "fp32"]] = Field(
        default_factory=lambda: ["int8", "fp16"], description="Builder precision flags (INT8 honours Q/DQ)")
    workspace_mb: int = Field(1024, ge=16, description="Builder workspace memory pool")
    dla_core: int | None = Field(None, ge=0, description="Build for this DLA core (None: GPU)")
    gpu_fallback: bool = Field(True, description="Let layers DLA cannot run fall back to the GPU")
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
    enabled: bool = Field(True, description="Quantize to INT8 (False: ship FP32)")
    calibration_count: int = Field(300, ge=1, description="Calibration samples to use")
    # ONNX Runtime
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = Field(True, description="Per-channel weight scales")
    activation_type: Literal["int8", "uint8"] = "uint8"
    # OpenVINO / NNCF
    preset: Literal["performance", "mixed"] = Field("performance", description="NNCF preset")
    fast_bias_correction: bool = True
    # fallback when over budget
    max_excluded_nodes: int = Field(
        8, ge=0, description="Most layers the fallback may keep in float to meet the budget"
    )


class AccuracyBudget(Strict):
    max_accuracy_drop: float | None = Field(
        0.5, description="Largest allowed top-1 drop FP32→INT8, in percentage points (None: no check)"
    )


class Limits(Strict):
    latency_budget_ms: float | None = Field(None, gt=0, description="p99 budget on the device")


class TargetProfile(Strict):
    name: str
    description: str = ""
    device: DeviceInfo
    backend: str = Field(description="Backend name in the registry (edgekit.build.backends.registry)")
    engines: list[str] = Field(description="Runtime engine order on the device")
    runtime: RuntimeSettings = RuntimeSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    accuracy: AccuracyBudget = AccuracyBudget()
    limits: Limits = Limits()


# ----------------------------------------------------------------------------- build files
class ModelSource(Strict):
    source: str = Field(description="'package.module:factory', a .onnx file, or a torch.export .pt2 file")
    checkpoint: Path | None = Field(None, description="State dict or checkpoint for a factory model")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory")
    name: str = Field(description="Model name recorded in the bundle")
    version: str = "0.1.0"
    release: int | None = Field(
        None, ge=0, description="Anti-rollback counter; default: the build's UNIX time"
    )
    input_shape: list[int] = Field(description="Input shape including batch, e.g. [1, 3, 224, 224]")
    input_name: str = "input"
    output_name: str = "logits"
    dynamic_batch: bool = True
    labels: list[str] | None = None
    labels_file: Path | None = None


class DataSource(Strict):
    source: str = Field(
        description="Image folder (class sub-folders for labels), .npz (x[, y]), .npy, or 'module:factory'"
    )
    count: int | None = Field(None, ge=1, description="Use at most this many samples")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class PreprocessSpec(Strict):
    type: Literal["image"] = "image"
    color: Literal["gray", "rgb", "bgr"] = "rgb"
    size: list[int] = Field(description="[height, width]")
    resize: Literal["stretch", "shorter_center_crop"] = "stretch"
    interpolation: Literal["area", "linear", "nearest", "cubic"] = "area"
    scale: float = 1 / 255
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32"] = "float32"

    @field_validator("size")
    @classmethod
    def _two(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or min(v) < 1:
            raise ValueError("size is [height, width] with positive values")
        return v


class PostprocessSpec(Strict):
    type: Literal["classification", "none"] = "classification"
    softmax: bool = True
    top_k: int = Field(5, ge=1)


class BuildConfig(Strict):
    model: ModelSource
    target: str = Field(description="Profile name (targets/NAME.yaml) or a path to a profile YAML")
    calibration: DataSource | None = None
    validation: DataSource | None = Field(None, description="Labelled data for the accuracy check")
    preprocess: PreprocessSpec | None = None
    postprocess: PostprocessSpec = PostprocessSpec()
    quantize: dict[str, Any] = Field(default_factory=dict, description="Overrides of the profile's quantize")
    accuracy: dict[str, Any] = Field(default_factory=dict, description="Overrides of the profile's accuracy")
    runtime: dict[str, Any] = Field(default_factory=dict, description="Overrides of the profile's runtime")
    output: Path = Field(Path("build/model.ekb"), description="Bundle to write")
    workdir: Path | None = Field(None, description="Where intermediate files go (default: next to output)")
    signing_key: Path | None = Field(None, description="ed25519 private key (default: $EDGEKIT_SIGNING_KEY)")
    export_atol: float = Field(1e-4, gt=0, description="Max |torch - onnx| allowed after export")


# ----------------------------------------------------------------------------- errors
def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that ``loc`` (minus its last element) points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        ann = field.annotation if field else None
        current = None
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                current = cand
    return list(getattr(current, "model_fields", {}))


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = _fields_at(model, loc)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else f" — known keys: {', '.join(known)}"
            lines.append(f"  {where}: unknown key{hint}")
        else:
            lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``model.version``) in a plain dict; None values are skipped."""
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = str(value) if isinstance(value, Path) else value
    return out


def load_build(path: Path | None, overrides: dict[str, Any] | None = None) -> BuildConfig:
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or {})
    cfg = parse(BuildConfig, data, str(path) if path else "build settings")
    if cfg.model.labels and cfg.model.labels_file:
        raise ConfigError("give model.labels or model.labels_file, not both")
    return cfg


def resolve_profile(profile: TargetProfile, cfg: BuildConfig) -> TargetProfile:
    """The profile with the build file's quantize/accuracy/runtime overrides applied (validated)."""
    data = profile.model_dump()
    for section in ("quantize", "accuracy", "runtime"):
        data[section].update(getattr(cfg, section))
    return parse(TargetProfile, data, f"target {profile.name} with the build's overrides")
