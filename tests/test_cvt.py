"""CvT: the convolutional-projection attention against a direct computation (depthwise convs
written out tap by tap, BatchNorm, softmax over the reduced keys) and the mixer contract, the
class token's path around the convolutions, the train/eval dependence of the BatchNorms; the
published sizes of ``cvt_13`` / ``cvt_21`` (meta device); a functional re-implementation of
the authors' network (``lib/models/cls_cvt.py``) on an authors'-layout state dict against
the model that state dict converts into; the model API on a tiny CvT at 32x32; ``nano_cvt``
and the ``convattn`` spec mixer."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixlab
import mixlab.models.cvt  # noqa: F401  (registers the models, the spec mixer and the authors' layout)
from mixlab.analysis import count_macs, count_params
from mixlab.layers.fuse import fuse_batchnorm
from mixlab.mixers import Mixer
from mixlab.mixers.conv_attention import ConvAttention
from mixlab.models.cvt import AUTHORS_RULES, CvT, QuickGELU
from mixlab.registry import MIXERS
from mixlab.weights import convert_state_dict, detect_format
from test_parity import _fast_init, randomize_  # noqa: F401
from test_nano import mixer_calls

D = 24


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mixer(heads=3, kv_stride=2, prefix=0, grid=None, seed=0, qkv_bias=True) -> ConvAttention:
    """A float64 ConvAttention in eval mode with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    m = ConvAttention(D, heads, qkv_bias=qkv_bias, kv_stride=kv_stride, num_prefix_tokens=prefix, grid_size=grid)
    return randomize_(m, seed).double().eval()


# --------------------------------------------------------------------------------------------
# A direct computation of the mixer
# --------------------------------------------------------------------------------------------
def dwconv_taps(fmap, weight, stride):
    """Depthwise k x k convolution, padding (k-1)/2, written as a sum over the taps."""
    B, C, H, W = fmap.shape
    k = weight.shape[-1]
    p = (k - 1) // 2
    Ho, Wo = (H + 2 * p - k) // stride + 1, (W + 2 * p - k) // stride + 1
    xp = F.pad(fmap, (p, p, p, p))
    out = fmap.new_zeros(B, C, Ho, Wo)
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky: ky + stride * (Ho - 1) + 1: stride, kx: kx + stride * (Wo - 1) + 1: stride]
            out += weight[:, 0, ky, kx].view(1, C, 1, 1) * patch
    return out


