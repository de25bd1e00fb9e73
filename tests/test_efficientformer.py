"""EfficientFormer: its attention mixer (learned per-offset biases) against the mixer
contract, the L1 model (published size, numerical parity with timm's ``efficientformer_l1``
under random weights, other input sizes, BatchNorm folding), and the ``meta4d`` / ``meta3d``
specification mixers."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.efficientformer as ef  # noqa: E402  (registers the model, the layout and the spec mixers)
from mixlab.analysis import count_params, profile_model  # noqa: E402
from mixlab.mixers.offset_attention import OffsetBiasAttention, offset_index, resample_offset_bias  # noqa: E402
from mixlab.models.blocks import MetaBlock  # noqa: E402
from mixlab.models.efficientformer import EfficientFormer, Meta4DBlock, TokenSwitch  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, assert_same_logits, randomize_, timm_model  # noqa: E402,F401

D = 16


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attention(grid=(4, 5), heads=2, key_dim=4, attn_ratio=2.0, seed=0) -> OffsetBiasAttention:
    torch.manual_seed(seed)
    m = OffsetBiasAttention(D, key_dim, heads, attn_ratio, grid).double().eval()
    with torch.no_grad():
        m.attention_biases.normal_(0, 1.0)  # zero-initialised: make the bias really count
    return m


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
CASES = [
    ("map-4x5", (4, 5), (2, 4, 5, D)),
    ("tokens-4x5", (4, 5), (2, 20, D)),
    ("map-7x7", (7, 7), (1, 7, 7, D)),
    ("built-4x4-run-6x5", (4, 4), (2, 6, 5, D)),
    ("built-7x7-run-2x2", (7, 7), (2, 2, 2, D)),
    ("1x1", (1, 1), (2, 1, 1, D)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, grid, shape = case
    m = attention(grid)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_rows_are_softmax_rows(case):
    _, grid, shape = case
    m = attention(grid)
    x = randn(*shape)
    N = shape[1] if len(shape) == 3 else shape[1] * shape[2]
    with torch.no_grad():
        A = m.affinity(x)
    assert A.shape == (shape[0], m.num_heads, N, N)
    assert (A >= 0).all()
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    assert m.values(x).shape == (shape[0], N, m.num_heads * m.val_dim)
    assert m.affinity_kind == "dynamic" and m.exact_av is True


def test_bias_is_indexed_by_absolute_offsets():
    m = attention((3, 4))
    B = m.bias(3, 4)
    for i in range(12):
        for j in range(12):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            close(B[:, i, j], m.attention_biases[:, abs(yi - yj) * 4 + abs(xi - xj)], atol=0)
    # and it enters the affinity: without it the attention is another one
    x = randn(1, 3, 4, D)
    with torch.no_grad():
        A = m.affinity(x)
        m.attention_biases.zero_()
        assert (m.affinity(x) - A).abs().max() > 1e-3


def test_same_attention_as_timms_on_the_same_weights():
    from timm.models.efficientformer import Attention as TimmAttention
    torch.manual_seed(0)
    theirs = randomize_(TimmAttention(dim=64, key_dim=32, num_heads=8, attn_ratio=4, resolution=7), 0)
    theirs.eval()  # (timm's Attention.train returns None)
    ours = OffsetBiasAttention(64, 32, 8, 4, (7, 7)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.attention_bias_idxs, theirs.attention_bias_idxs)
    x = torch.randn(2, 49, 64)
    with torch.no_grad():
        close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        close(ours(x.reshape(2, 7, 7, 64)).reshape(2, 49, 64), theirs(x), atol=1e-5, rtol=1e-5)
        # timm's biases are for 7x7 only; ours run on another grid
        with pytest.raises(RuntimeError):
            theirs(torch.randn(1, 64, 64))
        assert ours(torch.randn(1, 8, 8, 64)).shape == (1, 8, 8, 64)


def test_token_sequence_of_another_length_is_refused():
    with pytest.raises(ValueError, match="4x5 grid"):
        attention((4, 5))(randn(1, 21, D))


def test_resample_offset_bias():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 7 * 7, generator=g, dtype=torch.float64)
    assert resample_offset_bias(t, (7, 7), (7, 7)) is t  # the built grid: the parameter itself
    assert resample_offset_bias(t, (7, 7), (8, 6)).shape == (3, 48)
    const = torch.full((3, 16), 0.4, dtype=torch.float64)
    close(resample_offset_bias(const, (4, 4), (9, 5)), torch.full((3, 45), 0.4, dtype=torch.float64))
    # a bias of |Δy| alone stays a bias of |Δy| alone (the interpolation is separable)
    rows = torch.randn(3, 7, 1, generator=g, dtype=torch.float64).expand(3, 7, 7).reshape(3, 49)
    r = resample_offset_bias(rows, (7, 7), (10, 8)).reshape(3, 10, 8)
    close(r, r[:, :, :1].expand(-1, -1, 8))
    # on another grid the mixer uses exactly the resampled table
    m = attention((4, 4))
    close(m.bias(6, 5), resample_offset_bias(m.attention_biases, (4, 4), (6, 5))[:, offset_index(6, 5)], atol=0)


def test_attention_gradients_reach_the_biases():
    m = OffsetBiasAttention(D, 4, 2, 2.0, (3, 3)).train()
    x = torch.randn(2, 5, 4, D, requires_grad=True)  # another grid: through the resampling too
    m(x).square().sum().backward()
    assert m.attention_biases.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# EfficientFormer-L1: published size and the authors' configuration
# --------------------------------------------------------------------------------------------
def test_published_parameters_and_gmacs():
    """docs/published_figures.md: 12.29M / 1.29 GMACs (timm's reference code; paper 12.3M / 1.3G)."""
    p = profile_model("efficientformer_l1")
    assert abs(p.params / 1e6 - 12.29) <= 0.01 * 12.29, p.params
    assert abs(p.gmacs - 1.29) <= 0.05 * 1.29, p.gmacs
    assert p.output_shape == (1, 1000)


def test_l1_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("efficientformer_l1")
    assert [len(s.blocks) for s in m.stages] == [3, 2, 6, 5]  # 3 + switch + 1 in the last stage
    assert [i["num_chs"] for i in m.feature_info] == [48, 96, 224, 448]
    last = list(m.stages[3].blocks)
    assert [type(b) for b in last] == [Meta4DBlock] * 3 + [TokenSwitch, MetaBlock]
    attn = last[4].mixer
    assert (attn.num_heads, attn.key_dim, attn.val_dim, attn.grid_size) == (8, 32, 128, (7, 7))
    assert attn.qkv.out_features == 8 * (32 + 32 + 128) and attn.proj.in_features == 1024
    assert last[4].norm1.eps == 1e-5 and m.norm.eps == 1e-5
    assert m.stem.conv1.stride == (2, 2) and m.stem.conv1.bias is not None and isinstance(m.stem.act1, nn.ReLU)
    assert m.no_weight_decay() == {"stages.3.blocks.4.mixer.attention_biases"}
    assert detect_format(m.state_dict()) == "mixlab"


# --------------------------------------------------------------------------------------------
# Parity with timm
# --------------------------------------------------------------------------------------------
def convert_with_rules(sd: dict) -> dict:
    """timm's names -> mixlab's through the family's registered rules (TIMM_RULES): the
    first matching rule renames a key, others keep their name."""
    rules = [(re.compile(p), r) for p, r in ef.TIMM_RULES]
    out = {}
    for k, v in sd.items():
        for pattern, replacement in rules:
            if m := pattern.match(k):
                k = m.expand(replacement)
                break
        out[k] = v
    return out


def ours_from(theirs: nn.Module, **kwargs) -> EfficientFormer:
    torch.manual_seed(0)
    model = (mixlab.create_model("efficientformer_l1", **kwargs) if not kwargs.get("depths")
             else EfficientFormer(**kwargs)).eval()
    model.load_state_dict(convert_with_rules(theirs.state_dict()), strict=True)
    return model


def test_timm_parity_at_224():
    theirs = timm_model("efficientformer_l1")
    ours = ours_from(theirs)
    assert_same_logits(ours, theirs, 224)
    assert torch.equal(ours.head_dist.weight, theirs.head_dist.weight)
    # the distillation head is really used: the logits are the average of both heads'
    feats = torch.randn(2, 448)
    with torch.no_grad():
        close(ours.forward_head(feats.reshape(2, 1, 1, 448)), (ours.head.fc(feats) + ours.head_dist(feats)) / 2,
              atol=1e-6, rtol=1e-6)
        assert (ours.head.fc(feats) - ours.head_dist(feats)).abs().max() > 1e-2


@pytest.mark.parametrize("depths, num_vit", [((1, 1, 1, 3), 2), ((1, 1, 1, 2), 2)],
                         ids=["3d-after-4d", "all-3d-last-stage"])
def test_timm_parity_other_variants(depths, num_vit):
    """timm's layout puts its Flat before the first 3D block (first of all when the whole
    last stage is 3D, as in L7): the same indices here, for any num_vit."""
    from timm.models.efficientformer import EfficientFormer as TimmEfficientFormer
    torch.manual_seed(0)
    theirs = randomize_(TimmEfficientFormer(depths=depths, embed_dims=(16, 24, 32, 64), num_vit=num_vit), 0).eval()
    ours = ours_from(theirs, depths=depths, dims=(16, 24, 32, 64), num_vit=num_vit)
    assert sum(isinstance(b, MetaBlock) for b in ours.stages[3].blocks) == num_vit
    assert_same_logits(ours, theirs, 224)


def test_timm_state_dict_through_convert_state_dict():
    theirs = timm_model("efficientformer_l1")
    assert detect_format(theirs.state_dict()) == "timm"
    ours = mixlab.create_model("efficientformer_l1").eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), ours), strict=True)
    assert_same_logits(ours, theirs, 224)


