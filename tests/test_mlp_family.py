"""ResMLP, gMLP and Vision Permutator: their mixers against the mixer contract
(``mixlab.mixers.token_mlp``), against the papers' operations written out independently,
the models' API on tiny configurations, the published sizes (on the meta device), the
specification mixers and their nano proposals.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mixlab
from mixlab.analysis import count_params, profile_model
from mixlab.analysis.complexity import count_macs
from mixlab.engine.optim import param_groups
from mixlab.mixers.base import aggregate
from mixlab.mixers.token_mlp import PermuteMLP, SpatialGatingMLP, TokenLinear
from mixlab.models.base import FeatureExtractor
from mixlab.models.gmlp import GMLP
from mixlab.models.resmlp import ResMLP
from mixlab.models.spec import SpecError
from mixlab.registry import MIXERS
from mixlab.models.vip import VisionPermutator


def close(actual, expected, atol=1e-10):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-9)


def prepare(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, eval mode, every parameter random (no bias at zero, no gate bias at one)."""
    g = torch.Generator().manual_seed(seed + 1000)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# --------------------------------------------------------------------------------------------
# Mixers: (id, factory, input shape, affinity groups G)
# --------------------------------------------------------------------------------------------
C = 16
MIXER_CASES = [
    ("token-linear-map", lambda: TokenLinear(20, (4, 5)), (2, 4, 5, C), 1),
    ("token-linear-tokens", lambda: TokenLinear(20), (2, 20, C), 1),
    ("gating-map", lambda: SpatialGatingMLP(C, 24, 20, (4, 5)), (2, 4, 5, C), 1),
    ("gating-tokens", lambda: SpatialGatingMLP(C, 24, 20), (2, 20, C), 1),
    # the authors' setting: as many segments as the map's side (S = 4 channels per segment)
    ("permute-4x4-seg4", lambda: PermuteMLP(C, (4, 4), 4), (2, 4, 4, C), 2 * 4 ** 2 + 4),
    ("permute-4x4-seg4-bias", lambda: PermuteMLP(C, (4, 4), 4, qkv_bias=True), (2, 4, 4, C), 2 * 4 ** 2 + 4),
    ("permute-3x5-seg8-bias", lambda: PermuteMLP(C, (3, 5), 8, qkv_bias=True), (2, 3, 5, C), 2 * 2 ** 2 + 2),
    ("permute-2x3-seg16", lambda: PermuteMLP(C, (2, 3), 16), (1, 2, 3, C), 3),
]
MIXER_IDS = [c[0] for c in MIXER_CASES]


def make_mixer(case, seed=0):
    _, factory, shape, groups = case
    torch.manual_seed(seed)
    mixer = prepare(factory(), seed)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return mixer, x, groups


