"""``edgekit train --task detection|segmentation``: the run's model, loss, metrics and final evaluation.

The trainer is the same one classification uses (optimiser, schedule, AMP, accumulation, EMA, early
stopping, checkpoints, resume); what differs lives here:

* data: :mod:`edgekit.train.dense_data` (letterboxed images, boxes and masks that follow augmentation);
* models and losses: :mod:`edgekit.train.dense_models`, :mod:`edgekit.train.dense_losses`;
* metrics: every epoch on the validation split in network-input pixels (mAP50/mAP or mIoU/Dice);
  at the end on the test split **the way the device reports**: each original image through the
  runtime's letterbox preprocessing, the model, and the runtime's post-processing (decode, class-aware
  NMS, boxes mapped back to the original image; masks resized back), scored against the original
  annotations with :mod:`edgekit.evaluate.dense_metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config.train import TrainConfig
from ..errors import ConfigError
from .dense_data import DenseDataset, DensePrepared, prepare_dense
STRIDES = (8, 16, 32)
# what a bundle reports by default on the device
DEPLOY = {"score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 100}


def postprocess_manifest(task: str, strides: tuple[int, ...] = STRIDES, **overrides: Any) -> dict[str, Any]:
    """The bundle's post-processing section for a model this module trains."""
    if task == "segmentation":
        return {"type": "segmentation"}
    return {"type": "detection", "strides": list(strides), **DEPLOY, **overrides}


def detection_metrics_fn(p: DensePrepared, strides: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], dict]:
    """Validation mAP50/mAP every epoch (network-input pixels; the final test is in original pixels)."""
    from ..evaluate.dense_metrics import detection_map_raw

    def metrics(out: np.ndarray, y: np.ndarray) -> dict[str, float]:
        res = detection_map_raw(out, y, p.classes, p.size, strides)
        return {"map50": float(res["map50"] or 0.0), "map": float(res["map"] or 0.0)}

    return metrics


def segmentation_metrics_fn(p: DensePrepared) -> Callable[[np.ndarray, np.ndarray], dict]:
    from ..evaluate.dense_metrics import segmentation_metrics_raw

    def metrics(out: np.ndarray, y: np.ndarray) -> dict[str, float]:
        res = segmentation_metrics_raw(out, y, p.labels)
        return {"miou": float(res["miou"] or 0.0), "dice": float(res["mean_dice"] or 0.0)}

    return metrics


def check_settings(cfg: TrainConfig) -> None:
    """Settings that mean nothing for boxes and masks are refused, not ignored."""
    bad = []
    if cfg.loss.name != "auto":
        bad.append(f"loss.name {cfg.loss.name!r} (the task has its own loss)")
    if cfg.loss.class_weights != "none" or cfg.loss.sampler != "none":
        bad.append("loss.class_weights / loss.sampler")
    if cfg.augment.mixup or cfg.augment.cutmix:
        bad.append("augment.mixup / augment.cutmix")
    if cfg.distill is not None:
        bad.append("distill (distillation is for classification and regression)")
    if cfg.optim.label_smoothing:
        bad.append("optim.label_smoothing")
    if bad:
        raise ConfigError(f"{cfg.data.task} does not use {', '.join(bad)}", hint="remove them from the settings")


class _AtSize(torch.nn.Module):
    """The detection loss at the run's input size (the trainer calls ``loss_fn(out, y)``)."""

    def __init__(self, loss: torch.nn.Module, size: tuple[int, int]):
        super().__init__()
        self.loss, self.size = loss, tuple(size)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(out, y, self.size)


def build(cfg: TrainConfig) -> dict[str, Any]:
    """Data, model, loss, datasets and metrics of a detection or segmentation run."""
    from .dense_losses import DetectionLoss, SegmentationLoss
    from .models import build_model, default_arch

    check_settings(cfg)
    task = cfg.data.task
    p = prepare_dense(cfg.data, cfg.split, cfg.train.seed, multiple=max(STRIDES))
    arch = cfg.model.arch or default_arch("image", task)
    kwargs = dict(cfg.model.kwargs)
    model = build_model(arch, [3, *p.size], p.out_dim, task=task, kind="image", pretrained=cfg.model.pretrained,
                        freeze_backbone=cfg.model.freeze_backbone, checkpointing=cfg.model.checkpointing, **kwargs)
    if task == "detection":
        strides = tuple(getattr(model, "strides", STRIDES))
        loss_fn = _AtSize(DetectionLoss(p.out_dim, strides), p.size)
        metrics = detection_metrics_fn(p, strides)
        post = postprocess_manifest(task, strides)
    else:
        loss_fn, metrics, post = SegmentationLoss(), segmentation_metrics_fn(p), postprocess_manifest(task)
    augment = cfg.augment if cfg.augment.enabled else None
    meta = {"arch": arch, "task": task, "kind": "image", "input_shape": [3, *p.size], "out_dim": p.out_dim,
            "labels": p.labels, "y_stats": None, "preprocess": p.preprocess_manifest(), "postprocess": post,
            "name": cfg.run_name}
    return {"prepared": p, "arch": arch, "model": model, "loss_fn": loss_fn, "metrics_fn": metrics, "meta": meta,
            "datasets": (DenseDataset(p, "train", augment), DenseDataset(p, "val", None))}


