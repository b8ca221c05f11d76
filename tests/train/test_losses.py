"""Losses: focal loss against cross-entropy, class weights for rare classes, the loss per task, standardization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.errors import ConfigError
from edgekit.train.losses import FocalLoss, class_weights, fit_y_stats, make_loss, standardize

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0], [1.0, 1.0, -2.0]])
HARD = torch.tensor([0, 2, 1, 0, 1])
SOFT = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.8, 0.1]])
WEIGHT = torch.tensor([0.5, 2.0, 1.0])


@pytest.mark.parametrize("target", [HARD, SOFT], ids=["hard", "soft"])
@pytest.mark.parametrize("weight", [None, WEIGHT], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_0_is_cross_entropy(target, weight, smoothing):
    focal = FocalLoss(0.0, weight=weight, label_smoothing=smoothing)(LOGITS, target)
    ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(LOGITS, target)
    assert torch.allclose(focal, ce, atol=1e-6)


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    y = torch.tensor([0])
    ce = nn.CrossEntropyLoss()
    focal = FocalLoss(2.0)
    ratio_easy = focal(easy, y) / ce(easy, y)
    ratio_hard = focal(hard, y) / ce(hard, y)
    assert ratio_easy < 0.001 and 0.1 < ratio_hard < 1
    # also with soft targets, and gradients flow
    logits = LOGITS.clone().requires_grad_(True)
    loss = FocalLoss(2.0)(logits, SOFT)
    loss.backward()
    assert loss < nn.CrossEntropyLoss()(LOGITS, SOFT) and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["inverse", "inverse_sqrt", "effective"])
def test_class_weights_are_larger_for_rare_classes(mode):
    y = np.array([0] * 100 + [1] * 10 + [2] * 1 + [3] * 50)
    w = class_weights(y, 4, mode)
    assert w.dtype == np.float32 and w.shape == (4,)
    assert w[2] > w[1] > w[3] > w[0]
    assert np.isclose(w.mean(), 1.0)


def test_class_weight_modes_differ_and_refuse_bad_input():
    y = np.array([0] * 90 + [1] * 10)
    inv, sqrt = class_weights(y, 2, "inverse"), class_weights(y, 2, "inverse_sqrt")
    assert np.isclose(inv[1] / inv[0], 9.0) and np.isclose(sqrt[1] / sqrt[0], 3.0)
    with pytest.raises(ConfigError, match="modes"):
        class_weights(y, 2, "balanced")
    with pytest.raises(ConfigError, match="labels"):
        class_weights(np.array([0, 5]), 2)


def test_make_loss_per_task():
    assert isinstance(make_loss("classification"), nn.CrossEntropyLoss)
    focal = make_loss("classification", name="focal", class_weights=np.array([1.0, 3.0]), focal_gamma=1.5)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and torch.equal(focal.weight, torch.tensor([1.0, 3.0]))
    ce = make_loss("classification", class_weights=[1.0, 2.0], label_smoothing=0.1)
    assert ce.label_smoothing == 0.1 and torch.equal(ce.weight, torch.tensor([1.0, 2.0]))
    assert isinstance(make_loss("forecast"), nn.MSELoss)
    assert isinstance(make_loss("regression", name="huber"), nn.HuberLoss)
    with pytest.raises(ConfigError, match="mse, huber"):
        make_loss("regression", name="focal")
    with pytest.raises(ConfigError, match="cross_entropy, focal"):
        make_loss("classification", name="mse")
    with pytest.raises(ConfigError, match="class weights"):
        make_loss("forecast", class_weights=[1.0, 2.0])


def test_standardize_matches_the_model_scale():
    y = np.array([[10.0, 100.0], [20.0, 300.0], [30.0, 200.0]], dtype=np.float32)
    stats = fit_y_stats(y)
    z = standardize(torch.from_numpy(y), stats)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-6) and torch.allclose(z.std(0, unbiased=False),
                                                                                   torch.ones(2), atol=1e-5)
    one = fit_y_stats(y, per_output=False)
    assert len(one[0]) == 1 and np.isclose(one[0][0], y.mean())
    assert torch.allclose(standardize(torch.tensor([2.0, 4.0]), ([2.0], [2.0])), torch.tensor([0.0, 1.0]))
    assert fit_y_stats(np.ones((4, 1)))[1] == [1.0]  # constant target: std 1, not a division by zero
    t = torch.randn(3)
    assert standardize(t, None) is t
