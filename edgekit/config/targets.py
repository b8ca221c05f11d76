"""Target profiles: YAML files in ``targets/``, loadable by name or path."""

from __future__ import annotations

import difflib
import importlib.resources
import os
from pathlib import Path

from ..build.backends.registry import get_backend
from .base import parse, read_yaml
from .target import TargetProfile
from ..errors import ConfigError

TARGETS_ENV = "EDGEKIT_TARGETS"


def targets_dirs() -> list[Path]:
    """``$EDGEKIT_TARGETS`` (os.pathsep-separated) first, then the profiles shipped with edgekit."""
    dirs = [Path(p) for p in os.environ.get(TARGETS_ENV, "").split(os.pathsep) if p]
    return dirs + [shipped_targets_dir()]


def shipped_targets_dir() -> Path:
    """Where the profiles shipped with edgekit are: ``targets/`` in the source tree, packaged as
    ``edgekit._targets`` so that wheel and editable installs find them the same way."""
    shipped = importlib.resources.files("edgekit._targets")
    # edgekit is installed as plain files (never a zip), so the resource root is a real directory;
    # load_target() and the CLI hand these paths to users, hence a Path and not a Traversable.
    if not isinstance(shipped, Path):
        raise RuntimeError(f"edgekit's target profiles are not on the file system ({shipped!r}); reinstall edgekit")
    return shipped


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
