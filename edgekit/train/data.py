"""Training data: load, split train/val/test, fit the normalization on train only.

Sources (``DataConfig.path``): an image folder with one sub-folder per class, a ``.npz`` (``x``, ``y``,
optional ``x_test``/``y_test``, group and meta arrays) or a CSV/Parquet table (tabular rows, or with a time
column a series cut into forecast windows). Images from a folder are resized by the runtime's own
preprocessing, so training sees what the device will feed the model.

*raw* arrays are what was loaded; the model sees ``(raw * scale - mean) / std`` per channel (axis 1),
the same formula as the bundle's ``preprocess``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config.base import parse
from ..config.train import DataConfig, SplitConfig, TrainConfig
from ..errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_TARGET_NAMES = ("target", "label", "y")
_STD_FLOOR = 1e-6


# ----------------------------------------------------------------------------- normalization
def _safe_std(std: np.ndarray) -> np.ndarray:
    """``std`` with values below the floor replaced by 1.0: a constant channel must not amplify device drift."""
    return np.where(std < _STD_FLOOR, 1.0, std)


@dataclass
class Normalizer:
    """``(raw * scale - mean) / std`` per channel (axis 1)."""

    scale: float
    mean: list[float]
    std: list[float]

    def _shape(self, ndim: int) -> tuple[int, ...]:
        return (1, len(self.mean)) + (1,) * (ndim - 2)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Normalized float32 copy of a raw batch."""
        x = np.asarray(raw, dtype=np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(self._shape(x.ndim))
        std = np.asarray(self.std, dtype=np.float32).reshape(self._shape(x.ndim))
        return ((x - mean) / std).astype(np.float32, copy=False)

    @classmethod
    def fit(cls, raw_train: np.ndarray, scale: float) -> "Normalizer":
        """Per-channel mean and std of ``raw_train * scale`` (a std below 1e-6, a constant channel, is 1.0)."""
        x = np.asarray(raw_train, dtype=np.float64) * scale
        if x.ndim < 2 or len(x) == 0:
            raise CalibrationError(f"cannot fit a normalization on an array of shape {x.shape}")
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes)
        std = _safe_std(x.std(axis=axes))
        return cls(scale=float(scale), mean=[float(v) for v in mean], std=[float(v) for v in std])


# ----------------------------------------------------------------------------- prepared data
@dataclass
class Prepared:
    """Loaded, split data with the train-fitted normalization (see the module docstring)."""

    kind: str  # "image" | "sequence" | "tabular" | "forecast"
    task: str  # "classification" | "regression" | "forecast"
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    meta: dict[str, np.ndarray | None]
    labels: list[str] | None
    norm: Normalizer
    split_report: dict
    source: dict
    season: int | None
    input_shape: list[int]
    y_stats: tuple[list[float], list[float]] | None = None
    color: str | None = None  # image: "gray" | "rgb" (None: not a runtime image layout)
    extra: dict[str, Any] = field(default_factory=dict)  # forecast: lookback, horizon, target, features

    def normalized(self, split: str) -> np.ndarray:
        """The model input of ``split`` (float32)."""
        return self.norm.apply(self.x[split])

    def preprocess_manifest(self) -> dict:
        """The bundle's ``preprocess`` section: what the device applies before the model."""
        # The device decodes images as uint8 0-255; float images (any range) go in as raw tensors.
        if self.kind == "image" and self.color is not None and self.x["train"].dtype == np.uint8:
            return {"type": "image", "color": self.color, "size": list(self.input_shape[1:]), "resize": "stretch",
                    "interpolation": "area", "scale": self.norm.scale, "mean": list(self.norm.mean),
                    "std": list(self.norm.std), "layout": "NCHW", "dtype": "float32"}
        return {"type": "tensor", "scale": self.norm.scale, "mean": list(self.norm.mean),
                "std": list(self.norm.std), "dtype": "float32"}


