"""CETNet: the LEWin mixer against the mixer contract, the convolutional embedding (CE) and stem,
the family's configuration (the named CETNet-T/S/B wait for the paper's supplementary), Swin and
PVT with ``conv_embed=True`` (the paper's CE experiment), the model API on a tiny configuration, ``nano_cetnet`` and the
``lewin`` spec mixer. The authors released no code and timm has no CETNet: no parity test."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixlab  # noqa: E402
import mixlab.models.cetnet  # noqa: E402,F401  (registers the models and the spec mixer)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.layers.embed import CETNetStem, ConvolutionalEmbedding  # noqa: E402
from mixlab.mixers.lewin import LEWinAttention  # noqa: E402
from mixlab.models.cetnet import CETNet  # noqa: E402
from test_parity import _fast_init  # noqa: E402,F401

D = 16


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize_bn_(model: nn.Module, seed=0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (eval mode then matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def lewin(window=4, shift=0, heads=2, scope="window", bias=True, seed=0) -> LEWinAttention:
    torch.manual_seed(seed)
    m = LEWinAttention(D, heads, window, shift, conv_scope=scope, rel_pos_bias=bias)
    if bias:
        with torch.no_grad():
            m.relative_position_bias_table.normal_(0, 1.0)
    return randomize_bn_(m, seed).double().eval()


# --------------------------------------------------------------------------------------------
# LEWin and the mixer contract
# --------------------------------------------------------------------------------------------
CASES = [  # (name, window, shift, input shape)
    ("8x8-w4", 4, 0, (2, 8, 8, D)),
    ("8x8-w4-shift2", 4, 2, (2, 8, 8, D)),
    ("9x6-w4-shift2-padded", 4, 2, (1, 9, 6, D)),
    ("3x5-smaller-than-window", 7, 3, (2, 3, 5, D)),
    ("7x7-w7", 7, 0, (1, 7, 7, D)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("scope", ["window", "map"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case, scope):
    _, win, shift, shape = case
    m = lewin(win, shift, scope=scope)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_without_relative_position_bias():
    m = lewin(4, 2, bias=False)
    assert m.relative_position_bias_table is None
    x = randn(2, 8, 8, D)
    with torch.no_grad():
        close(m.explicit_forward(x), m(x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_is_softmax_rows_block_structured_by_window(case):
    _, win, shift, shape = case
    m = lewin(win, shift)
    x = randn(*shape)
    B, H, W, _ = shape
    with torch.no_grad():
        A = m.affinity(x)
    assert m.affinity_kind == "dynamic" and m.exact_av
    assert A.shape == (B, m.num_heads, H * W, H * W)
    assert (A >= 0).all()
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    # the support: i sees j only when both lie in the same window of the (shifted) map
    (wh, ww), (sh, sw) = m.window_and_shift(H, W)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    # the window id of each position after the cyclic shift, and its region (Swin's mask)
    yy, xx = (ys - sh) % Hp, (xs - sw) % Wp
    wid = (yy // wh * (Wp // ww) + xx // ww).flatten()
    same = wid[:, None] == wid[None, :]
    assert (A[:, :, ~same] == 0).all()
    if not (sh or sw):
        assert (A[:, :, same] > 0).all()


def test_values_are_v_after_its_depthwise_conv_projection():
    m = lewin(4, 0, scope="map")
    x = randn(2, 8, 8, D)
    with torch.no_grad():
        conv, bn = m.conv_v
        t = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, None, 1, 1, groups=D)
        t = bn(t).permute(0, 2, 3, 1)
        expected = m.proj_v(t).reshape(2, 64, D)
        close(m.values(x), expected)
        # a map no larger than one window is one window: both scopes agree there
        mw, mm = lewin(8, 0, scope="window"), lewin(8, 0, scope="map")
        mm.load_state_dict(mw.state_dict())
        close(mw.values(x), mm.values(x))


def test_window_scope_pads_each_window_on_its_own():
    """With 'window' scope, a position at a window's border does not read across it."""
    m = lewin(4, 0, scope="window")
    mm = lewin(4, 0, scope="map")
    mm.load_state_dict(m.state_dict())
    x = randn(1, 8, 8, D)
    with torch.no_grad():
        vw, vm = m.values(x).view(8, 8, D), mm.values(x).view(8, 8, D)
    close(vw[1:3, 1:3], vm[1:3, 1:3])  # window interiors agree
    assert not torch.allclose(vw[3, 1], vm[3, 1])  # the window's bottom row does not


