"""Knowledge distillation: the loss by hand, a frozen teacher, feature projections, teacher checks, `edgekit train`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.config.train import load_train
from edgekit.errors import ConfigError
from edgekit.train.distill import KD, Distiller, check_teacher, kd_loss, load_teacher
from edgekit.train.models import build_model, save_checkpoint
from edgekit.train.tasks import get_task
from edgekit.train.trainer import Trainer


def test_kd_loss_matches_a_hand_computed_value():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    T = 2.0
    expected = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        ps = [math.exp(v / T) for v in si]
        pt = [math.exp(v / T) for v in ti]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = expected / 2 * T * T  # batchmean, scaled by T²
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    # the combined loss: (1 - α) task + α T² KL
    d = Distiller(nn.Linear(3, 3), KD(temperature=T, alpha=0.25), classifies=True)
    task = F.cross_entropy(s, torch.tensor([0, 2]))
    assert d.loss(task, s, t).item() == pytest.approx(0.75 * task.item() + 0.25 * expected, rel=1e-5)


def test_regression_students_match_the_teachers_standardized_outputs():
    mean, std = torch.tensor([10.0, 20.0]), torch.tensor([2.0, 4.0])
    d = Distiller(nn.Linear(3, 2), KD(alpha=0.4), classifies=False, standardize=lambda t: (t - mean) / std)
    s = torch.tensor([[12.0, 24.0], [10.0, 16.0]])
    t = torch.tensor([[10.0, 20.0], [14.0, 20.0]])
    # standardized: s = [[1, 1], [0, -1]], t = [[0, 0], [2, 0]] -> squared errors 1, 1, 4, 1 -> MSE 1.75
    assert d.loss(torch.tensor(2.0), s, t).item() == pytest.approx(0.6 * 2.0 + 0.4 * 1.75)


def test_kd_settings_are_validated():
    with pytest.raises(ConfigError, match="temperature"):
        KD(temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        KD(alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        load_train(None, {"data.path": "x.npz", "out": "r", "distill": {"teacher": "r", "temperature": -1}})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    idx = np.random.default_rng(0).permutation(len(x))
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x[idx[:300]], y=d.target[idx[:300]], x_test=x[idx[300:400]], y_test=d.target[idx[300:400]])
    return path


def _cfg(data: Path, out: Path, **over):
    base = {"data.path": data, "out": out, "train.epochs": 1, "train.batch_size": 32,
            "model.kwargs": {"widths": [8, 16]}, "robustness": False, "evaluate": False, "optim.ema": None}
    base.update(over)
    return load_train(None, base)


def _trainer(cfg, model, teacher=None, kd=None, **kw):
    from edgekit.train.augment import make_dataset
    from edgekit.train.data import prepare
    from edgekit.train.losses import make_loss

    p = prepare(cfg.data, cfg.split, cfg.train.seed)
    return Trainer(cfg, model, get_task("classification"), make_dataset(p, "train", None), make_dataset(p, "val", None),
                   loss_fn=make_loss("classification"), run_dir=cfg.out, teacher=teacher, distill=kd, **kw), p


def _net(widths, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet_small", [1, 8, 8], 10, task="classification", widths=widths)


def test_alpha_zero_is_exactly_the_plain_loss_and_the_teacher_stays_frozen(digits, tmp_path):
    torch.set_num_threads(1)
    plain, _ = _trainer(_cfg(digits, tmp_path / "a"), _net([8, 16]))
    teacher = _net([16, 32], seed=1)
    before = copy.deepcopy(teacher.state_dict())
    kd0, _ = _trainer(_cfg(digits, tmp_path / "b"), _net([8, 16]), teacher, KD(alpha=0.0))
    # same seed, same batches (dropout draws from the seeded global RNG): the same losses bit for bit
    torch.manual_seed(5)
    a = plain._train_epoch(0)
    torch.manual_seed(5)
    assert a == kd0._train_epoch(0)
    for a, b in zip(plain.model.parameters(), kd0.model.parameters()):
        assert torch.equal(a, b)
    # a teacher that counts: the teacher is frozen, gets no gradient, its weights and BN statistics do not move
    kd, _ = _trainer(_cfg(digits, tmp_path / "c"), _net([8, 16]), teacher, KD(alpha=0.9, temperature=3))
    loss = kd._train_epoch(0)
    assert loss != plain._train_epoch(1) and math.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the student is trained by it
    assert any(not torch.equal(a, b) for a, b in zip(kd.model.parameters(), _net([8, 16]).parameters()))


def test_teacher_without_settings_and_student_as_its_own_teacher(digits, tmp_path):
    student = _net([8, 16])
    with pytest.raises(ConfigError, match="without a teacher"):
        _trainer(_cfg(digits, tmp_path / "x"), student, None, KD())
    with pytest.raises(ConfigError, match="student itself"):
        _trainer(_cfg(digits, tmp_path / "x"), student, student, KD())
    # a pruned student distilled from its own unpruned self: the caller passes a frozen copy
    t, _ = _trainer(_cfg(digits, tmp_path / "x"), student, copy.deepcopy(student), KD())
    assert math.isfinite(t._train_epoch(0))


def test_feature_matching_creates_a_projection_that_trains(digits, tmp_path):
    torch.set_num_threads(1)
    teacher = _net([16, 32], seed=1)
    cfg = _cfg(digits, tmp_path / "f", **{"train.precision": "bf16", "train.accumulate": 2, "optim.ema": 0.9})
    tr, _ = _trainer(cfg, _net([8, 16]), teacher, KD(features=True))
    proj = tr.projection
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (16, 32)
    opt_params = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in proj.parameters())
    w0 = proj.weight.detach().clone()
    assert math.isfinite(tr._train_epoch(0))  # bf16 autocast, accumulation and EMA with a teacher
    assert not torch.equal(w0, proj.weight) and tr.ema is not None
    assert "projection" in tr.state(0, [], {}) and tr.state(0, [], {})["projection"]["weight"].shape == (32, 16)
    # equal widths: nothing to learn in between
    same, _ = _trainer(_cfg(digits, tmp_path / "g"), _net([8, 16]), _net([8, 16], seed=2), KD(features=True))
    assert isinstance(same.projection, nn.Identity)
    # features of a plain module cannot be matched
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match="EdgeNet"):
        _trainer(_cfg(digits, tmp_path / "h"), _net([8, 16]), flat, KD(features=True))


def test_load_teacher_checks_outputs_labels_and_inputs(tmp_path):
    net = build_model("mlp", [6], 3, task="classification", hidden=[8])
    save_checkpoint(tmp_path / "t3" / "model.pt", net, {"labels": ["a", "b", "c"],
                                                        "preprocess": {"type": "tensor", "scale": 1.0,
                                                                       "mean": [0.0] * 6, "std": [1.0] * 6}})
    with pytest.raises(ConfigError, match="gives 3 outputs but the student has 4 classes"):
        load_teacher(tmp_path / "t3", [6], 4, labels=["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="same classes in the same order"):
        load_teacher(tmp_path / "t3", [6], 3, labels=["c", "b", "a"])
    with pytest.raises(ConfigError, match="input shape"):
        load_teacher(tmp_path / "t3", [7], 3, labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match="neither a run folder"):
        load_teacher(tmp_path / "missing", [6], 3)
    t = load_teacher(tmp_path / "t3", [6], 3, labels=["a", "b", "c"])
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    # a teacher normalized otherwise sees its own normalization: x_student -> raw -> x_teacher
    student_pre = {"type": "tensor", "scale": 1.0, "mean": [2.0] * 6, "std": [4.0] * 6}
    wrapped = load_teacher(tmp_path / "t3", [6], 3, labels=["a", "b", "c"], preprocess=student_pre)
    x = torch.randn(5, 6)
    assert torch.allclose(wrapped(x), t(x * 4.0 + 2.0), atol=1e-5)
    with pytest.raises(ConfigError, match="package.module:function"):
        load_teacher("nope:", [6], 3)
    with pytest.raises(ConfigError, match="4 outputs"):
        check_teacher(nn.Linear(6, 4), [6], 2, classifies=False)


def teacher_factory() -> nn.Module:  # referenced as tests.train.test_distill:teacher_factory
    torch.manual_seed(3)
    return build_model("resnet_small", [1, 8, 8], 10, task="classification", widths=[16, 32])


def test_edgekit_train_with_a_distill_section_runs_and_records_the_teacher(digits, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.train.models import read_checkpoint
    from edgekit.train.run import train

    train(_cfg(digits, tmp_path / "teacher", **{"model.kwargs": {"widths": [16, 32]}}))
    spec = tmp_path / "student.yaml"
    spec.write_text(f"data: {{path: {digits}}}\nout: {tmp_path / 'student'}\nmodel: {{kwargs: {{widths: [8, 16]}}}}\n"
                    f"train: {{epochs: 1, batch_size: 32}}\nevaluate: false\n"
                    f"distill: {{teacher: {tmp_path / 'teacher'}, temperature: 3.0, alpha: 0.6, features: true}}\n")
    result = CliRunner().invoke(app, ["train", str(spec), "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert m["distill"]["teacher"] == str(tmp_path / "teacher")
    assert m["distill"]["temperature"] == 3.0 and m["distill"]["alpha"] == 0.6 and m["distill"]["features"]
    assert m["distill"]["teacher_params"] > m["params"] and m["epochs_run"] == 1
    assert read_checkpoint(tmp_path / "student")["distill"]["teacher"] == str(tmp_path / "teacher")
    # a factory teacher, given as a flag
    doc = CliRunner().invoke(app, ["train", str(spec), "--out", str(tmp_path / "s2"), "--set",
                                   "distill.teacher=tests.train.test_distill:teacher_factory", "--json"])
    assert doc.exit_code == 0, (doc.stdout, doc.stderr)
    # a teacher for other classes is refused with a usage error that says why
    bad = CliRunner().invoke(app, ["train", str(spec), "--out", str(tmp_path / "s3"), "--set",
                                   "distill.teacher=tests.train.test_distill:wrong_teacher", "--json"])
    assert bad.exit_code != 0 and "same classes" in bad.stdout + bad.stderr


def wrong_teacher() -> nn.Module:
    return build_model("resnet_small", [1, 8, 8], 3, task="classification", widths=[8])


class _StopAt:
    """Callbacks that press Ctrl-C when epoch ``n`` has finished."""

    def __init__(self, n: int):
        self.n = n

    def on_epoch_start(self, epoch, epochs, steps):
        pass

    def on_batch(self, step, loss):
        pass

    def on_epoch_end(self, row):
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def test_a_distilled_run_resumes_to_the_same_losses_with_mixup(digits, tmp_path):
    """last.pt carries the feature projection: Ctrl-C + --resume gives the uninterrupted run's curve."""
    from edgekit.train.run import TrainingInterrupted, train

    torch.set_num_threads(1)
    teacher = tmp_path / "teacher"
    train(_cfg(digits, teacher, **{"model.kwargs": {"widths": [16, 32]}}))
    over = {"train.epochs": 2, "augment.mixup": 0.2, "augment.cutmix": 1.0,
            "distill": {"teacher": str(teacher), "features": True, "alpha": 0.5}}
    full = train(_cfg(digits, tmp_path / "full", **over)).metrics
    with pytest.raises(TrainingInterrupted):
        train(_cfg(digits, tmp_path / "cut", **over), callbacks=_StopAt(1))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["projection"]["weight"].shape == (32, 16)
    resumed = train(_cfg(digits, tmp_path / "cut", **over), resume=True).metrics
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert all(math.isfinite(r["train_loss"]) for r in full["history"])