def bn_eval(t, bn):
    shape = (1, -1, 1, 1)
    return ((t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def direct(m: ConvAttention, prefix, fmap):
    """(affinity (B, h, P+N, P+M), output (B, P+N, C)) from the prefix tokens (B, P, C) and the
    NCHW grid map, computed literally."""
    def branch(proj, lin):
        t = bn_eval(dwconv_taps(fmap, proj.conv.weight, proj.conv.stride[0]), proj.bn)
        t = torch.cat([prefix, t.flatten(2).transpose(1, 2)], dim=1)
        return t @ lin.weight.t() + (lin.bias if lin.bias is not None else 0)

    q, k, v = (branch(m.conv_proj_q, m.proj_q), branch(m.conv_proj_k, m.proj_k), branch(m.conv_proj_v, m.proj_v))
    B, T, C = q.shape
    h, d = m.num_heads, C // m.num_heads
    qh, kh, vh = (t.reshape(B, -1, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    logits = torch.einsum("bhid,bhjd->bhij", qh, kh) / C ** 0.5  # the authors' scale: the whole width
    A = torch.exp(logits - logits.amax(-1, keepdim=True))
    A = A / A.sum(-1, keepdim=True)
    o = torch.einsum("bhij,bhjd->bhid", A, vh).permute(0, 2, 1, 3).reshape(B, T, C)
    return A, o @ m.proj.weight.t() + m.proj.bias


CASES = [  # id, heads, kv_stride, prefix tokens, input shape, grid argument
    ("map-4x5", 3, 2, 0, (2, 4, 5, D), None),
    ("map-7x3-stride3", 2, 3, 0, (1, 7, 3, D), None),
    ("map-1x1", 1, 2, 0, (2, 1, 1, D), None),
    ("map-6x6-stride1", 4, 1, 0, (1, 6, 6, D), None),
    ("cls-square-4x4", 3, 2, 1, (2, 1 + 16, D), None),
    ("cls-grid-3x5", 6, 2, 1, (2, 1 + 15, D), (3, 5)),
    ("two-prefix-grid-5x2", 2, 2, 0, (1, 2 + 10, D), (5, 2)),
]
IDS = [c[0] for c in CASES]


def _input(shape, grid, prefix, seed=1):
    x = randn(*shape, seed=seed)
    if x.ndim == 4:
        return x, x[:, :0, 0], x.permute(0, 3, 1, 2)
    H, W = grid if grid is not None else (int((shape[1] - prefix) ** 0.5),) * 2
    P = shape[1] - H * W
    return x, x[:, :P], x[:, P:].transpose(1, 2).reshape(shape[0], D, H, W)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, heads, s, prefix, shape, grid = case
    m = mixer(heads, s, prefix)
    x = _input(shape, grid, prefix)[0]
    with torch.no_grad():
        y = m(x, grid=grid)
        close(m.explicit_forward(x, grid=grid), y)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert m.affinity_kind == "dynamic" and m.exact_av is True and isinstance(m, Mixer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_against_a_direct_computation(case):
    _, heads, s, prefix, shape, grid = case
    m = mixer(heads, s, prefix)
    x, pre, fmap = _input(shape, grid, prefix)
    H, W = fmap.shape[-2:]
    P = pre.shape[1]
    Hk, Wk = -(-H // s), -(-W // s)  # ceil: the reduced key grid
    with torch.no_grad():
        A_ref, y_ref = direct(m, pre, fmap)
        A, V, y = m.affinity(x, grid=grid), m.values(x, grid=grid), m(x, grid=grid)
    assert m.reduced_grid(H, W) == (Hk, Wk)
    assert A.shape == (shape[0], heads, P + H * W, P + Hk * Wk) and V.shape == (shape[0], P + Hk * Wk, D)
    close(A, A_ref)
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=torch.float64))
    close(y.reshape(y_ref.shape), y_ref)


def test_the_convolutions_are_depthwise_and_batchnormed():
    m = ConvAttention(48, 3)
    for name, stride in (("q", 1), ("k", 2), ("v", 2)):
        conv, bn = getattr(m, f"conv_proj_{name}").conv, getattr(m, f"conv_proj_{name}").bn
        assert conv.groups == 48 and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
        assert conv.stride == (stride, stride) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == 48
        assert getattr(m, f"proj_{name}").bias is not None
    assert m.scale == 48 ** -0.5  # the authors' (and Hugging Face's) scale: the whole width
    assert ConvAttention(48, 3, qkv_bias=False).proj_k.bias is None
    assert ConvAttention(48, 3, scale=16 ** -0.5).scale == 0.25


def test_the_class_token_bypasses_the_convolutions():
    """The class token's value is proj_v(cls) itself; the grid tokens' keys and values do not
    depend on it; it is both a query (row 0) and a key (column 0)."""
    m = mixer(3, 2, prefix=1)
    x = randn(2, 1 + 16, D)
    x2 = x.clone()
    x2[:, 0] += randn(2, D, seed=5)
    with torch.no_grad():
        V, V2 = m.values(x), m.values(x2)
        close(V[:, 0], m.proj_v(x[:, 0]))
        close(V[:, 1:], V2[:, 1:], atol=0, rtol=0)
        _, k, _ = m._qkv(x)
        _, k2, _ = m._qkv(x2)
        close(k[:, 1:], k2[:, 1:], atol=0, rtol=0)
        A, A2 = m.affinity(x), m.affinity(x2)
    assert A.shape == (2, 3, 17, 1 + 4)
    assert (A[..., 0] - A2[..., 0]).abs().max() > 1e-3  # every query attends to the class token
    assert (A[:, :, 0] - A2[:, :, 0]).abs().max() > 1e-3  # and the class token queries the grid
    # without the token, the grid tokens alone (as a map) give the affinity over the reduced grid
    plain = mixer(3, 2, prefix=0)
    with torch.no_grad():
        Ag = plain.affinity(x[:, 1:].reshape(2, 4, 4, D))
    assert Ag.shape == (2, 3, 16, 4)


def test_batchnorm_makes_the_affinity_depend_on_the_mode():
    """Eval mode: a sample's affinity does not depend on the rest of the batch. Train mode: the
    BatchNorms use the batch's statistics, so it does; forward == explicit_forward still holds."""
    m = mixer(3, 2)
    a, b = randn(1, 4, 4, D, seed=1), randn(1, 4, 4, D, seed=2) * 3 + 1
    c = randn(1, 4, 4, D, seed=3)
    with torch.no_grad():
        e1, e2 = m.affinity(torch.cat([a, b]))[:1], m.affinity(torch.cat([a, c]))[:1]
        close(e1, e2)
        close(e1, m.affinity(a))
        m.train()
        t1, t2 = m.affinity(torch.cat([a, b]))[:1], m.affinity(torch.cat([a, c]))[:1]
        assert (t1 - t2).abs().max() > 1e-4 and (t1 - e1).abs().max() > 1e-4
        x = torch.cat([a, b])
        close(m.explicit_forward(x), m(x))


def test_grid_problems_are_refused_clearly():
    m = mixer(3, 2, prefix=1)
    with pytest.raises(ValueError, match="not a square grid; pass grid"):
        m(randn(1, 1 + 12, D))
    with pytest.raises(ValueError, match="cannot hold a 5x5 grid"):
        m(randn(1, 10, D), grid=(5, 5))
    with pytest.raises(ValueError, match="map"):
        m(randn(1, 2, 2, 2, D))
    close(m(randn(1, 1 + 12, D), grid=(3, 4)), mixer(3, 2, prefix=1, grid=(3, 4))(randn(1, 1 + 12, D)))
    with pytest.raises(ValueError, match="odd"):
        ConvAttention(D, 3, kernel_size=2)
    with pytest.raises(ValueError, match="divisible"):
        ConvAttention(D, 5)


def test_attention_dropout_is_active_in_training():
    m = mixer(3, 2)
    m.attn_drop = 0.5
    x = randn(4, 4, 4, D)
    with torch.no_grad():
        m.train()
        torch.manual_seed(0)
        y1 = m(x)
        torch.manual_seed(1)
        y2 = m(x)
    assert (y1 - y2).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Published sizes and the configuration (meta device)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, exact, paper_m, gmacs",
                         [("cvt_13", 19_997_480, 20, 4.5), ("cvt_21", 31_622_696, 32, 7.1)])
def test_parameters_and_gmacs(name, exact, paper_m, gmacs):
    """The parameter counts of the authors' specs (hand-checked: CvT-21 = CvT-13 + 2 stage-2
    blocks of 451,200 + 6 stage-3 blocks of 1,787,136); the paper rounds them to 20M / 32M
    (CvT-21's 31.62M is 1.2% under its "32M"). GMACs within 5% of Table 2 (attention matmuls
    and the depthwise convolutions counted)."""
    with torch.device("meta"):
        m = mixlab.create_model(name)
        x = torch.empty(1, 3, 224, 224)
        n, macs = count_params(m), count_macs(m, x)[0]
        assert m(x).shape == (1, 1000)
    assert n == exact
    assert abs(n / 1e6 - paper_m) <= 0.015 * paper_m
    assert abs(macs / 1e9 - gmacs) <= 0.05 * gmacs, macs


def test_configuration():
    with torch.device("meta"):
        m13, m21 = mixlab.create_model("cvt_13"), mixlab.create_model("cvt_21")
    assert [len(s.blocks) for s in m13.stages] == [1, 2, 10] and [len(s.blocks) for s in m21.stages] == [1, 4, 16]
    assert m13.embed_dims == (64, 192, 384) and [s.blocks[0].mixer.num_heads for s in m13.stages] == [1, 3, 6]
    embeds = [(s.embed.proj.kernel_size, s.embed.proj.stride, s.embed.proj.padding) for s in m13.stages]
    assert embeds == [((7, 7), (4, 4), (2, 2)), ((3, 3), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1))]
    assert all(isinstance(s.embed.post_norm, nn.LayerNorm) and s.embed.post_norm.eps == 1e-5 for s in m13.stages)
    assert [s.cls_token is not None for s in m13.stages] == [False, False, True]
    assert [s.blocks[0].mixer.num_prefix_tokens for s in m13.stages] == [0, 0, 1]
    mix = m13.stages[2].blocks[0].mixer
    assert mix.kv_stride == 2 and mix.conv_proj_q.conv.stride == (1, 1) and mix.proj_q.bias is not None
    blk = m13.stages[1].blocks[0]
    assert blk.mlp.fc1.out_features == 4 * 192 and isinstance(blk.mlp.act, QuickGELU) and blk.norm1.eps == 1e-5
    assert not [n for n, _ in m13.named_parameters() if re.search(r"(^|\.)pos_", n)]  # no position embedding
    assert m13.head.pool == "token" and m13.min_input_size == 16
    assert [f["reduction"] for f in m13.feature_info] == [4, 8, 16]
    assert m13.no_weight_decay() == {"stages.2.cls_token"}
    assert detect_format(m13.state_dict()) == "mixlab"


# --------------------------------------------------------------------------------------------
# The authors' network, written functionally on their state-dict names
# --------------------------------------------------------------------------------------------
def _authors_name(key: str) -> str:
    """mixlab key -> the authors' key (the inverse of AUTHORS_RULES)."""
    for pat, rep in ((r"^stages\.(\d+)\.embed\.proj\.(.+)$", r"stage\1.patch_embed.proj.\2"),
                     (r"^stages\.(\d+)\.embed\.post_norm\.(.+)$", r"stage\1.patch_embed.norm.\2"),
                     (r"^stages\.(\d+)\.cls_token$", r"stage\1.cls_token"),
                     (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.(.+)$", r"stage\1.blocks.\2.attn.\3"),
                     (r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", r"stage\1.blocks.\2.\3"),
                     (r"^head\.fc\.(.+)$", r"head.\1")):
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    return key


def authors_forward(sd, x, dims, depths, heads, strides, pads, kernels, eps=1e-5):
    """CvT's forward as in ``lib/models/cls_cvt.py`` (cls token in the last stage, QuickGELU,
    'dw_bn' projections, scale dim**-0.5), on an authors'-layout state dict."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def conv_bn(fm, p, stride):
        fm = F.conv2d(fm, sd[p + ".conv.weight"], None, stride, 1, 1, fm.shape[1])
        fm = F.batch_norm(fm, sd[p + ".bn.running_mean"], sd[p + ".bn.running_var"], sd[p + ".bn.weight"],
                          sd[p + ".bn.bias"], False, 0.0, 1e-5)
        return fm.flatten(2).transpose(1, 2)

    n = len(dims)
    for i in range(n):
        x = F.conv2d(x, sd[f"stage{i}.patch_embed.proj.weight"], sd[f"stage{i}.patch_embed.proj.bias"],
                     strides[i], pads[i])
        B, C, H, W = x.shape
        t = ln(x.flatten(2).transpose(1, 2), f"stage{i}.patch_embed.norm")
        cls = i == n - 1
        if cls:
            t = torch.cat([sd[f"stage{i}.cls_token"].expand(B, -1, -1), t], 1)
        for j in range(depths[i]):
            p = f"stage{i}.blocks.{j}"
            u = ln(t, p + ".norm1")
            c, g = (u[:, :1], u[:, 1:]) if cls else (u[:, :0], u)
            fm = g.transpose(1, 2).reshape(B, C, H, W)
            qkv = []
            for name, s in (("q", 1), ("k", 2), ("v", 2)):
                z = lin(torch.cat([c, conv_bn(fm, f"{p}.attn.conv_proj_{name}", s)], 1), f"{p}.attn.proj_{name}")
                qkv.append(z.reshape(B, z.shape[1], heads[i], C // heads[i]).transpose(1, 2))
            a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * C ** -0.5, -1)
            o = (a @ qkv[2]).transpose(1, 2).reshape(B, -1, C)
            t = t + lin(o, p + ".attn.proj")
            h = lin(ln(t, p + ".norm2"), p + ".mlp.fc1")
            t = t + lin(h * torch.sigmoid(1.702 * h), p + ".mlp.fc2")
        if cls:
            return lin(ln(t[:, 0], "norm"), "head")
        x = t.transpose(1, 2).reshape(B, C, H, W)


TINY = dict(img_size=32, embed_dims=(16, 24, 48), depths=(1, 2, 2), num_heads=(1, 2, 3), num_classes=10)


def tiny(**kw) -> CvT:
    torch.manual_seed(0)
    return CvT(**{**TINY, **kw})


@pytest.mark.parametrize("size", [32, 48], ids=["32", "48"])
def test_authors_layout_converts_and_matches_their_forward(size):
    src = randomize_(tiny(), 3).double().eval()
    theirs = {_authors_name(k): v for k, v in src.state_dict().items()}
    assert detect_format(theirs) == "authors-cvt"
    assert "stage2.blocks.1.attn.conv_proj_v.bn.running_var" in theirs and "stage2.cls_token" in theirs
    ours = tiny().double().eval()
    ours.load_state_dict(convert_state_dict(theirs, ours), strict=True)
    x = randn(2, 3, size, size, seed=4)
    with torch.no_grad():
        ref = authors_forward(theirs, x, (16, 24, 48), (1, 2, 2), (1, 2, 3), (4, 2, 2), (2, 1, 1), (7, 3, 3))
        close(ours(x), ref, atol=1e-9, rtol=1e-8)
    assert len(AUTHORS_RULES) == 6
    with torch.device("meta"):
        vit = mixlab.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="authors-cvt cvt checkpoint"):
        convert_state_dict(theirs, vit)


# --------------------------------------------------------------------------------------------
# The model API on a tiny CvT at 32x32
# --------------------------------------------------------------------------------------------
def test_forward_backward_every_parameter_learns():
    model = tiny().train()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    # the classifier reads the class token only, and in the last block the class token's query
    # bypasses the convolutions: the grid tokens' query convolution there cannot learn (as in the
    # authors' network); the model without a class token averages the map and trains everything
    assert bad == [f"stages.2.blocks.1.mixer.conv_proj_q.{n}" for n in ("conv.weight", "bn.weight", "bn.bias")]
    model = tiny(cls_token=False).train()
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_features_intermediates_head_and_classifier_reset():
    model = tiny().eval()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6, rtol=1e-5)
        close(pre, feats[:, 0], atol=0, rtol=0)  # the class token
        assert [tuple(f.shape) for f in model.forward_intermediates(x, [-1, 0])] == [(2, 48, 2, 2), (2, 16, 8, 8)]
    assert feats.shape == (2, 1 + 4, 48) and pre.shape == (2, 48)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 8, 8), (2, 24, 4, 4), (2, 48, 2, 2)]
    close(maps[-1], feats[:, 1:].reshape(2, 2, 2, 48).permute(0, 3, 1, 2), atol=0, rtol=0)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        close(model(x), model.forward_head(model.forward_features(x), pre_logits=True), atol=0, rtol=0)


def test_without_a_class_token_the_head_averages_the_map():
    model = tiny(cls_token=False).eval()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, 2, 2, 48) and model.head.pool == "avg"
        close(model.forward_head(f, pre_logits=True), f.mean((1, 2)), atol=0, rtol=0)
    assert all(s.cls_token is None for s in model.stages)
    with pytest.raises(ValueError, match="cls_token=True"):
        tiny(cls_token=False, global_pool="token")


def test_fuse_folds_the_projection_batchnorms():
    model = randomize_(tiny(), 1).eval()
    x = randn(1, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x)
        n = fuse_batchnorm(model)
        close(model(x), ref, atol=1e-4, rtol=1e-4)
    assert n == 3 * 5  # q, k, v in each of the 5 blocks


def test_drop_path_follows_the_authors_per_stage_rule():
    model = tiny(drop_path_rate=0.2)
    rates = [[getattr(b.drop_path1, "p", 0.0) for b in s.blocks] for s in model.stages]
    assert rates == [[0.0], [0.0, 0.0], [0.0, pytest.approx(0.2)]]
    model = tiny(drop_path_rate=(0.1, 0.2, 0.3))
    assert [[getattr(b.drop_path1, "p", 0.0) for b in s.blocks] for s in model.stages] == [
        [0.0], [0.0, pytest.approx(0.2)], [0.0, pytest.approx(0.3)]]
    model = tiny(drop_path_rate=0.5).train()
    x = randn(8, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        b = model(x)
    assert not torch.equal(a, b)


def test_create_model_arguments():
    with torch.device("meta"):
        m = mixlab.create_model("cvt_13", num_classes=7, in_chans=1, img_size=64, act="gelu").eval()
        assert m(torch.empty(1, 1, 64, 64)).shape == (1, 7)
    assert isinstance(m.stages[0].blocks[0].mlp.act, nn.GELU)
    with pytest.raises(TypeError, match="did you mean"):
        mixlab.create_model("cvt_13", depth=(1, 2, 3))
    with pytest.raises(ValueError, match="unknown act"):
        tiny(act="relu")


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (48, 16), (16, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_input_sizes(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(randn(1, 3, *size, dtype=torch.float32))
        maps = model.forward_intermediates(randn(1, 3, *size, dtype=torch.float32), [2])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert maps[0].shape == (1, 48, -(-size[0] // 16), -(-size[1] // 16))


def test_bad_input_is_refused_clearly():
    model = tiny().eval()
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="minimum 16x16"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="depths has 2 entries"):
        tiny(depths=(1, 2))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny(num_heads=(1, 5, 3))


# --------------------------------------------------------------------------------------------
# nano_cvt and the spec mixer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1), (16, 3)])
def test_nano_cvt_size_and_forward(size, chans):
    with torch.device("meta"):
        m = mixlab.create_model("nano_cvt", img_size=size, in_chans=chans)
    assert 1.0e6 <= count_params(m) <= 1.3e6, count_params(m)
    assert m.stages[-1].cls_token is not None and m.num_classes == 10
    torch.manual_seed(0)
    m = mixlab.create_model("nano_cvt", img_size=size, in_chans=chans).eval()
    with torch.no_grad():
        out = m(torch.randn(2, chans, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_nano_cvt_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("nano_cvt").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # every parameter gets a gradient but the last block's grid-query convolution, which the
    # class-token classifier never reads (weight decay alone moves it)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [f"stages.2.blocks.2.mixer.conv_proj_q.{n}" for n in ("conv.weight", "bn.weight", "bn.bias")]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before) - 1  # all but that BatchNorm's zero bias
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("name", ["nano_cvt",
                                  "spec:patch2 / convattn:1x16:heads=2 / convattn:2x32:heads=4,kv_stride=1"])
def test_every_mixer_keeps_the_contract_inside_the_network(name):
    """As tests/test_nano.py checks every nano model: the input each mixer really sees (16x16,
    eval mode), affinity and values only from that input (the class-token stage's square grid)."""
    torch.manual_seed(0)
    model = mixlab.create_model(name, img_size=16, in_chans=3, num_classes=10).eval()
    seen = mixer_calls(model, torch.randn(1, 3, 16, 16))
    assert seen
    for key, (m, x, out) in seen.items():
        with torch.no_grad():
            A, V = m.affinity(x), m.values(x)
            N = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1]
            assert A.shape[-2] == N and A.shape[-1] == V.shape[1] <= N, (key, A.shape)
            torch.testing.assert_close(m.explicit_forward(x), out, atol=2e-5, rtol=1e-4)


def test_spec_mixer_is_registered():
    opts, desc = MIXERS["convattn"].options, MIXERS["convattn"].description
    assert opts == {"heads": 4, "kv_stride": 2} and "CvT" in desc
    m = mixlab.create_model("spec:patch2 / convattn:1x16:heads=2 / convattn:1x32:heads=4,kv_stride=1",
                            img_size=32, num_classes=10).eval()
    mixers = [b.mixer for s in m.stages for b in s.blocks]
    assert [(x.num_heads, x.kv_stride) for x in mixers] == [(2, 2), (4, 1)]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
