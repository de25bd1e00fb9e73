"""ViT_C / ViT_P (Xiao et al., NeurIPS 2021): the paper's Table 1 (parameters and FLOPs = MACs,
measured on the meta device), the equal-FLOPs relation between each convolutional stem and
the transformer block it replaces, the stem's grid, stride and error messages, a tiny ViT_C
forward / backward at 32x32 in float64 with the attention mixers' contract inside it, parity
with timm's VisionTransformer over a HybridEmbed(ConvStem) (timm registers no ViT_C, but
builds the same network from its parts) through the registered timm layout, and ``nano_vit_c``
against ``nano_vit``."""
from __future__ import annotations

from functools import lru_cache, partial

import pytest
import torch

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.vit_c  # noqa: E402,F401  (registers the models and the timm layout)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.mixers import Attention  # noqa: E402
from mixlab.models.vit import VisionTransformer  # noqa: E402
from mixlab.models.vit_c import PAPER_FIGURES, ViTConvStem, VisionTransformerC  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, randomize_  # noqa: E402,F401
from test_nano import mixer_calls  # noqa: E402

SIZES = ("1gf", "4gf", "18gf", "36gf")
VIT_P = {"1gf": "vit_p_1gf", "4gf": "vit_p_4gf", "18gf": "vit_base_patch16_224", "36gf": "vit_p_36gf"}


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@lru_cache(maxsize=None)
def profile(name: str):
    """(model, params, MACs, per-part MACs) of a registered model at 224, on the meta device."""
    with torch.device("meta"):
        m = mixlab.create_model(name)
        macs, parts = count_macs(m, torch.empty(1, 3, 224, 224))
    return m, count_params(m), macs, parts


def tiny(**kwargs) -> VisionTransformerC:
    """A float64 ViT_C at 32x32: stem 8(/2)-16(/2)-16(/1) -> 1x1 -> 32, an 8x8 grid, 2 blocks."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, num_classes=5, stem_channels=(8, 16, 16), stem_strides=(2, 2, 1), embed_dim=32,
               depth=2, num_heads=2, mlp_ratio=3.0)
    return VisionTransformerC(**{**cfg, **kwargs}).double()


# --------------------------------------------------------------------------------------------
# The paper's Table 1
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAPER_FIGURES))
def test_parameters_and_macs_match_table_1(name):
    """Parameters within 1% of Table 1 and MACs within 5% of its GFLOPs (pycls counts a
    multiply-add as one flop, as count_macs does: ViT-B/16 is 17.5 there, 17.56 here)."""
    params_m, gflops = PAPER_FIGURES[name]
    m, n, macs, _ = profile(name)
    assert abs(n / 1e6 - params_m) <= 0.01 * params_m, n
    assert abs(macs / 1e9 - gflops) <= 0.05 * gflops, macs
    with torch.device("meta"):
        assert m(torch.empty(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("size", SIZES)
def test_vit_c_is_vit_p_with_a_conv_stem_and_one_block_less(size):
    c, _, _, _ = profile(f"vit_c_{size}")
    p, _, _, _ = profile(VIT_P[size])
    assert type(p) is VisionTransformer and isinstance(c, VisionTransformerC)
    assert len(c.blocks) == len(p.blocks) - 1
    assert c.embed_dim == p.embed_dim and c.blocks[0].mixer.num_heads == p.blocks[0].mixer.num_heads
    assert c.blocks[0].mlp.fc1.out_features == p.blocks[0].mlp.fc1.out_features
    assert c.grid_size == p.grid_size == (14, 14) and c.patch_embed.stride == 16
    assert c.pos_embed.pos_embed.shape == p.pos_embed.pos_embed.shape == (1, 197, c.embed_dim)
    assert [f["reduction"] for f in c.feature_info] == [16] * len(c.blocks)
    stem = {"1gf": ((24, 48, 96, 192), (2, 2, 2, 2)), "4gf": ((48, 96, 192, 384), (2, 2, 2, 2)),
            "18gf": ((64, 128, 128, 256, 256, 512), (2, 2, 1, 2, 1, 2))}
    assert (c.stem_channels, c.stem_strides) == stem.get(size, stem["18gf"])
    # the paper's design rule: stride 2 doubles the channels, stride 1 keeps them
    for (a, b), s in zip(zip(c.stem_channels, c.stem_channels[1:]), c.stem_strides[1:]):
        assert b == a * s


def test_vit_p_18gf_is_vit_base():
    assert not mixlab.is_model("vit_p_18gf")  # ViT_P-18GF = ViT-B/16: no second name for it
    assert {"vit_c_1gf", "vit_c_4gf", "vit_c_18gf", "vit_c_36gf", "vit_p_1gf", "vit_p_4gf",
            "vit_p_36gf", "nano_vit_c"} == set(mixlab.list_models(family="vit_c"))


@pytest.mark.parametrize("size", SIZES)
def test_equal_flops(size):
    """The paper's claim: ViT_C-nGF and ViT_P-nGF match in FLOPs (Table 1: 1.1/1.1, 4.0/3.9,
    17.7/17.5, 35.0/35.9): the conv stem costs about the block it replaces (for 1, 4 and 18GF;
    36GF keeps 18GF's stem, cheaper than one of its wider blocks)."""
    _, _, macs_c, parts_c = profile(f"vit_c_{size}")
    _, _, macs_p, parts_p = profile(VIT_P[size])
    assert abs(macs_c / macs_p - 1) <= 0.03, (macs_c, macs_p)
    stem_extra = parts_c["patch_embed"] - parts_p["patch_embed"]
    block = parts_p["blocks.0"]
    assert parts_c["blocks.0"] == block
    ratio = stem_extra / block
    assert (0.5 <= ratio <= 1.0) if size == "36gf" else (0.75 <= ratio <= 1.35), ratio


# --------------------------------------------------------------------------------------------
# The stem
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, strides, size", [((8, 16), (2, 2), 32), ((8, 16, 16), (2, 2, 1), 24),
                                                     ((4, 8, 8, 16, 16, 32), (2, 2, 1, 2, 1, 2), 48),
                                                     ((8,), None, 10)])
