"""PVT v1: spatial-reduction attention against the mixer contract and a direct computation,
the published sizes of ``pvt_tiny`` ... ``pvt_large`` (timm has no PVT v1, so no parity test),
the whole network against a functional re-computation on a state dict in the authors'
layout (which also checks the checkpoint conversion), the replaceable patch embedding, the
``sra`` spec mixer and the ``nano_pvt`` arena model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("timm")  # for test_parity's helpers

import mixlab  # noqa: E402
import mixlab.models.pvt  # noqa: E402,F401  (registers the models, the spec mixer and the layout)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.mixers.sra import SpatialReductionAttention  # noqa: E402
from mixlab.models.pvt import PVT, PVTPatchEmbed  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, randomize_  # noqa: E402,F401
from test_nano import mixer_calls  # noqa: E402

D = 24


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sra(heads=4, R=2, seed=0, dim=D) -> SpatialReductionAttention:
    torch.manual_seed(seed)
    return randomize_(SpatialReductionAttention(dim, heads, R, qkv_bias=True), seed).double().eval()


# --------------------------------------------------------------------------------------------
# Published sizes and the configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params_m, gmacs", [("pvt_tiny", 13.2, 1.9), ("pvt_small", 24.5, 3.8),
                                                   ("pvt_medium", 44.2, 6.7), ("pvt_large", 61.4, 9.8)])
def test_parameters_and_gmacs(name, params_m, gmacs):
    """The paper's Table 1 / the authors' README (GFLOPs from their get_flops.py, attention
    matmuls included, i.e. MACs)."""
    with torch.device("meta"):
        m = mixlab.create_model(name)
        x = torch.empty(1, 3, 224, 224)
        n, macs = count_params(m), count_macs(m, x)[0]
        assert m(x).shape == (1, 1000)
    assert abs(n / 1e6 - params_m) <= 0.01 * params_m, n
    assert abs(macs / 1e9 - gmacs) <= 0.05 * gmacs, macs


def test_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("pvt_small")
    assert [len(s.blocks) for s in m.stages] == [3, 4, 6, 3]
    mixers = [s.blocks[0].mixer for s in m.stages]
    assert [(x.dim, x.num_heads, x.sr_ratio) for x in mixers] == [(64, 1, 8), (128, 2, 4), (320, 5, 2), (512, 8, 1)]
    assert [s.blocks[0].mlp.fc1.out_features for s in m.stages] == [512, 1024, 1280, 2048]
    assert [s.embed.proj.stride for s in m.stages] == [(4, 4), (2, 2), (2, 2), (2, 2)]
    assert [s.embed.proj.kernel_size for s in m.stages] == [(4, 4), (2, 2), (2, 2), (2, 2)]
    assert [tuple(s.pos_embed.pos_embed.shape) for s in m.stages] == [(1, 3136, 64), (1, 784, 128), (1, 196, 320),
                                                                       (1, 50, 512)]
    assert m.cls_token.shape == (1, 1, 512) and m.head.pool == "token"
    assert mixers[0].q.bias is not None and mixers[0].sr.kernel_size == (8, 8) and mixers[0].sr.stride == (8, 8)
    assert not hasattr(mixers[3], "sr")  # R = 1: no reduction at all
    assert m.stages[0].blocks[0].norm1.eps == 1e-6 and m.norm.eps == 1e-6
    assert m.stages[0].embed.norm.eps == 1e-5 and mixers[0].norm.eps == 1e-5
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32] and m.min_input_size == 32
    assert m.no_weight_decay() == {"cls_token"}
    assert mixlab.model_family("pvt_small") == "pvt"


# --------------------------------------------------------------------------------------------
# Spatial-reduction attention
# --------------------------------------------------------------------------------------------
CASES = [  # (id, heads, R, input shape)
    ("map-8x8-R2", 4, 2, (2, 8, 8, D)),
    ("map-8x8-R4", 2, 4, (1, 8, 8, D)),
    ("map-9x7-R4-not-a-multiple", 3, 4, (2, 9, 7, D)),
    ("map-6x10-R3", 6, 3, (1, 6, 10, D)),
    ("map-5x5-R1", 4, 1, (2, 5, 5, D)),
    ("tokens-cls+16-R1", 8, 1, (2, 17, D)),
    ("map-2x2-R2-one-key", 1, 2, (1, 2, 2, D)),
]
IDS = [c[0] for c in CASES]


def n_m(shape, R):
    if len(shape) == 3:
        return shape[1], shape[1]
    return shape[1] * shape[2], (shape[1] // R) * (shape[2] // R)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, heads, R, shape = case
    m = sra(heads, R)
    x = randn(*shape)
    N, M = n_m(shape, R)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
        A, V = m.affinity(x), m.values(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert A.shape == (shape[0], heads, N, M) and V.shape == (shape[0], M, D)
    assert (A >= 0).all()
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    assert m.affinity_kind == "dynamic" and m.exact_av is True


def direct(m: SpatialReductionAttention, x: torch.Tensor):
    """softmax(q·kᵀ·scale) over the reduced keys and the output, written out from the
    weights: the reduction as a sum over each R x R cell (no conv2d), LN by hand."""
    B, H, W, C = x.shape
    R, G = m.sr_ratio, m.num_heads
    d = C // G
    q = x.reshape(B, H * W, C) @ m.q.weight.T + m.q.bias
    if R > 1:
        h, w = H // R, W // R
        cells = x[:, : h * R, : w * R].reshape(B, h, R, w, R, C)
        r = torch.einsum("biyjxc,ocyx->bijo", cells, m.sr.weight) + m.sr.bias
        r = r.reshape(B, h * w, C)
        mu, var = r.mean(-1, keepdim=True), r.var(-1, unbiased=False, keepdim=True)
        r = (r - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    else:
        r = x.reshape(B, H * W, C)
    kv = r @ m.kv.weight.T + m.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    qh = q.reshape(B, -1, G, d).transpose(1, 2)
    kh = k.reshape(B, -1, G, d).transpose(1, 2)
    vh = v.reshape(B, -1, G, d).transpose(1, 2)
    A = torch.softmax(torch.einsum("bgnd,bgmd->bgnm", qh, kh) * d ** -0.5, dim=-1)
    o = torch.einsum("bgnm,bgmd->bngd", A, vh).reshape(B, H * W, C)
    return A, (o @ m.proj.weight.T + m.proj.bias).reshape(B, H, W, C)


@pytest.mark.parametrize("heads, R, shape", [(4, 2, (2, 8, 8, D)), (3, 4, (2, 9, 7, D)), (2, 1, (1, 3, 4, D)),
                                             (6, 3, (1, 7, 6, D))])
def test_against_a_direct_computation(heads, R, shape):
    m = sra(heads, R)
    x = randn(*shape)
    A, y = direct(m, x)
    with torch.no_grad():
        close(m.affinity(x), A)
        close(m(x), y)


def test_input_affinity_spreads_each_key_over_its_cell():
    m = sra(2, 4)
    x = randn(2, 9, 11, D)  # reduced to 2x2; the last row and 3 columns are read by no key
    with torch.no_grad():
        A, P = m.affinity(x), m.input_affinity(x)
    assert A.shape == (2, 2, 99, 4) and P.shape == (2, 2, 99, 99)
    close(P.sum(-1), torch.ones(2, 2, 99, dtype=torch.float64))
    grid = P.reshape(2, 2, 99, 9, 11)
    for i in range(2):
        for j in range(2):
            cell = grid[..., 4 * i: 4 * i + 4, 4 * j: 4 * j + 4]
            close(cell, (A[..., 2 * i + j] / 16)[..., None, None].expand_as(cell))
    assert (grid[..., 8:, :] == 0).all() and (grid[..., :, 8:] == 0).all()
    m1 = sra(4, 1)
    for x1 in (randn(1, 3, 5, D), randn(1, 10, D)):
        with torch.no_grad():
            close(m1.input_affinity(x1), m1.affinity(x1), atol=0, rtol=0)


def test_bad_input_to_the_mixer_is_refused_clearly():
    with pytest.raises(ValueError, match="smaller than the spatial reduction's 4x4 cell"):
        sra(2, 4)(randn(1, 3, 8, D))
    with pytest.raises(ValueError, match=r"needs a \(B, H, W, C\) map"):
        sra(2, 2)(randn(1, 16, D))
    with pytest.raises(ValueError, match="expected 24 channels"):
        sra(2, 2)(randn(1, 4, 4, 12))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SpatialReductionAttention(24, 5)
    with pytest.raises(ValueError, match="sr_ratio must be a positive integer"):
        SpatialReductionAttention(24, 4, 0)


def test_attention_dropout():
    m = sra(4, 2)
    m.attn_drop = 0.5
    x = randn(2, 4, 4, D)
    with torch.no_grad():
        y_eval = m(x)
        m.train()
        torch.manual_seed(0)
        y = m(x)
    assert (y - y_eval).abs().max() > 1e-3 and torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------
# The whole network against a re-computation in the authors' layout
# --------------------------------------------------------------------------------------------
TINY = dict(img_size=64, patch_size=4, embed_dims=(16, 24, 40, 48), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
            depths=(1, 2, 1, 1), sr_ratios=(8, 4, 2, 1), num_classes=10)


def tiny(**kw) -> PVT:
    torch.manual_seed(0)
    return PVT(**{**TINY, **kw})


def to_authors(sd: dict) -> dict:
    """mixlab keys -> the names of whai362/PVT's classification/pvt.py."""
    import re
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^stages\.(\d)\.embed\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
        k2 = re.sub(r"^stages\.(\d)\.pos_embed\.pos_embed$", lambda m: f"pos_embed{int(m[1]) + 1}", k2)
        k2 = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.mixer\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.", k2)
        k2 = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.", k2)
        out[re.sub(r"^head\.fc\.", "head.", k2)] = v
    return out