def test_another_input_size():
    """timm's attention biases are fixed to 7x7 (224 only; see the attention test above). At
    160 the convolutional stages still equal timm's, and the model runs with its biases
    resampled to the 5x5 grid."""
    theirs = timm_model("efficientformer_l1")
    ours = ours_from(theirs)
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = theirs.forward_intermediates(x, indices=[0, 1, 2], stop_early=True, intermediates_only=True)
        mine = ours.forward_intermediates(x)
        for a, b in zip(mine, ref):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
        assert mine[3].shape == (1, 448, 5, 5)
        logits = ours.forward_head(mine[3].permute(0, 2, 3, 1))
        attn = ours.stages[3].blocks[4].mixer
        close(attn.bias(5, 5), resample_offset_bias(attn.attention_biases, (7, 7), (5, 5))[:, offset_index(5, 5)],
              atol=0)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# The model API on a small configuration, BatchNorm folding
# --------------------------------------------------------------------------------------------
def small(**kw) -> EfficientFormer:
    torch.manual_seed(0)
    return EfficientFormer(**{**dict(img_size=64, depths=(1, 1, 1, 2), dims=(16, 24, 32, 48), num_vit=1,
                                     key_dim=8, num_heads=2, num_classes=10), **kw})


def test_forward_backward_every_parameter_learns():
    model = small(drop_path_rate=0.1).train()
    assert count_params(model) < 1_000_000
    x = randn(2, 3, 64, 64, dtype=torch.float32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad


def test_features_intermediates_heads_and_classifier_reset():
    model = small().eval()
    x = randn(2, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6, rtol=1e-5)
    assert feats.shape == (2, 2, 2, 48) and pre.shape == (2, 48)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4), (2, 48, 2, 2)]
    # distillation training returns both heads' logits
    model.distilled_training = True
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (2, 10)
    model.eval().reset_classifier(5)
    assert model.head_dist.out_features == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        close(model(x), model.forward_head(model.forward_features(x), pre_logits=True), atol=0, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (67, 75), (96, 80)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_input_sizes(size):
    model = small().eval()
    with torch.no_grad():
        out = model(randn(1, 3, *size, dtype=torch.float32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="minimum"):
        model(randn(1, 3, 16, 16, dtype=torch.float32))


@pytest.mark.parametrize("num_vit", [0, 2], ids=["no-3d", "all-3d"])
def test_num_vit_extremes(num_vit):
    model = small(num_vit=num_vit).eval()
    kinds = [type(b) for b in model.stages[3].blocks]
    assert kinds == ([Meta4DBlock] * 2 if num_vit == 0 else [TokenSwitch, MetaBlock, MetaBlock])
    with torch.no_grad():
        assert model(randn(1, 3, 64, 64, dtype=torch.float32)).shape == (1, 10)
    with pytest.raises(ValueError, match="num_vit"):
        small(num_vit=3)


def test_fuse_folds_every_batchnorm_and_keeps_the_outputs():
    model = small().eval()
    g = torch.Generator().manual_seed(0)
    n_bn = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n_bn += 1
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
            elif isinstance(m, ef.LayerScale):
                m.gamma.normal_(0, 0.5, generator=g)
        x = randn(2, 3, 64, 64, dtype=torch.float32)
        before = model(x)
        from mixlab.layers.fuse import fuse_batchnorm
        assert fuse_batchnorm(model) == n_bn == 2 + 3 + 2 * 4  # stem, downsamples, two per 4D block
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (before - after).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())


def test_registered_model_fuse():
    model = mixlab.create_model("efficientformer_l1", num_classes=10).eval()
    x = randn(1, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        before = model(x)
        assert model.fuse() is model
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (before - after).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())


# --------------------------------------------------------------------------------------------
# The specification mixers and the nano proposal
# --------------------------------------------------------------------------------------------
NANO_EFFICIENTFORMER = ("conv2 / meta4d:2x40 / meta4d:2x80 / meta4d:3x160"
                        " / meta3d:1x160:downsample=none,heads=4,key_dim=32")


def test_spec_mixers_build_the_authors_blocks():
    m = mixlab.create_model("spec:conv2 / meta4d:1x16:pool=5 / meta3d:2x32:heads=2,key_dim=8,attn_ratio=2",
                            img_size=32, num_classes=4)
    b4, b3 = m.stages[0].blocks[0], m.stages[1].blocks[1]
    assert isinstance(b4, Meta4DBlock) and b4.mixer.pool_size == 5
    assert isinstance(b3, MetaBlock) and isinstance(b3.mixer, OffsetBiasAttention)
    assert (b3.mixer.num_heads, b3.mixer.key_dim, b3.mixer.val_dim, b3.mixer.grid_size) == (2, 8, 16, (8, 8))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown option"):
        mixlab.create_model("spec:conv2 / meta4d:1x16:heads=2")


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_efficientformer_size(size, chans):
    with torch.device("meta"):
        n = count_params(mixlab.create_model("spec:" + NANO_EFFICIENTFORMER, img_size=size, in_chans=chans,
                                             num_classes=10))
    assert 1.1e6 <= n <= 1.3e6, n


def test_nano_efficientformer_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("spec:" + NANO_EFFICIENTFORMER, img_size=32, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