def test_stem_grid_and_stride(channels, strides, size):
    torch.manual_seed(0)
    stem = ViTConvStem(3, channels, strides, 12).double()
    s = 2 ** sum(1 for t in (strides or (2,) * len(channels)) if t == 2)
    assert stem.stride == s
    y = stem(randn(2, 3, size, size + s))
    assert y.shape == (2, size // s, size // s + 1, 12)  # channels-last, H/s x W/s
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * len(channels) + [(1, 1)]
    assert [c.bias is None for c in convs] == [True] * len(channels) + [False]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in stem.convs)
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in stem.convs)
    assert n_bn == n_relu == len(channels)


def test_stem_error_messages():
    stem = ViTConvStem(3, (8, 16, 16), (2, 2, 1), 16)
    with pytest.raises(ValueError, match=r"input size 30x32 is not divisible by the convolutional stem's total "
                                         r"stride 4; use a multiple of 4 \(for example 28x32\)"):
        stem(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="one stride per convolution"):
        ViTConvStem(3, (8, 16), (2,), 16)
    with pytest.raises(ValueError, match="must each be 1 or 2"):
        ViTConvStem(3, (8, 16), (2, 4), 16)
    with pytest.raises(ValueError, match="at least one 3x3 convolution"):
        ViTConvStem(3, (), (), 16)
    with pytest.raises(ValueError, match=r"img_size \(30, 30\) is not divisible by the patch size 4"):
        tiny(img_size=30)
    m = tiny()
    with pytest.raises(ValueError, match="not divisible by the convolutional stem's total stride 4"):
        m(torch.zeros(1, 3, 34, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than this model's minimum 4x4"):
        m(torch.zeros(1, 3, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="built for 3 input channels"):
        m(torch.zeros(1, 1, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="did you mean 'stem_channels'"):
        mixlab.create_model("vit_c_1gf", stem_channel=(8,))


# --------------------------------------------------------------------------------------------
# A tiny ViT_C
# --------------------------------------------------------------------------------------------
def test_tiny_forward_backward_and_api():
    m = tiny().train()
    x = randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5) and out.isfinite().all()
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    assert m.patch_embed.convs[0].weight.grad.abs().sum() > 0 and m.pos_embed.pos_embed.grad.abs().sum() > 0
    m.eval()
    feats = m.forward_intermediates(x, [0, -1])
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8)] * 2
    assert m.forward_features(x).shape == (2, 65, 32)  # class token + 8x8 grid
    # another size: the position embedding is resampled to the 12x12 grid
    assert m(randn(1, 3, 48, 48)).shape == (1, 5)
    # fusing the stem's BatchNorms (eval mode) changes nothing
    with torch.no_grad():
        for mod in m.patch_embed.convs:
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(randn(mod.num_features, seed=3) * 0.1)
                mod.running_var.copy_(randn(mod.num_features, seed=4).abs() + 0.5)
        ref = m(x)
        assert m.fuse() is m
        assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
        close(m(x), ref)
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)


