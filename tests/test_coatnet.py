"""CoAtNet: its relative attention against the mixer contract (and timm's ``Attention2d`` with
``RelPosBias``), the registered models (published sizes, numerical parity with timm's
``coatnet_0_rw_224`` and ``coatnet_0_224`` under random weights), other input sizes and bias
table resampling, BatchNorm folding, the nano model and the ``relattn`` spec mixer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.layers.conv_blocks import MBConvBlock  # noqa: E402
from mixlab.mixers import Mixer  # noqa: E402
from mixlab.mixers.rel_attention import RelativeAttention, resample_rel_bias_table  # noqa: E402
from mixlab.models.blocks import MetaBlock  # noqa: E402
from mixlab.models.coatnet import CoAtNet, RelAttnBlock  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, assert_same_logits, randomize_  # noqa: E402,F401
from test_nano import mixer_calls  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops on a busy 2-core machine (conftest.py)

D = 16


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attention(grid=(4, 5), heads=2, head_dim=None, dim_out=None, seed=0) -> RelativeAttention:
    torch.manual_seed(seed)
    m = RelativeAttention(D, heads, grid, head_dim=head_dim, dim_out=dim_out).double().eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 1.0)  # make the bias really count
    return m


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
CASES = [
    ("map-4x5", dict(grid=(4, 5)), (2, 4, 5, D)),
    ("tokens-4x5", dict(grid=(4, 5)), (2, 20, D)),
    ("widening-head-dim-4", dict(grid=(3, 3), heads=3, head_dim=4, dim_out=24), (2, 3, 3, D)),
    ("built-4x4-run-6x5", dict(grid=(4, 4)), (2, 6, 5, D)),
    ("built-7x7-run-2x3", dict(grid=(7, 7)), (1, 2, 3, D)),
    ("1x1", dict(grid=(1, 1)), (2, 1, 1, D)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, kw, shape = case
    m = attention(**kw)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
    assert y.shape == x.shape[:-1] + (m.dim_out,) and torch.isfinite(y).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_rows_are_softmax_rows(case):
    _, kw, shape = case
    m = attention(**kw)
    x = randn(*shape)
    N = shape[1] if len(shape) == 3 else shape[1] * shape[2]
    with torch.no_grad():
        A = m.affinity(x)
    assert A.shape == (shape[0], m.num_heads, N, N)
    assert (A >= 0).all()
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    assert m.values(x).shape == (shape[0], N, m.num_heads * m.head_dim)
    assert m.affinity_kind == "dynamic" and m.exact_av is True and isinstance(m, Mixer)


def test_bias_is_indexed_by_signed_offsets():
    m = attention((3, 4))
    B = m.bias(3, 4)
    for i in range(12):
        for j in range(12):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            row = (yi - yj + 2) * 7 + (xi - xj + 3)
            close(B[:, i, j], m.relative_position_bias_table[row], atol=0)
    x = randn(1, 3, 4, D)
    with torch.no_grad():  # and it enters the affinity: without it the attention is another one
        A = m.affinity(x)
        m.relative_position_bias_table.zero_()
        assert (m.affinity(x) - A).abs().max() > 1e-3


def test_same_attention_as_timms_on_the_same_weights():
    """timm's ``Attention2d`` (NCHW, 1x1-conv qkv, head-first layout) with ``RelPosBias``."""
    from functools import partial

    from timm.layers import RelPosBias
    from timm.models.maxxvit import Attention2d
    torch.manual_seed(0)
    theirs = Attention2d(32, 48, dim_head=8, rel_pos_cls=partial(RelPosBias, window_size=(5, 4)))
    randomize_(theirs, 0).eval()
    ours = RelativeAttention(32, 6, (5, 4), head_dim=8, dim_out=48).eval()
    sd = {k.replace("rel_pos.", ""): v.flatten(1) if v.ndim == 4 else v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 32, 5, 4)
    with torch.no_grad():
        close(ours(x.permute(0, 2, 3, 1)), theirs(x).permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_token_sequence_of_another_length_is_refused():
    with pytest.raises(ValueError, match="4x5 grid"):
        attention((4, 5))(randn(1, 21, D))
    with pytest.raises(ValueError, match="divisible"):
        RelativeAttention(30, 4, (3, 3))


def test_resample_rel_bias_table():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(7 * 9, 3, generator=g, dtype=torch.float64)
    assert resample_rel_bias_table(t, (4, 5), (4, 5)) is t
    assert resample_rel_bias_table(t, (4, 5), (6, 3)).shape == (11 * 5, 3)
    const = torch.full((7 * 7, 2), 0.7, dtype=torch.float64)
    close(resample_rel_bias_table(const, (4, 4), (9, 2)), torch.full((17 * 3, 2), 0.7, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        resample_rel_bias_table(t, (4, 4), (5, 5))
    m = attention((4, 4))  # on another grid the mixer uses exactly the resampled table
    from mixlab.mixers.window import relative_position_index
    table = resample_rel_bias_table(m.relative_position_bias_table, (4, 4), (6, 5))
    close(m.bias(6, 5), table[relative_position_index(6, 5, 6, 5).reshape(-1)].view(30, 30, -1).permute(2, 0, 1),
          atol=0)


def test_attention_gradients_reach_the_table():
    m = RelativeAttention(D, 2, (3, 3)).train()
    x = torch.randn(2, 5, 4, D, requires_grad=True)  # another grid: through the resampling too
    m(x).square().sum().backward()
    assert m.relative_position_bias_table.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# Published sizes and configurations (meta device)
# --------------------------------------------------------------------------------------------
def measure(name, size=224, **kw):
    with torch.device("meta"):
        m = mixlab.create_model(name, **kw)
        macs, _ = count_macs(m, torch.empty(1, 3, size, size))
    return count_params(m) / 1e6, macs / 1e9


@pytest.mark.parametrize("name, params, gmacs", [("coatnet_0", 25.0, 4.2), ("coatnet_0_rw_224", 27.44, 4.41)])
def test_published_parameters_and_gmacs(name, params, gmacs):
    p, g = measure(name)
    assert abs(p - params) <= 0.01 * params, p
    assert abs(g - gmacs) <= 0.05 * gmacs, g


def test_timm_coatnet_0_224_strides_in_the_depthwise_conv():
    """timm's coatnet_0_224 (stride in the depthwise conv): the same 25.04M, 4.55 GMACs, 8% over
    the paper's 4.2G; the paper's stride in the first 1x1 conv gives 4.14."""
    p_dw, g_dw = measure("coatnet_0", stride_mode="dw")
    p, g = measure("coatnet_0")
    with torch.device("meta"):
        t = timm.create_model("coatnet_0_224")
        t_macs, _ = count_macs(t, torch.empty(1, 3, 224, 224))
    assert round(p_dw, 2) == round(p, 2) == round(count_params(t) / 1e6, 2) == 25.04
    assert abs(g_dw - t_macs / 1e9) < 1e-6 and round(g_dw, 2) == 4.55 and round(g, 2) == 4.14


def test_coatnet_0_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("coatnet_0")
    assert [len(s.blocks) for s in m.stages] == [2, 3, 5, 2]
    assert [i["num_chs"] for i in m.feature_info] == [96, 192, 384, 768]
    assert [i["reduction"] for i in m.feature_info] == [4, 8, 16, 32]
    assert m.stem.conv1.out_channels == m.stem.conv2.out_channels == 64 and m.stem.conv1.stride == (2, 2)
    assert all(isinstance(b, MBConvBlock) for s in m.stages[:2] for b in s.blocks)
    assert all(isinstance(b, RelAttnBlock) for s in m.stages[2:] for b in s.blocks)
    b = m.stages[0].blocks[0]
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1) and b.conv1.out_channels == 384
    assert b.se.fc1.out_channels == 24 and isinstance(b.act1, nn.GELU)
    attn = [blk.mixer for s in m.stages[2:] for blk in s.blocks]
    got = [(a.num_heads, a.head_dim, a.grid_size) for a in (attn[0], attn[-1])]
    assert got == [(12, 32, (14, 14)), (24, 32, (7, 7))]
    assert m.stages[2].blocks[0].mixer.qkv.in_features == 192 and m.stages[2].blocks[0].mixer.qkv.out_features == 1152
    assert m.head.pre_logits.fc.out_features == 768 and isinstance(m.norm, nn.Identity)
    assert len(m.no_weight_decay()) == 7 and detect_format(m.state_dict()) == "mixlab"
    assert m.stage_mixers[2] == "relative attention (global, 12 heads)"


# --------------------------------------------------------------------------------------------
# Parity with timm (random weights, eval mode, 64x64: timm builds its tables for img_size)
# --------------------------------------------------------------------------------------------
def timm_and_ours(timm_name, ours_name, size=64, timm_kwargs=None, ours_kwargs=None, seed=0):
    torch.manual_seed(seed)
    theirs = randomize_(timm.create_model(timm_name, img_size=size, **(timm_kwargs or {})), seed).eval()
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    ours = mixlab.create_model(ours_name, img_size=size, **(ours_kwargs or {})).eval()
    ours.load_state_dict(convert_state_dict(sd, ours), strict=True)
    return theirs, ours


def test_timm_parity_coatnet_0_rw_224():
    theirs, ours = timm_and_ours("coatnet_0_rw_224", "coatnet_0_rw_224")
    assert_same_logits(ours, theirs, 64)
    assert detect_format(ours.state_dict()) == "mixlab"


def test_timm_parity_coatnet_0():
    """Our coatnet_0 is timm's coatnet_0_224 with the paper's stride in the 1x1 conv."""
    theirs, ours = timm_and_ours("coatnet_0_224", "coatnet_0", timm_kwargs=dict(conv_stride_mode="1x1"))
    assert_same_logits(ours, theirs, 64)


SHALLOW = dict(depths=(1, 1, 2, 1), embed_dim=(32, 64, 64, 96), stem_width=32)


def shallow_kwargs(**kw):
    return dict(depths=SHALLOW["depths"], dims=SHALLOW["embed_dim"], stem_width=SHALLOW["stem_width"], **kw)


def test_timm_parity_depthwise_stride_and_another_size():
    """timm's own coatnet_0_224 layout (stride in the depthwise conv), shallow, at 96."""
    theirs, ours = timm_and_ours("coatnet_0_224", "coatnet_0", 96, timm_kwargs=SHALLOW,
                                 ours_kwargs=shallow_kwargs(stride_mode="dw"))
    assert ours.stages[0].blocks[0].conv2.stride == (2, 2)
    assert_same_logits(ours, theirs, 96)


def test_converted_tables_are_resampled_like_the_mixer_does():
    """A 64x64 timm checkpoint into a model built for 96 (the converter resamples the tables)
    == the 64-built model run at 96 (the mixers resample on the fly)."""
    theirs, ours64 = timm_and_ours("coatnet_0_rw_224", "coatnet_0_rw_224", 64, timm_kwargs=SHALLOW,
                                   ours_kwargs=shallow_kwargs())
    ours96 = mixlab.create_model("coatnet_0_rw_224", img_size=96, **shallow_kwargs()).eval()
    ours96.load_state_dict(convert_state_dict(theirs.state_dict(), ours96), strict=True)
    assert ours96.stages[3].blocks[0].mixer.relative_position_bias_table.shape == (25, 2)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours64(x), ours96(x)
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


# --------------------------------------------------------------------------------------------
# A tiny CoAtNet: training step, sizes, API, fusion, errors
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> CoAtNet:
    torch.manual_seed(0)
    return CoAtNet(**{**dict(img_size=32, num_classes=10, stem_width=8, dims=(16, 16, 32, 32), depths=(1, 2, 2, 1),
                             head_dim=8, head_hidden_size=24), **kw})


@pytest.mark.parametrize("variant", ["paper", "rw"])
def test_forward_backward_every_parameter_learns(variant):
    model = tiny(variant=variant, drop_path_rate=0.1,
                 stride_mode="pool" if variant == "rw" else "1x1").train()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad


@pytest.mark.parametrize("size, chans", [(16, 3), (28, 1), (37, 3), (45, 3)])
def test_other_input_sizes(size, chans):
    model = tiny(in_chans=chans).eval()
    with torch.no_grad():
        out = model(randn(1, chans, size, size, dtype=torch.float32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="minimum"):
        model(randn(1, chans, 8, 8, dtype=torch.float32))


def test_features_intermediates_heads_and_classifier_reset():
    model = tiny().eval()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6, rtol=1e-5)
    assert feats.shape == (2, 1, 1, 32) and pre.shape == (2, 24)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2), (2, 32, 1, 1)]
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 24)


