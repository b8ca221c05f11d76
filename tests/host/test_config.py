"""Build files and target profiles: validation, suggestions, overrides, nothing changed silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgekit.build.backends.registry import BACKENDS, load_compiler
from edgekit.build.backends.base import BackendCompiler
from edgekit.config import load_build, resolve_profile
from edgekit.errors import ConfigError
from edgekit.config.targets import available_targets, load_target
from edgekit_runtime.engines import ENGINES, engine_class

from .conftest import BUILD_FILE


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "build.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load(BUILD_FILE.read_text())


def test_example_build_file_is_valid():
    cfg = load_build(BUILD_FILE)
    assert cfg.model.name == "digits-cnn" and cfg.target == "x86-openvino-cpu"


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    data = base()
    data["calibraton"] = data.pop("calibration")
    with pytest.raises(ConfigError, match=r"calibraton: unknown key — did you mean 'calibration'\?"):
        load_build(write(tmp_path, data))


def test_unknown_nested_key_suggests_the_right_one(tmp_path):
    data = base()
    data["model"]["chekpoint"] = data["model"].pop("checkpoint")
    with pytest.raises(ConfigError, match=r"model\.chekpoint: unknown key — did you mean 'checkpoint'\?"):
        load_build(write(tmp_path, data))


def test_profile_override_typo_is_caught(tmp_path):
    data = base()
    data["quantize"] = {"calibraton_count": 10}
    # refused when the build file is read, before anything is exported
    with pytest.raises(ConfigError, match=r"quantize\.calibraton_count: unknown key — did you mean 'calibration_count'"):
        load_build(write(tmp_path, data))


def test_wrong_type_is_reported_with_its_location(tmp_path):
    data = base()
    data["model"]["input_shape"] = "one by eight"
    with pytest.raises(ConfigError, match=r"model\.input_shape"):
        load_build(write(tmp_path, data))


def test_flags_override_fields_and_keep_the_rest():
    cfg = load_build(BUILD_FILE, {"model.version": "2.0.0", "target": "onnxruntime-cpu", "output": None})
    assert cfg.model.version == "2.0.0" and cfg.target == "onnxruntime-cpu"
    assert cfg.model.name == "digits-cnn"  # untouched
    assert str(cfg.output) == "build/demo/digits-x86-openvino-cpu.ekb"  # None means "not given"


def test_override_is_validated_too():
    with pytest.raises(ConfigError, match="release"):
        load_build(BUILD_FILE, {"model.release": -5})


def test_profile_overrides_apply_without_touching_other_settings(tmp_path):
    data = base()
    data["quantize"] = {"calibration_count": 64}
    cfg = load_build(write(tmp_path, data))
    profile = resolve_profile(load_target("onnxruntime-cpu"), cfg)
    assert profile.quantize.calibration_count == 64
    assert profile.quantize.per_channel is True and profile.accuracy.max_accuracy_drop == 0.5


def test_unknown_target_suggests_a_close_name():
    with pytest.raises(ConfigError, match="did you mean 'x86-openvino-cpu'"):
        load_target("x86-openvino-cp")


def test_target_loads_by_path(tmp_path):
    data = yaml.safe_load((BUILD_FILE.parents[1] / "targets" / "onnxruntime-cpu.yaml").read_text())
    data["name"] = "my-board"
    data["runtime"] = {"threads": 2}
    p = tmp_path / "my-board.yaml"
    p.write_text(yaml.safe_dump(data))
    profile = load_target(str(p))
    assert profile.name == "my-board" and profile.runtime.threads == 2


def test_target_with_unknown_backend_is_refused(tmp_path):
    data = yaml.safe_load((BUILD_FILE.parents[1] / "targets" / "onnxruntime-cpu.yaml").read_text())
    data["backend"] = "tensorflow"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'"):
        load_target(p)


def test_every_shipped_profile_loads_and_maps_to_a_registered_engine():
    names = available_targets()
    assert {"x86-openvino-cpu", "onnxruntime-cpu"} <= set(names)
    for name in names:
        profile = load_target(name)
        assert profile.name == name, f"{name}.yaml declares name {profile.name!r}"
        for engine in profile.engines:
            assert engine in ENGINES


def test_registry_entries_all_import():
    """An explicit registry: every entry resolves, no import side effects needed."""
    for name, backend in BACKENDS.items():
        compiler = load_compiler(name)
        assert isinstance(compiler, BackendCompiler) and compiler.name == name
        assert compiler.engine == backend.engine
        cls = engine_class(backend.engine)
        assert cls.name == backend.engine
        reason = cls.unavailable_reason()
        if reason is None:
            assert cls.library_version() in compiler.library_version()
        else:  # e.g. TensorRT on a host without it: the reason says what to install
            assert "install" in reason
            assert compiler.library_version()


def test_a_nested_override_keeps_the_profiles_other_nested_settings():
    cfg = load_build(BUILD_FILE, {"target": "jetson-agx-orin", "runtime": {"tensorrt": {"dla_core": 0}}})
    trt = resolve_profile(load_target("jetson-agx-orin"), cfg).runtime.tensorrt
    assert trt.dla_core == 0 and trt.max_batch == load_target("jetson-agx-orin").runtime.tensorrt.max_batch == 8


def test_an_explicit_null_override_keeps_the_sections_other_keys():
    from edgekit.config import apply_overrides

    out = apply_overrides({"accuracy": {"metric": "top1", "max_accuracy_drop": 1.0}},
                          {"accuracy": {"max_accuracy_drop": None}})
    assert out == {"accuracy": {"metric": "top1", "max_accuracy_drop": None}}


def test_build_file_sizes_over_the_bundle_format_limits_are_refused_when_read():
    from edgekit.config import PostprocessSpec, PreprocessSpec
    from edgekit_runtime.contract import bundle_spec
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="over the bundle format's limit"):
        PreprocessSpec(size=[100000, 100000])
    with pytest.raises(ValidationError):
        PostprocessSpec(top_k=bundle_spec.MAX_TOP_K + 1)
    assert PreprocessSpec(size=[4096, 4096]).size == [4096, 4096]
