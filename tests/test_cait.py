"""CaiT (Touvron et al., 2021): the talking-heads and class-attention mixers against the mixer
contract and against timm's modules, the published sizes, numerical parity with timm's
``cait_xxs24_224`` under random weights (at 224 and, on a shallow CaiT, at 160), conversion of
timm's state dicts, the timm-style model API on a tiny CaiT, and the ``nano_cait`` arena model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.cait  # noqa: E402,F401  (registers the models and the timm layout)
from mixlab.analysis import count_macs, count_params  # noqa: E402
from mixlab.mixers import Attention  # noqa: E402
from mixlab.mixers.base import aggregate  # noqa: E402
from mixlab.mixers.talking_heads import ClassAttention, TalkingHeadsAttention, aggregate_rows  # noqa: E402
from mixlab.models.blocks import MetaBlock  # noqa: E402
from mixlab.models.cait import Cait, ClassAttentionBlock  # noqa: E402
from mixlab.weights import convert_state_dict, detect_format  # noqa: E402
from test_parity import _fast_init, assert_same_logits, mixlab_from, randomize_, timm_model  # noqa: E402,F401

D = 16


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in float64, eval mode, with random weights (the head-mixing maps far from identity)."""
    return randomize_(module, seed).double().eval()


# --------------------------------------------------------------------------------------------
# Talking-heads attention
# --------------------------------------------------------------------------------------------
TH_SHAPES = [(2, 4, 5, D), (2, 7, D), (1, 1, D), (3, 3, 3, D)]


