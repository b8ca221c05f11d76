"""Architectures: shapes, ONNX export that matches torch, output units, fine-tuning, pretrained weights, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.errors import ConfigError, ModelImportError
from edgekit.train.models import (ARCHS, build_model, default_arch, describe, from_checkpoint, read_checkpoint,
                                  save_checkpoint)


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {"image": ([3, 16, 16], "classification"), "sequence": ([3, 30], "classification"),
        "forecast": ([1, 24], "forecast"), "tabular": ([7], "regression")}


@pytest.mark.parametrize("arch", sorted(a for a, info in ARCHS.items() if "classification" in info.tasks))
def test_every_arch_gives_out_dim_outputs_for_every_kind_it_fits(arch):
    for kind in ARCHS[arch].kinds:
        shape, task = TINY[kind]
        model = build_model(arch, shape, 5, task=task).eval()
        assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
        with torch.no_grad():
            out = model(torch.randn(2, *shape))
        assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_image_archs_take_any_number_of_channels_and_8px_digits():
    for arch in ("resnet_small", "resnet18", "mobilenet_v2", "mobilenet_v3_small"):
        model = build_model(arch, [1, 8, 8], 10, task="classification").eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # no stem downsampling for small images: 8x8 keeps 8x8 through the first stage
    small = build_model("resnet_small", [1, 8, 8], 10, task="classification")
    assert small.stem(torch.randn(1, 1, 8, 8)).shape[-2:] == (8, 8)


def test_defaults_and_refusals():
    assert [default_arch(k, "classification") for k in ("image", "sequence", "forecast", "tabular")] == [
        "resnet_small", "inception_time", "gru", "mlp"]
    with pytest.raises(ConfigError, match="resnet_small.*inception_time"):
        build_model("resnet99", [1, 8, 8], 10, task="classification")
    with pytest.raises(ConfigError, match="does not fit sequence data.*inception_time"):
        build_model("resnet_small", [6, 100], 4, task="classification")
    with pytest.raises(ConfigError, match="widths"):
        build_model("resnet_small", [1, 8, 8], 10, task="classification", width=3)
    with pytest.raises(ConfigError, match="classification"):
        build_model("mlp", [4], 3, task="classification", y_stats=([0.0], [1.0]))


def test_inception_time_kernels_are_odd_and_capped_to_the_series():
    model = build_model("inception_time", [2, 12], 3, task="classification")
    sizes = {conv.kernel_size[0] for conv in model.inception[0].convs}
    assert sizes == {11, 9}  # 40, 20 -> 12 -> 11; 10 -> 9
    assert len(model.inception) == 6 and len(model.shortcuts) == 2
    assert model(torch.randn(2, 2, 12)).shape == (2, 3)


@pytest.mark.parametrize("arch,shape,out_dim,task", [
    ("resnet_small", [1, 8, 8], 10, "classification"),
    ("inception_time", [6, 100], 4, "classification"),
    ("gru", [1, 24], 6, "forecast"),
    ("mlp", [5], 2, "regression"),
])
def test_exports_to_onnx_and_matches_torch(tmp_path, arch, shape, out_dim, task):
    import onnxruntime as ort

    y_stats = ([10.0] * out_dim, [2.0] * out_dim) if task != "classification" else None
    model = build_model(arch, shape, out_dim, task=task, y_stats=y_stats).eval()
    path = tmp_path / "m.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=True, external_data=False,
                      verbose=False, dynamic_shapes=({0: batch},))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (3, out_dim)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_y_stats_make_the_model_answer_in_real_units():
    torch.manual_seed(1)
    plain = build_model("gru", [1, 24], 3, task="forecast").eval()
    scaled = build_model("gru", [1, 24], 3, task="forecast", y_stats=([100.0, 200.0, 300.0], [5.0, 6.0, 7.0])).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(4, 1, 24)
    with torch.no_grad():
        expected = plain(x) * torch.tensor([5.0, 6.0, 7.0]) + torch.tensor([100.0, 200.0, 300.0])
        assert torch.allclose(scaled(x), expected, atol=1e-5)
    assert "y_mean" in scaled.state_dict() and "y_mean" not in plain.state_dict()


def test_freeze_backbone_trains_only_the_head_and_keeps_batch_norm_statistics():
    model = build_model("resnet_small", [1, 8, 8], 10, task="classification", freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert describe(model)["trainable_params"] == 10 * 128 + 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8) * 3 + 1), torch.arange(8))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # running_mean/var and num_batches_tracked untouched
    assert model.training and not model.stem[1].training


def test_pretrained_loads_the_backbone_and_skips_a_head_of_another_size(tmp_path):
    source = build_model("inception_time", [3, 20], 10, task="classification", nb_filters=8)
    path = tmp_path / "pre.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # a DDP checkpoint
    model = build_model("inception_time", [3, 20], 4, task="classification", nb_filters=8, pretrained=path,
                        freeze_backbone=True)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.head.weight.shape == (4, 32)
    other = tmp_path / "other.pt"
    torch.save(build_model("mlp", [4], 2, task="regression").state_dict(), other)
    with pytest.raises(ConfigError, match="no weights"):
        build_model("inception_time", [3, 20], 4, task="classification", pretrained=other)
    with pytest.raises(ConfigError, match="do not exist"):
        build_model("inception_time", [3, 20], 4, task="classification", pretrained=tmp_path / "missing.pt")


def test_pretrained_torchvision_weights_fit_a_one_channel_model(tmp_path):
    import torchvision

    tv = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    model = build_model("mobilenet_v3_small", [1, 16, 16], 3, task="classification", pretrained=path)
    first = model.body.features[0][0].weight
    assert first.shape[1] == 1
    assert torch.allclose(first, tv.features[0][0].weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.body.classifier[0].weight, tv.classifier[0].weight)


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(4, 3, 30), torch.tensor([0, 1, 2, 0])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        model = build_model("inception_time", [3, 30], 3, task="classification", nb_filters=4, checkpointing=ckpt)
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.inception[0].convs[0].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = build_model("fcn1d", [2, 16], 3, task="regression", filters=(8, 16, 8),
                        y_stats=([1.0, 2.0, 3.0], [0.5, 0.5, 2.0]))
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    run = tmp_path / "runs" / "a"
    path = save_checkpoint(run / "model.pt", model, {"labels": None, "epoch": 3, "metrics": {"rmse": np.float32(1.5)},
                                                     "preprocess": {"source": tmp_path / "data.npz"}})
    assert sorted(p.name for p in run.iterdir()) == ["model.pt"]  # no temp file left behind
    ckpt = read_checkpoint(run)
    assert ckpt["format"] == "edgekit-run/1" and ckpt["arch"] == "fcn1d" and ckpt["epoch"] == 3
    assert ckpt["arch_kwargs"] == {"filters": [8, 16, 8]} and ckpt["kind"] == "sequence"
    rebuilt = from_checkpoint(str(path))
    rebuilt.load_state_dict(ckpt["model"])
    model.eval(), rebuilt.eval()
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ModelImportError, match="not an edgekit run checkpoint"):
        from_checkpoint(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("arch", sorted(a for a, info in ARCHS.items() if "classification" not in info.tasks))
def test_dense_archs_give_the_contract_outputs_and_refuse_classification(arch):
    task = ARCHS[arch].tasks[0]
    model = build_model(arch, [3, 64, 64], 3, task=task).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    if task == "detection":  # [B, A, 4 + C] over strides 8, 16, 32 (64 + 16 + 4 anchor points)
        assert out.shape == (2, 84, 7)
    else:  # [B, C, H, W] logits at the input size
        assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=f"not made for classification.*{'resnet_small'}"):
        build_model(arch, [3, 64, 64], 3, task="classification")