@pytest.mark.parametrize("case", MIXER_CASES, ids=MIXER_IDS)
def test_explicit_forward_equals_forward(case):
    mixer, x, _ = make_mixer(case)
    assert mixer.exact_av is True
    with torch.no_grad():
        y = mixer(x)
        y_explicit = mixer.explicit_forward(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    close(y_explicit, y)


@pytest.mark.parametrize("case", MIXER_CASES, ids=MIXER_IDS)
def test_affinity_shape_and_groups(case):
    mixer, x, groups = make_mixer(case)
    N = math.prod(x.shape[1:-1])
    with torch.no_grad():
        A = mixer.affinity(x)
        V = mixer.values(x)
    assert A.shape == (x.shape[0], groups, N, N)
    assert A.dtype == torch.float64 and torch.isfinite(A).all()
    assert V.shape[:2] == (x.shape[0], N) and V.shape[-1] % groups == 0
    assert mixer.affinity_kind == "static"
    # static: the same for another input
    with torch.no_grad():
        close(mixer.affinity(torch.randn_like(x)), A, atol=0)


def test_token_linear_affinity_is_the_weight():
    mixer, x, _ = make_mixer(MIXER_CASES[0])
    with torch.no_grad():
        A = mixer.affinity(x)
        y = mixer(x)
    close(A[1, 0], mixer.proj.weight, atol=0)
    # the paper's operation, position by position: y[n, c] = sum_m W[n, m] x[m, c] + b[n]
    t = x.reshape(2, 20, C)
    ref = torch.einsum("nm,bmc->bnc", mixer.proj.weight, t) + mixer.proj.bias[:, None]
    close(y.reshape(2, 20, C), ref)
    assert A[0, 0].sum(-1).sub(1).abs().max() > 1e-3  # not row-normalised: not an attention


def test_spatial_gating_matches_the_paper_and_its_gated_affinity():
    mixer, x, _ = make_mixer(MIXER_CASES[2])
    t = x.reshape(2, 20, C)
    with torch.no_grad():
        z = F.gelu(t @ mixer.fc1.weight.t() + mixer.fc1.bias)
        u, v = z[..., :12], z[..., 12:]
        v = F.layer_norm(v, (12,), mixer.norm.weight, mixer.norm.bias, mixer.norm.eps)
        s = u * (torch.einsum("nm,bmc->bnc", mixer.proj.weight, v) + mixer.proj.bias[:, None])
        ref = s @ mixer.fc2.weight.t() + mixer.fc2.bias
        close(mixer(x).reshape(2, 20, C), ref)
        # the data-dependent view: diag(u_c) W per hidden channel, plus u ⊙ b
        G = mixer.gated_affinity(x)
        assert G.shape == (2, 12, 20, 20)
        close(aggregate(G, mixer.values(x)) + u * mixer.proj.bias[:, None], s)


def test_spatial_gating_starts_as_a_channel_mlp():
    """The paper's init (token weights near zero, bias one): s = u ⊙ (W·LN(v) + 1) ≈ u."""
    torch.manual_seed(0)
    mixer = SpatialGatingMLP(C, 24, 20, (4, 5)).eval()
    assert torch.equal(mixer.proj.bias, torch.ones(20)) and mixer.proj.weight.abs().max() < 1e-5
    x = torch.randn(2, 4, 5, C)
    with torch.no_grad():
        u = F.gelu(mixer.fc1(x))[..., :12]
        close(mixer(x), mixer.fc2(u), atol=1e-4)


def permute_reference(m: PermuteMLP, x: torch.Tensor) -> torch.Tensor:
    """The Permute-MLP written from the paper: per segment, the height branch maps the
    (y, s) values of a column with mlp_h, the width branch the (x, s) values of a row with
    mlp_w; split attention over the spatial mean of the three branches."""
    B, H, W, Cx = x.shape
    g, S = m.segment_dim, m.seg_width
    xs = x.reshape(B, H, W, g, S)
    Wh = m.mlp_h.weight.reshape(H, S, H, S)  # (y', s', y, s)
    Ww = m.mlp_w.weight.reshape(W, S, W, S)  # (x', s', x, s)
    h = torch.einsum("pqys,byxgs->bpxgq", Wh, xs)
    w = torch.einsum("pqxs,byxgs->bypgq", Ww, xs)
    if m.mlp_h.bias is not None:
        h = h + m.mlp_h.bias.reshape(H, 1, 1, S)
        w = w + m.mlp_w.bias.reshape(W, 1, S)
    h, w = h.reshape(B, H, W, Cx), w.reshape(B, H, W, Cx)
    c = m.mlp_c(x)
    pooled = (h + w + c).mean(dim=(1, 2))  # (B, C)
    logits = m.reweight.fc2(F.gelu(m.reweight.fc1(pooled))).reshape(B, Cx, 3)
    a = logits.softmax(dim=-1)
    y = h * a[:, None, None, :, 0] + w * a[:, None, None, :, 1] + c * a[:, None, None, :, 2]
    return m.proj(y)


@pytest.mark.parametrize("case", [c for c in MIXER_CASES if c[0].startswith("permute")],
                         ids=[c[0] for c in MIXER_CASES if c[0].startswith("permute")])
def test_permute_mlp_matches_the_paper(case):
    mixer, x, _ = make_mixer(case)
    with torch.no_grad():
        close(mixer(x), permute_reference(mixer, x))


def test_permute_affinity_is_static_along_columns_and_rows():
    mixer, x, _ = make_mixer(MIXER_CASES[6])  # 3x5 map, 8 segments of S = 2 channels, biases
    H, W, S = 3, 5, 2
    with torch.no_grad():
        A = mixer.affinity(x)[0]
        A_h, A_w = mixer.axial_affinities()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    same_col = xs[:, None] == xs[None, :]
    same_row = ys[:, None] == ys[None, :]
    assert (A_h[..., ~same_col] == 0).all() and (A_h[..., same_col] != 0).all()
    assert (A_w[..., ~same_row] == 0).all() and (A_w[..., same_row] != 0).all()
    # entries are the branch weights: output (y', x') channel s_out reads input (y, x') channel s_in
    n_out, n_in = 1 * W + 3, 2 * W + 3  # (1, 3) <- (2, 3)
    assert A_h[1, 0, n_out, n_in] == mixer.mlp_h.weight[1 * S + 1, 2 * S + 0]
    n_out, n_in = 2 * W + 4, 2 * W + 0  # (2, 4) <- (2, 0)
    assert A_w[0, 1, n_out, n_in] == mixer.mlp_w.weight[4 * S + 0, 0 * S + 1]
    # the groups: S² height pairs, S² width pairs, then S identities (the channel branch)
    close(A[: S * S], A_h.reshape(S * S, H * W, H * W), atol=0)
    close(A[S * S: 2 * S * S], A_w.reshape(S * S, H * W, H * W), atol=0)
    close(A[2 * S * S:], torch.eye(H * W, dtype=A.dtype).expand(S, -1, -1), atol=0)


@pytest.mark.parametrize("mixer, x", [
    (TokenLinear(20, (4, 5)), torch.randn(1, 5, 5, 8)),
    (SpatialGatingMLP(8, 12, 20, (4, 5)), torch.randn(1, 4, 6, 8)),
    (PermuteMLP(16, (4, 4), 4), torch.randn(1, 4, 5, 16)),
], ids=["token-linear", "gating", "permute"])
def test_mixers_reject_another_input_size(mixer, x):
    with pytest.raises(ValueError, match="img_size"):
        mixer(x)
    with pytest.raises(ValueError, match="img_size"):
        mixer.affinity(x)


def test_bad_mixer_configurations():
    with pytest.raises(ValueError, match="segments"):
        PermuteMLP(16, (4, 4), 3)
    with pytest.raises(ValueError, match="even"):
        SpatialGatingMLP(8, 13, 16)


# --------------------------------------------------------------------------------------------
# Models, tiny configurations
# --------------------------------------------------------------------------------------------
IMG = 32
NUM_CLASSES = 10
CONFIGS = {
    "resmlp": lambda **kw: ResMLP(**{**dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2,
                                            num_classes=NUM_CLASSES), **kw}),
    "gmlp": lambda **kw: GMLP(**{**dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2, mlp_ratio=3,
                                        num_classes=NUM_CLASSES), **kw}),
    # a 2x2 transition after stage 0 and a 1x1 width change after stage 1, as the authors' rule
    "vip": lambda **kw: VisionPermutator(**{**dict(img_size=IMG, patch_size=4, depths=(1, 1, 1), dims=(16, 32, 48),
                                                   transitions=(True, False), segment_dims=(8, 4, 4),
                                                   num_classes=NUM_CLASSES), **kw}),
}
NAMES = list(CONFIGS)


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return CONFIGS[name](**kw)


