"""``edgekit eval`` for detectors and segmenters: bundles (and a run's torch model) side by side on a split folder.

Every predictor answers the way the device does: each original image through the bundle's letterbox
preprocessing, its engine and the runtime's post-processing (decode, class-aware NMS, boxes back onto the
photo; masks resized back), at COCO's evaluation thresholds for detection (score ≥ 0.001, 100 boxes per
image). The scores are pycocotools' (mAP, AP50, per-class AP) or per-pixel IoU/Dice against the split's own
annotations; the figures put FP32 and INT8 next to each other: PR curves, a gallery of boxes (or mask
overlays), and the detection confusion matrix at IoU 0.5 per predictor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ..errors import ConfigError
from ..train.tasks import DENSE_TASKS
from .report import save_report


def bundle_task(bundle: Path, keyring: Any) -> str | None:
    """The bundle's post-processing type when it is detection or segmentation, else None."""
    return _describe(bundle, keyring)[0]


def _describe(bundle: Path, keyring: Any) -> tuple[str | None, list[str], str]:
    """One load of ``bundle``: its task (detection, segmentation or None), labels and predictor name."""
    import edgekit_runtime

    with edgekit_runtime.load(bundle, keyring=keyring) as model:
        kind = (model.manifest_json.get("postprocess") or {}).get("type")
        labels, backend = list(model.labels or []), model.manifest.backend
    kind = "detection" if kind == "detections" else kind  # a graph with NMS inside: boxes all the same
    return (kind if kind in DENSE_TASKS else None), labels, f"{backend.precision} ({backend.name})"


def _records(data: Path, task: str, classes: list[str]) -> list:
    from ..data.detection import is_split_folder, load_split_folder

    data = Path(data)
    if not is_split_folder(data):
        raise ConfigError(f"--data {data} is not a detection/segmentation split folder",
                          hint="give a folder with images/ and annotations.json (COCO), labels/ (YOLO) or masks/, "
                               "e.g. data/test")
    return load_split_folder(data, classes, masks=task == "segmentation",
                             hint="evaluate on data annotated with the model's classes, in its order").records



