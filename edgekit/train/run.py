"""A training run from data to a run folder: prepare, build, fit, evaluate, write what a build needs.

``runs/NAME/`` holds ``train.yaml`` (the config as resolved), ``model.pt`` (best checkpoint with
what rebuilds the module), ``last.pt`` (for ``--resume``), ``metrics.json``, ``report.md`` and its
PNGs, and ``tensorboard/`` event files. A run folder is a model source for ``edgekit compile``
(:func:`edgekit.train.run_folder.build_settings`).

``--nproc N`` re-launches this module's work under ``torch.distributed.run`` (DDP: gloo on CPUs,
NCCL on GPUs); the same code runs under ``torchrun`` across machines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.fileio import atomic_write

from ..config.train import TrainConfig
from ..errors import ConfigError, EdgekitError, ExitCode
from .run_folder import write_metrics
from .tasks import DENSE_TASKS, Task, get_task
from .trainer import Callbacks, DistInfo, FitResult, Trainer, seed_everything

log = logging.getLogger(__name__)

# what a finished or interrupted run holds: never overwritten by a new run (train.yaml alone is)
RUN_FILES = ("model.pt", "last.pt", "metrics.json")


class TrainingInterrupted(EdgekitError):
    """Ctrl-C during training: ``last.pt`` holds the last finished epoch."""

    exit_code = ExitCode.INTERRUPTED


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    report: Path | None


@dataclass
class _Setup:
    prepared: Any
    task: Task
    arch: str
    model: Any
    meta: dict[str, Any]
    loss_fn: Any
    sample_weights: np.ndarray | None
    mixer: Any
    teacher: Any = None  # the frozen distillation teacher (train.distill), or None
    kd: Any = None
    dense: dict[str, Any] | None = None  # detection/segmentation: what edgekit.train.dense.build made


def write_config(cfg: TrainConfig, path: Path) -> None:
    import yaml

    atomic_write(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode(), durable=False)


def _setup(cfg: TrainConfig, dist: DistInfo) -> _Setup:
    if cfg.data.task in DENSE_TASKS:
        from .dense import build

        seed_everything(cfg.train.seed, cfg.train.deterministic)  # the same initial weights on every rank
        b = build(cfg)
        return _Setup(b["prepared"], get_task(cfg.data.task, "image"), b["arch"], b["model"], b["meta"],
                      b["loss_fn"], None, None, dense=b)
    from .augment import batch_mixer
    from .data import prepare
    from .losses import class_weights, make_loss
    from .models import build_model, default_arch

    p = prepare(cfg.data, cfg.split, cfg.train.seed)
    task = get_task(cfg.data.task, p.kind)
    arch = cfg.model.arch or default_arch(p.kind, task.name)
    out_dim = task.out_dim(p.y["train"], p.labels)
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # the same initial weights on every rank
    kwargs = dict(cfg.model.kwargs)
    if p.kind == "forecast" and arch == "gru" and "level" not in kwargs:
        # level-free forecasting (predict the change from the last value); kwargs level: null turns it off
        kwargs["level"] = [p.norm.mean[0] / p.norm.scale, p.norm.std[0] / p.norm.scale]
    model = build_model(arch, list(p.input_shape), out_dim, task=task.name, y_stats=p.y_stats,
                        pretrained=cfg.model.pretrained, freeze_backbone=cfg.model.freeze_backbone,
                        checkpointing=cfg.model.checkpointing, **kwargs)
    weights = sample_weights = None
    if task.classifies:
        counts = np.bincount(p.y["train"], minlength=out_dim)
        if cfg.loss.class_weights != "none":
            weights = class_weights(p.y["train"], out_dim, cfg.loss.class_weights)
        if cfg.loss.sampler == "weighted":
            sample_weights = (1.0 / np.maximum(counts, 1))[p.y["train"]]
    elif cfg.loss.class_weights != "none" or cfg.loss.sampler != "none" or cfg.loss.name in ("cross_entropy", "focal"):
        raise ConfigError(f"loss.{'name' if cfg.loss.name in ('cross_entropy', 'focal') else 'class_weights/sampler'} "
                          f"applies to classification; {task.name} uses mse or huber")
    loss_fn = make_loss(task.name, name=cfg.loss.name, class_weights=weights, focal_gamma=cfg.loss.focal_gamma,
                        label_smoothing=cfg.optim.label_smoothing)
    mixer = None
    if cfg.augment.enabled and (cfg.augment.mixup or cfg.augment.cutmix):
        if not (task.classifies and p.kind in ("image", "sequence")):
            raise ConfigError(f"augment.mixup/cutmix mix classes of images or sequences; this run is {task.name} on "
                              f"{p.kind} data: set them to 0")
        mixer = batch_mixer(cfg.augment, out_dim)
    meta = {"arch": arch, "task": task.name, "kind": p.kind,
            "input_shape": list(p.input_shape), "out_dim": out_dim, "labels": p.labels,
            "y_stats": [list(map(float, s)) for s in p.y_stats] if p.y_stats is not None else None,
            "preprocess": p.preprocess_manifest(), "name": cfg.run_name}
    teacher = kd = None
    if cfg.distill is not None:
        from .distill import KD, load_teacher

        d = cfg.distill
        kd = KD(temperature=d.temperature, alpha=d.alpha, features=d.features)
        teacher = load_teacher(d.teacher, p.input_shape, out_dim, labels=p.labels if task.classifies else None,
                               preprocess=meta["preprocess"])
        meta["distill"] = {"teacher": d.teacher, "teacher_params": sum(v.numel() for v in teacher.parameters()),
                           **kd.as_dict()}
    return _Setup(p, task, arch, model, meta, loss_fn, sample_weights, mixer, teacher, kd)


def _init_dist(dist: DistInfo, device: str) -> None:
    """Join the process group: NCCL for ranks on GPUs (one GPU per local rank), gloo on CPUs."""
    if dist.world_size > 1:
        import torch
        import torch.distributed as td

        from .trainer import pick_device

        on_gpu = pick_device(device, dist).type == "cuda"
        if on_gpu:
            torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
        if not td.is_initialized():
            td.init_process_group("nccl" if on_gpu else "gloo")


def _load_last(run_dir: Path) -> dict[str, Any]:
    import torch

    path = run_dir / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist; start the run without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_out(cfg: TrainConfig, resume: bool) -> None:
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (runs/NAME)")
    if resume:
        return
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}); give another --out, or --resume "
                          f"to continue it")


def train(cfg: TrainConfig, *, resume: bool = False, callbacks: Callbacks | None = None,
          dist: DistInfo | None = None) -> RunResult:
    """Train in this process (or as one DDP rank when launched by torch.distributed.run)."""
    import torch

    from .models import save_checkpoint

    dist = dist or DistInfo.from_env()
    if cfg.nproc > 1 and dist.world_size == 1:
        return launch(cfg, resume=resume)
    t0 = time.perf_counter()
    run_dir = cfg.out
    if dist.main:
        _check_out(cfg, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
    _init_dist(dist, cfg.train.device)
    try:
        if resume and dist.main:
            _warn_changed(cfg, run_dir / "train.yaml")
        s = _setup(cfg, dist)
        if dist.main:
            write_config(cfg, run_dir / "train.yaml")
        from .augment import make_dataset

        if s.dense is not None:
            train_ds, val_ds = s.dense["datasets"]
        else:
            train_ds = make_dataset(s.prepared, "train", cfg.augment if cfg.augment.enabled else None)
            val_ds = make_dataset(s.prepared, "val", None)
        trainer = Trainer(
            cfg, s.model, s.task, train_ds, val_ds, loss_fn=s.loss_fn,
            y_stats=None if s.dense else s.prepared.y_stats, sample_weights=s.sample_weights, mixer=s.mixer,
            run_dir=run_dir, save_best=lambda m, info: save_checkpoint(run_dir / "model.pt", m, {**s.meta, **info}),
            callbacks=callbacks, dist=dist, teacher=s.teacher, distill=s.kd,
            metrics_fn=s.dense["metrics_fn"] if s.dense else None)
        state = _load_last(run_dir) if resume else None
        if state is not None and state.get("seed") != cfg.train.seed:
            raise ConfigError(f"last.pt was trained with seed {state.get('seed')}; resume with the same "
                              f"train.seed")
        fit = trainer.fit(state)
        if fit.interrupted and not fit.history:
            raise TrainingInterrupted("interrupted before the first epoch finished: there is nothing to resume; "
                                      "start the run again (without --resume)")
        if fit.interrupted:
            raise TrainingInterrupted(f"interrupted after {fit.epochs_run} epoch(s); {run_dir / 'last.pt'} holds "
                                      f"the last finished epoch: continue with --resume")
        metrics: dict[str, Any] = {}
        report = None
        if dist.main:
            seconds = (state or {}).get("seconds", 0.0) + time.perf_counter() - t0
            if s.dense is not None:
                from .dense import finish as finish_dense

                metrics, report = finish_dense(cfg, s.dense, fit, run_dir, dist.world_size, seconds)
            else:
                metrics, report = finish(cfg, s, fit, run_dir, dist.world_size, seconds)
        if dist.world_size > 1:
            torch.distributed.barrier()
        return RunResult(run_dir, metrics, report)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _warn_changed(cfg: TrainConfig, path: Path) -> None:
    """A resumed run with other settings is a different run: say which settings changed."""
    import yaml

    if not path.is_file():
        return
    before = yaml.safe_load(path.read_text()) or {}
    now = cfg.model_dump(mode="json")
    if (before.get("train") or {}).get("epochs", cfg.train.epochs) != cfg.train.epochs and \
            cfg.optim.schedule == "onecycle":
        raise ConfigError(f"the run was started with train.epochs {before['train']['epochs']}; a OneCycle schedule "
                          f"cannot be stretched to {cfg.train.epochs} on --resume: resume with the same epochs")
    changed = [f"{section}.{k}" for section, values in now.items() if isinstance(values, dict)
               for k, v in values.items() if (before.get(section) or {}).get(k, v) != v]
    changed += [k for k, v in now.items() if not isinstance(v, dict) and k != "nproc" and before.get(k, v) != v]
    if changed:
        log.warning("resuming with settings that differ from the interrupted run (%s): the result will not be "
                    "the run it would have been", ", ".join(changed))


def finish(cfg: TrainConfig, s: _Setup, fit: FitResult, run_dir: Path, world_size: int,
           seconds: float) -> tuple[dict[str, Any], Path | None]:
    """Evaluate the best checkpoint on the test split and write metrics.json and report.md."""
    from ..evaluate import TorchPredictor, evaluate, write_report
    from .models import load_trained

    p = s.prepared
    best = load_trained(run_dir / "model.pt")
    val_out = TorchPredictor(best, p.norm).predict(p.x["val"])
    val = s.task.metrics(val_out, p.y["val"])
    split = "test" if len(p.x.get("test", ())) else "val"
    if not cfg.evaluate:  # the headline metrics only: no report, plots or robustness table
        evaluation = {"primary": s.task.metrics(TorchPredictor(best, p.norm).predict(p.x[split]), p.y[split]),
                      "baselines": None}
    else:
        evaluation = evaluate([TorchPredictor(best, p.norm)], p.x[split], p.y[split], task=s.task.name,
                              kind=p.kind, labels=p.labels, meta=p.meta.get(split), season=p.season,
                              history=fit.history, out_dir=run_dir, robustness=cfg.robustness, seed=cfg.train.seed)
    first = evaluation["primary"]
    keys = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc_ovr", "ece") \
        if s.task.classifies else ("rmse", "mae", "mape", "r2")
    test: dict[str, Any] = {k: first.get(k) for k in keys if k in first}
    if s.task.classifies:
        test["per_class_recall"] = {row["label"]: row["recall"] for row in first.get("per_class", [])}
    elif evaluation.get("baselines"):
        test["baselines"] = evaluation["baselines"]
    notes = [f"architecture {s.arch} ({'chosen for ' + p.kind + ' data' if not cfg.model.arch else 'as asked'})"]
    if split == "val":
        notes.append("the data has no test split (split.test is 0): the figures below are on the validation split")
    if fit.stopped_early:
        notes.append(f"early stopping after {fit.epochs_run} epochs ({fit.monitor} did not improve for "
                     f"{cfg.train.early_stopping})")
    metrics = {
        "task": s.task.name, "kind": p.kind, "arch": s.arch, "evaluated_on": split,
        "test": test, "val": val, "monitor": fit.monitor, "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history), "stopped_early": fit.stopped_early, "world_size": world_size,
        "seed": cfg.train.seed, "seconds": round(seconds, 2), "params": sum(v.numel() for v in best.parameters()),
        "split": p.split_report, "data_sha256": p.source.get("sha256"), "history": fit.history,
        "evaluation": evaluation,
    }
    if s.meta.get("distill"):
        metrics["distill"] = s.meta["distill"]
    write_metrics(run_dir, metrics)
    if not cfg.evaluate:
        return metrics, None
    summary = {"run": cfg.run_name, "task": s.task.name, "kind": p.kind, "arch": s.arch, "seed": cfg.train.seed,
               "world_size": world_size, "epochs_run": len(fit.history), "best_epoch": fit.best_epoch,
               "split_report": p.split_report, "evaluation": evaluation, "notes": notes}
    report = write_report(run_dir, summary)
    return metrics, report


def launch(cfg: TrainConfig, *, resume: bool = False) -> RunResult:
    """Run ``cfg`` under ``torch.distributed.run`` with ``cfg.nproc`` local processes; returns rank 0's result."""
    _check_out(cfg, resume)
    cfg.out.mkdir(parents=True, exist_ok=True)
    spec = cfg.out / "train.yaml"
    if resume:
        _warn_changed(cfg, spec)
    write_config(cfg, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
           "-m", "edgekit.cli.train_worker", str(spec)] + (["--resume"] if resume else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    try:
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them write last.pt and stop
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise TrainingInterrupted(f"interrupted; {cfg.out / 'last.pt'} holds the last finished epoch: continue "
                                  f"with --resume") from None
    if proc.returncode in (130, -2):
        raise TrainingInterrupted(f"interrupted; {cfg.out / 'last.pt'} holds the last finished epoch: continue "
                                  f"with --resume")
    if proc.returncode != 0:
        raise EdgekitError(f"distributed training failed (torch.distributed.run exited {proc.returncode}); "
                           f"the workers' errors are above")
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    report = cfg.out / "report.md"
    return RunResult(cfg.out, metrics, report if report.is_file() else None)


def find_lr(cfg: TrainConfig, *, start: float = 1e-6, end: float = 1.0, steps: int = 100) -> dict[str, Any]:
    """LR range test (Smith 2017): raise the LR exponentially over ``steps`` batches, plot the loss.

    Suggests the LR where the smoothed loss falls fastest; writes lr_find.png and lr_find.json.
    """
    from .augment import make_dataset
    from .trainer import EpochSampler, _batches

    dist = DistInfo()
    s = _setup(cfg, dist)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(s.prepared, "train", cfg.augment if cfg.augment.enabled else None)
    trainer = Trainer(cfg, s.model, s.task, ds, make_dataset(s.prepared, "val", None), loss_fn=s.loss_fn,
                      y_stats=s.prepared.y_stats, run_dir=cfg.out, dist=dist)
    trainer.writer = None
    opt = trainer.opt
    factor = (end / start) ** (1 / max(1, steps - 1))
    for g in opt.param_groups:
        g["lr"] = start
    model = trainer.model.train()
    lrs, losses, smooth, best = [], [], 0.0, float("inf")
    sampler = EpochSampler(len(ds), cfg.train.seed, dist)
    epoch = 0
    while len(lrs) < steps:
        for xb, yb in _batches(ds, sampler.indices(epoch), trainer.micro):
            lr = opt.param_groups[0]["lr"]
            opt.zero_grad(set_to_none=True)
            loss = trainer._loss(model(xb.to(trainer.device)), yb.to(trainer.device))
            loss.backward()
            opt.step()
            value = loss.item()
            smooth = 0.9 * smooth + 0.1 * value  # exponential average, bias-corrected below
            corrected = smooth / (1 - 0.9 ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(corrected)
            best = min(best, corrected)
            for g in opt.param_groups:
                g["lr"] = lr * factor
            if len(lrs) >= steps or not np.isfinite(value) or (len(lrs) > 5 and corrected > 4 * best):
                break
        if len(lrs) >= steps or not np.isfinite(losses[-1]) or (len(lrs) > 5 and losses[-1] > 4 * best):
            break
        epoch += 1
    log_lr = np.log10(np.asarray(lrs))
    grads = np.gradient(np.asarray(losses), log_lr) if len(lrs) > 2 else np.zeros(len(lrs))
    cut = max(1, len(lrs) // 10)  # skip the first points (noisy) and stop before the blow-up
    lo, hi = cut, max(cut + 1, int(np.argmin(losses)) + 1)
    idx = lo + int(np.argmin(grads[lo:hi])) if hi > lo else int(np.argmin(losses))
    suggested = float(lrs[idx])
    result = {"suggested_lr": suggested, "min_loss_lr": float(lrs[int(np.argmin(losses))]), "lrs": lrs,
              "losses": losses}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"LR range test: {s.arch}")
    ax.legend()
    fig.tight_layout()
    png = cfg.out / "lr_find.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    result["plot"] = str(png)
    (cfg.out / "lr_find.json").write_text(json.dumps(result, indent=2))
    return result
