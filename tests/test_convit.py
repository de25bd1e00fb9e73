"""ConViT: gated positional self-attention (GPSA) against the mixer contract and timm's GPSA,
the published sizes of ``convit_tiny`` / ``convit_small``, numerical parity with timm's
``convit_tiny`` under random weights (224 and 160), the model API on a tiny configuration,
and the ``nano_convit`` arena model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.convit  # noqa: E402,F401  (registers the models and the timm layout)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.mixers import Attention  # noqa: E402
from mixlab.mixers.gpsa import GatedPositionalAttention, relative_positions  # noqa: E402
from mixlab.models.convit import ConViT  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, assert_same_logits, mixlab_from, randomize_, timm_model  # noqa: E402,F401

D = 24


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gpsa(heads=4, grid=None, seed=0, locality=1.0) -> GatedPositionalAttention:
    """A float64 GPSA with random weights everywhere, gates well away from 0 (both parts count)."""
    torch.manual_seed(seed)
    m = randomize_(GatedPositionalAttention(D, heads, locality_strength=locality, grid_size=grid), seed)
    with torch.no_grad():
        m.gating_param.copy_(torch.linspace(-1.5, 1.5, heads))
    return m.double().eval()


# --------------------------------------------------------------------------------------------
# Published sizes and the configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params_m, gmacs", [("convit_tiny", 5.71, 1.25), ("convit_small", 27.78, 5.75)])
def test_parameters_and_gmacs(name, params_m, gmacs):
    """timm 1.0.31's figures (counted the same way on timm's model: 5.71M / 1.25, 27.78M / 5.75)."""
    with torch.device("meta"):
        m = mixlab.create_model(name)
        x = torch.empty(1, 3, 224, 224)
        n, macs = count_params(m), count_macs(m, x)[0]
        assert m(x).shape == (1, 1000)
    assert abs(n / 1e6 - params_m) <= 0.01 * params_m, n
    assert abs(macs / 1e9 - gmacs) <= 0.05 * gmacs, macs


def test_configuration():
    with torch.device("meta"):
        tiny, small = mixlab.create_model("convit_tiny"), mixlab.create_model("convit_small")
    assert (tiny.embed_dim, small.embed_dim) == (192, 432)
    kinds = [type(b.mixer) for b in tiny.blocks]
    assert kinds == [GatedPositionalAttention] * 10 + [Attention] * 2
    g = tiny.blocks[0].mixer
    assert g.num_heads == 4 and g.qk.bias is None and g.v.bias is None and g.proj.bias is not None
    assert g.locality_strength == 1.0 and small.blocks[9].mixer.num_heads == 9
    assert tiny.blocks[10].mixer.qkv.bias is None
    assert tiny.blocks[0].norm1.eps == 1e-6 and tiny.norm.eps == 1e-6
    assert tiny.pos_embed.pos_embed.shape == (1, 196, 192)  # grid tokens only: no class token yet
    assert tiny.head.pool == "token"
    assert detect_format(tiny.state_dict()) == "mixlab"


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
CASES = [
    ("map-4x5", 4, None, (2, 4, 5, D)),
    ("tokens-square-4x4", 4, None, (2, 16, D)),
    ("tokens-built-3x5", 4, (3, 5), (2, 15, D)),
    ("map-7x3-6-heads", 6, None, (1, 7, 3, D)),
    ("map-1x1", 2, None, (2, 1, 1, D)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    _, heads, grid, shape = case
    m = gpsa(heads, grid)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert m.affinity_kind == "mixed" and m.exact_av is True


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_is_the_gated_mix_of_its_parts(case):
    _, heads, grid, shape = case
    m = gpsa(heads, grid)
    x = randn(*shape)
    N = shape[1] if len(shape) == 3 else shape[1] * shape[2]
    with torch.no_grad():
        A = m.affinity(x)
        content, positional, gate = m.affinity_parts(x)
    assert A.shape == content.shape == positional.shape == (shape[0], heads, N, N)
    g = gate.view(1, -1, 1, 1)
    close(A, (1 - g) * content + g * positional)  # the renormalisation divides by one
    close(gate, torch.sigmoid(m.gating_param))
    for part in (A, content, positional):
        assert (part >= 0).all()
        close(part.sum(-1), torch.ones(part.shape[:-1], dtype=torch.float64))
    # the positional part is static: the same for any input and every batch element
    close(m.positional_affinity(randn(*shape, seed=7)), positional, atol=0, rtol=0)
    assert shape[0] == 1 or positional.stride(0) == 0  # a view, not a copy per batch element
    if N > 1:  # both parts matter
        assert (content - positional).abs().max() > 1e-3 and 0.1 < gate.min() and gate.max() < 0.9


def test_the_gate_moves_the_affinity_between_its_parts():
    m = gpsa(4)
    x = randn(2, 3, 4, D)
    with torch.no_grad():
        content, positional, _ = m.affinity_parts(x)
        m.gating_param.fill_(-40.0)
        close(m.affinity(x), content)
        m.gating_param.fill_(40.0)
        close(m.affinity(x), positional)


def test_relative_positions():
    rel = relative_positions(3, 4, dtype=torch.float64)
    for i in range(12):
        for j in range(12):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            dx, dy = xj - xi, yj - yi
            assert rel[i, j].tolist() == [dx, dy, dx * dx + dy * dy]
    # timm's (and the authors') square-grid indices
    from timm.models.convit import GPSA as TimmGPSA
    assert torch.equal(relative_positions(5, 5), TimmGPSA(16, 4).get_rel_indices(25)[0])


@pytest.mark.parametrize("heads, locality", [(4, 1.0), (9, 0.5), (16, 2.0), (6, 1.0)])
def test_local_init_is_timms(heads, locality):
    from timm.models.convit import GPSA as TimmGPSA
    theirs = TimmGPSA(8 * heads, heads, locality_strength=locality)
    ours = GatedPositionalAttention(8 * heads, heads, locality_strength=locality)
    with torch.no_grad():
        ours.pos_proj.weight.copy_(theirs.pos_proj.weight)  # heads beyond k² keep their (random) init
    theirs.local_init()
    ours.local_init()
    assert torch.equal(ours.pos_proj.weight, theirs.pos_proj.weight)
    assert torch.equal(ours.v.weight, torch.eye(8 * heads))


def test_local_init_is_a_convolution():
    """With a strong locality, each of the 9 heads attends to one of the 3x3 offsets around
    the query (a 3x3 convolution's taps), whatever the query."""
    m = GatedPositionalAttention(18, 9, locality_strength=20.0).double()
    with torch.no_grad():
        P = m.positional_affinity(torch.zeros(1, 7, 7, 18, dtype=torch.float64))[0]  # (9, 49, 49)
    offsets = set()
    for h in range(9):
        for q in (16, 24, 32):  # interior queries
            j = int(P[h, q].argmax())
            assert P[h, q, j] > 0.99
            offsets.add((h, j % 7 - q % 7, j // 7 - q // 7))
    assert {(dx, dy) for _, dx, dy in offsets} == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert len(offsets) == 9  # one offset per head, the same for every query


def test_same_attention_as_timms_on_the_same_weights():
    from timm.models.convit import GPSA as TimmGPSA
    torch.manual_seed(0)
    theirs = randomize_(TimmGPSA(36, 9), 0).eval()
    ours = GatedPositionalAttention(36, 9).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 36, 36)
    with torch.no_grad():
        close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        close(ours(x.reshape(2, 6, 6, 36)).reshape(2, 36, 36), theirs(x), atol=1e-5, rtol=1e-5)
        close(ours.affinity(x), theirs.get_attention(x), atol=1e-6, rtol=1e-5)


def test_sequence_without_a_grid_is_refused():
    with pytest.raises(ValueError, match="its grid 3x5 or a square grid"):
        gpsa(4, (3, 5))(randn(1, 14, D))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) map"):
        gpsa(4)(randn(1, 12, D))


def test_attention_dropout_drops_the_mixed_matrix():
    m = gpsa(4)
    m.attn_drop = 0.5
    x = randn(2, 3, 3, D)
    with torch.no_grad():
        y_eval = m(x)
        m.train()
        torch.manual_seed(0)
        y = m(x)
    assert (y - y_eval).abs().max() > 1e-3 and torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------
# Parity with timm
# --------------------------------------------------------------------------------------------
def test_timm_parity_at_224():
    theirs = timm_model("convit_tiny")
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    ours = mixlab_from("convit_tiny", theirs)
    assert_same_logits(ours, theirs, 224)
    assert torch.equal(ours.blocks[3].mixer.gating_param, theirs.blocks[3].attn.gating_param)
    assert torch.equal(ours.blocks[11].mixer.qkv.weight, theirs.blocks[11].attn.qkv.weight)
    assert torch.equal(ours.cls_token, theirs.cls_token)


def test_timm_parity_at_160_and_position_embedding_resampling():
    """The 224 checkpoint converted into a model built for 160 (its position embedding
    resampled by the converter) == timm's ConViT built for 160 with the same weights, its
    embedding resampled by timm's own function; and a 224 model fed a 160 image resamples
    the same way on the fly."""
    from timm.layers import resample_abs_pos_embed as timm_resample
    theirs = timm_model("convit_tiny")
    sd = theirs.state_dict()
    timm160 = timm.create_model("convit_tiny", img_size=160).eval()
    timm160.load_state_dict(dict(sd, pos_embed=timm_resample(sd["pos_embed"], (10, 10), num_prefix_tokens=0)))
    ours160 = mixlab.create_model("convit_tiny", img_size=160).eval()
    ours160.load_state_dict(convert_state_dict(sd, ours160), strict=True)
    assert ours160.pos_embed.pos_embed.shape == (1, 100, 192)
    assert_same_logits(ours160, timm160, 160, seed=2)
    ours224 = mixlab.create_model("convit_tiny").eval()
    ours224.load_state_dict(convert_state_dict(sd, ours224), strict=True)
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(ours224(x), ours160(x), atol=1e-5, rtol=1e-5)


def test_conversion_refuses_another_family():
    sd = timm_model("convit_tiny").state_dict()
    with torch.device("meta"):
        vit = mixlab.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="timm convit checkpoint"):
        convert_state_dict(sd, vit)


