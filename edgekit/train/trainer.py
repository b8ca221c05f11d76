"""The training loop: one process or one rank of a DDP job, resumable to the same final metrics.

Reproducibility comes from reseeding every epoch from (seed, epoch, rank) and drawing the
epoch's sample order from the same seed: an interrupted run resumed from ``last.pt`` runs
exactly the epochs the uninterrupted one would have. Every rank evaluates the full
validation split, so early stopping agrees across ranks without talking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from ..config.train import TrainConfig
from ..errors import ConfigError
from .distill import KD, Distiller
from .tasks import Task, monitor_mode

log = logging.getLogger(__name__)


class Callbacks(Protocol):
    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def on_batch(self, step: int, loss: float) -> None: ...
    def on_epoch_end(self, row: dict[str, Any]) -> None: ...


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@dataclass
class FitResult:
    model: nn.Module  # the best weights (EMA where enabled), eval mode, on the CPU
    history: list[dict[str, Any]]
    best_epoch: int
    best_value: float
    monitor: str
    epochs_run: int
    stopped_early: bool
    interrupted: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def pick_device(choice: str, dist: DistInfo) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but torch sees no CUDA device; use cpu or auto")
        return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision fp16 needs CUDA (a grad scaler on a GPU); use bf16 on the CPU")
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else None


class EpochSampler:
    """This rank's share of one epoch's order: a seeded permutation, or a class-balanced weighted draw."""

    def __init__(self, n: int, seed: int, dist: DistInfo, weights: np.ndarray | None = None):
        self.n, self.seed, self.dist, self.weights = n, seed, dist, weights
        self.per_rank = math.ceil(n / dist.world_size)

    def indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            order = rng.permutation(self.n)
        else:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights / self.weights.sum())
        total = self.per_rank * self.dist.world_size
        order = np.concatenate([order, order[: total - len(order)]])  # pad like DistributedSampler
        return order[self.dist.rank :: self.dist.world_size]


def _batches(dataset, idx: np.ndarray, batch: int, *, workers: int = 0, seed: int = 0):
    """``dataset[idx]`` in batches, lazily; with ``workers`` > 0 in worker processes seeded from ``seed``."""
    from torch.utils.data import DataLoader

    chunks = [idx[i : i + batch].tolist() for i in range(0, len(idx), batch)]
    return DataLoader(dataset, batch_sampler=chunks, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    o = cfg.optim
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = int(round(o.warmup_epochs * steps_per_epoch))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if o.schedule == "step":
            return o.gamma ** ((step // steps_per_epoch) // o.step_size)
        return 1.0

    return f


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.optim.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.optim.lr, total_steps=max(1, cfg.train.epochs * steps_per_epoch),
            pct_start=max(0.05, min(0.5, cfg.optim.warmup_epochs / cfg.train.epochs)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))


class Trainer:
    """Fits ``model`` on the prepared splits; writes ``last.pt`` every epoch and on Ctrl-C (rank 0)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, train_ds, val_ds, *,
                 loss_fn: nn.Module, y_stats: tuple[list[float], list[float]] | None = None,
                 sample_weights: np.ndarray | None = None, mixer=None, run_dir: Path,
                 save_best: Callable[[nn.Module, dict[str, Any]], None] | None = None,
                 callbacks: Callbacks | None = None, dist: DistInfo | None = None,
                 teacher: nn.Module | None = None, distill: KD | None = None,
                 metrics_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None):
        self.cfg, self.task = cfg, task
        self.metrics_fn = metrics_fn or task.metrics
        self.dist = dist or DistInfo()
        self.device = pick_device(cfg.train.device, self.dist)
        self.model = model.to(self.device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.loss_fn = loss_fn.to(self.device)
        self.mixer = mixer
        self.run_dir = run_dir
        self.save_best = save_best
        self.cb = callbacks
        self.monitor, self.mode = monitor_mode(task, cfg.train.monitor)
        self.amp = autocast_dtype(cfg.train.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.y_mean = self.y_std = None
        if y_stats is not None:
            self.y_mean = torch.tensor(y_stats[0], dtype=torch.float32, device=self.device)
            self.y_std = torch.tensor(y_stats[1], dtype=torch.float32, device=self.device)
        self.micro = cfg.train.batch_size // self.dist.world_size
        self.sampler = EpochSampler(len(train_ds), cfg.train.seed, self.dist, sample_weights)
        micro_steps = math.ceil(self.sampler.per_rank / self.micro)
        self.steps_per_epoch = math.ceil(micro_steps / cfg.train.accumulate)
        self.distiller: Distiller | None = None
        projection = None
        if distill is not None and teacher is None:
            raise ConfigError("distillation settings without a teacher: give distill.teacher (a run folder or "
                              "package.module:factory)")
        if teacher is not None:
            if teacher is model:
                raise ConfigError("the distillation teacher is the student itself; pass a frozen copy (e.g. the "
                                  "unpruned model) as the teacher")
            # the teacher is never wrapped in DDP: it takes no gradient, each rank runs its own copy
            self.distiller = Distiller(teacher.to(self.device), distill or KD(), classifies=task.classifies,
                                       standardize=self._standardize)
            if self.distiller.kd.features:
                probe = train_ds[0][0].unsqueeze(0).to(self.device)
                projection = self.distiller.setup(self.model, probe)
        self.ddp = None
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
            if projection is not None:  # DDP broadcasts the student's weights; the projection starts equal too
                import torch.distributed as td

                for p in projection.parameters():
                    td.broadcast(p.data, 0)
        # the feature projection trains with the student (the teacher's parameters are frozen)
        trained = self.model if projection is None else nn.ModuleList([self.model, projection])
        self.projection = projection
        self.opt = make_optimizer(cfg, trained)
        self.sched = make_scheduler(cfg, self.opt, self.steps_per_epoch)
        self.ema = None
        if cfg.optim.ema:
            from torch.optim.swa_utils import AveragedModel

            decay = cfg.optim.ema

            def ema_step(avg: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
                # warm-up (as timm's ModelEmaV2): early averages follow the weights, or a 0.999 average of a
                # short run would stay near the random initialisation
                d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
                return avg + (current - avg) * (1.0 - d)

            self.ema = AveragedModel(self.model, avg_fn=ema_step, use_buffers=True)
        self._t0, self._seconds_before = time.perf_counter(), 0.0
        self.writer = None
        if self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed; no event files")

    # ------------------------------------------------------------------ steps
    def _standardize(self, out: torch.Tensor) -> torch.Tensor:
        """Regression/forecast outputs in standard units (what the loss compares); others as they are."""
        if self.y_std is None:
            return out
        shape = (1, -1) if out.ndim > 1 else (-1,)
        return (out - self.y_mean.view(shape)) / self.y_std.view(shape)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.task.dense:  # boxes or masks: the task's loss reads them as they are
            return self.loss_fn(out, y)
        if self.y_std is not None:
            shape = (1, -1) if out.ndim > 1 else (-1,)
            out = (out - self.y_mean.view(shape)) / self.y_std.view(shape)
            y = (y.float().view_as(out) - self.y_mean.view(shape)) / self.y_std.view(shape)
        elif not self.task.classifies:
            y = y.float().view_as(out)
        return self.loss_fn(out, y)

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    def _train_epoch(self, epoch: int) -> float:
        net = self.ddp or self.model
        net.train()
        idx = self.sampler.indices(epoch)
        acc = self.cfg.train.accumulate
        total, count = 0.0, 0
        n_micro = math.ceil(len(idx) / self.micro)
        self.opt.zero_grad(set_to_none=True)
        batches = _batches(self.train_ds, idx, self.micro, workers=self.cfg.train.num_workers,
                           seed=epoch_seed(self.cfg.train.seed, epoch, self.dist.rank))
        for i, (xb, yb) in enumerate(batches):
            xb, yb = xb.to(self.device), yb.to(self.device)
            if self.mixer is not None:
                xb, yb = self.mixer(xb, yb)
            last_of_step = (i + 1) % acc == 0 or i + 1 == n_micro
            # the last step of an epoch may gather fewer micro-batches: weigh them by how many it has
            group = acc if (i // acc + 1) * acc <= n_micro else n_micro - (i // acc) * acc
            sync = self.ddp.no_sync() if (self.ddp is not None and not last_of_step) else contextlib.nullcontext()
            with sync:
                if self.distiller is None:
                    with self._autocast():
                        out = net(xb)
                    loss = self._loss(out, yb)
                else:
                    d = self.distiller
                    with self._autocast():
                        with d.capture(self.model, "student", "student"):
                            out = net(xb)
                        t_out = d.teacher_out(xb)  # on the same (augmented, mixed) batch
                    loss = d.loss(self._loss(out, yb), out, t_out)
                scaled = loss / group
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if last_of_step:
                if self.projection is not None and self.ddp is not None:
                    self._average_projection_grads()
                if self.scaler:
                    self.scaler.unscale_(self.opt)
                if self.cfg.train.clip_grad_norm:
                    nn.utils.clip_grad_norm_(self._trained_parameters(), self.cfg.train.clip_grad_norm)
                if self.scaler:
                    self.scaler.step(self.opt)
                    self.scaler.update()
                else:
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.sched.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            if not math.isfinite(loss.item()):
                raise ConfigError(f"the training loss became {loss.item()} at epoch {epoch + 1}; lower optim.lr "
                                  f"(edgekit train --find-lr suggests one) or keep train.clip_grad_norm on")
            total += loss.item() * len(xb)
            count += len(xb)
            if self.cb and self.dist.main:
                self.cb.on_batch(i // acc, loss.item())
        if self.dist.world_size > 1:
            import torch.distributed as td

            t = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            td.all_reduce(t)
            total, count = float(t[0]), int(t[1])
            # every rank's last forward updated its own batch-norm statistics: take rank 0's, so all ranks
            # validate (and save) the same model
            for buf in self.model.buffers():
                td.broadcast(buf, 0)
            if self.ema is not None:
                for buf in self.ema.module.buffers():
                    td.broadcast(buf, 0)
        return total / max(1, count)

    def _trained_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        return params + list(self.projection.parameters()) if self.projection is not None else params

    def _average_projection_grads(self) -> None:
        """DDP averages the student's gradients; the projection is outside it, so average its gradients here."""
        import torch.distributed as td

        for p in self.projection.parameters():
            if p.grad is not None:
                td.all_reduce(p.grad)
                p.grad /= self.dist.world_size

    def _agree(self, improved: bool, stop: bool) -> tuple[bool, bool]:
        """Rank 0's early-stopping decision for every rank (they must leave the loop together)."""
        if self.dist.world_size == 1:
            return improved, stop
        import torch.distributed as td

        t = torch.tensor([float(improved), float(stop)], device=self.device)
        td.broadcast(t, 0)
        return bool(t[0]), bool(t[1])

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def predict(self, dataset, model: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        model = model or self.eval_model()
        model.eval()
        outs, ys, total = [], [], 0.0
        for xb, yb in _batches(dataset, np.arange(len(dataset)), 256, workers=self.cfg.train.num_workers):
            xb, yb = xb.to(self.device), yb.to(self.device)
            with self._autocast():
                out = model(xb)
            total += self._loss(out, yb).item() * len(xb)
            outs.append(out.float().cpu().numpy())
            ys.append(yb.cpu().numpy())
        return np.concatenate(outs), np.concatenate(ys), total / max(1, len(dataset))

    # ------------------------------------------------------------------ state
    def state(self, epoch: int, history: list, best: dict) -> dict[str, Any]:
        return {"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.state_dict() if self.ema is not None else None, "history": history, "best": best,
                "world_size": self.dist.world_size, "seed": self.cfg.train.seed,
                "projection": self.projection.state_dict() if self.projection is not None else None,
                "seconds": self._seconds_before + time.perf_counter() - self._t0}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.projection is not None and state.get("projection"):
            self.projection.load_state_dict(state["projection"])

    def _save_last(self, epoch: int, history: list, best: dict) -> None:
        if not self.dist.main:
            return
        path = self.run_dir / "last.pt"
        tmp = path.with_suffix(".pt.partial")
        torch.save(self.state(epoch, history, best), tmp)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ fit
    def fit(self, resume: dict[str, Any] | None = None) -> FitResult:
        cfg = self.cfg
        t0 = self._t0 = time.perf_counter()
        self._seconds_before = float((resume or {}).get("seconds", 0.0))
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"value": None, "epoch": -1, "bad": 0}
        start = 0
        if resume is not None:
            if resume.get("world_size", 1) != self.dist.world_size:
                raise ConfigError(f"last.pt was written by {resume.get('world_size')} process(es); resume with "
                                  f"--nproc {resume.get('world_size')} to get the same run")
            self.load_state(resume)
            history, best, start = list(resume["history"]), dict(resume["best"]), resume["epoch"] + 1
        epoch = start - 1
        stopped_early = interrupted = False
        try:
            for epoch in range(start, cfg.train.epochs):
                if best["bad"] >= (cfg.train.early_stopping or math.inf):  # a resumed run that had stopped
                    stopped_early = True
                    break
                seed_everything(epoch_seed(cfg.train.seed, epoch, self.dist.rank), cfg.train.deterministic)
                if self.cb and self.dist.main:
                    self.cb.on_epoch_start(epoch, cfg.train.epochs, self.steps_per_epoch)
                te = time.perf_counter()
                train_loss = self._train_epoch(epoch)
                out, y, val_loss = self.predict(self.val_ds)
                metrics = self.metrics_fn(out, y)
                row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                       **{f"val_{k}": v for k, v in metrics.items()},
                       "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - te}
                value = val_loss if self.monitor == "loss" else metrics[self.monitor]
                # a tie on the metric (small validation sets saturate: 100 % of 6) goes to the lower loss
                improved = (best["value"] is None
                            or (value > best["value"] if self.mode == "max" else value < best["value"])
                            or (value == best["value"] and val_loss < best.get("loss", math.inf)))
                bad_after = 0 if improved else best["bad"] + 1
                improved, stop = self._agree(improved, bad_after >= (cfg.train.early_stopping or math.inf))
                if improved:
                    best.update(value=value, epoch=epoch, bad=0, loss=val_loss)
                    if self.save_best and self.dist.main:
                        self.save_best(self.eval_model(), {"epoch": epoch + 1, "val": metrics, "val_loss": val_loss})
                else:
                    best["bad"] += 1
                row["best"] = improved
                history.append(row)
                if self.writer is not None:
                    for k, v in row.items():
                        if k not in ("epoch", "best"):
                            self.writer.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k,
                                                   v, epoch + 1)
                    self.writer.flush()
                self._save_last(epoch, history, best)
                if self.cb and self.dist.main:
                    self.cb.on_epoch_end(row)
                if stop:
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            # last.pt (written after every finished epoch) is what --resume continues from; the epoch in
            # progress is dropped, never saved half-done
            interrupted = True
        finally:
            if self.writer is not None:
                self.writer.close()
        return FitResult(model=self.eval_model(), history=history, best_epoch=best["epoch"] + 1,
                         best_value=best["value"] if best["value"] is not None else float("nan"),
                         monitor=self.monitor, epochs_run=len(history), stopped_early=stopped_early,
                         interrupted=interrupted, seconds=time.perf_counter() - t0)