# ----------------------------------------------------------------------------- hashing
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_sha256(folder: Path, files: list[Path]) -> str:
    """Digest of the sorted relative names and each file's sha256."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(b"\0")
        h.update(_file_sha256(f).encode())
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- labels
def _encode_labels(*arrays: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Class indices for label arrays (strings or ints); names are the sorted unique values as str."""
    values = [np.asarray(a) for a in arrays]
    for a in values:
        if a.ndim != 1:
            raise CalibrationError(f"classification labels must be one per sample (shape (N,)), got {a.shape}")
    if any(a.dtype.kind in "fc" for a in values):
        for a in values:
            if a.dtype.kind in "fc" and not np.all(np.isfinite(a) & (a == np.round(a))):
                raise CalibrationError("classification labels are fractional; use task: regression for "
                                       "continuous targets")
        values = [a.astype(np.int64) if a.dtype.kind in "fc" else a for a in values]
    kinds = {a.dtype.kind for a in values}
    if len(kinds) > 1 and not kinds <= {"i", "u", "b"}:
        values = [a.astype(str) for a in values]
    classes = np.unique(np.concatenate(values))
    names = [str(c) for c in classes]
    return names, [np.searchsorted(classes, a).astype(np.int64) for a in values]


def _regression_targets(y: np.ndarray, where: str) -> np.ndarray:
    try:
        y = np.asarray(y, dtype=np.float32)
    except (TypeError, ValueError):
        raise CalibrationError(f"{where}: regression targets must be numbers") from None
    if not np.all(np.isfinite(y)):
        raise CalibrationError(f"{where}: regression targets contain NaN or infinite values; drop or fill them")
    return y


# ----------------------------------------------------------------------------- loaders
@dataclass
class _Loaded:
    """One source before splitting (``x_test`` etc. when the data has its own test split)."""

    kind: str
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    meta: np.ndarray | None = None
    times: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    meta_test: np.ndarray | None = None
    labels: list[str] | None = None
    color: str | None = None
    source: dict = field(default_factory=dict)
    season: int | None = None
    series: dict | None = None  # forecast: target times and window bookkeeping
    extra: dict[str, Any] = field(default_factory=dict)


def _load_folder(cfg: DataConfig) -> _Loaded:
    from edgekit_runtime.processing import list_images, preprocess_batch, read_image

    folder = Path(cfg.path)
    files = list_images(folder)
    if not files:
        raise CalibrationError(f"{folder} holds no images; expected one sub-folder of images per class")
    loose = [f for f in files if f.parent == folder]
    if loose:
        raise CalibrationError(f"{folder} has images outside class sub-folders (e.g. {loose[0].name}); "
                               "put each image in a sub-folder named after its class")
    if cfg.task != "classification":
        raise ConfigError(f"an image folder is a classification set; task is {cfg.task!r}")
    names = [f.relative_to(folder).parts[0] for f in files]
    images = [read_image(f, "rgb") for f in files]
    color = cfg.color
    if color == "auto":
        color = "gray" if all(np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])
                              for im in images) else "rgb"
    if cfg.image_size:
        if len(cfg.image_size) != 2 or min(cfg.image_size) < 1:
            raise ConfigError(f"data.image_size must be [height, width], not {cfg.image_size}")
        size = [int(v) for v in cfg.image_size]
    else:
        size = [int(round(float(np.median([im.shape[i] for im in images])))) for i in (0, 1)]
    if color != "rgb":  # decode as the device does (its grayscale decode differs from converting RGB)
        images = [read_image(f, color) for f in files]
    # The runtime's own colour conversion and resize; scale 1 keeps the 0-255 values exact.
    spec = {"type": "image", "color": color, "size": size, "resize": "stretch", "interpolation": "area",
            "scale": 1.0, "layout": "NCHW", "dtype": "float32"}
    x = np.rint(preprocess_batch(images, spec)).astype(np.uint8)
    labels, (y,) = _encode_labels(np.asarray(names))
    source = {"path": str(folder), "format": "image_folder", "files": len(files),
              "sha256": _folder_sha256(folder, files)}
    return _Loaded(kind="image", x=x, y=y, labels=labels, color=color, source=source)


