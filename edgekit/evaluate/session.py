"""``edgekit eval``: a run folder (torch) or bundles (the device runtime) on one data set, side by side.

A run folder without ``--data`` is evaluated on its own test split (split again with its seed,
refused when the data changed). ``--data`` evaluates on a whole file instead (its
``x_test``/``y_test`` when it has them). Bundles always need ``--data``; FP32 and INT8 bundles,
or two versions, go through the runtime in one report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, ConfigError


def _load_file(data: Path, like: Any | None, task: str, pre: Any | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str] | None, str, int | None]:
    """Raw inputs, targets, meta, label names, kind and season of every sample in ``data``.

    ``pre`` (the model's preprocessing) fixes what the file must become: an image folder is resized
    to the model's size and read in its colour, as the device would, not by the folder's own median.
    """
    from ..config.train import DataConfig
    from ..train.data import _load

    fields = like.model_dump() if like is not None else {"task": task}
    fields.update(path=data)
    spec = pre if isinstance(pre, dict) or pre is None else {"type": pre.type, "size": pre.size, "color": pre.color}
    if spec is not None and spec.get("type") == "image":
        # the loader reads RGB arrays (the runtime converts them for a bgr model)
        color = "gray" if spec.get("color") == "gray" else "rgb"
        fields.update(kind="image", image_size=list(spec["size"]), color=color)
    loaded = _load(DataConfig(**fields))
    if loaded.x_test is not None:
        return loaded.x_test, loaded.y_test, loaded.meta_test, loaded.labels, loaded.kind, loaded.season
    return loaded.x, loaded.y, loaded.meta, loaded.labels, loaded.kind, loaded.season


def _remap(y: np.ndarray, names: list[str] | None, model_labels: list[str] | None) -> np.ndarray:
    """Class indices of the file (named ``names``) as indices of the model's labels."""
    if names is None or model_labels is None:
        return y
    unknown = sorted(set(names) - set(model_labels))
    if unknown:
        raise CalibrationError(f"the data has classes {unknown[:5]} the model was not trained on "
                               f"(it knows {model_labels[:10]})")
    lookup = np.array([model_labels.index(n) for n in names], dtype=np.int64)
    return lookup[y]


def evaluate_source(source: Path, *, data: Path | None = None, compare: list[Path] | None = None,
                    out: Path | None = None, robustness: bool = True, keyring_path: Path | None = None,
                    task: str | None = None) -> dict[str, Any]:
    """Evaluate ``source`` (run folder or bundle) and any ``compare`` bundles; writes report.md + PNGs."""
    import yaml

    from ..config.base import parse
    from ..config.train import TrainConfig
    from ..train.data import Normalizer, load_run_data
    from ..train.models import load_trained
    from ..train.run_folder import is_run_folder, read_meta
    from .predictors import BundlePredictor, TorchPredictor
    from .report import evaluate, write_report

    source = Path(source)
    compare = list(compare or [])
    predictors: list[Any] = []
    keyring = None
    if keyring_path is not None:
        from edgekit_runtime.keyring import Keyring

        keyring = Keyring.from_paths(keyring_path)
    season = None
    from .dense_session import DENSE_TASKS, bundle_task, evaluate_dense

    if (is_run_folder(source) and read_meta(source).get("task") in DENSE_TASKS) or (
            source.suffix == ".ekb" and source.is_file() and bundle_task(source, keyring) is not None):
        return evaluate_dense(source, data=data, compare=compare, out=out, keyring=keyring)
    if is_run_folder(source):
        meta = read_meta(source)
        cfg = parse(TrainConfig, yaml.safe_load((source / "train.yaml").read_text()) or {},
                    str(source / "train.yaml"))
        pre = meta["preprocess"]
        norm = Normalizer(scale=float(pre.get("scale", 1.0)), mean=list(pre["mean"]), std=list(pre["std"]))
        predictors.append(TorchPredictor(load_trained(source / "model.pt"), norm, name="fp32 (torch)"))
        task_name, labels = meta["task"], meta.get("labels")
        if data is None:
            p = load_run_data(source)
            split = "test" if len(p.x["test"]) else "val"
            raw, y, slices, kind, season = p.x[split], p.y[split], p.meta.get(split), p.kind, p.season
            what = f"{cfg.data.path} ({split} split)"
        else:
            raw, y, slices, names, kind, season = _load_file(data, cfg.data, task_name, meta["preprocess"])
            y = _remap(y, names, labels) if task_name == "classification" else y
            what = str(data)
        out = out or source / "eval"
    elif source.suffix == ".ekb" and source.is_file():
        if data is None:
            raise ConfigError("evaluating a bundle needs --data (an image folder, .npz, .csv or .parquet)")
        first = BundlePredictor(source, keyring=keyring)
        predictors.append(first)
        m = first.model.manifest
        post = m.postprocess
        task_name = task or ("classification" if post is not None and post.type == "classification" else "regression")
        labels = list(first.model.labels) if first.model.labels else None
        raw, y, slices, names, kind, season = _load_file(data, None, task_name, m.preprocess)
        y = _remap(y, names, labels) if task_name == "classification" else y
        what = str(data)
        out = out or source.with_name(source.stem + "-eval")
    else:
        raise ConfigError(f"{source} is neither a run folder (with model.pt) nor a bundle (.ekb)")
    for other in compare:
        if other.suffix != ".ekb" or not other.is_file():
            raise ConfigError(f"--compare {other}: give a bundle (.ekb)")
        predictors.append(BundlePredictor(other, keyring=keyring))
    # two bundles of the same precision and backend would share a name
    seen: dict[str, int] = {}
    for pr in predictors:
        if pr.name in seen:
            seen[pr.name] += 1
            pr.name = f"{pr.name} #{seen[pr.name]}"
        else:
            seen[pr.name] = 1
    try:
        result = evaluate(predictors, raw, y, task=task_name, kind=kind, labels=labels, meta=slices, season=season,
                          out_dir=Path(out), robustness=robustness)
    finally:
        for pr in predictors:
            close = getattr(pr, "close", None)
            if close is not None:
                close()
    summary = {"run": source.name, "task": task_name, "kind": kind, "evaluation": result,
               "notes": [f"evaluated on {what}: {len(y)} samples"] +
                        [f"{pr.name}: {getattr(pr, 'path', source)}" for pr in predictors]}
    report = write_report(Path(out), summary)
    return {"source": str(source), "data": what, "samples": int(len(y)), "report": str(report),
            "evaluation": {"predictors": {n: {k: v for k, v in result["metrics"][n].items()
                                              if isinstance(v, (int, float)) or v is None}
                                          for n in result["predictors"]},
                           "robustness": result.get("robustness"), "baselines": result.get("baselines")}}