# ----------------------------------------------------------------------------- final evaluation
def device_predictions(model, p: DensePrepared, split: str, post: dict[str, Any],
                       batch: int = 32, records: list | None = None) -> list[dict[str, Any]]:
    """Each original image of ``split`` (or of ``records``) through the runtime's preprocessing, ``model``
    (torch, FP32) and the runtime's post-processing: what ``edgekit-runtime run`` would print for the FP32
    model."""
    import torch

    from edgekit_runtime import detection as det
    from edgekit_runtime.processing import preprocess_batch

    pre = p.preprocess_manifest()
    files = [r.image for r in (p.records[split] if records is None else records)]
    results = []
    model.eval()
    for i in range(0, len(files), batch):
        metas: list = []
        x = preprocess_batch(files[i : i + batch], pre, [None, 3, *p.size], meta=metas)
        with torch.no_grad():
            out = model(torch.from_numpy(x)).float().numpy()
        for raw, m in zip(out, metas):
            results.append(det.postprocess(raw, m, post, p.labels))
    return results


def eval_postprocess(post: dict[str, Any]) -> dict[str, Any]:
    """``post`` at COCO's evaluation thresholds (score ≥ 0.001, NMS IoU 0.6, 100 boxes) for boxes; the bundle
    reports with its own. A segmentation section is returned as it is."""
    from ..evaluate.dense_metrics import EVAL_IOU_THRESHOLD, EVAL_SCORE_THRESHOLD, MAX_DETECTIONS

    if post.get("type") not in ("detection", "detections"):
        return dict(post)
    return {**post, "score_threshold": EVAL_SCORE_THRESHOLD, "iou_threshold": EVAL_IOU_THRESHOLD,
            "max_detections": MAX_DETECTIONS}


def evaluate_test(model, p: DensePrepared, split: str, post: dict[str, Any]) -> dict[str, Any]:
    """Test metrics in original image pixels from the device post-processing (evaluation thresholds); the
    predictions are the runtime's results (boxes) or masks."""
    records = p.records[split]
    res = device_predictions(model, p, split, eval_postprocess(post))
    if p.task == "detection":
        return {"coco": score("detection", res, records, p.classes), "predictions": res}
    return {"segmentation": score("segmentation", res, records, p.labels), "predictions": [r["mask"] for r in res]}