def _npz_kind(x: np.ndarray, cfg: DataConfig, where: str) -> tuple[str, np.ndarray]:
    if cfg.kind == "forecast" or cfg.task == "forecast":
        raise ConfigError(f"{where}: forecasting reads a time series from a CSV/Parquet file with a time column "
                          "(data.time); for pre-cut windows use task: regression")
    if x.ndim == 4:
        kind = "image"
    elif x.ndim == 3:
        kind = "image" if cfg.kind == "image" else "sequence"
        if kind == "image":
            x = x[:, None]
    elif x.ndim == 2:
        kind = "tabular"
    else:
        raise CalibrationError(f"{where}: x has shape {x.shape}; expected (N, C, H, W) images, (N, C, L) "
                               "sequences or (N, F) rows")
    if cfg.kind not in ("auto", kind):
        raise ConfigError(f"{where}: data.kind is {cfg.kind!r} but x of shape {x.shape} is {kind} data")
    if x.dtype != np.uint8:
        if x.dtype.kind not in "fiub":
            raise CalibrationError(f"{where}: x has dtype {x.dtype}; expected numbers")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise CalibrationError(f"{where}: x contains NaN or infinite values; fill or drop them")
    return kind, x


def _load_npz(cfg: DataConfig) -> _Loaded:
    path = Path(cfg.path)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if "x" not in keys or "y" not in keys:
            raise CalibrationError(f"{path} has arrays {sorted(keys)}; expected 'x' and 'y' "
                                   "(and optionally x_test, y_test, group, meta)")
        if ("x_test" in keys) != ("y_test" in keys):
            raise CalibrationError(f"{path}: x_test and y_test go together; it has only one of them")

        def optional(name: str | None, default: str) -> tuple[np.ndarray | None, str | None]:
            key = name or (default if default in keys else None)
            if key is None:
                return None, None
            if key not in keys:
                raise ConfigError(f"{path} has no array {key!r} (it has {sorted(keys)})")
            return data[key], key

        kind, x = _npz_kind(data["x"], cfg, str(path))
        y = data["y"]
        x_test = y_test = meta_test = None
        if "x_test" in keys:
            _, x_test = _npz_kind(data["x_test"], cfg, f"{path} (x_test)")
            y_test = data["y_test"]
            if x_test.shape[1:] != x.shape[1:]:
                raise CalibrationError(f"{path}: x_test has samples of shape {x_test.shape[1:]}, x of {x.shape[1:]}")
            if len(y_test) != len(x_test):
                raise CalibrationError(f"{path}: x_test has {len(x_test)} samples but y_test {len(y_test)}")
        groups, _ = optional(cfg.group, "group")
        meta, meta_key = optional(cfg.meta, "meta")
        if meta_key is not None and x_test is not None and f"{meta_key}_test" in keys:
            meta_test = data[f"{meta_key}_test"]
    if len(y) != len(x):
        raise CalibrationError(f"{path}: x has {len(x)} samples but y {len(y)}")
    for name, arr in (("group", groups), ("meta", meta)):
        if arr is not None and len(arr) != len(x):
            raise CalibrationError(f"{path}: the {name} array has {len(arr)} entries, x has {len(x)} samples")
    labels = None
    if cfg.task == "classification":
        labels, encoded = _encode_labels(y, *([y_test] if y_test is not None else []))
        y = encoded[0]
        y_test = encoded[1] if y_test is not None else None
    else:
        y = _regression_targets(y, str(path))
        y_test = _regression_targets(y_test, f"{path} (y_test)") if y_test is not None else None
    color = None
    if kind == "image" and x.shape[1] in (1, 3):
        color = "gray" if x.shape[1] == 1 else "rgb"
    source = {"path": str(path), "format": "npz", "sha256": _file_sha256(path)}
    return _Loaded(kind=kind, x=x, y=y, groups=groups, meta=meta, x_test=x_test, y_test=y_test,
                   meta_test=meta_test, labels=labels, color=color, source=source)


def _read_table(path: Path):
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError(f"reading {path.suffix} files needs pandas: pip install pandas") from None
    if path.suffix == ".csv":
        return pd.read_csv(path)
    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise ConfigError(f"reading Parquet needs pyarrow ({exc}): pip install pyarrow") from None


def _column(df, name: str, what: str, path: Path):
    if name not in df.columns:
        raise ConfigError(f"{path} has no {what} column {name!r}; its columns are {list(df.columns)}")
    return df[name]


def _infer_season(times) -> int | None:
    """12 for monthly, 7 for daily, 24 for hourly series (from the median spacing), else None."""
    import pandas as pd

    if len(times) < 3 or not pd.api.types.is_datetime64_any_dtype(times):
        return None
    step = pd.Series(times).diff().dropna().median()
    hours = step / pd.Timedelta(hours=1)
    if 27 * 24 <= hours <= 32 * 24:
        return 12
    if abs(hours - 24) < 1e-6:
        return 7
    if abs(hours - 1) < 1e-6:
        return 24
    return None