def image(size=IMG, chans=3, batch=2, seed=1):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    model = build(name)
    assert count_params(model) < 300_000
    x = image()
    model.train()
    out = model(x)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_features_head_and_classifier(name):
    model = build(name).eval()
    x = image()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    last = model.feature_info[-1]["reduction"]
    assert feats.shape == (2, IMG // last, IMG // last, model.num_features)
    assert pre.shape == (2, model.num_features)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre)


@pytest.mark.parametrize("name", NAMES)
def test_intermediates_and_feature_extractor(name):
    model = build(name).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(image())
    assert len(maps) == len(model.feature_info) == len(model.stages) == len(model.stage_mixers)
    for f, info in zip(maps, model.feature_info):
        assert f.shape == (2, info["num_chs"], IMG // info["reduction"], IMG // info["reduction"])
    fx = FeatureExtractor(build(name), out_indices=(-1,)).eval()
    with torch.no_grad():
        (last,) = fx(image())
    assert last.shape == maps[-1].shape


def test_vip_stage_layout():
    model = build("vip")
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 8]
    assert model.stages[1].downsample.proj.kernel_size == (2, 2)  # transition
    assert model.stages[2].downsample.proj.kernel_size == (1, 1)  # width change only
    assert model.stages[2].blocks[0].mixer.grid_size == (4, 4)
    assert model.stage_mixers[0] == "permute-MLP (8x8, 8 segments)"


