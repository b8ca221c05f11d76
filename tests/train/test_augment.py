"""Augmentation: train split only, reproducible under the global torch seed, label-consistent mixing."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from edgekit.config.train import AugmentConfig, DataConfig, SplitConfig
from edgekit.train.augment import augment_sequences, batch_mixer, make_dataset, time_warp, window_slice
from edgekit.train.data import prepare


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    path = tmp_path_factory.mktemp("aug") / "digits.npz"
    np.savez(path, x=x[:300], y=d.target[:300])
    return prepare(DataConfig(path=path), SplitConfig(), seed=0)


@pytest.fixture(scope="module")
def motions(tmp_path_factory):
    datasets = pytest.importorskip("aeon.datasets")
    x, y = datasets.load_basic_motions(split="train")
    x_test, y_test = datasets.load_basic_motions(split="test")
    path = tmp_path_factory.mktemp("aug") / "bm.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return prepare(DataConfig(path=path), SplitConfig(), seed=0)


def _items(ds, n=8):
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


@pytest.mark.parametrize("fixture", ["digits", "motions"])
def test_augment_changes_train_only(fixture, request):
    p = request.getfixturevalue(fixture)
    aug = AugmentConfig(erasing=0.5, time_warp=0.2, window_slice=0.8)
    plain = _items(make_dataset(p, "train", None))
    np.testing.assert_allclose(plain.numpy(), p.normalized("train")[:8], rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    augmented = _items(make_dataset(p, "train", aug))
    assert augmented.shape == plain.shape and augmented.dtype == torch.float32
    assert not torch.allclose(augmented, plain, atol=1e-3)
    for split in ("val", "test"):
        ds = make_dataset(p, split, aug)
        np.testing.assert_allclose(_items(ds).numpy(), p.normalized(split)[:8], rtol=1e-5, atol=1e-4)
        x, y = ds[0]
        assert y.dtype == torch.int64 and int(y) == int(p.y[split][0])
    # reproducible under the global seed (the trainer reseeds per epoch)
    torch.manual_seed(0)
    np.testing.assert_array_equal(_items(make_dataset(p, "train", aug)).numpy(), augmented.numpy())
    # disabled means disabled
    off = _items(make_dataset(p, "train", AugmentConfig(enabled=False)))
    assert torch.equal(off, plain)


def test_sequence_ops_keep_shape_and_content():
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 50)
    x = torch.stack([torch.sin(6 * t), t]).unsqueeze(0).repeat(4, 1, 1)  # (4, 2, 50)
    warped = time_warp(x, 0.3)
    assert warped.shape == x.shape and not torch.allclose(warped, x)
    # a monotone warp of a ramp stays a monotone ramp from 0 to 1
    ramp = warped[:, 1]
    assert (ramp.diff(dim=1) >= -1e-6).all() and torch.allclose(ramp[:, [0, -1]], torch.tensor([0.0, 1.0]).expand(4, 2))
    sliced = window_slice(x, 0.5)
    assert sliced.shape == x.shape and (sliced[:, 1].max(dim=1).values - sliced[:, 1].min(dim=1).values < 0.6).all()
    # jitter is in per-channel std units
    cfg = AugmentConfig(jitter=0.5, scaling=0.0)
    noisy = augment_sequences(torch.zeros(64, 2, 200), cfg, torch.tensor([1.0, 10.0]))
    stds = noisy.std(dim=(0, 2))
    assert stds[0] == pytest.approx(0.5, rel=0.1) and stds[1] == pytest.approx(5.0, rel=0.1)


def test_regression_sequences_only_jittered():
    cfg = AugmentConfig(jitter=0.0, scaling=0.5, time_warp=0.5, window_slice=0.5)
    x = torch.randn(3, 2, 30)
    assert torch.equal(augment_sequences(x, cfg, torch.ones(2), label_preserving_only=True), x)


def test_forecast_never_augmented(tmp_path):
    pd = pytest.importorskip("pandas")
    values = np.sin(np.arange(120) / 3).astype(np.float32)
    pd.DataFrame({"t": np.arange(120), "v": values}).to_csv(tmp_path / "s.csv", index=False)
    p = prepare(DataConfig(path=tmp_path / "s.csv", task="forecast", time="t", lookback=12, horizon=3),
                SplitConfig(), seed=0)
    ds = make_dataset(p, "train", AugmentConfig(jitter=1.0, scaling=1.0))
    x, y = ds[0]
    np.testing.assert_allclose(x.numpy(), p.normalized("train")[0], rtol=1e-6)
    assert y.dtype == torch.float32 and y.shape == (3,)


@pytest.mark.parametrize("shape", [(8, 1, 8, 8), (8, 6, 100), (8, 5)])
def test_batch_mixer_soft_labels(shape):
    assert batch_mixer(AugmentConfig(), 4) is None
    torch.manual_seed(0)
    mix = batch_mixer(AugmentConfig(mixup=0.4, cutmix=1.0), num_classes=4)
    x = torch.arange(8, dtype=torch.float32).view(8, *([1] * (len(shape) - 1))).expand(shape).contiguous()
    y = torch.arange(8) % 4
    mixed, soft = mix(x, y)
    assert mixed.shape == x.shape and soft.shape == (8, 4)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    assert not torch.equal(mixed, x) and (soft.max(dim=1).values < 1).any()
    # the soft labels say how much of each sample is in the mix: the mixed mean is the label-weighted mean
    value = x.reshape(8, -1).mean(dim=1)
    partner_share = torch.stack([soft[i, int(y[i])] for i in range(8)])
    assert ((partner_share < 1) == (mixed.reshape(8, -1).mean(dim=1) != value)).all()


def test_span_cutmix_labels_match_the_pasted_span():
    torch.manual_seed(1)
    mix = batch_mixer(AugmentConfig(cutmix=1.0), num_classes=2)
    x = torch.cat([torch.zeros(1, 3, 40), torch.ones(1, 3, 40)])
    mixed, soft = mix(x, torch.tensor([0, 1]))
    pasted = mixed[0].mean().item()  # sample 0 is zeros: its ones came from sample 1
    torch.testing.assert_close(soft[0], torch.tensor([1 - pasted, pasted]))