@pytest.mark.parametrize("shape", TH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("heads", [2, 4])
def test_talking_heads_explicit_forward_equals_forward(shape, heads):
    m = randomized(TalkingHeadsAttention(D, heads), seed=heads)
    x = randn(*shape)
    N = x.reshape(x.shape[0], -1, D).shape[1]
    with torch.no_grad():
        y = m(x)
        close(m.explicit_forward(x), y)
        A = m.affinity(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert A.shape == (shape[0], heads, N, N)
    assert m.values(x).shape == (shape[0], N, D)
    assert m.affinity_kind == "dynamic" and m.exact_av is True


def test_talking_heads_affinity_is_the_mixed_softmax():
    """A_h = Σ W_post[h,h'] softmax_j(Σ W_pre[h',h''] L_h'' + b_pre[h']) + b_post[h], computed head by head."""
    C, H = 24, 3
    d = C // H
    m = randomized(TalkingHeadsAttention(C, H), seed=5)
    x = randn(2, 6, C)
    with torch.no_grad():
        A = m.affinity(x)
        qkv = m.qkv(x).reshape(2, 6, 3, H, d)
        q, k = qkv[:, :, 0], qkv[:, :, 1]  # (B, N, heads, d)
        L = [q[:, :, h] @ k[:, :, h].transpose(1, 2) * d ** -0.5 for h in range(H)]
        P = [sum(m.pre_mix.weight[g, h] * L[h] for h in range(H)) + m.pre_mix.bias[g] for g in range(H)]
        P = [p.softmax(-1) for p in P]
        for g in range(H):
            close(A[:, g], sum(m.post_mix.weight[g, h] * P[h] for h in range(H)) + m.post_mix.bias[g])
    # the post-softmax mixing makes the rows something other than probabilities
    assert (A.sum(-1) - 1).abs().max() > 1e-3


def test_talking_heads_without_mixing_is_plain_attention():
    th = randomized(TalkingHeadsAttention(D, 4), seed=2)
    with torch.no_grad():
        for lin in (th.pre_mix, th.post_mix):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    plain = Attention(D, 4).double().eval()
    plain.load_state_dict({k: v for k, v in th.state_dict().items() if not k.startswith(("pre_mix", "post_mix"))})
    x = randn(2, 3, 4, D)
    with torch.no_grad():
        close(th(x), plain(x))
        close(th.affinity(x), plain.affinity(x))


def test_talking_heads_matches_timm_on_the_same_weights():
    from timm.models.cait import TalkingHeadAttn
    theirs = randomized(TalkingHeadAttn(D, num_heads=4, qkv_bias=True), seed=3)
    ours = TalkingHeadsAttention(D, 4).double().eval()
    rename = {"proj_l": "pre_mix", "proj_w": "post_mix"}
    ours.load_state_dict({rename.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
                          for k, v in theirs.state_dict().items()}, strict=True)
    x = randn(2, 9, D)
    with torch.no_grad():
        close(ours(x), theirs(x))
    # and the same gradients (the head mixing is batched matrix products here, linear layers there)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = randn(2, 9, D, seed=7)
    (ours(xa) * g).sum().backward()
    (theirs(xb) * g).sum().backward()
    close(xa.grad, xb.grad)
    for mine, timms in (("pre_mix", "proj_l"), ("post_mix", "proj_w")):
        close(getattr(ours, mine).weight.grad, getattr(theirs, timms).weight.grad)
        close(getattr(ours, mine).bias.grad, getattr(theirs, timms).bias.grad)


# --------------------------------------------------------------------------------------------
# Class attention: affinity is the class token's row only, (B, heads, 1, N)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 17])
def test_class_attention_explicit_forward_equals_forward(n):
    m = randomized(ClassAttention(D, 4), seed=n)
    x = randn(3, n, D)
    with torch.no_grad():
        y = m(x)
        A = m.affinity(x)
        close(m.explicit_forward(x), y)
        close(m.project(aggregate_rows(A, m.values(x)), x), y)
    assert y.shape == (3, 1, D)
    assert A.shape == (3, 4, 1, n) and (A >= 0).all()
    close(A.sum(-1), torch.ones(3, 4, 1, dtype=torch.float64))  # a softmax row per head
    assert m.values(x).shape == (3, n, D)
    assert m.affinity_kind == "dynamic" and m.exact_av is True


def test_aggregate_rows_is_aggregate_on_square_affinities():
    A, V = randn(2, 4, 6, 6, seed=3), randn(2, 6, 8, seed=4)
    close(aggregate_rows(A, V), aggregate(A, V), atol=0, rtol=0)
    close(aggregate_rows(A[:, :, 2:3], V), aggregate(A, V)[:, 2:3])
    with pytest.raises(ValueError, match="cannot aggregate"):
        aggregate_rows(A, randn(2, 5, 8))


def test_class_attention_reads_every_token_and_is_queried_by_the_class_token_only():
    m = randomized(ClassAttention(D, 2), seed=7)
    x = randn(2, 6, D)
    with torch.no_grad():
        y = m(x)
        A = m.affinity(x)
        # changing a patch token changes the class token's update (it is a key / value) ...
        x2 = x.clone()
        x2[:, 4] += 1.0
        assert (m(x2) - y).abs().max() > 1e-6
        # ... and its query is the class token's: q depends on x[:, 0] alone
        q = m.q(x[:, :1]).reshape(2, 1, 2, D // 2).transpose(1, 2)
        k = m.k(x).reshape(2, 6, 2, D // 2).transpose(1, 2)
        close(A, (q @ k.transpose(-2, -1) * (D // 2) ** -0.5).softmax(-1))


def test_class_attention_matches_timm_and_refuses_a_map():
    from timm.models.cait import ClassAttn
    theirs = randomized(ClassAttn(D, num_heads=4, qkv_bias=True), seed=4)
    ours = ClassAttention(D, 4).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn(2, 10, D)
    with torch.no_grad():
        close(ours(x), theirs(x))
    with pytest.raises(ValueError, match=r"\(B, N, C\) token sequence with the class token first"):
        ours(randn(1, 3, 3, D))


def test_class_attention_block_updates_only_the_class_token():
    blk = randomized(ClassAttentionBlock(D, 2, norm_layer=nn.LayerNorm, layer_scale=0.5), seed=1)
    u = randn(2, 5, D)
    with torch.no_grad():
        out = blk(u)
    assert out.shape == u.shape
    assert torch.equal(out[:, 1:], u[:, 1:])
    assert (out[:, 0] - u[:, 0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Published sizes and the authors' configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("cait_xxs24_224", 11.96), ("cait_s24_224", 46.92)])
def test_published_parameters(name, params):
    with torch.device("meta"):
        m = mixlab.create_model(name)
        macs, _ = count_macs(m, torch.empty(1, 3, 224, 224))
    assert abs(count_params(m) / 1e6 - params) <= 0.01 * params, count_params(m)
    assert macs > 0


def test_xxs24_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("cait_xxs24_224", drop_path_rate=0.1)
    assert len(m.blocks) == 24 and len(m.cls_blocks) == 2
    assert all(isinstance(b, MetaBlock) and isinstance(b.mixer, TalkingHeadsAttention) for b in m.blocks)
    blk = m.blocks[0]
    assert blk.norm1.eps == 1e-6 and m.norm.eps == 1e-6 and m.cls_blocks[0].norm1.eps == 1e-6
    assert blk.mixer.num_heads == 4 and blk.mixer.qkv.bias is not None and m.cls_blocks[0].mixer.q.bias is not None
    assert blk.ls1.gamma.shape == (192,) and m.cls_blocks[1].ls2.gamma.shape == (192,)
    # the authors' stochastic depth: one rate for every self-attention block, none in class attention
    assert {b.drop_path1.p for b in m.blocks} == {0.1}
    assert isinstance(m.cls_blocks[0].drop_path, nn.Identity)
    # positions for the 14x14 patches only: the class token is not position-embedded
    assert m.pos_embed.pos_embed.shape == (1, 196, 192) and m.cls_token.shape == (1, 1, 192)
    assert detect_format(m.state_dict()) == "mixlab"


def test_layer_scale_init_values():
    m = Cait(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    assert torch.all(m.blocks[1].ls2.gamma == 1e-5) and torch.all(m.cls_blocks[0].ls1.gamma == 1e-5)


# --------------------------------------------------------------------------------------------
# Parity with timm
# --------------------------------------------------------------------------------------------
def test_timm_parity_at_224():
    theirs = timm_model("cait_xxs24_224")
    assert detect_format(theirs.state_dict()) == "timm"
    ours = mixlab_from("cait_xxs24_224", theirs)
    assert_same_logits(ours, theirs, 224)
    # the tensors really came across (timm's names: gamma_1, proj_l, blocks_token_only)
    assert torch.equal(ours.blocks[5].ls1.gamma, theirs.blocks[5].gamma_1)
    assert torch.equal(ours.blocks[5].mixer.pre_mix.weight, theirs.blocks[5].attn.proj_l.weight)
    assert torch.equal(ours.cls_blocks[1].mixer.k.weight, theirs.blocks_token_only[1].attn.k.weight)


def test_timm_parity_at_160_on_a_shallow_cait():
    from timm.models.cait import Cait as TimmCait
    cfg = dict(patch_size=16, embed_dim=96, depth=3, num_heads=4)
    torch.manual_seed(0)
    theirs = randomize_(TimmCait(img_size=160, init_values=1e-5, **cfg), 3).eval()
    ours = Cait(img_size=160, **cfg).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), ours), strict=True)
    assert_same_logits(ours, theirs, 160, seed=2)
    with torch.no_grad():
        x = torch.randn(2, 3, 160, 160)
        close(ours.forward_features(x), theirs.forward_features(x), atol=1e-4, rtol=1e-4)


def test_checkpoint_for_224_converts_to_another_size():
    """timm's 224 checkpoint into a model built for 160: the position embedding is resampled
    by the converter exactly as the 224 model resamples it at run time on a 160 input."""
    from timm.models.cait import Cait as TimmCait
    cfg = dict(patch_size=16, embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    sd = randomize_(TimmCait(img_size=224, **cfg), 5).state_dict()
    at224, at160 = Cait(img_size=224, **cfg).eval(), Cait(img_size=160, **cfg).eval()
    at224.load_state_dict(convert_state_dict(sd, at224), strict=True)
    at160.load_state_dict(convert_state_dict(sd, at160), strict=True)
    assert at160.pos_embed.pos_embed.shape == (1, 100, 64)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        close(at160(x), at224(x), atol=1e-5, rtol=1e-5)


def test_conversion_refuses_another_family():
    from timm.models.cait import Cait as TimmCait
    sd = TimmCait(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2).state_dict()
    with torch.device("meta"):
        vit = mixlab.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="timm cait checkpoint"):
        convert_state_dict(sd, vit)


# --------------------------------------------------------------------------------------------
# The model API on a tiny CaiT
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> Cait:
    torch.manual_seed(0)
    return Cait(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                          layer_scale=0.1), **kw})


def test_tiny_forward_backward_reaches_every_parameter():
    m = tiny(drop_path_rate=0.1, drop_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    m(x).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_tiny_features_intermediates_and_classifier():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, 1 + 16, 32)
        assert m.forward_head(f, pre_logits=True).shape == (2, 32)
        close(m.forward_head(f, pre_logits=True), f[:, 0], atol=0, rtol=0)
        assert m(x).shape == (2, 5)
        maps = m.forward_intermediates(x)
        assert [t.shape for t in maps] == [(2, 32, 4, 4)] * 2
        assert [i["reduction"] for i in m.feature_info] == [8, 8]
        # the last map is forward_features' patch tokens
        close(maps[-1].flatten(2).transpose(1, 2), f[:, 1:], atol=1e-6, rtol=1e-6)
        assert m.forward_intermediates(x, [-1, 0])[0].shape == (2, 32, 4, 4)
        # another input size resamples the positions
        assert m(torch.randn(1, 3, 48, 40)).shape == (1, 5)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [2])
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    m.reset_classifier(3, pool="avg")
    with torch.no_grad():
        close(m.forward_head(m.forward_features(x), pre_logits=True), m.forward_features(x)[:, 1:].mean(1))


def test_create_model_arguments():
    m = mixlab.create_model("cait_xxs24_224", num_classes=10, in_chans=1, img_size=64, drop_rate=0.1,
                            drop_path_rate=0.2, depth=2)
    assert m.pos_embed.pos_embed.shape == (1, 16, 192) and m.patch_embed.proj.in_channels == 1
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def test_bad_input_is_refused_clearly():
    m = tiny().eval()
    with pytest.raises(ValueError, match="in_chans=1"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="smaller than"):
        m(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="img_size .* not divisible"):
        tiny(img_size=30)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="max")
    with pytest.raises(TypeError, match="did you mean 'depth'"):
        mixlab.create_model("nano_cait", depht=3)


# --------------------------------------------------------------------------------------------
# nano_cait (the arena)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,chans", [(32, 3), (28, 1)])
def test_nano_cait_trains_one_step(size, chans):
    torch.manual_seed(0)
    m = mixlab.create_model("nano_cait", img_size=size, in_chans=chans).train()
    n = count_params(m)
    assert 1.0e6 <= n <= 1.3e6, n
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(4, chans, size, size), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m(x).shape == (4, 10)