def _numeric_matrix(df, columns: list[str], path: Path) -> np.ndarray:
    import pandas as pd

    for c in columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise ConfigError(f"{path}: column {c!r} is not numeric; encode it or leave it out of data.features")
        missing = int(df[c].isna().sum())
        if missing:
            raise CalibrationError(f"{path}: column {c!r} has {missing} missing values; fill or drop them")
    return df[columns].to_numpy(dtype=np.float32)


def _load_table(cfg: DataConfig) -> _Loaded:
    import pandas as pd

    path = Path(cfg.path)
    df = _read_table(path)
    fmt = path.suffix.lstrip(".")
    forecast = cfg.task == "forecast" or cfg.kind == "forecast"
    if forecast and cfg.task != "forecast":
        raise ConfigError(f"data.kind is 'forecast' but the task is {cfg.task!r}; set task: forecast")
    if forecast and not cfg.time:
        raise ConfigError(f"a forecast needs the time column of {path}: set data.time")
    if cfg.kind in ("image", "sequence"):
        raise ConfigError(f"{path} is a table; data.kind {cfg.kind!r} needs an image folder or a .npz")
    times = None
    if cfg.time:
        times = _column(df, cfg.time, "time", path)
        if not pd.api.types.is_numeric_dtype(times) and not pd.api.types.is_datetime64_any_dtype(times):
            try:
                times = pd.to_datetime(times.astype(str))
            except (ValueError, TypeError):
                raise ConfigError(f"{path}: the time column {cfg.time!r} is neither numbers nor dates") from None
        df = df.assign(**{cfg.time: times}).sort_values(cfg.time, kind="stable").reset_index(drop=True)
        times = df[cfg.time]
    skip = {c for c in (cfg.time, cfg.group, cfg.meta) if c}
    target = cfg.target
    if target is None:
        target = next((c for c in _TARGET_NAMES if c in df.columns), None)
        if target is None and forecast:
            numeric = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
            target = numeric[0] if len(numeric) == 1 else None
        if target is None:
            raise ConfigError(f"which column of {path} is the target? set data.target (columns: {list(df.columns)})")
    _column(df, target, "target", path)
    skip.add(target)
    if cfg.features is not None:
        features = list(cfg.features)
        for c in features:
            _column(df, c, "feature", path)
    else:
        features = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    source = {"path": str(path), "format": fmt, "sha256": _file_sha256(path), "rows": int(len(df))}
    meta = _column(df, cfg.meta, "meta", path).to_numpy() if cfg.meta else None
    groups = _column(df, cfg.group, "group", path).to_numpy() if cfg.group else None
    if forecast:
        if groups is not None:
            raise ConfigError(f"{path}: a forecast reads one series; data.group is not supported for forecasts")
        return _windows(cfg, df, target, [c for c in features if c != target], times, source, path)
    if not features:
        raise ConfigError(f"{path} has no numeric feature columns besides the target; set data.features")
    x = _numeric_matrix(df, features, path)
    y = df[target].to_numpy()
    labels = None
    if cfg.task == "classification":
        if pd.isna(df[target]).any():
            raise CalibrationError(f"{path}: the target column {target!r} has missing values; drop those rows")
        labels, (y,) = _encode_labels(y if y.dtype.kind != "O" else y.astype(str))
    else:
        y = _regression_targets(y, f"{path} column {target!r}")
    return _Loaded(kind="tabular", x=x, y=y, groups=groups, meta=meta,
                   times=times.to_numpy() if times is not None else None, labels=labels, source=source,
                   extra={"target": target, "features": features})


