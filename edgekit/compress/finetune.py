"""Fine-tuning a compressed model with the training loop of the run it came from.

A compression pass changes the model; the run folder (``train.yaml`` + its data) says how it
was trained. :class:`FinetuneContext` prepares that run's data, task and loss once (the same
pieces ``edgekit train`` uses, :func:`edgekit.train.run._setup`), and :func:`finetune` runs
:class:`edgekit.train.trainer.Trainer` on any model for a few epochs at a lower learning rate.
Nothing is written into the user's run folder: the Trainer's files go to the build's work folder.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config.build import FinetuneSettings
from ..errors import ConfigError, EdgekitError

log = logging.getLogger(__name__)


@dataclass
class FinetuneContext:
    """A run's prepared data, task and loss, ready to fine-tune (and evaluate) any model of its shape."""

    run: Path
    cfg: Any  # edgekit.config.train.TrainConfig, as the run resolved it
    setup: Any  # edgekit.train.run._Setup: prepared data, task, loss, sampler weights, mixer
    work: Path  # where the Trainer writes (last.pt, tensorboard): the build's work folder
    lr_scale: float = 0.1
    batch_size: int | None = None

    @classmethod
    def load(cls, settings: FinetuneSettings, work: Path) -> "FinetuneContext":
        """The run named by ``finetune.run``; ConfigError when it is not a finished run folder."""
        from ..config.train import load_train
        from ..train.run import _setup
        from ..train.run_folder import read_meta
        from ..train.trainer import DistInfo

        if settings.run is None:
            raise ConfigError("fine-tuning needs the training run: set finetune.run: runs/NAME in the build file "
                              "(compiling a run folder sets it), or use finetune_epochs: 0 with importance: magnitude")
        run = Path(settings.run).resolve()
        read_meta(run)  # a finished run, or a clear error
        # the run's own distill: section (a teacher it trained with) is not this build's: a distill pass names its own
        cfg = load_train(run / "train.yaml").model_copy(update={"distill": None})
        return cls(run, cfg, _setup(cfg, DistInfo()), Path(work), settings.lr_scale, settings.batch_size)

    # ------------------------------------------------------------------ evaluation
    @property
    def metric(self) -> str:
        from ..train.tasks import monitor_mode

        name, _ = monitor_mode(self.setup.task, None)
        return name

    def evaluate(self, model) -> float:
        """The task's headline metric (accuracy %, or RMSE) of ``model`` on the run's validation split."""
        from ..evaluate import TorchPredictor

        p = self.setup.prepared
        was_training = model.training
        out = TorchPredictor(model, p.norm).predict(p.x["val"])
        model.train(was_training)
        value = float(self.setup.task.metrics(out, p.y["val"])[self.metric])
        return value  # accuracy in percent, as the training report gives it

    # ------------------------------------------------------------------ gradients (Taylor importance)
    def accumulate_gradients(self, model, batches: int = 8) -> int:
        """Backpropagate the training loss of ``batches`` training batches into ``model``'s ``.grad``."""
        import torch

        from ..train.augment import make_dataset
        from ..train.trainer import _batches

        ds = make_dataset(self.setup.prepared, "train", None)
        batch = self.batch_size or self.cfg.train.batch_size
        idx = np.random.default_rng(self.cfg.train.seed).permutation(len(ds))[: batches * batch]
        model.train()
        model.zero_grad(set_to_none=True)
        y_stats = self.setup.prepared.y_stats
        seen = 0
        for xb, yb in _batches(ds, idx, batch):
            out = model(xb).float()
            if y_stats is not None:  # the loss is taken in normalised units, as the Trainer does
                mean, std = (torch.tensor(s, dtype=torch.float32) for s in y_stats)
                shape = (1, -1) if out.ndim > 1 else (-1,)
                out = (out - mean.view(shape)) / std.view(shape)
                yb = (yb.float().view_as(out) - mean.view(shape)) / std.view(shape)
            elif not self.setup.task.classifies:
                yb = yb.float().view_as(out)
            self.setup.loss_fn(out, yb).backward()
            seen += len(xb)
        model.eval()
        return seen

    # ------------------------------------------------------------------ training
    def train_config(self, epochs: int, out: Path):
        """The run's recipe for ``epochs`` epochs at lr × lr_scale, without warm-up or early stopping."""
        from ..config.base import parse
        from ..config.train import TrainConfig

        data = self.cfg.model_dump(mode="json")
        data["train"].update(epochs=epochs, early_stopping=None)
        if self.batch_size:
            data["train"]["batch_size"] = self.batch_size
        data["optim"].update(lr=self.cfg.optim.lr * self.lr_scale, warmup_epochs=0.0)
        if data["optim"].get("schedule") == "onecycle":
            data["optim"]["schedule"] = "cosine"  # OneCycle warms up again: a pruned model needs a gentle restart
        data.update(out=str(out), nproc=1)
        return parse(TrainConfig, data, "fine-tuning settings")


def finetune(ctx: FinetuneContext, model, epochs: int, *, teacher=None, distill=None,
             name: str = "finetune") -> dict[str, Any]:
    """Train ``model`` in place for ``epochs`` epochs with the run's recipe; its best epoch's weights stay.

    Returns the metric on the validation split before and after, the epochs and the seconds.
    ``teacher``/``distill`` (an :class:`edgekit.train.distill.KD`) turn the loss into distillation.
    """
    from ..train.augment import make_dataset
    from ..train.trainer import DistInfo, Trainer

    t0 = time.perf_counter()
    before = ctx.evaluate(model)
    result: dict[str, Any] = {"metric": ctx.metric, "before": round(before, 4), "epochs": epochs}
    if epochs <= 0:
        result.update(after=result["before"], seconds=round(time.perf_counter() - t0, 3))
        return result
    out = ctx.work / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = ctx.train_config(epochs, out)
    s = ctx.setup
    best: dict[str, Any] = {}

    def keep_best(m, info: dict[str, Any]) -> None:
        best["state"] = copy.deepcopy({k: v.detach().cpu() for k, v in m.state_dict().items()})
        best["epoch"] = info.get("epoch")

    extra: dict[str, Any] = {"teacher": teacher, "distill": distill} if teacher is not None else {}
    trainer = Trainer(cfg, model, s.task,
                      make_dataset(s.prepared, "train", cfg.augment if cfg.augment.enabled else None),
                      make_dataset(s.prepared, "val", None), loss_fn=s.loss_fn, y_stats=s.prepared.y_stats,
                      sample_weights=s.sample_weights, mixer=s.mixer, run_dir=out, save_best=keep_best,
                      dist=DistInfo(), **extra)
    fit = trainer.fit()
    if fit.interrupted:
        raise EdgekitError("fine-tuning was interrupted; the build stops (compile again to start over)")
    model.cpu()
    if "state" in best:
        model.load_state_dict(best["state"])
    model.eval()
    after = ctx.evaluate(model)
    if not math.isfinite(after):
        raise EdgekitError(f"fine-tuning gave a {ctx.metric} of {after}; lower finetune.lr_scale")
    result.update(after=round(after, 4), best_epoch=best.get("epoch"),
                  seconds=round(time.perf_counter() - t0, 3))
    log.info("fine-tuned %d epoch(s): %s %.4g -> %.4g", epochs, ctx.metric, before, after)
    return result