def evaluate_dense(source: Path, *, data: Path | None, compare: list[Path], out: Path | None,
                   keyring: Any) -> dict[str, Any]:
    """Evaluate a detection/segmentation run folder or bundle (and ``compare`` bundles) on ``data``."""
    from ..train.dense import bundle_predictions, device_predictions, eval_postprocess, score
    from ..train.run_folder import is_run_folder, read_meta
    from .dense_metrics import confusion_at_iou
    from .dense_plots import plot_detection_gallery, plot_pr_curves, plot_segmentation_overlays
    from .plots import plot_confusion_matrix

    source = Path(source)
    results: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    if is_run_folder(source):
        from ..train.dense_data import run_prepared
        from ..train.models import load_trained

        meta = read_meta(source)
        task, labels = meta["task"], list(meta["labels"])
        p = run_prepared(source)
        post = eval_postprocess(meta["postprocess"])
        model = load_trained(source / "model.pt")
        if data is None:
            split = "test" if p.records.get("test") else "val"
            records, what = p.records[split], f"the run's {split} split"
        else:
            records, what = _records(data, task, p.classes), str(data)
        results["fp32 (torch)"] = device_predictions(model, p, "", post, records=records)
        seen.add("fp32 (torch)")
        out = Path(out or source / "eval")
    else:
        task, labels, _ = _describe(source, keyring)
        if task is None:
            raise ConfigError(f"{source} is not a detection or segmentation bundle")
        if data is None:
            raise ConfigError("evaluating a detection/segmentation bundle needs --data SPLIT_FOLDER (e.g. data/test)")
        records, what = _records(data, task, labels if task == "detection" else labels[1:]), str(data)
        compare = [source, *compare]
        out = Path(out or source.with_name(source.stem + "-eval"))
    classes = labels if task == "detection" else labels[1:]
    for bundle in compare:
        bundle = Path(bundle)
        if bundle.suffix != ".ekb" or not bundle.is_file():
            raise ConfigError(f"--compare {bundle}: give a bundle (.ekb)")
        kind, _, name = _describe(bundle, keyring)
        if kind != task:
            raise ConfigError(f"--compare {bundle} is not a {task} bundle")
        if name in seen:
            name = f"{name} {bundle.stem}"
        seen.add(name)
        results[name] = bundle_predictions(bundle, keyring, records)
    out.mkdir(parents=True, exist_ok=True)
    images = [r.image for r in records]
    metrics: dict[str, Any] = {}
    figures: list[Path] = []
    if task == "detection":
        gts = [(r.boxes, r.labels) for r in records]
        scored = {n: score(task, res, records, labels) for n, res in results.items()}
        metrics = {n: {k: s[k] for k in ("map50", "map", "map75", "mar100")} |
                   {"per_class_ap50": {c: v["ap50"] for c, v in s["per_class"].items()}} for n, s in scored.items()}
        figures.append(plot_pr_curves(scored, out / "pr_curves.png"))
        figures.append(plot_detection_gallery(images[:8], gts[:8], {n: r[:8] for n, r in results.items()},
                                              classes, out / "predictions.png"))
        for i, (n, res) in enumerate(results.items()):
            cm = confusion_at_iou(res, gts, len(classes), iou=0.5, score_threshold=0.25)
            metrics[n]["confusion_iou50"] = cm.tolist()
            figures.append(plot_confusion_matrix(cm, [*classes, "background"], out / f"confusion_{i}.png",
                                                 title=f"{n}: confusion at IoU 0.5"))
    else:
        gts = [r.read_mask() for r in records]
        for n, res in results.items():
            s = score(task, res, records, labels)
            metrics[n] = {"miou": s["miou"], "dice": s["mean_dice"], "pixel_accuracy": s["pixel_accuracy"],
                          "per_class_iou": {c: v["iou"] for c, v in s["per_class"].items()}}
        figures.append(plot_segmentation_overlays(images[:8], gts[:8], {n: [r["mask"] for r in res][:8]
                                                                         for n, res in results.items()},
                                                  labels, out / "overlays.png"))
    report = _write_report(out, source, task, what, len(records), metrics, figures, classes)
    return {"source": str(source), "task": task, "data": what, "samples": len(records), "report": str(report),
            "evaluation": {"predictors": {n: {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
                                          for n, m in metrics.items()}}}


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _write_report(out: Path, source: Path, task: str, what: str, n: int, metrics: dict[str, Any],
                  figures: list[Path], classes: list[str]) -> Path:
    names = list(metrics)
    lines = [f"# Evaluation report: {source.name}", "", f"{task}, {n} images of {what}; every predictor through the "
             f"device's preprocessing and post-processing, scored against the original annotations.", ""]
    if task == "detection":
        lines += ["| predictor | mAP50 | mAP@[.5:.95] | mAP75 | AR100 |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(m['map50'])} | {_fmt(m['map'])} | {_fmt(m['map75'])} | {_fmt(m['mar100'])} |"
                  for k, m in metrics.items()]
        lines += ["", "| class | " + " | ".join(f"AP50 {k}" for k in names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(_fmt(metrics[k]["per_class_ap50"].get(c)) for k in names) + " |"
                  for c in classes]
    else:
        lines += ["| predictor | mIoU | Dice | pixel accuracy |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(m['miou'])} | {_fmt(m['dice'])} | {_fmt(m['pixel_accuracy'])} |"
                  for k, m in metrics.items()]
        lines += ["", "| class | " + " | ".join(f"IoU {k}" for k in names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(_fmt(metrics[k]["per_class_iou"].get(c)) for k in names) + " |"
                  for c in ["background", *classes]]
    lines += [""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return save_report(out, lines)