@pytest.mark.parametrize("variant, stride_mode, folded", [("paper", "1x1", 1 + 2 * 3), ("paper", "dw", 1 + 2 * 3),
                                                          ("rw", "pool", 1 + 3)])
def test_fuse_folds_batchnorms_and_keeps_the_outputs(variant, stride_mode, folded):
    model = tiny(variant=variant, stride_mode=stride_mode).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
        x = randn(2, 3, 32, 32, dtype=torch.float32)
        before = model(x)
        from mixlab.layers.fuse import fuse_batchnorm
        assert fuse_batchnorm(model) == folded  # stem + conv1/norm1 (+ conv2/norm2 unless SE sits between)
        after = model(x)
    assert (before - after).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="variant"):
        tiny(variant="tf")
    with pytest.raises(ValueError, match="stride_mode"):
        tiny(stride_mode="conv")
    with pytest.raises(ValueError, match="block_types"):
        tiny(block_types=("C", "X", "T", "T"))
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="head_dim"):
        tiny(head_dim=12)
    with pytest.raises(TypeError, match="did you mean 'depths'"):
        mixlab.create_model("coatnet_0", depth=(1, 1, 1, 1))


# --------------------------------------------------------------------------------------------
# nano_coatnet and the `relattn` spec mixer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_coatnet_size(size, chans):
    with torch.device("meta"):
        n = count_params(mixlab.create_model("nano_coatnet", img_size=size, in_chans=chans))
    assert 1.06e6 <= n <= 1.2e6, n