def test_attention_mixers_keep_the_contract_inside_the_network():
    """The mixer is mixlab's Attention on the (B, 1 + N, C) sequence the conv stem produces."""
    m = randomize_(tiny(), 0).double().eval()
    for size in (32, 16, 24):
        seen = mixer_calls(m, randn(2, 3, size, size, seed=size))
        assert len(seen) == len(m.blocks)
        with torch.no_grad():
            for i, blk in enumerate(m.blocks):
                mixer, inp, out = seen[f"blocks.{i}.mixer"]
                assert mixer is blk.mixer
                assert isinstance(mixer, Attention) and mixer.affinity_kind == "dynamic" and mixer.exact_av
                n = 1 + (size // 4) ** 2
                A = mixer.affinity(inp)
                assert A.shape == (2, 2, n, n)
                close(A.sum(-1), torch.ones(2, 2, n, dtype=torch.float64))
                close(mixer.explicit_forward(inp), out)


# --------------------------------------------------------------------------------------------
# timm: VisionTransformer(embed_layer=HybridEmbed(backbone=ConvStem(...), proj=False))
# --------------------------------------------------------------------------------------------
def timm_vit_c(img_size=32, channels=(8, 16, 16), strides=(2, 2, 1), dim=32, depth=2, heads=2, mlp_ratio=3.0):
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer_hybrid import ConvStem
    n = len(channels)
    backbone = ConvStem(3, depth=n + 1, channels=(*channels, dim), kernel_size=(3,) * n + (1,),
                        stride=(*strides, 1))
    torch.manual_seed(0)
    embed = partial(HybridEmbed, backbone=backbone, proj=False)
    model = TimmViT(img_size=img_size, patch_size=1, embed_dim=dim, depth=depth, num_heads=heads,
                    mlp_ratio=mlp_ratio, embed_layer=embed)
    return randomize_(model, 0).eval()


def test_timm_parity_through_the_registered_layout():
    theirs = timm_vit_c()
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    from mixlab.weights.convert import _layout
    assert _layout(sd) == ("timm", "vit_c")  # not the plain ViT layout: the stem's keys differ
    ours = VisionTransformerC(img_size=32, stem_channels=(8, 16, 16), stem_strides=(2, 2, 1), embed_dim=32,
                              depth=2, num_heads=2, mlp_ratio=3.0).eval()
    ours.load_state_dict(convert_state_dict(sd, ours), strict=True)
    for size in (32, 16):  # 16: both resample the 8x8 position embedding to 4x4
        if size != 32:
            theirs_at = timm_vit_c(img_size=size)
            from timm.layers import resample_abs_pos_embed as timm_resample
            theirs_at.load_state_dict(dict(sd, pos_embed=timm_resample(sd["pos_embed"], (4, 4), num_prefix_tokens=1)))
        else:
            theirs_at = theirs
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            a, b = ours(x), theirs_at(x)
        assert a.shape == b.shape == (2, 1000)
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-4 * scale and b.std() > 1e-2 * scale


# --------------------------------------------------------------------------------------------
# nano_vit_c
# --------------------------------------------------------------------------------------------
def test_nano_vit_c_against_nano_vit():
    counts, macs = {}, {}
    for name in ("nano_vit", "nano_vit_c"):
        for size, chans in ((32, 3), (28, 1)):
            with torch.device("meta"):
                m = mixlab.create_model(name, img_size=size, in_chans=chans)
                counts[name, size] = count_params(m)
                macs[name, size] = count_macs(m, torch.empty(1, chans, size, size))[0]
    for size in (32, 28):
        assert 1.0e6 <= counts["nano_vit_c", size] <= 1.3e6, counts
        assert abs(macs["nano_vit_c", size] / macs["nano_vit", size] - 1) <= 0.05, macs  # equal FLOPs
    vit, vit_c = mixlab.create_model("nano_vit"), mixlab.create_model("nano_vit_c")
    assert len(vit_c.stages[0].blocks) == len(vit.stages[0].blocks) - 1
    assert vit_c.stem.stride == vit.feature_info[0]["reduction"] == 4 and vit_c.min_input_size == 4
    assert vit_c.spec["name"] == "nano_vit_c" and vit_c.spec["stem"]["channels"] == [64, 128, 128]
    # the same network after the stem
    shapes = {k: v.shape for k, v in vit.state_dict().items() if not k.startswith(("stem.", "stages.0.blocks.5."))}
    assert shapes == {k: v.shape for k, v in vit_c.state_dict().items() if not k.startswith("stem.")}


def test_nano_vit_c_runs_on_small_images():
    torch.manual_seed(0)
    for size, chans in ((32, 3), (28, 1), (16, 3)):
        m = mixlab.create_model("nano_vit_c", img_size=size, in_chans=chans)
        out = m(torch.randn(2, chans, size, size))
        assert out.shape == (2, 10) and out.isfinite().all()
    out.sum().backward()
    assert m.stem.convs[0].weight.grad.abs().sum() > 0
    m32 = mixlab.create_model("nano_vit_c").eval()  # built for 32, fed 16x16: position embedding resampled
    with torch.no_grad():
        assert m32(torch.randn(1, 3, 16, 16)).shape == (1, 10)
