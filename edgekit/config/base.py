"""What every config model shares: strict parsing, "did you mean" errors, YAML and dotted overrides.

A build is described by one YAML file; CLI flags override individual fields
through :func:`apply_overrides` (dotted paths), and the result is validated
again, so a flag can never smuggle in a value the file could not hold. Nothing
here changes a user's setting behind their back: an invalid combination is an
error that says what to change.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..errors import ConfigError


class Strict(BaseModel):
    """Unknown keys are refused (with a suggestion), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_PARTIALS: dict[type, type] = {}


def partial(model: type[Strict]) -> type[Strict]:
    """A model with ``model``'s fields, all optional: the typed override section of a build file.

    A typo in an override is refused when the build file is read (with "did you mean"), not
    later when it is merged into the profile; only the keys a user set are merged.
    """
    if model not in _PARTIALS:
        fields = {name: (Optional[f.annotation], None) for name, f in model.model_fields.items()}
        _PARTIALS[model] = create_model(f"{model.__name__}Override", __base__=Strict, **fields)
    return _PARTIALS[model]


def merge(base: BaseModel, override: BaseModel | None, where: str) -> Any:
    """``base`` with the fields ``override`` set explicitly, validated as ``type(base)``."""
    if override is None:
        return base
    return parse(type(base), deep_update(base.model_dump(), override.model_dump(exclude_unset=True)), where)


def deep_update(base: dict, update: dict) -> dict:
    """``base`` with ``update`` laid over it, nested mappings merged key by key (not replaced)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
    """Set dotted keys (``model.version``) in a plain dict; None values are skipped.

    A mapping value is merged into the mapping it lands on, so ``{"accuracy": {"max_accuracy_drop":
    None}}`` (an explicit null) keeps the build file's other ``accuracy`` keys.
    """
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        value = str(value) if isinstance(value, Path) else value
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            value = deep_update(node[parts[-1]], value)
        node[parts[-1]] = value
    return out