def test_nano_coatnet_runs_and_keeps_the_contract():
    torch.manual_seed(0)
    for size, chans in ((28, 1), (32, 3)):
        m = mixlab.create_model("nano_coatnet", img_size=size, in_chans=chans)
        assert m(torch.randn(2, chans, size, size)).shape == (2, 10)
    model = mixlab.create_model("nano_coatnet", img_size=16).eval()
    seen = mixer_calls(model, torch.randn(1, 3, 16, 16))
    assert len(seen) == 4
    for key, (mixer, x, out) in seen.items():
        with torch.no_grad():
            torch.testing.assert_close(mixer.explicit_forward(x), out, atol=2e-5, rtol=1e-4)


def test_nano_coatnet_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("nano_coatnet").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_relattn_spec_mixer():
    m = mixlab.create_model("spec:conv2 / convnext:1x16 / relattn:2x32:heads=2", img_size=32, num_classes=4)
    blk = m.stages[1].blocks[1]
    assert isinstance(blk, MetaBlock) and isinstance(blk.mixer, RelativeAttention)
    assert (blk.mixer.num_heads, blk.mixer.grid_size) == (2, (8, 8))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
        assert m(torch.randn(1, 3, 24, 40)).shape == (1, 4)  # another grid: the table is resampled
    with pytest.raises(ValueError, match="unknown option"):
        mixlab.create_model("spec:conv2 / relattn:1x16:window=3")