def test_lewin_rejects_bad_options():
    with pytest.raises(ValueError, match="conv_scope"):
        LEWinAttention(D, 2, 4, conv_scope="global")
    with pytest.raises(ValueError, match="kernel_size"):
        LEWinAttention(D, 2, 4, kernel_size=2)
    with pytest.raises(ValueError, match="divisible"):
        LEWinAttention(D, 3, 4)


# --------------------------------------------------------------------------------------------
# Convolutional embedding and stem
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["mbconv", "fused"])
@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (1, 1)])
def test_convolutional_embedding_shapes(block, hw):
    ce = randomize_bn_(ConvolutionalEmbedding(8, 12, 2, 2, block, (2, 1))).double().eval()
    x = randn(2, *hw, 8)
    y = ce(x)
    assert y.shape == (2, -(-hw[0] // 2), -(-hw[1] // 2), 12)
    close(y.mean(-1), torch.zeros(y.shape[:-1], dtype=torch.float64), atol=1e-8, rtol=0)  # ends in LayerNorm
    assert len(ce.blocks) == 2 and not ce.blocks[0].residual and ce.blocks[1].residual


def test_convolutional_embedding_options_and_errors():
    ce = ConvolutionalEmbedding(3, 16, 2, 2, "fused", (1, 2), project=False, nchw_input=True)
    assert ce(torch.randn(1, 3, 9, 9)).shape == (1, 5, 5, 16)
    assert isinstance(ce.proj, nn.Identity) and isinstance(ce.norm, nn.Identity)
    with pytest.raises(ValueError, match="block"):
        ConvolutionalEmbedding(8, 16, block="ghost")
    with pytest.raises(ValueError, match="expansion"):
        ConvolutionalEmbedding(8, 16, depth=2, expansion=(1, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        ConvolutionalEmbedding(8, 16, stride=4)
    with pytest.raises(ValueError, match="4 expansion"):
        CETNetStem(3, 8, 16, expansions=(1, 2))


def test_stem_has_stride_4_and_five_layers():
    stem = CETNetStem(3, 8, 16).eval()
    assert stem(torch.randn(1, 3, 32, 28)).shape == (1, 8, 7, 16)
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
    k3 = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(k3) == 4 and [c.stride[0] for c in k3] == [2, 1, 2, 1]  # four Fused-MBConvs
    assert stem.s1.proj.kernel_size == (1, 1)  # then the 1x1 conv (and LayerNorm)


# --------------------------------------------------------------------------------------------
# The family's configuration (the named variants wait for the paper's supplementary)
# --------------------------------------------------------------------------------------------
def test_configuration():
    with torch.device("meta"):
        t = CETNet(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16))
        assert t(torch.empty(1, 3, 224, 224)).shape == (1, 1000)
    assert [len(s.blocks) for s in t.stages] == [2, 2, 6, 2]
    assert [f["num_chs"] for f in t.feature_info] == [64, 128, 256, 512]
    assert [f["reduction"] for f in t.feature_info] == [4, 8, 16, 32]
    blocks = t.stages[2].blocks
    assert [b.mixer.shift_size for b in blocks[:2]] == [(0, 0), (3, 3)]
    assert isinstance(t.stages[1].downsample, ConvolutionalEmbedding)
    assert not any(mixlab.is_model(f"cetnet_{v}") for v in ("tiny", "small", "base"))
    with pytest.raises(TypeError, match="unknown argument"):
        mixlab.create_model("nano_cetnet", window=7)


# --------------------------------------------------------------------------------------------
# The model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> CETNet:
    torch.manual_seed(0)
    cfg = dict(img_size=32, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
               num_classes=7)
    return randomize_bn_(CETNet(**{**cfg, **kw})).eval()  # float32: float64 convolutions are slow on CPUs


def test_tiny_model_forward_features_and_fuse():
    m = tiny()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        y = m(x)
        feats = m.forward_intermediates(x)
        assert y.shape == (2, 7)
        assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2), (2, 128, 1, 1)]
        assert m.forward_intermediates(randn(1, 3, 30, 22, dtype=torch.float32), [1])[0].shape == (1, 32, 4, 3)
        m.fuse()
        close(m(x), y, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


def test_tiny_model_trains_and_checks_input():
    m = tiny(conv_scope="map", drop_path_rate=0.1).train()
    loss = m(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than"):
        m(torch.randn(1, 3, 2, 2))


# --------------------------------------------------------------------------------------------
# Swin with conv_embed=True (CETNet's CE applied to Swin)
# --------------------------------------------------------------------------------------------
def test_swin_conv_embed():
    with torch.device("meta"):
        plain = mixlab.create_model("swin_tiny_patch4_window7_224")
        ce = mixlab.create_model("swin_tiny_patch4_window7_224", conv_embed=True).eval()
        macs = count_macs(ce, torch.empty(1, 3, 224, 224))[0]
    assert count_params(plain) == 28_288_354  # unchanged by the option
    assert count_params(ce) == 28_826_674
    assert abs(macs / 1e9 - 5.234) < 0.005
    assert isinstance(ce.stem, CETNetStem)
    assert all(isinstance(s.downsample, ConvolutionalEmbedding) for s in ce.stages[1:])
    small = mixlab.create_model("swin_tiny_patch4_window7_224", conv_embed=True, depths=(1, 1, 1, 1),
                                num_classes=5).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 60, 44)).shape == (1, 5)
    with pytest.raises(ValueError, match="patch_size must be 4"):
        mixlab.create_model("swin_tiny_patch4_window7_224", conv_embed=True, patch_size=2)


def test_pvt_conv_embed():
    """The same experiment on PVT: CETNet's stem for the first embedding, CEs for the others."""
    from mixlab.models.pvt import PVTPatchEmbed

    with torch.device("meta"):
        plain = mixlab.create_model("pvt_small")
        ce = mixlab.create_model("pvt_small", conv_embed=True)
    assert count_params(plain) == 24_485_864  # unchanged by the option
    assert isinstance(ce.stages[0].embed, CETNetStem)
    assert all(isinstance(s.embed, ConvolutionalEmbedding) for s in ce.stages[1:])
    assert all(isinstance(s.embed, PVTPatchEmbed) for s in plain.stages)
    torch.manual_seed(0)
    small = mixlab.create_model("pvt_tiny", conv_embed=True, depths=(1, 1, 1, 1), img_size=64, num_classes=5).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        assert small(torch.randn(1, 3, 72, 56)).shape == (1, 5)
    with pytest.raises(ValueError, match="patch_size must be 4"):
        mixlab.create_model("pvt_tiny", conv_embed=True, patch_size=2)
    with pytest.raises(ValueError, match="not both"):
        mixlab.create_model("pvt_tiny", conv_embed=True, embed_layer=lambda *a: None)


# --------------------------------------------------------------------------------------------
# nano_cetnet and the spec mixer
# --------------------------------------------------------------------------------------------
def test_nano_cetnet():
    torch.manual_seed(0)
    for size, chans in ((32, 3), (28, 1), (16, 3)):
        mm = mixlab.create_model("nano_cetnet", img_size=size, in_chans=chans)
        assert 1.0e6 <= count_params(mm) <= 1.3e6 and mm.num_classes == 10
        assert mm(torch.randn(2, chans, size, size)).shape == (2, 10)


def test_lewin_spec_mixer():
    from mixlab.registry import MIXERS
    assert MIXERS["lewin"].options == {"heads": 4, "window": 7}
    torch.manual_seed(0)
    m = mixlab.create_model("spec:patch2 / lewin:2x16:heads=2,window=4 / lewin:1x32:heads=2,window=4",
                            img_size=16, num_classes=3).eval()
    mixers = [b.mixer for s in m.stages for b in s.blocks]
    assert all(isinstance(x, LEWinAttention) for x in mixers)
    assert [x.shift_size for x in mixers[:2]] == [(0, 0), (2, 2)]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