@pytest.mark.parametrize("name", NAMES)
def test_fixed_input_size(name):
    model = build(name).eval()
    with pytest.raises(ValueError, match="img_size"):
        model(image(48))
    with pytest.raises(ValueError, match="in_chans"):
        model(image(chans=1))
    other = build(name, img_size=48, in_chans=1).eval()
    with torch.no_grad():
        assert other(image(48, chans=1)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_drop_path(name):
    model = build(name, drop_path_rate=0.5)
    x = image(batch=8)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():  # features: gMLP's classifier starts at zero
        a, b = model.forward_features(x), model.forward_features(x)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), model.forward_features(x))


def test_inits():
    small = dict(img_size=32, embed_dim=16, depth=1, num_classes=3)
    r12 = mixlab.create_model("resmlp_12_224", **small)
    r24 = mixlab.create_model("resmlp_24_224", **small)
    assert torch.equal(r12.stages[0].blocks[0].ls1.gamma, torch.full((16,), 0.1))  # the authors' 0.1 for depth 12
    assert torch.equal(r24.stages[0].blocks[0].ls2.gamma, torch.full((16,), 1e-5))  # and 1e-5 for depth 24
    assert r12.stages[0].blocks[0].mixer.proj.weight.std() < 0.03
    g = mixlab.create_model("gmlp_s16_224", **small)
    sgu = g.stages[0].blocks[0].mixer
    assert torch.equal(sgu.proj.bias, torch.ones(4)) and sgu.proj.weight.abs().max() < 1e-5
    assert torch.equal(g.head.fc.weight, torch.zeros(3, 16))


def test_resmlp_affine_params_are_not_weight_decayed():
    model = build("resmlp")
    skip = model.no_weight_decay()
    assert "norm.alpha" in skip and "stages.0.blocks.1.norm2.beta" in skip
    decayed = {n for grp in param_groups(model, 0.05, 1e-3) if grp["weight_decay"] > 0 for n in grp["names"]}
    assert not any(n.endswith((".alpha", ".beta", ".gamma")) for n in decayed)
    assert "stages.0.blocks.0.mixer.proj.weight" in decayed


def test_registry_families():
    import mixlab.models.gmlp  # noqa: F401
    import mixlab.models.resmlp  # noqa: F401
    import mixlab.models.vip  # noqa: F401
    assert mixlab.list_models(family="resmlp") == ["resmlp_12_224", "resmlp_24_224"]
    assert mixlab.list_models(family="gmlp") == ["gmlp_b16_224", "gmlp_s16_224"]
    assert mixlab.list_models(family="vip") == ["vip_l7", "vip_m7", "vip_s7"]


