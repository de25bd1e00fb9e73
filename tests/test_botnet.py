"""BoTNet: the MHSA with 2D relative position logits against the mixer contract, a direct
computation of q·rᵀ and timm's ``BottleneckAttn`` (same weights, same output, both scalings,
stride 2); the published size of ``botnet50``; the model API on a tiny configuration; the
``botattn`` spec mixer and the ``nano_botnet`` arena model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.botnet  # noqa: E402,F401  (registers the models and the spec mixer)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.mixers.bot import BottleneckAttention  # noqa: E402
from mixlab.models.botnet import BoTBlock, BoTNet  # noqa: E402
from mixlab.models.resnet import Bottleneck  # noqa: E402
from test_parity import _fast_init, randomize_  # noqa: E402,F401
from test_nano import mixer_calls  # noqa: E402

D = 16


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mhsa(heads=4, grid=(5, 6), scale_pos=True, seed=0) -> BottleneckAttention:
    torch.manual_seed(seed)
    return randomize_(BottleneckAttention(D, heads, grid, scale_pos_embed=scale_pos), seed).double().eval()


# --------------------------------------------------------------------------------------------
# Published size and configuration
# --------------------------------------------------------------------------------------------
def test_botnet50_parameters_and_gmacs():
    """The paper: BoTNet-50 has 20.8M parameters (Table 1 / Sec. 4.1); GMACs measured 4.02
    (ResNet-50: 4.09), attention's matrix products included."""
    with torch.device("meta"):
        m = mixlab.create_model("botnet50")
        x = torch.empty(1, 3, 224, 224)
        n, macs = count_params(m), count_macs(m, x)[0]
        assert m(x).shape == (1, 1000)
    assert abs(n / 1e6 - 20.8) <= 0.01 * 20.8, n
    assert abs(macs / 1e9 - 4.02) <= 0.01 * 4.02, macs


def test_botnet50_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("botnet50")
    kinds = [[type(b) for b in s.blocks] for s in m.stages]
    assert kinds == [[Bottleneck] * 3, [Bottleneck] * 4, [Bottleneck] * 6, [BoTBlock] * 3]
    c5 = m.stages[3].blocks
    assert [b.mixer.grid_size for b in c5] == [(14, 14), (7, 7), (7, 7)]
    assert isinstance(c5[0].pool, nn.AvgPool2d) and isinstance(c5[1].pool, nn.Identity)
    assert c5[0].mixer.num_heads == 4 and c5[0].mixer.head_dim == 128 and c5[0].mixer.qkv.bias is None
    assert c5[0].mixer.rel_h.shape == (27, 128) and c5[1].mixer.rel_w.shape == (13, 128)
    assert c5[0].downsample is not None and c5[1].downsample is None
    assert m.feature_info[-1] == dict(num_chs=2048, reduction=32, module="stages.3")
    assert m.no_weight_decay() == {f"stages.3.blocks.{i}.mixer.rel_{a}" for i in range(3) for a in "hw"}


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
CASES = [  # (id, heads, built grid, input shape, scale_pos_embed)
    ("5x6-gist-scaling", 4, (5, 6), (2, 5, 6, D), True),
    ("5x6-timm-scaling", 4, (5, 6), (2, 5, 6, D), False),
    ("3x4-on-5x6-tables", 2, (5, 6), (1, 3, 4, D), True),
    ("7x3-8-heads", 8, (7, 3), (2, 7, 3, D), True),
    ("1x1", 1, (2, 2), (2, 1, 1, D), True),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, heads, grid, shape, sp = case
    m = mhsa(heads, grid, sp)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
        A = m.affinity(x)
    N = shape[1] * shape[2]
    assert y.shape == x.shape and A.shape == (shape[0], heads, N, N)
    assert m.values(x).shape == (shape[0], N, D)
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    assert m.affinity_kind == "dynamic" and m.exact_av is True


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_position_logits_direct(case):
    """q·rᵀ entry by entry: q_i·(r_h[y_j - y_i] + r_w[x_j - x_i]), from the central rows of
    the tables when the map is smaller than the grid they were built for; and the affinity is
    softmax(s·q·kᵀ + s'·q·rᵀ)."""
    _, heads, grid, (B, H, W, _), sp = case
    m = mhsa(heads, grid, sp)
    x = randn(B, H, W, D)
    gh, gw = grid
    with torch.no_grad():
        q, k, _ = m._qkv(x)
        P = m.position_logits(q, H, W)
        ref = torch.empty_like(P)
        for i in range(H * W):
            yi, xi = divmod(i, W)
            for j in range(H * W):
                yj, xj = divmod(j, W)
                r = m.rel_h[yj - yi + gh - 1] + m.rel_w[xj - xi + gw - 1]
                ref[:, :, i, j] = q[:, :, i] @ r
        close(P, ref)
        s = m.head_dim ** -0.5
        close(m.affinity(x), ((q @ k.transpose(-2, -1)) * s + ref * (s if sp else 1.0)).softmax(-1))


@pytest.mark.parametrize("scale_pos", [False, True], ids=["timm-default", "scaled-pos"])
@pytest.mark.parametrize("stride", [1, 2])
def test_parity_with_timm_bottleneck_attn(scale_pos, stride):
    """timm's BottleneckAttn (qkv as one 1x1 conv, q | k | v head-major, pool inside for
    stride 2) with the same weights gives the same output; BoTNet's pool is the block's."""
    from timm.layers.bottleneck_attn import BottleneckAttn
    torch.manual_seed(0)
    theirs = BottleneckAttn(D, feat_size=(6, 4), stride=stride, num_heads=4, scale_pos_embed=scale_pos)
    theirs = randomize_(theirs, 3).double().eval()
    ours = BottleneckAttention(D, 4, (6, 4), scale_pos_embed=scale_pos).double().eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(theirs.qkv.weight.flatten(1))
        ours.rel_h.copy_(theirs.pos_embed.height_rel)
        ours.rel_w.copy_(theirs.pos_embed.width_rel)
        x = randn(2, D, 6, 4)
        y = ours(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if stride == 2:
            y = nn.AvgPool2d(2, 2, ceil_mode=True)(y)
        close(y, theirs(x))


def test_mixer_refuses_bad_input():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        BottleneckAttention(10, 4)
    m = mhsa(4, (4, 4))
    with pytest.raises(ValueError, match="larger than the 4x4 grid.*larger img_size"):
        m(randn(1, 5, 4, D))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) map"):
        m(randn(1, 16, D))


# --------------------------------------------------------------------------------------------
# The model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> BoTNet:
    torch.manual_seed(0)
    return BoTNet(**{**dict(img_size=64, depths=(1, 1, 1, 2), widths=(8, 8, 16, 16), stem_width=8, num_classes=10),
                     **kw})


def test_forward_backward_every_parameter_learns():
    model = randomize_(tiny(), 0).train()  # random BN scales: the zero-initialised last BNs would hide the branches
    out = model(randn(2, 3, 64, 64, dtype=torch.float32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    assert not bad


def test_features_intermediates_sizes_and_bad_input():
    model = tiny().eval()
    x = randn(1, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in maps] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2)]
        assert model(randn(1, 3, 48, 40, dtype=torch.float32)).shape == (1, 10)  # smaller: central table rows
        model.reset_classifier(0)
        assert model(x).shape == (1, 64)
    with pytest.raises(ValueError, match="larger img_size"):
        model(randn(1, 3, 96, 96, dtype=torch.float32))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="attn_stages"):
        tiny(attn_stages=(4,))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny(num_heads=3)
    with pytest.raises(TypeError, match="did you mean"):
        mixlab.create_model("botnet50", num_head=4)