# --------------------------------------------------------------------------------------------
# The model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> ConViT:
    torch.manual_seed(0)
    return ConViT(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, local_up_to_layer=2,
                            num_classes=10), **kw})


def test_forward_backward_every_parameter_learns():
    model = tiny().train()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    assert not bad


def test_features_intermediates_heads_and_classifier_reset():
    model = tiny().eval()
    x = randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6, rtol=1e-5)
        close(pre, feats[:, 0], atol=0, rtol=0)  # the class token
        assert [tuple(f.shape) for f in model.forward_intermediates(x, [-1, 0])] == [(2, 48, 4, 4)] * 2
    assert feats.shape == (2, 17, 48) and pre.shape == (2, 48)
    assert [tuple(f.shape) for f in maps] == [(2, 48, 4, 4)] * 3
    close(maps[-1], feats[:, 1:].reshape(2, 4, 4, 48).permute(0, 3, 1, 2), atol=0, rtol=0)
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
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


def test_create_model_arguments():
    with torch.device("meta"):
        m = mixlab.create_model("convit_tiny", num_classes=7, in_chans=1, img_size=64, drop_rate=0.1,
                                drop_path_rate=0.1).eval()
        assert m(torch.empty(1, 1, 64, 64)).shape == (1, 7)
    assert m.pos_embed.pos_embed.shape == (1, 16, 192) and m.blocks[11].drop_path1.p == pytest.approx(0.1)
    with pytest.raises(TypeError, match="did you mean"):
        mixlab.create_model("convit_tiny", local_up_to=3)


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (48, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_other_input_sizes(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(randn(1, 3, *size, dtype=torch.float32))
        maps = model.forward_intermediates(randn(1, 3, *size, dtype=torch.float32), [0])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert maps[0].shape == (1, 48, size[0] // 8, size[1] // 8)


def test_bad_input_is_refused_clearly():
    model = tiny().eval()
    with pytest.raises(ValueError, match="not divisible by the patch size 8x8.*multiple of 8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="minimum"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        ConViT(img_size=100)
    with pytest.raises(ValueError, match="local_up_to_layer"):
        tiny(local_up_to_layer=4)


@pytest.mark.parametrize("local", [0, 3], ids=["no-gpsa", "all-gpsa"])
def test_local_up_to_layer_extremes(local):
    model = tiny(local_up_to_layer=local).eval()
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [GatedPositionalAttention] * local + [Attention] * (3 - local)
    x = randn(1, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 17, 48)
        assert model(x).shape == (1, 10)


def test_init_is_local():
    """After the model's init every GPSA has the identity value map and the convolutional
    positional init (the ViT init does not overwrite it)."""
    model = tiny()
    for blk in model.blocks[:2]:
        m = blk.mixer
        assert torch.equal(m.v.weight, torch.eye(48))
        assert m.pos_proj.weight[:, 2].tolist() == [-1.0] * 4 and torch.equal(m.gating_param, torch.ones(4))
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# nano_convit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_convit_size(size, chans):
    with torch.device("meta"):
        m = mixlab.create_model("nano_convit", img_size=size, in_chans=chans)
    n = count_params(m)
    assert 1.0e6 <= n <= 1.3e6, n
    assert sum(isinstance(b.mixer, GatedPositionalAttention) for b in m.blocks) == 4 and len(m.blocks) == 6


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_convit_trains_one_step(size, chans):
    torch.manual_seed(0)
    model = mixlab.create_model("nano_convit", img_size=size, in_chans=chans).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, chans, size, size), torch.arange(8) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    assert isinstance(model, nn.Module) and model.num_classes == 10