def test_metrics(task: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The ``test`` block of metrics.json (fractions 0..1)."""
    if task == "detection":
        c = evaluation["coco"]
        return {"map50": c["map50"], "map": c["map"], "map75": c.get("map75"), "mar100": c.get("mar100"),
                "per_class_ap50": {k: v["ap50"] for k, v in c["per_class"].items()},
                "per_class_ap": {k: v["ap"] for k, v in c["per_class"].items()}}
    s = evaluation["segmentation"]
    return {"miou": s["miou"], "dice": s["mean_dice"], "pixel_accuracy": s.get("pixel_accuracy"),
            "per_class_iou": {k: v["iou"] for k, v in s["per_class"].items()},
            "per_class_dice": {k: v["dice"] for k, v in s["per_class"].items()}}


def write_figures(p: DensePrepared, split: str, evaluation: dict[str, Any], out_dir: Path,
                  count: int = 8) -> list[Path]:
    """PR curves and a prediction gallery (detection) or mask overlays (segmentation) for report.md."""
    from ..evaluate.dense_plots import plot_detection_gallery, plot_pr_curves, plot_segmentation_overlays

    records = p.records[split][:count]
    images = [r.image for r in records]
    if p.task == "detection":
        return [plot_pr_curves({"FP32": evaluation["coco"]}, out_dir / "pr_curves.png"),
                plot_detection_gallery(images, [(r.boxes, r.labels) for r in records],
                                       {"FP32": evaluation["predictions"][:count]}, p.classes,
                                       out_dir / "predictions.png")]
    return [plot_segmentation_overlays(images, [r.read_mask() for r in records],
                                       {"FP32": evaluation["predictions"][:count]}, p.labels, out_dir / "overlays.png")]


def write_report(run_dir: Path, summary: dict[str, Any], test: dict[str, Any], figures: list[Path]) -> Path:
    """``report.md`` of a detection or segmentation run: facts, split, headline and per-class metrics, figures."""
    from ..evaluate.report import save_report

    lines = [f"# Evaluation report: {summary['run']}", "", "| | |", "|---|---|"]
    for k in ("task", "arch", "seed", "epochs_run", "best_epoch", "evaluated_on", "input_size"):
        lines.append(f"| {k.replace('_', ' ')} | {summary.get(k)} |")
    lines += ["", "## Data", "", "| split | images | objects |", "|---|---|---|"]
    for name, row in summary["split_report"].items():
        if isinstance(row, dict):
            lines.append(f"| {name} | {row['images']} | {row['objects']} |")
    split = summary["split_report"]
    lines += ["", f"Split: {split.get('method')}; annotations: {split.get('source')}.",
              ""]
    if summary["task"] == "detection":
        lines += ["## Metrics (COCO, pycocotools; boxes from the device post-processing in original image pixels)", "",
                  f"mAP@[.5:.95] **{test['map']:.3f}** · mAP50 **{test['map50']:.3f}** · mAP75 "
                  f"{(test.get('map75') or 0):.3f}", "", "| class | AP50 | AP |", "|---|---|---|"]
        for name, ap50 in (test.get("per_class_ap50") or {}).items():
            ap = (test.get("per_class_ap") or {}).get(name)
            cells = ["–" if v is None else f"{v:.3f}" for v in (ap50, ap)]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    else:
        lines += ["## Metrics (masks from the device post-processing at the original image size)", "",
                  f"mIoU **{test['miou']:.3f}** · Dice **{test['dice']:.3f}** · pixel accuracy "
                  f"{(test.get('pixel_accuracy') or 0):.3f}", "", "| class | IoU |", "|---|---|"]
        for name, iou in (test.get("per_class_iou") or {}).items():
            lines.append(f"| {name} | {'–' if iou is None else f'{iou:.3f}'} |")
    lines.append("")
    for f in figures:
        lines += [f"![{Path(f).stem}]({Path(f).name})", ""]
    return save_report(run_dir, lines, summary.get("notes"))


def finish(cfg: TrainConfig, built: dict[str, Any], fit, run_dir: Path, world_size: int,
           seconds: float) -> tuple[dict[str, Any], Path | None]:
    """Evaluate the best checkpoint on the test split (val where the data has none): metrics.json, report.md."""
    from .models import load_trained
    from .run_folder import write_metrics

    p: DensePrepared = built["prepared"]
    best = load_trained(run_dir / "model.pt")
    split = "test" if "test" in p.records else "val"
    evaluation = evaluate_test(best, p, split, built["meta"]["postprocess"])
    test = test_metrics(p.task, evaluation)
    notes = [f"architecture {built['arch']}"]
    if split == "val":
        notes.append("the data has no test/ split: the figures are on the validation split, which also chose the "
                     "best epoch")
    if fit.stopped_early:
        notes.append(f"early stopping after {fit.epochs_run} epochs ({fit.monitor} did not improve for "
                     f"{cfg.train.early_stopping})")
    val_row = fit.history[fit.best_epoch - 1] if 0 < fit.best_epoch <= len(fit.history) else {}
    metrics = {
        "task": p.task, "kind": "image", "arch": built["arch"], "evaluated_on": split, "test": test,
        "val": {k[4:]: v for k, v in val_row.items() if k.startswith("val_")}, "monitor": fit.monitor,
        "best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "stopped_early": fit.stopped_early,
        "world_size": world_size, "seed": cfg.train.seed, "seconds": round(seconds, 2),
        "params": sum(v.numel() for v in best.parameters()), "input_size": list(p.size), "classes": p.classes,
        "split": p.split_report, "history": fit.history,
    }
    figures = write_figures(p, split, evaluation, run_dir) if cfg.evaluate else []
    write_metrics(run_dir, metrics)
    if not cfg.evaluate:
        return metrics, None
    summary = {"run": cfg.run_name, "task": p.task, "arch": built["arch"], "seed": cfg.train.seed,
               "epochs_run": len(fit.history), "best_epoch": fit.best_epoch, "evaluated_on": split,
               "input_size": list(p.size), "split_report": p.split_report, "notes": notes}
    return metrics, write_report(run_dir, summary, test, figures)


def bundle_predictions(bundle: Path, keyring, records: list, batch: int = 16) -> list[dict[str, Any]]:
    """Each original image through a bundle on the device runtime (its engine, preprocessing and
    post-processing), at the evaluation thresholds for detection: the device's own answers, scorable."""
    import edgekit_runtime
    from edgekit_runtime import detection as det

    out: list[dict[str, Any]] = []
    with edgekit_runtime.load(bundle, keyring=keyring) as model:
        post = eval_postprocess(model.manifest_json["postprocess"])
        files = [r.image for r in records]
        fixed = model.inputs[0].shape[0]
        batch = fixed if isinstance(fixed, int) else batch  # a graph exported at batch 1 (NMS inside) takes 1
        for i in range(0, len(files), batch):
            metas: list = []
            raw = model.run(model.preprocess(files[i : i + batch], meta=metas))[model.outputs[0].name]
            out += [det.postprocess(r, m, post, model.labels) for r, m in zip(raw, metas)]
    return out


def score(task: str, results: list[dict[str, Any]], records: list, labels: list[str]) -> dict[str, Any]:
    """pycocotools mAP (detection) or mIoU/Dice (segmentation) of device results against the annotations."""
    from ..evaluate.dense_metrics import coco_map, segmentation_metrics

    if task == "detection":
        return coco_map(results, [(r.boxes, r.labels) for r in records], labels)
    return segmentation_metrics([r["mask"] for r in results], [r.read_mask() for r in records], len(labels),
                                class_names=labels)
