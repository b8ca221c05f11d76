"""Typed configuration (pydantic, unknown keys refused): target profiles, build files, one section per stage."""

from .base import Strict, apply_overrides, deep_update, format_validation_error, merge, parse, partial, read_yaml
from .build import (OVERRIDABLE, BuildConfig, DataSource, ExportSettings, ModelSource, PostprocessSpec,
                    PreprocessSpec, load_build, resolve_profile)
from .target import (AccuracyBudget, DeviceInfo, FidelityGate, LatencyGate, Limits, QuantizeSettings,
                     RuntimeSettings, TargetProfile, TensorRTBuild)

__all__ = [
    "Strict", "apply_overrides", "deep_update", "format_validation_error", "merge", "parse", "partial", "read_yaml",
    "OVERRIDABLE", "BuildConfig", "DataSource", "ExportSettings", "ModelSource", "PostprocessSpec",
    "PreprocessSpec", "load_build", "resolve_profile",
    "AccuracyBudget", "DeviceInfo", "FidelityGate", "LatencyGate", "Limits", "QuantizeSettings",
    "RuntimeSettings", "TargetProfile", "TensorRTBuild",
]
