"""Calibration and validation data: image folders, .npy/.npz files, Python factories.

Images are turned into tensors by the *runtime's* preprocessing with the
bundle's preprocessing spec, so calibration sees exactly what the device will
feed the model. Arrays (``.npy``/``.npz``, factories) are taken as already
preprocessed (for ``tensor`` preprocessing: normalised with the spec's
mean/std). The calibration hash recorded in the manifest is the sha256 of
the resulting float32 tensor (shape and bytes): two builds calibrated on the
same data have the same hash whatever the source format was.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit_runtime.processing import list_images, preprocess_batch

from ..config import DataSource
from ..errors import CalibrationError
from ..models.importer import resolve_callable
from .detection import is_split_folder, split_arrays


@dataclass
class Dataset:
    x: np.ndarray  # preprocessed float32, batch first
    y: np.ndarray | None  # int64 labels, or None
    source: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # undecodable images left out (file, error)

    def __len__(self) -> int:
        return len(self.x)

    def sha256(self) -> str:
        return tensor_sha256(self.x)


def tensor_sha256(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(str(x.dtype).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _decodable(files: list[Path], preprocess: dict) -> tuple[np.ndarray, list[Path], list[dict[str, str]]]:
    """Preprocess ``files`` one by one; those the runtime cannot decode are left out and listed."""
    from edgekit_runtime.contract.errors import InputError

    xs, kept, skipped = [], [], []
    for f in files:
        try:
            xs.append(preprocess_batch([f], preprocess))
        except InputError as exc:
            skipped.append({"file": str(f), "error": str(exc)})
            continue
        kept.append(f)
    if not kept:
        raise CalibrationError(f"none of the {len(files)} images in {files[0].parent} can be decoded "
                               f"(first: {skipped[0]['error']})")
    return np.concatenate(xs), kept, skipped


def _from_folder(folder: Path, preprocess: dict | None, labels: list[str] | None,
                 skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, str]]]:
    if preprocess is None:
        raise CalibrationError(f"{folder} is an image folder, but the build has no 'preprocess' section")
    if preprocess.get("type", "image") != "image":
        raise CalibrationError(f"{folder} is an image folder, but the build's preprocess is type "
                               f"{preprocess['type']!r}; give a .npz/.npy or 'module:factory' of preprocessed tensors")
    files = list_images(folder)
    if not files:
        raise CalibrationError(f"{folder} holds no images")
    skipped: list[dict[str, str]] = []
    if skip_bad:
        x, files, skipped = _decodable(files, preprocess)
    else:
        x = preprocess_batch(files, preprocess)
    # class-per-sub-folder layout (torchvision ImageFolder) gives labels
    classes = sorted({f.parent.name for f in files if f.parent != folder})
    if not classes or any(f.parent == folder for f in files):
        return x, None, skipped
    names = labels or classes
    unknown = set(classes) - set(names)
    if unknown:
        raise CalibrationError(f"sub-folders {sorted(unknown)} of {folder} are not among the model's labels")
    return x, np.array([names.index(f.parent.name) for f in files], dtype=np.int64), skipped


def _from_arrays(obj, where: str, targets: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(obj, tuple) and len(obj) == 2:
        x, y = obj
    elif isinstance(obj, dict) or hasattr(obj, "files"):
        keys = list(obj.keys()) if isinstance(obj, dict) else list(obj.files)
        y = obj["y"] if "y" in keys else None
        if "x" in keys:
            x = obj["x"]
        elif [k for k in keys if k != "y"]:  # a model with several inputs: one array per input name
            x = per_input({k: obj[k] for k in keys if k != "y"}, where)
        else:
            raise CalibrationError(f"{where} has keys {keys}; expected 'x' (and 'y' for labels), or for a model "
                                   f"with several inputs one array per input name")
    else:
        x, y = obj, None
    x = np.asarray(x)
    if x.dtype.names is not None:
        pass  # per_input checked the fields
    elif x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise CalibrationError(f"{where}: x has dtype {x.dtype}; give preprocessed float tensors")
        x = x.astype(np.float32)
    if y is not None and targets:  # regression/forecast values: float, one row per sample
        y = np.asarray(y, dtype=np.float32)
        if len(y) != len(x):
            raise CalibrationError(f"{where}: y has {len(y)} rows for {len(x)} samples")
        if not np.isfinite(y).all():
            raise CalibrationError(f"{where}: y holds NaN or infinite values")
    elif y is not None:
        y = np.asarray(y).astype(np.int64)
        if y.shape != (len(x),):
            raise CalibrationError(f"{where}: y has shape {y.shape}, expected ({len(x)},)")
    return x, y


def per_input(arrays: dict[str, np.ndarray], where: str) -> np.ndarray:
    """Samples of a model with several inputs as one numpy structured array: a field per input name, each
    float32 with its own per-sample shape. Slicing, ``len``, ``np.concatenate`` and hashing work on it as on
    a plain batch, so the build passes it where a one-input model's array goes; ``x[name]`` is one input's
    batch (``edgekit.build.backends.base.feeds`` makes the engine's feeds of it)."""
    fields, lengths = [], {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating) or a.ndim < 1:
            raise CalibrationError(f"{where}: input {name!r} has dtype {a.dtype} and shape {a.shape}; give "
                                   f"preprocessed float tensors, the samples along the first axis")
        fields.append((name, np.float32, a.shape[1:]))
        lengths[name] = len(a)
    if len(set(lengths.values())) > 1:
        raise CalibrationError(f"{where}: the inputs hold different numbers of samples {lengths}; give the same "
                               f"number for every input")
    out = np.empty(next(iter(lengths.values())), dtype=np.dtype(fields))
    for name, a in arrays.items():
        out[name] = a
    return out


def named_feeds(x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """A batch of samples as an engine's feeds: a plain array goes to the first (only) input name; a structured
    array (:func:`per_input`) gives each named input its field."""
    if x.dtype.names is None:
        return {names[0]: x}
    return {name: np.ascontiguousarray(x[name]) for name in names}


def load_data(src: DataSource, preprocess: dict | None = None, labels: list[str] | None = None,
              targets: bool = False, skip_bad_images: bool = False, task: str | None = None) -> Dataset:
    """Load ``src`` into preprocessed tensors (and labels where the source has them).

    ``targets``: ``y`` holds regression/forecast values (float, any shape per sample), or padded boxes /
    label masks, not class indices.
    ``skip_bad_images``: an image folder's undecodable files are left out and listed in ``Dataset.skipped``
    (otherwise the first one refuses the build, named).
    ``task``: the build's postprocess type; a detection/segmentation split folder (``images/`` with COCO
    ``annotations.json``, YOLO ``labels/`` or ``masks/``) is read for it (``edgekit.data.detection.split_arrays``).
    """
    s = src.source
    path = Path(s)
    skipped: list[dict[str, str]] = []
    if path.is_dir() and is_split_folder(path):
        if preprocess is None:
            raise CalibrationError(f"{path} holds images with annotations but the build has no 'preprocess' "
                                   f"section", hint="add one (resize: letterbox for a detector), or give a .npz")
        x, y = split_arrays(path, preprocess, task or "classification", labels, targets)
    elif path.is_dir():
        x, y, skipped = _from_folder(path, preprocess, labels, skip_bad_images)
    elif path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise CalibrationError(f"{path} does not exist")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                x, y = _from_arrays(data, s, targets)
        else:
            x, y = _from_arrays(np.load(path, allow_pickle=False), s, targets)
    elif ":" in s and not path.exists():
        x, y = _from_arrays(resolve_callable(s)(**src.kwargs), s, targets)
    else:
        raise CalibrationError(
            f"data source {s!r} is neither an image folder, a .npy/.npz file nor 'module:factory'"
        )
    if src.count is not None:
        x = x[: src.count]
        y = y[: src.count] if y is not None else None
    if len(x) == 0:
        raise CalibrationError(f"data source {s!r} is empty")
    return Dataset(x=np.ascontiguousarray(x), y=y, source=s, skipped=skipped)

