"""Knowledge distillation: a frozen teacher's outputs (and optionally features) as extra targets for the student.

The trainer (``Trainer(..., teacher=, distill=KD(...))``) and the compile-time ``distill`` pass use
this module. Classification follows Hinton et al. (2015): soft targets at temperature ``T`` with
the KL term scaled by ``T²`` so its gradients keep their size as ``T`` grows::

    loss = (1 - α) · task_loss(student, y) + α · T² · KL(softmax(teacher/T) ‖ softmax(student/T))

Regression and forecast students match the teacher's outputs with MSE on standardized values (the
same standardization as the task loss, so the two terms have one scale):
``(1 - α) · task_loss + α · MSE(standardize(student), standardize(teacher))``.

``features=True`` adds FitNets-style hint learning (Romero et al., 2015): the student's
``features()`` output goes through a learned projection (``nn.Linear`` for vectors, a 1×1 conv for
maps, after adaptive pooling to the teacher's spatial size) to the teacher's ``features()``, with a
relative squared error ``|proj(s) - t|² / |t|²`` weighted by :data:`FEATURE_WEIGHT`. The projection
is created from the shapes of one probe sample and trained with the student; it is not part of
the saved model.

The teacher runs in eval mode under ``torch.no_grad`` on the same (augmented, mixed) batch as the
student: with MixUp/CutMix the soft target is the teacher's answer on the mixed input.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EdgekitError

log = logging.getLogger(__name__)

# weight of the feature-matching term (a relative squared error, about 1 for an untrained projection)
FEATURE_WEIGHT = 1.0


@dataclass
class KD:
    """Distillation settings: temperature ``T`` of the soft targets, weight ``alpha`` of the teacher's term,
    and whether to match features through a learned projection as well."""

    temperature: float = 4.0
    alpha: float = 0.7
    features: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature} (4 is a usual choice)")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distillation alpha must be in [0, 1] (the teacher's share of the loss), "
                              f"got {self.alpha}")

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature), "alpha": float(self.alpha), "features": bool(self.features)}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch (``batchmean``)."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


# ------------------------------------------------------------------------------------ the teacher


class Renormalized(nn.Module):
    """A teacher trained with another input normalization: the student's inputs are mapped back to raw
    values and normalized the teacher's way, ``((x·σs + μs)/ks · kt − μt)/σt`` per channel."""

    def __init__(self, net: nn.Module, student: dict[str, Any], teacher: dict[str, Any]):
        super().__init__()
        self.net = net
        gain = [(ss * float(teacher["scale"])) / (float(student["scale"]) * st)
                for ss, st in zip(student["std"], teacher["std"])]
        bias = [((ms / float(student["scale"])) * float(teacher["scale"]) - mt) / st
                for ms, mt, st in zip(student["mean"], teacher["mean"], teacher["std"])]
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.net(x * self.gain.view(shape) + self.bias.view(shape))


def _same_normalization(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("scale", "mean", "std")
    if any(k not in a or k not in b for k in keys):
        return True  # nothing to compare: take the teacher as it is
    flat = [(float(x), float(y)) for k in keys
            for x, y in zip(*(v if isinstance(v, list) else [v] for v in (a[k], b[k])))]
    return len(a["mean"]) == len(b["mean"]) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in flat)