def reference_logits(sd: dict, x: torch.Tensor, heads) -> torch.Tensor:
    """PVT v1 computed functionally from a state dict with the authors' names (the paper's
    Sec. 3 and Fig. 2; only the first-stage input layout is NCHW)."""
    S = len(heads)
    ln = F.layer_norm
    for i in range(1, S + 1):
        w, b = sd[f"patch_embed{i}.proj.weight"], sd[f"patch_embed{i}.proj.bias"]
        x = F.conv2d(x, w, b, stride=w.shape[-1])
        B, C, H, W = x.shape
        t = ln(x.flatten(2).transpose(1, 2), (C,), sd[f"patch_embed{i}.norm.weight"], sd[f"patch_embed{i}.norm.bias"])
        if i == S:
            t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)
        t = t + sd[f"pos_embed{i}"]
        j = 0
        while f"block{i}.{j}.norm1.weight" in sd:
            p = f"block{i}.{j}."
            h = ln(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
            q = F.linear(h, sd[p + "attn.q.weight"], sd[p + "attn.q.bias"])
            r = h
            if p + "attn.sr.weight" in sd:
                sw = sd[p + "attn.sr.weight"]
                r = F.conv2d(h.transpose(1, 2).reshape(B, C, H, W), sw, sd[p + "attn.sr.bias"], stride=sw.shape[-1])
                r = ln(r.flatten(2).transpose(1, 2), (C,), sd[p + "attn.norm.weight"], sd[p + "attn.norm.bias"])
            kv = F.linear(r, sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"])
            G, d = heads[i - 1], C // heads[i - 1]
            qh, kh, vh = (z.reshape(B, -1, G, d).transpose(1, 2) for z in (q, kv[..., :C], kv[..., C:]))
            o = (torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, -1) @ vh).transpose(1, 2).reshape(B, -1, C)
            t = t + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            h = ln(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            t = t + h
            j += 1
        if i < S:
            x = t.transpose(1, 2).reshape(B, C, H, W)
    t = ln(t, (t.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


def test_network_equals_a_functional_recomputation_and_the_authors_layout_converts():
    ours = randomize_(tiny(), 3).double().eval()
    authors = to_authors(ours.state_dict())
    assert detect_format(authors) == "authors-pvt" and detect_format(ours.state_dict()) == "mixlab"
    x = randn(2, 3, 64, 64, seed=4)
    with torch.no_grad():
        y = ours(x)
        close(y, reference_logits(authors, x, TINY["num_heads"]), atol=1e-9, rtol=1e-8)
    assert y.std() > 1e-2
    fresh = tiny().double().eval()
    fresh.load_state_dict(convert_state_dict(authors, fresh), strict=True)
    with torch.no_grad():
        close(fresh(x), y, atol=0, rtol=0)
    with torch.device("meta"):
        other = mixlab.create_model("convit_tiny")
    with pytest.raises(ValueError, match="authors-pvt pvt checkpoint"):
        convert_state_dict(authors, other)


# --------------------------------------------------------------------------------------------
# The model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def test_forward_backward_every_parameter_learns():
    model = tiny().train()
    out = model(randn(2, 3, 64, 64, dtype=torch.float32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    assert not bad


def test_features_intermediates_heads_and_classifier_reset():
    model = tiny().eval()
    x = randn(2, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6, rtol=1e-5)
        close(pre, feats[:, 0], atol=0, rtol=0)
        assert [tuple(f.shape) for f in model.forward_intermediates(x, [-1, 1])] == [(2, 48, 2, 2), (2, 24, 8, 8)]
    assert feats.shape == (2, 5, 48)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 24, 8, 8), (2, 40, 4, 4), (2, 48, 2, 2)]
    close(maps[-1], feats[:, 1:].reshape(2, 2, 2, 48).permute(0, 3, 1, 2), atol=0, rtol=0)
    with torch.device("meta"):
        feat = mixlab.create_model("pvt_tiny", features_only=True, img_size=64)
        assert [tuple(f.shape) for f in feat(torch.empty(1, 3, 64, 64))] == [(1, 64, 16, 16), (1, 128, 8, 8),
                                                                             (1, 320, 4, 4), (1, 512, 2, 2)]
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        close(model(x), model.forward_head(model.forward_features(x), pre_logits=True), atol=0, rtol=0)
    avg = tiny(global_pool="avg").eval()
    with torch.no_grad():
        f = avg.forward_features(x)
        close(avg.forward_head(f, pre_logits=True), f[:, 1:].mean(1), atol=0, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (72, 40), (32, 36), (100, 92)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_input_sizes(size):
    """Any multiple of 4 from 32 up: later embeddings floor odd maps and the reductions
    floor maps that are not multiples of R, as the authors' convolutions do."""
    model = tiny().eval()
    x = randn(1, 3, *size, dtype=torch.float32)
    with torch.no_grad():
        out = model(x)
        maps = model.forward_intermediates(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    h, w = size[0] // 4, size[1] // 4
    want = []
    for c in TINY["embed_dims"]:
        want.append((1, c, h, w))
        h, w = h // 2, w // 2
    assert [tuple(f.shape) for f in maps] == want


def test_create_model_arguments():
    with torch.device("meta"):
        m = mixlab.create_model("pvt_tiny", num_classes=7, in_chans=1, img_size=128, drop_rate=0.1,
                                drop_path_rate=0.1).eval()
        assert m(torch.empty(1, 1, 128, 128)).shape == (1, 7)
    assert m.stages[0].pos_embed.pos_embed.shape == (1, 1024, 64) and m.stages[3].pos_embed.pos_embed.shape == (1, 17,
                                                                                                               512)
    assert m.stages[3].blocks[1].drop_path1.p == pytest.approx(0.1)
    with pytest.raises(TypeError, match="did you mean"):
        mixlab.create_model("pvt_tiny", sr_ratio=(8, 4, 2, 1))


def test_bad_input_is_refused_clearly():
    model = tiny().eval()
    with pytest.raises(ValueError, match="not divisible by the patch size 4x4"):
        model(torch.randn(1, 3, 66, 64))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="minimum 32x32"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="sr_ratios\\[-1\\] must be 1"):
        tiny(sr_ratios=(8, 4, 2, 2))
    with pytest.raises(ValueError, match="depths has 4 stage.*num_heads has 3"):
        tiny(num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="max")
    with pytest.raises(ValueError, match="multiple of 4"):
        PVT(img_size=30)
    with pytest.raises(ValueError, match="smaller than the 2x2 patch embedding"):
        PVTPatchEmbed(3, 8, 2)(torch.randn(1, 3, 1, 5))


class OverlapEmbed(nn.Module):
    """A convolutional embedding in the CETNet spirit: 3x3 convolution of the given stride
    (padding 1), BatchNorm, GELU, 1x1 convolution; NCHW in, channels-last out."""

    def __init__(self, in_chs, out_chs, stride):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride, 1), nn.BatchNorm2d(out_chs), nn.GELU(),
                                  nn.Conv2d(out_chs, out_chs, 1))

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


def test_the_patch_embedding_is_replaceable():
    calls = []

    def embed(in_chs, out_chs, stride, stage_index):
        calls.append((in_chs, out_chs, stride, stage_index))
        return OverlapEmbed(in_chs, out_chs, stride)

    model = tiny(embed_layer=embed).eval()
    assert calls == [(3, 16, 4, 0), (16, 24, 2, 1), (24, 40, 2, 2), (40, 48, 2, 3)]
    assert all(isinstance(s.embed, OverlapEmbed) for s in model.stages)
    with torch.no_grad():
        # 3x3/2 with padding 1 rounds up (9 -> 5) where the default floors: the position
        # embeddings are resampled to the grid the embedding produces
        for size in (64, 72):
            out = model(randn(1, 3, size, size, dtype=torch.float32))
            assert out.shape == (1, 10) and torch.isfinite(out).all()
    default = tiny()
    assert [type(s.embed) for s in default.stages] == [PVTPatchEmbed] * 4
    assert [s.embed.floor for s in default.stages] == [False, True, True, True]


# --------------------------------------------------------------------------------------------
# The spec mixer and nano_pvt
# --------------------------------------------------------------------------------------------
def _contract_inside(model, x):
    """Every SRA mixer of ``model`` reproduces its forward from affinity and values on the
    input it sees inside the network."""
    seen = mixer_calls(model, x, SpatialReductionAttention)
    with torch.no_grad():
        for mod, inp, out in seen.values():
            close(mod.explicit_forward(inp), out)
    return seen


def test_spec_mixer():
    from mixlab.registry import MIXERS
    assert MIXERS["sra"].options == {"heads": 2, "sr_ratio": 2}
    spec = "spec:patch2 / sra:1x16:heads=1,sr_ratio=4 / sra:1x32:heads=2 / sra:1x32:heads=4,sr_ratio=1"
    torch.manual_seed(0)
    m = mixlab.create_model(spec, img_size=32, num_classes=10).double().eval()
    mixers = [mod for mod in m.modules() if isinstance(mod, SpatialReductionAttention)]
    assert [(x.num_heads, x.sr_ratio) for x in mixers] == [(1, 4), (2, 2), (4, 1)]
    for size in (32, 16):
        assert len(_contract_inside(m, randn(2, 3, size, size))) == 3
        with torch.no_grad():
            assert m(randn(1, 3, size, size)).shape == (1, 10)


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_pvt_size(size, chans):
    with torch.device("meta"):
        m = mixlab.create_model("nano_pvt", img_size=size, in_chans=chans)
        macs = count_macs(m, torch.empty(1, chans, size, size))[0]
    n = count_params(m)
    assert 1.06e6 <= n <= 1.2e6, n
    assert [len(s.blocks) for s in m.stages] == [2, 2, 2] and m.num_classes == 10
    assert [s.blocks[0].mixer.sr_ratio for s in m.stages] == [4, 2, 1]
    if size == 32:
        assert 40e6 < macs < 50e6, macs


def test_nano_pvt_keeps_the_contract_at_16():
    torch.manual_seed(0)
    m = mixlab.create_model("nano_pvt", img_size=16).double().eval()
    assert len(_contract_inside(m, randn(2, 3, 16, 16))) == 6


def test_nano_pvt_trains_one_step_on_fashion_mnist_sizes_and_runs_at_16_and_32():
    torch.manual_seed(0)
    model = mixlab.create_model("nano_pvt", img_size=28, in_chans=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    rgb = mixlab.create_model("nano_pvt").eval()
    with torch.no_grad():
        assert model.eval()(x).shape == (4, 10)
        for size in (16, 32):
            out = rgb(torch.randn(2, 3, size, size))
            assert out.shape == (2, 10) and torch.isfinite(out).all()
