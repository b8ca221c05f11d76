"""Structured pruning of the architectures pruners usually break on: attention (ViT's MultiheadAttention,
Swin's windowed attention), concatenation (DenseNet), channel shuffle (ShuffleNet), squeeze-excitation with
depthwise convolutions (MobileNetV3) and layer scale (ConvNeXt). Small torchvision models at tiny inputs,
random weights: each must lose MACs, still run with its output shape, keep its head, and keep every pruned
width a multiple of round_to (per head for attention)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torch_pruning")

from torch import nn  # noqa: E402

from edgekit.compress.prune import channel_counts, prune  # noqa: E402
from edgekit.config.build import PrunePass  # noqa: E402

ROUND_TO = 16


def _prune(model: nn.Module, side: int, ratio: float = 0.5, round_to: int = ROUND_TO, **settings):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out_before = model(x)
    before = channel_counts(model)
    result = prune(model, x[:1], PrunePass(ratio=ratio, **settings), round_to)
    with torch.no_grad():
        out_after = model(x)
    after = channel_counts(model)
    assert out_after.shape == out_before.shape
    assert torch.isfinite(out_after).all()
    assert result.after["macs"] < result.before["macs"], result
    assert result.after["params"] < result.before["params"], result
    changed = {k: (before[k], c) for k, c in after.items() if k in before and c != before[k]}
    assert changed, "no layer was pruned"
    assert all(c % round_to == 0 for _, c in changed.values()), changed
    assert result.head not in changed and after[result.head] == before[result.head]
    return result, changed


def test_vit_prunes_head_dims_evenly_and_keeps_heads():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=128,
                              mlp_dim=256, num_classes=10)
    result, changed = _prune(model, 32)
    assert any("MultiheadAttention" in n for n in result.notes), result.notes
    for layer in model.encoder.layers:
        attn = layer.self_attention
        assert attn.num_heads == 4  # heads kept
        assert attn.embed_dim == 64 and attn.head_dim == 16 and attn.head_dim * attn.num_heads == attn.embed_dim
        assert attn.in_proj_weight.shape == (3 * 64, 64)
        assert layer.mlp[0].out_features == 128
    # the residual width, with the parameters outside modules that carry it, and the model's own attribute
    assert model.conv_proj.out_channels == 64 and model.hidden_dim == 64
    assert model.class_token.shape[-1] == 64 and model.encoder.pos_embedding.shape[-1] == 64
    assert result.before["macs"] / result.after["macs"] > 2.5


def test_grouped_layers_round_the_whole_width():
    """12 heads of 32 at round_to 16: Torch-Pruning alone rounds per head against the total and never prunes;
    here every head keeps 16 of 32 (12 × 16 = 192, a multiple of 16)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=12, hidden_dim=384,
                              mlp_dim=384, num_classes=10)
    _prune(model, 16)
    attn = model.encoder.layers[0].self_attention
    assert attn.num_heads == 12 and attn.embed_dim == 192 and attn.head_dim == 16


def test_swin_attention_is_kept_whole_and_the_mlps_prune():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=10)
    qkv = [m.attn.qkv.weight.shape for m in model.modules() if hasattr(m, "attn")]
    result, changed = _prune(model, 32)
    assert [m.attn.qkv.weight.shape for m in model.modules() if hasattr(m, "attn")] == qkv
    assert any("ShiftedWindowAttention" in n for n in result.notes), result.notes
    assert any(k.endswith("mlp.0") for k in changed), changed


def test_densenet_concatenation():
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=16, block_config=(2, 2), num_init_features=32, bn_size=2,
                                        num_classes=10)
    _, changed = _prune(model, 32)
    assert any("denselayer" in k for k in changed), changed


def test_shufflenet_channel_shuffle_prunes_inside_branches():
    torch.manual_seed(0)
    model = torchvision.models.ShuffleNetV2([2, 2, 2], [16, 32, 64, 128, 256], num_classes=10)
    result, changed = _prune(model, 32)
    assert any("blocks" in n for n in result.notes), result.notes
    # the widths crossing the channel shuffle stay: every block's output keeps its width
    for stage, width in ((model.stage2, 32), (model.stage3, 64), (model.stage4, 128)):
        for block in stage:
            assert block.branch2[-3].out_channels == width // 2


def test_mobilenet_v3_squeeze_excitation_and_depthwise():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    _, changed = _prune(model, 32)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # depthwise stays depthwise
    assert any("fc1" in k for k in changed), changed  # squeeze-excitation reduction pruned with its block


def test_convnext_layer_scale():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], num_classes=10)
    _prune(model, 32)
    for block in model.modules():
        if hasattr(block, "layer_scale"):
            assert block.layer_scale.shape[0] == block.block[0].out_channels  # the unwrapped parameter follows


def test_ignore_and_iterations_still_work():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    result, changed = _prune(model, 32, iterations=2, ignore=["layer4"])
    assert not {"layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1"} & set(changed), changed
    assert len(result.steps) == 2 and result.steps[0]["macs"] > result.steps[1]["macs"]