def load_teacher(spec: str | Path, input_shape: Sequence[int], out_dim: int, *,
                 labels: Sequence[str] | None = None, preprocess: dict[str, Any] | None = None) -> nn.Module:
    """The teacher named by ``spec``, in eval mode with every parameter frozen, checked against the student.

    ``spec``: a run folder (or its ``model.pt``) written by ``edgekit train``, or ``pkg.module:factory``
    (called with no arguments; a module that needs weights loads them itself). The teacher must take
    inputs of ``input_shape`` (one sample) and give ``out_dim`` outputs. ``labels``: the student's class
    names; a run-folder teacher with other labels (or another order) is refused. ``preprocess``: the
    student's input normalization; a run-folder teacher normalized otherwise is wrapped so it sees
    inputs normalized its own way.
    """
    from ..models.importer import resolve_callable
    from .models import load_trained, read_checkpoint

    text = str(spec)
    path = Path(text)
    meta: dict[str, Any] = {}
    if path.is_dir() or path.suffix == ".pt" or ":" not in text:
        if not (path / "model.pt").is_file() and not path.is_file():
            raise ConfigError(f"distillation teacher {text!r} is neither a run folder with model.pt nor "
                              f"'package.module:factory'; train the teacher with edgekit train first")
        try:
            meta = {k: v for k, v in read_checkpoint(path).items() if k != "model"}
            teacher: nn.Module = load_trained(path)
        except EdgekitError as exc:
            raise ConfigError(f"distillation teacher: {exc}") from None
    else:
        try:
            factory = resolve_callable(text)
        except EdgekitError as exc:
            raise ConfigError(f"distillation teacher: {exc}") from None
        try:
            teacher = factory()
        except Exception as exc:
            raise ConfigError(f"distillation teacher: {text}() failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"distillation teacher: {text}() returned a {type(teacher).__name__}, not a "
                              f"torch nn.Module")
    if meta:
        if preprocess is not None and meta.get("preprocess") and not _same_normalization(preprocess,
                                                                                         meta["preprocess"]):
            log.info("the teacher was trained with another input normalization; its inputs are renormalized")
            teacher = Renormalized(teacher, preprocess, meta["preprocess"])
    teacher = freeze(teacher)
    check_teacher(teacher, input_shape, out_dim, classifies=labels is not None or meta.get("task") ==
                  "classification", name=text)
    # the same number of classes is not enough: class i of the teacher must be class i of the student
    if labels is not None and meta.get("labels") is not None and list(meta["labels"]) != list(labels):
        raise ConfigError(f"distillation teacher {text} was trained on the labels {list(meta['labels'])}, the "
                          f"student learns {list(labels)}: a teacher must classify the same classes in the "
                          f"same order (train it on the same data)")
    return teacher


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode, no parameter that wants a gradient: the teacher is never trained."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def check_teacher(teacher: nn.Module, input_shape: Sequence[int], out_dim: int, *, classifies: bool = True,
                  name: str = "the teacher") -> None:
    """Run one zero sample of ``input_shape`` through ``teacher``; its output must have ``out_dim`` values."""
    param = next(teacher.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros((1, *[int(s) for s in input_shape]), device=device)
    try:
        with torch.no_grad():
            out = teacher(x)
    except Exception as exc:
        raise ConfigError(f"distillation teacher {name} does not take the student's input shape "
                          f"{list(input_shape)}: {type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"distillation teacher {name} returns a {type(out).__name__}; it must return one tensor "
                          f"of outputs")
    got = int(out.reshape(len(out), -1).shape[1])
    if got != int(out_dim):
        what = "classes (labels)" if classifies else "outputs"
        raise ConfigError(f"distillation teacher {name} gives {got} outputs but the student has {out_dim} {what}: "
                          f"a teacher must predict the same {what} as the student (train it on the same data and "
                          f"task)")


# ------------------------------------------------------------------------------------ the loss


def _edge_net(module: nn.Module, who: str) -> nn.Module:
    """The :class:`EdgeNet` inside ``module`` (a renormalized teacher wraps one), for feature matching."""
    from .models import EdgeNet

    net = module.net if isinstance(module, Renormalized) else module
    if not isinstance(net, EdgeNet):
        raise ConfigError(f"distill features: true matches EdgeNet features(); the {who} is a "
                          f"{type(net).__name__}. Use a model built by edgekit train, or features: false")
    return net


def _projection(s: torch.Tensor, t: torch.Tensor) -> nn.Module:
    """What maps student features of ``s``'s shape to the teacher's: a linear layer (vectors) or a 1×1 conv."""
    if s.ndim != t.ndim or s.ndim not in (2, 3, 4):
        raise ConfigError(f"distill features: cannot match student features of shape {list(s.shape[1:])} to "
                          f"the teacher's {list(t.shape[1:])}; use features: false")
    cs, ct = s.shape[1], t.shape[1]
    if s.shape[1:2] == t.shape[1:2]:
        return nn.Identity()
    if s.ndim == 2:
        return nn.Linear(cs, ct)
    conv = nn.Conv1d if s.ndim == 3 else nn.Conv2d
    return conv(cs, ct, 1)


class Distiller:
    """The teacher, its settings and (with ``features``) the trained projection, for one training run."""

    def __init__(self, teacher: nn.Module, kd: KD, *, classifies: bool,
                 standardize: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.teacher = freeze(teacher)
        self.kd = kd
        self.classifies = classifies
        self.standardize = standardize
        self.projection: nn.Module | None = None
        self._feats: dict[str, torch.Tensor] = {}

    # a forward hook on ``head`` sees the features() output of every EdgeNet (forward = head(features(x)))
    @contextlib.contextmanager
    def capture(self, module: nn.Module, key: str, who: str) -> Iterator[None]:
        if not self.kd.features:
            yield
            return
        net = _edge_net(module, who)
        handle = net.head.register_forward_hook(lambda _m, args, _out: self._feats.__setitem__(key, args[0]))
        try:
            yield
        finally:
            handle.remove()

    def setup(self, student: nn.Module, sample: torch.Tensor) -> nn.Module | None:
        """Create the projection from the features one probe ``sample`` (with batch axis) gives."""
        if not self.kd.features:
            return None
        was = student.training
        student.eval()
        try:
            with torch.no_grad():
                with self.capture(student, "student", "student"):
                    student(sample)
                with self.capture(self.teacher, "teacher", "teacher"):
                    self.teacher(sample)
        finally:
            student.train(was)
        s, t = self._feats.pop("student"), self._feats.pop("teacher")
        s_pooled = self._pool(s, t)
        self.projection = _projection(s_pooled, t).to(s.device)
        log.info("distillation: student features %s -> teacher features %s through %s", list(s.shape[1:]),
                 list(t.shape[1:]), type(self.projection).__name__)
        return self.projection

    @staticmethod
    def _pool(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.ndim >= 3 and s.shape[2:] != t.shape[2:]:
            pool = F.adaptive_avg_pool1d if s.ndim == 3 else F.adaptive_avg_pool2d
            return pool(s, t.shape[2:])
        return s

    def teacher_out(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's outputs on ``x`` (no gradient, eval mode); keeps its features when they are matched."""
        self.teacher.eval()
        with torch.no_grad(), self.capture(self.teacher, "teacher", "teacher"):
            return self.teacher(x)

    def loss(self, task_loss: torch.Tensor, out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
        """The combined loss for a batch whose student outputs are ``out`` (features captured by :meth:`capture`)."""
        a = float(self.kd.alpha)
        if self.classifies:
            soft = kd_loss(out, t_out, self.kd.temperature)
        else:
            s = self.standardize(out.float())
            soft = F.mse_loss(s, self.standardize(t_out.float()).view_as(s))
        total = (1.0 - a) * task_loss + a * soft
        if self.kd.features:
            s_feat, t_feat = self._feats.pop("student"), self._feats.pop("teacher").float()
            proj = self.projection(self._pool(s_feat.float(), t_feat))
            total = total + FEATURE_WEIGHT * feature_loss(proj, t_feat)
        return total


def feature_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``|p - t|² / |t|²`` over the batch: a scale-free hint loss (1 for a projection that outputs zeros)."""
    return (projected - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-8)


__all__ = ["FEATURE_WEIGHT", "Distiller", "KD", "Renormalized", "check_teacher", "feature_loss", "freeze",
           "kd_loss", "load_teacher"]