def _windows(cfg: DataConfig, df, target: str, features: list[str], times, source: dict, path: Path) -> _Loaded:
    """A series cut into (lookback → horizon) windows; channel 0 is the target."""
    values = _numeric_matrix(df, [target] + features, path)  # (T, C)
    season = cfg.season or _infer_season(times)
    lookback = cfg.lookback or (2 * season if season else 24)
    horizon = cfg.horizon or 6
    n_steps = len(values)
    count = n_steps - lookback - horizon + 1
    if count < 1:
        raise CalibrationError(f"{path} has {n_steps} time steps; a window needs lookback {lookback} + horizon "
                               f"{horizon}; lower data.lookback/data.horizon")
    starts = np.arange(count)
    steps = np.arange(lookback)[None, :] + starts[:, None]
    x = values[steps].transpose(0, 2, 1).copy()  # (N, C, lookback)
    y = values[steps[:, -1:] + 1 + np.arange(horizon)[None, :], 0].astype(np.float32)  # (N, horizon)
    series = {"n_steps": n_steps, "first_target": starts + lookback, "last_target": starts + lookback + horizon - 1,
              "times": np.asarray(times)}
    return _Loaded(kind="forecast", x=x.astype(np.float32), y=y, times=None, source=source, season=season,
                   series=series, extra={"target": target, "features": features, "lookback": lookback,
                                         "horizon": horizon})


# ----------------------------------------------------------------------------- splitting
def _resolve_method(split: SplitConfig, loaded: _Loaded, task: str) -> str:
    method = split.method
    ordered = loaded.kind == "forecast" or loaded.times is not None
    if method == "auto":
        if ordered:
            return "temporal"
        if loaded.groups is not None:
            return "grouped"
        return "stratified" if task == "classification" else "random"
    if method == "grouped" and loaded.groups is None:
        raise ConfigError("split.method is 'grouped' but no group is given; set data.group")
    if method == "stratified" and task != "classification":
        raise ConfigError(f"a stratified split needs classes; the task is {task!r} (use random or grouped)")
    if loaded.kind == "forecast" and method != "temporal":
        raise ConfigError(f"a forecast is split by time; split.method {method!r} would leak the future into "
                          "training (use temporal or auto)")
    return method


def _cut(idx: np.ndarray, frac: float, method: str, y, groups, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) indices: ``frac`` of ``idx`` held out by ``method``."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

    if method == "temporal":  # idx is in time order
        n_held = int(round(len(idx) * frac))
        return idx[: len(idx) - n_held], idx[len(idx) - n_held:]
    try:
        if method == "stratified":
            return tuple(train_test_split(idx, test_size=frac, stratify=y[idx], random_state=seed))
        if method == "random":
            return tuple(train_test_split(idx, test_size=frac, random_state=seed))
        g = groups[idx]
        if y is not None:
            n_splits = max(2, int(round(1 / frac)))
            if len(np.unique(g)) >= n_splits:
                splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                keep, held = next(splitter.split(idx, y[idx], g))
                return idx[keep], idx[held]
        keep, held = next(GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed).split(idx, groups=g))
        return idx[keep], idx[held]
    except ValueError as exc:
        raise CalibrationError(f"cannot make a {method} split of {len(idx)} samples ({exc}); add data or change "
                               "split.method / split.val / split.test") from None


def _split_indices(loaded: _Loaded, method: str, split: SplitConfig, task: str, seed: int) -> dict[str, np.ndarray]:
    n = len(loaded.x)
    y = loaded.y if task == "classification" else None
    if method == "temporal":
        order = np.argsort(loaded.times, kind="stable") if loaded.times is not None else np.arange(n)
    else:
        order = np.arange(n)
    own_test = loaded.x_test is not None
    test_frac = 0.0 if own_test else split.test
    if test_frac > 0:
        rest, test = _cut(order, test_frac, method, y, loaded.groups, seed)
    else:
        rest, test = order, order[:0]
    val_frac = split.val / (1.0 - test_frac)
    train, val = _cut(rest, val_frac, method, y, loaded.groups, seed)
    return {"train": np.sort(train) if method != "temporal" else train,
            "val": np.sort(val) if method != "temporal" else val,
            "test": np.sort(test) if method != "temporal" else test}


