"""Target profiles: YAML files in ``targets/``, loadable by name or path."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..build.backends.registry import get_backend
from .base import TargetProfile, parse, read_yaml
from ..errors import ConfigError

TARGETS_ENV = "EDGEKIT_TARGETS"


def targets_dirs() -> list[Path]:
    """``$EDGEKIT_TARGETS`` (os.pathsep-separated) first, then the profiles shipped with edgekit."""
    dirs = [Path(p) for p in os.environ.get(TARGETS_ENV, "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parents[2] / "targets"]


def available_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in targets_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(f.stem, f)
    return found


def load_target(name_or_path: str | os.PathLike) -> TargetProfile:
    """A profile by name (``x86-openvino-cpu``) or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        known = available_targets()
        if text not in known:
            close = difflib.get_close_matches(text, list(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown target {text!r}; {hint}known: {', '.join(known)}")
        path = known[text]
    profile = parse(TargetProfile, read_yaml(path), str(path))
    backend = get_backend(profile.backend)
    if backend.engine not in profile.engines:
        raise ConfigError(f"{path}: engines {profile.engines} must include the backend's engine {backend.engine!r}")
    return profile