# --------------------------------------------------------------------------------------------
# Published sizes (meta device)
# --------------------------------------------------------------------------------------------
# name -> (params M, GMACs at 224, source)
PUBLISHED = {
    "resmlp_12_224": (15.35, 3.01, "docs/published_figures.md (timm reference code)"),
    "resmlp_24_224": (30.02, 5.96, "docs/published_figures.md (timm reference code)"),
    "gmlp_s16_224": (19.42, 4.39, "docs/published_figures.md (seed gMLP-S 20 / 4.5)"),
    "gmlp_b16_224": (73.08, 15.72, "docs/published_figures.md (seed gMLP-B 73 / 15.8)"),
    "vip_s7": (25.0, 6.9, "ViP paper (ViP-Small/7: 25M, 6.9G FLOPs); authors' README 25M; PaddleViT 25.1M / 7.0G"),
    "vip_m7": (55.3, 16.4, "PaddleViT's ViP table for the authors' weights (55.3M, 16.4G); authors' README 55M"),
    "vip_l7": (87.8, 24.5, "PaddleViT's ViP table for the authors' weights (87.8M, 24.5G); authors' README 88M"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_size(name):
    params, gmacs, _ = PUBLISHED[name]
    with torch.device("meta"):  # profile_model's count, in one pass
        model = mixlab.create_model(name).eval()
        macs, _ = count_macs(model, torch.empty(1, 3, 224, 224))
    mparams = count_params(model) / 1e6
    assert abs(mparams - params) <= 0.01 * params, f"{name}: {mparams:.3f}M vs {params}M"
    assert abs(macs / 1e9 - gmacs) <= 0.05 * gmacs, f"{name}: {macs / 1e9:.3f} GMACs vs {gmacs}"


def test_profile_model_sees_the_stages():
    prof = profile_model("vip_s7")
    assert prof.output_shape == (1, 1000) and prof.gmacs == pytest.approx(6.90, abs=0.01)
    stages = [p for p in prof.parts if p.name.startswith("stages.")]
    assert [p.resolution for p in stages] == [(32, 32), (16, 16), (16, 16), (16, 16)]
    assert stages[0].mixer == "permute-MLP (32x32, 32 segments)"


# --------------------------------------------------------------------------------------------
# Specifications and nano proposals
# --------------------------------------------------------------------------------------------
NANO = {  # the proposed nano models (32x32, 10 classes) and their parameter counts
    "nano_resmlp": ("patch4 / resmlp:8x128", 1_101_194),
    "nano_gmlp": ("patch4 / gmlp:8x128:mlp_ratio=6", 1_236_362),
    "nano_vip": ("patch2 / permute:2x40:mlp_ratio=3 / permute:2x80:mlp_ratio=3 / permute:4x160:mlp_ratio=3",
                 1_245_790),
}


def test_spec_mixers_are_registered():
    assert MIXERS["resmlp"].options == {"layer_scale": 0.1}
    assert MIXERS["gmlp"].options == {}
    assert MIXERS["permute"].options == {"segments": 8}


def test_spec_blocks_get_the_stage_grid():
    m = mixlab.create_model("spec:patch2 / resmlp:1x16 / gmlp:1x32 / permute:1x64:segments=4", img_size=32,
                            num_classes=4)
    assert m.stages[0].blocks[0].mixer.proj.num_tokens == 16 * 16
    assert m.stages[1].blocks[0].mixer.proj.num_tokens == 8 * 8
    assert m.stages[2].blocks[0].mixer.grid_size == (4, 4) and m.stages[2].blocks[0].mixer.seg_width == 16
    assert m.stages[0].blocks[0].ls1.gamma[0].item() == pytest.approx(0.1)
    # SpecNet's ViT-style init leaves the gating unit's token layer at the paper's init
    assert torch.equal(m.stages[1].blocks[0].mixer.proj.bias, torch.ones(64))
    assert m.stage_mixers[2] == "ViP permute-MLP (segments=4)"
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(SpecError, match="unknown option"):
        mixlab.create_model("spec:patch2 / gmlp:1x16:heads=2", img_size=32)
    with pytest.raises(ValueError, match="segments"):
        mixlab.create_model("spec:patch2 / permute:1x20:segments=3", img_size=32)


@pytest.mark.parametrize("name", list(NANO))
def test_nano_proposal_trains_one_step(name):
    spec, params = NANO[name]
    torch.manual_seed(0)
    model = mixlab.create_model("spec:" + spec, img_size=32, num_classes=10)
    assert count_params(model) == params
    assert 1.1e6 <= params <= 1.3e6
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    opt = torch.optim.AdamW(param_groups(model, 0.05, 1e-3))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved == len(before)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