def _forecast_indices(loaded: _Loaded, split: SplitConfig) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Windows whose target steps all fall in train / val / test of the series cut by time."""
    s = loaded.series
    n = s["n_steps"]
    n_test = int(round(n * split.test))
    n_val = int(round(n * split.val))
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    first, last = s["first_target"], s["last_target"]
    idx = {name: np.flatnonzero((first >= lo) & (last < hi)) for name, (lo, hi) in bounds.items()}
    return idx, bounds


def _time_str(value) -> str:
    if isinstance(value, np.datetime64):
        import pandas as pd

        value = pd.Timestamp(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value.item() if isinstance(value, np.generic) else value


def _report(method: str, loaded: _Loaded, parts: dict[str, dict], labels: list[str] | None,
            groups: dict[str, np.ndarray | None], times: dict[str, tuple] | None, own_test: bool) -> dict:
    report: dict[str, Any] = {"method": method, "sizes": {k: int(len(v["y"])) for k, v in parts.items()},
                              "test_from": "data" if own_test else "split"}
    if labels is not None:
        report["class_counts"] = {k: {labels[c]: int(n) for c, n in enumerate(np.bincount(v["y"], minlength=len(labels)))}
                                  for k, v in parts.items()}
    if any(g is not None for g in groups.values()):
        sets = {k: set(np.asarray(g).tolist()) if g is not None else set() for k, g in groups.items()}
        overlap = sorted({str(v) for a in SPLITS for b in SPLITS if a < b for v in sets[a] & sets[b]})
        report["groups"] = {k: len(v) for k, v in sets.items()}
        report["group_overlap"] = overlap
    if times is not None:
        report["time_ranges"] = {k: [_time_str(lo), _time_str(hi)] if lo is not None else None
                                 for k, (lo, hi) in times.items()}
    return report


def _check_split(parts: dict[str, dict], labels: list[str] | None, split: SplitConfig, own_test: bool,
                 method: str) -> None:
    hint = "add data, or change split.val / split.test / split.method"
    if len(parts["train"]["y"]) == 0:
        raise CalibrationError(f"the {method} split leaves no training samples; {hint}")
    if len(parts["val"]["y"]) == 0:
        raise CalibrationError(f"the {method} split leaves the validation split empty; {hint}")
    if len(parts["test"]["y"]) == 0 and (own_test or split.test > 0):
        raise CalibrationError(f"the {method} split leaves the test split empty; {hint}")
    if labels is not None:
        present = np.bincount(parts["train"]["y"], minlength=len(labels))
        missing = [labels[i] for i in np.flatnonzero(present == 0)]
        if missing:
            raise CalibrationError(f"the {method} split leaves class(es) {missing} out of the training split; "
                                   f"{hint} (a class needs samples in train to be learned)")


# ----------------------------------------------------------------------------- prepare
def _load(cfg: DataConfig) -> _Loaded:
    path = Path(cfg.path)
    if path.is_dir():
        return _load_folder(cfg)
    if not path.is_file():
        raise ConfigError(f"the training data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(cfg)
    if suffix in (".csv", ".parquet", ".pq"):
        return _load_table(cfg)
    raise ConfigError(f"{path}: training data must be an image folder, a .npz, .csv or .parquet file")


def prepare(cfg: DataConfig, split: SplitConfig, seed: int) -> Prepared:
    """Load ``cfg.path``, split it as ``split`` says (seeded), fit the normalization on train."""
    loaded = _load(cfg)
    task = cfg.task
    if task == "forecast" and loaded.kind != "forecast":
        raise ConfigError("task forecast needs a time series (CSV/Parquet with data.time)")
    method = _resolve_method(split, loaded, task)
    own_test = loaded.x_test is not None
    times = None
    if loaded.kind == "forecast":
        idx, bounds = _forecast_indices(loaded, split)
        parts = {k: {"x": loaded.x[i], "y": loaded.y[i], "meta": None} for k, i in idx.items()}
        t = loaded.series["times"]
        times = {k: (t[idx[k][0] + loaded.extra["lookback"]], t[idx[k][-1] + loaded.extra["lookback"]
                                                             + loaded.extra["horizon"] - 1])
                 if len(idx[k]) else (None, None) for k in SPLITS}
        group_parts = {k: None for k in SPLITS}
    else:
        idx = _split_indices(loaded, method, split, task, seed)
        parts = {k: {"x": loaded.x[i], "y": loaded.y[i],
                     "meta": loaded.meta[i] if loaded.meta is not None else None} for k, i in idx.items()}
        if own_test:
            parts["test"] = {"x": loaded.x_test, "y": loaded.y_test, "meta": loaded.meta_test}
        group_parts = {k: loaded.groups[i] if loaded.groups is not None else None for k, i in idx.items()}
        if own_test:
            group_parts["test"] = None
        if loaded.times is not None and method == "temporal":
            times = {k: (loaded.times[i].min(), loaded.times[i].max()) if len(i) else (None, None)
                     for k, i in idx.items()}
            if own_test:
                times["test"] = (None, None)
    _check_split(parts, loaded.labels, split, own_test, method)
    report = _report(method, loaded, parts, loaded.labels, group_parts, times, own_test)
    if report.get("group_overlap"):
        if method == "grouped":
            raise CalibrationError(f"groups {report['group_overlap'][:5]} fall in more than one split")
        log.warning("the %s split puts %d group(s) in more than one split; use split.method: grouped to keep "
                    "them apart", method, len(report["group_overlap"]))

    x_train = parts["train"]["x"]
    scale = 1 / 255 if x_train.dtype == np.uint8 else 1.0
    norm = Normalizer.fit(x_train, scale)
    y_stats = None
    if task != "classification":
        yt = parts["train"]["y"].astype(np.float64).reshape(len(parts["train"]["y"]), -1)
        y_stats = ([float(v) for v in yt.mean(axis=0)], [float(v) for v in _safe_std(yt.std(axis=0))])
    log.info("data %s: %s, %s split %s", loaded.source.get("path"), loaded.kind, method, report["sizes"])
    return Prepared(kind=loaded.kind, task=task, x={k: v["x"] for k, v in parts.items()},
                    y={k: v["y"] for k, v in parts.items()}, meta={k: v["meta"] for k, v in parts.items()},
                    labels=loaded.labels, norm=norm, split_report=report, source=loaded.source,
                    season=loaded.season, input_shape=[int(v) for v in x_train.shape[1:]], y_stats=y_stats,
                    color=loaded.color, extra=loaded.extra)


# ----------------------------------------------------------------------------- run folders
def load_run_data(run_dir: Path) -> Prepared:
    """The data a run was trained on, split again with its seed; refuses data that changed since."""
    import yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "train.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a training run folder (no train.yaml); run edgekit train first")
    cfg = parse(TrainConfig, yaml.safe_load(cfg_path.read_text()) or {}, str(cfg_path))
    if not Path(cfg.data.path).exists():
        raise CalibrationError(f"the data {cfg.data.path} the run {run_dir} was trained on is not there; "
                               "pass --calibration/--validation")
    prepared = prepare(cfg.data, cfg.split, cfg.train.seed)
    metrics_path = run_dir / "metrics.json"
    recorded = None
    if metrics_path.is_file():
        recorded = json.loads(metrics_path.read_text()).get("data_sha256")
    if recorded is None:
        log.warning("%s records no data_sha256; cannot check that the data is unchanged", run_dir)
    elif recorded != prepared.source["sha256"]:
        raise CalibrationError(f"the data {cfg.data.path} changed since training (sha256 {recorded[:12]}… then, "
                               f"{prepared.source['sha256'][:12]}… now); pass --calibration/--validation")
    return prepared


@functools.lru_cache(maxsize=2)
def _cached_run_data(run_dir: str, stamp: tuple) -> Prepared:
    return load_run_data(Path(run_dir))


def split_arrays(run: str, split: str = "train", count: int | None = None, labels: bool = True):
    """Build-file factory: normalized ``(x, y)`` of a run's ``split`` (or ``x`` alone).

    ``y`` is int64 class indices (classification) or float32 targets in real units (regression,
    forecasts). ``count`` takes that many evenly spaced samples.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    run_dir = Path(run).resolve()
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in (run_dir / "train.yaml", run_dir / "metrics.json")
                  if p.is_file())
    p = _cached_run_data(str(run_dir), stamp)
    x, y = p.normalized(split), p.y[split]
    if len(x) == 0:
        raise CalibrationError(f"the run {run} has an empty {split} split")
    if count is not None and count < len(x):
        if count < 1:
            raise ConfigError(f"count must be at least 1, not {count}")
        pick = np.unique(np.linspace(0, len(x) - 1, count).round().astype(np.int64))
        x, y = x[pick], y[pick]
    if labels:  # class indices, or regression/forecast values in real units
        return np.ascontiguousarray(x), (y.astype(np.int64) if p.task == "classification" else y.astype(np.float32))
    return np.ascontiguousarray(x)


__all__ = ["Normalizer", "Prepared", "SPLITS", "load_run_data", "prepare", "split_arrays"]
