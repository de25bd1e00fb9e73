"""The parts around mixers, including those no registered model uses yet."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mixlab.layers import (AbsolutePosEmbed, Affine, BatchNormNHWC, ClassifierHead, ConditionalPosEnc, ConvMlp,
                           ConvStem, DropPath, GroupNorm1NHWC, LayerNorm, LayerNorm2d, LayerScale, Mlp, PatchEmbed,
                           PatchMerging, ResNetStem, resample_abs_pos_embed, stochastic_depth_rates)


def test_layernorm_channels_first_equals_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7)
    a, b = LayerNorm2d(8), LayerNorm(8)
    with torch.no_grad():
        a.weight.normal_(), a.bias.normal_()
        b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_nhwc_norms_match_their_nchw_counterparts():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 4)  # NCHW
    bn, ref = BatchNormNHWC(6).train(), nn.BatchNorm2d(6).train()
    torch.testing.assert_close(bn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    gn, ref = GroupNorm1NHWC(6), nn.GroupNorm(1, 6)
    torch.testing.assert_close(gn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ref(x))


def test_conv_mlp_is_the_linear_mlp_on_nchw():
    torch.manual_seed(0)
    lin, conv = Mlp(8, 16), ConvMlp(8, 16)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(conv, name).weight.copy_(getattr(lin, name).weight[:, :, None, None])
            getattr(conv, name).bias.copy_(getattr(lin, name).bias)
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(conv(x), lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


def test_affine_and_layerscale():
    a = Affine(4)
    with torch.no_grad():
        a.alpha.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        a.beta.fill_(0.5)
    torch.testing.assert_close(a(torch.ones(2, 4)), torch.tensor([[1.5, 2.5, 3.5, 4.5]] * 2))
    torch.testing.assert_close(LayerScale(4, 0.1)(torch.ones(1, 4)), torch.full((1, 4), 0.1))


def test_stems_and_embeddings_shapes_and_errors():
    x = torch.randn(2, 3, 32, 48)
    assert PatchEmbed(4, 3, 16)(x).shape == (2, 8, 12, 16)
    with pytest.raises(ValueError, match="patch size"):
        PatchEmbed(5, 3, 16)(x)
    assert ResNetStem(3, 8)(x).shape == (2, 8, 12, 8)
    stem = ConvStem(3, (8, 16), 24)
    assert stem.stride == 4 and stem(x).shape == (2, 8, 12, 24)
    with pytest.raises(ValueError, match="stride 4"):
        stem(torch.randn(1, 3, 30, 32))
    m = PatchMerging(16)
    assert m(torch.randn(2, 7, 9, 16)).shape == (2, 4, 5, 32)  # odd sizes are padded


def test_patch_merging_concatenates_the_2x2_neighbourhood():
    m = PatchMerging(1, out_dim=4, norm_layer=lambda d: nn.Identity())
    with torch.no_grad():
        m.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(16.0).view(1, 4, 4, 1)
    y = m(x)
    # order x(0,0), x(1,0), x(0,1), x(1,1) of each 2x2 block (Swin's reference order)
    assert y[0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]


def test_absolute_position_embedding_resamples_the_grid_only():
    torch.manual_seed(0)
    pe = AbsolutePosEmbed((4, 4), 8, num_prefix_tokens=2)
    x = torch.zeros(1, 2 + 16, 8)
    torch.testing.assert_close(pe(x, (4, 4)), pe.pos_embed.expand(1, -1, -1))
    y = pe(torch.zeros(1, 2 + 36, 8), (6, 6))
    assert y.shape == (1, 38, 8)
    torch.testing.assert_close(y[:, :2], pe.pos_embed[:, :2])  # class/distillation positions kept
    # a constant grid stays constant under resampling
    const = torch.ones(1, 2 + 16, 3)
    torch.testing.assert_close(resample_abs_pos_embed(const, (5, 7), (4, 4), 2)[:, 2:], torch.ones(1, 35, 3))


def test_conditional_position_encoding_is_residual():
    cpe = ConditionalPosEnc(4)
    with torch.no_grad():
        cpe.proj.weight.zero_(), cpe.proj.bias.zero_()
    x = torch.randn(2, 5, 5, 4)
    torch.testing.assert_close(cpe(x), x)


def test_classifier_head_pooling():
    grid = torch.randn(2, 3, 3, 8)
    h = ClassifierHead(8, 5, pool="avg")
    torch.testing.assert_close(h(grid, pre_logits=True), grid.mean(dim=(1, 2)))
    tokens = torch.randn(2, 1 + 9, 8)
    h_tok = ClassifierHead(8, 5, pool="token", num_prefix_tokens=1)
    torch.testing.assert_close(h_tok(tokens, pre_logits=True), tokens[:, 0])
    h_avg = ClassifierHead(8, 5, pool="avg", num_prefix_tokens=1)
    torch.testing.assert_close(h_avg(tokens, pre_logits=True), tokens[:, 1:].mean(dim=1))
    h.reset(0)
    assert h(grid).shape == (2, 8)
    with pytest.raises(ValueError, match="unknown pool"):
        ClassifierHead(8, 5, pool="max")


def test_drop_path():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    y = dp(torch.ones(1000, 4))
    kept = (y[:, 0] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(y.unique().tolist()) <= {0.0, 2.0}  # survivors rescaled by 1/keep
    assert torch.equal(dp.eval()(torch.ones(3, 4)), torch.ones(3, 4))
    rates = stochastic_depth_rates(0.3, [2, 2])
    assert rates[0][0] == 0.0 and rates[-1][-1] == pytest.approx(0.3) and len(rates[1]) == 2