def test_odd_maps_pool_like_the_shortcut():
    """An odd map (7x7 -> 4x4): the ceil-mode 2x2 pool matches the strided 1x1 shortcut."""
    torch.manual_seed(0)
    blk = BoTBlock(16, 8, stride=2, grid_size=(7, 7), num_heads=2).eval()
    with torch.no_grad():
        assert blk(torch.randn(1, 7, 7, 16)).shape == (1, 4, 4, 32)


# --------------------------------------------------------------------------------------------
# spec mixer and nano_botnet
# --------------------------------------------------------------------------------------------
def test_spec_mixer():
    model = mixlab.create_model("spec:conv2 / bottleneck:1x32 / botattn:2x64:heads=2", img_size=16,
                                num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    blk = model.stages[1].blocks[0]
    assert isinstance(blk, BoTBlock) and blk.mixer.num_heads == 2 and blk.mixer.grid_size == (4, 4)
    assert "MHSA" in model.stage_mixers[1]
    with pytest.raises(ValueError, match="heads=3 does not divide"):
        mixlab.create_model("spec:patch2 / botattn:1x64:heads=3", img_size=16)


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1), (16, 3)])
def test_nano_botnet_size_and_forward(size, chans):
    with torch.device("meta"):
        m = mixlab.create_model("nano_botnet", img_size=size, in_chans=chans)
        assert m(torch.empty(2, chans, size, size)).shape == (2, 10)
    assert 1.0e6 <= count_params(m) <= 1.3e6, count_params(m)
    assert sum(isinstance(b, BoTBlock) for s in m.stages for b in s.blocks) == 2


def test_nano_botnet_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("nano_botnet", img_size=28, in_chans=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
        small = mixlab.create_model("nano_botnet", img_size=16).eval()
        assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_every_mixer_of_nano_botnet_keeps_the_contract():
    """As tests/test_nano.py checks every nano model: the input each mixer really sees at 16x16."""
    torch.manual_seed(0)
    model = mixlab.create_model("nano_botnet", img_size=16).eval()
    seen = mixer_calls(model, torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        assert len(seen) == 2
        for key, (mixer, x, out) in seen.items():
            A = mixer.affinity(x)
            # one row per output position (fewer than the inputs in strided layers), one column per value
            assert A.shape[-2] == out.shape[1] * out.shape[2] and A.shape[-1] == mixer.values(x).shape[1], key
            torch.testing.assert_close(mixer.explicit_forward(x), out, atol=2e-5, rtol=1e-4)
