"""The shift-style family: ShiftViT, S2-MLPv2 and CycleMLP.

* the mixers against the contract of ``mixlab.mixers.base`` (``explicit_forward ==
  forward`` in float64, affinity shapes, kinds), and against references written here
  position by position from the papers' definitions (and, for Cycle FC, against the
  authors' deformable-convolution formulation through torchvision, when it is installed);
* the models: forward / backward, features, classifier reset, other input sizes, input
  checks, drop path, mixlab's state-dict format;
* the published parameter counts (within 1%) and GMACs (within 5%), on the meta device;
* the specification mixers 'shift', 's2mlp' and 'cycle' and the proposed nano models.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mixlab
import mixlab.models.cyclemlp  # noqa: F401  (registers the models and spec mixers)
import mixlab.models.s2mlp  # noqa: F401
import mixlab.models.shiftvit  # noqa: F401
from mixlab.analysis import count_macs, count_params
from mixlab.mixers.shift import (CycleFC, CycleMixer, PartialShift, SplitShiftMixer, cycle_offsets, shift_map,
                                 shift_matrix)
from mixlab.models.base import FeatureExtractor
from mixlab.models.cyclemlp import CycleMLP
from mixlab.models.s2mlp import S2MLPv2
from mixlab.models.shiftvit import ShiftViT, ShiftViTBlock
from mixlab.models.spec import SpecNet, create_from_spec
from mixlab.registry import MIXERS
from mixlab.weights import detect_format

ATOL = 1e-10


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-9)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, eval mode, every parameter random (biases included), so that no term of a
    comparison can vanish because it was initialised to zero."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return module


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# References written from the papers' definitions
# --------------------------------------------------------------------------------------------
def read(x, b, y, xx, c, dy, dx, border):
    """x[b, y + dy, xx + dx, c], or zero / the position's own value outside the map."""
    H, W = x.shape[1:3]
    sy, sx = y + dy, xx + dx
    if 0 <= sy < H and 0 <= sx < W:
        return x[b, sy, sx, c]
    return x[b, y, xx, c] if border == "keep" else x.new_zeros(())


def shiftvit_reference(x, n_div):
    """ShiftViT's shift: g = C // n_div; the first four groups of g channels move one pixel
    left, right, up, down (zero shifted in); the rest stay."""
    B, H, W, C = x.shape
    g = C // n_div
    moves = [(0, 1), (0, -1), (1, 0), (-1, 0)]  # (dy, dx) each group reads from
    out = torch.empty_like(x)
    for c in range(C):
        dy, dx = moves[c // g] if c < 4 * g else (0, 0)
        for b in range(B):
            for y in range(H):
                for xx in range(W):
                    out[b, y, xx, c] = read(x, b, y, xx, c, dy, dx, "zero")
    return out


def s2_shift_reference(t, which):
    """The S2-MLPv2 paper's ``spatial_shift1`` / ``spatial_shift2`` pseudo-code, run on numpy
    arrays (whose slice assignment reads its right-hand side before writing) in the paper's
    (w, h, c) layout: w is our W axis."""
    B, H, W, C = t.shape
    out = t.permute(0, 2, 1, 3).numpy().copy()  # (B, w, h, c)
    q = [C // 4, C // 2, 3 * C // 4]
    for a in out:
        if which == 1:
            a[1:, :, :q[0]] = a[:-1, :, :q[0]]
            a[:-1, :, q[0]:q[1]] = a[1:, :, q[0]:q[1]]
            a[:, 1:, q[1]:q[2]] = a[:, :-1, q[1]:q[2]]
            a[:, :-1, q[2]:] = a[:, 1:, q[2]:]
        else:
            a[:, 1:, :q[0]] = a[:, :-1, :q[0]]
            a[:, :-1, q[0]:q[1]] = a[:, 1:, q[0]:q[1]]
            a[1:, :, q[1]:q[2]] = a[:-1, :, q[1]:q[2]]
            a[:-1, :, q[2]:] = a[1:, :, q[2]:]
    return torch.from_numpy(out).permute(0, 2, 1, 3)


def cycle_fc_reference(fc: CycleFC, x):
    """Cycle FC from its definition, one output at a time:
    out[b, y, x, o] = Σ_c W[o, c]·X[b, (y, x) + offset_c, c] + bias[o], zero outside."""
    B, H, W, C = x.shape
    offs = cycle_offsets(C, fc.kernel_size)
    out = torch.zeros(B, H, W, fc.out_features, dtype=x.dtype)
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                col = torch.stack([read(x, b, y, xx, c, *((offs[c], 0) if fc.axis == "h" else (0, offs[c])), "zero")
                                   for c in range(C)])
                out[b, y, xx] = fc.weight @ col + (fc.bias if fc.bias is not None else 0)
    return out


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
C = 16
# (id, factory, input shape, affinity groups G)
CASES = [
    ("shift-16-div4", lambda: PartialShift(16, 4), (2, 5, 6, 16), 4),  # g = 4: 4 groups of 4
    ("shift-24-div12", lambda: PartialShift(24, 12), (2, 5, 6, 24), 12),  # g = 2
    ("shift-40-div12", lambda: PartialShift(40, 12), (2, 4, 5, 40), 40),  # g = 3 and 40: groups of 1
    ("shift-18-div8", lambda: PartialShift(18, 8), (1, 3, 7, 18), 9),  # g = 2, 18 channels: groups of 2
    ("s2-16", lambda: SplitShiftMixer(16), (2, 5, 6, 16), 48),
    ("s2-10-uneven-quarters", lambda: SplitShiftMixer(10), (2, 4, 7, 10), 30),
    ("cycle-16-k3", lambda: CycleMixer(16), (2, 5, 6, 16), 7 * 16),
    ("cycle-10-k5", lambda: CycleMixer(10, kernel_size=5), (2, 6, 7, 10), 11 * 10),
    ("cycle-10-k4-even", lambda: CycleMixer(10, kernel_size=4), (1, 6, 5, 10), 9 * 10),
    ("cycle-8-k3-bias", lambda: CycleMixer(8, qkv_bias=True), (2, 3, 4, 8), 7 * 8),
]
IDS = [c[0] for c in CASES]


def make(case, seed=0):
    _, factory, shape, groups = case
    torch.manual_seed(seed)
    return randomized(factory(), seed), rand(*shape, seed=seed + 1), groups


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case):
    mixer, x, _ = make(case)
    with torch.no_grad():
        y = mixer(x)
        close(mixer.explicit_forward(x), y)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_shape(case):
    mixer, x, groups = make(case)
    N = math.prod(x.shape[1:3])
    with torch.no_grad():
        A = mixer.affinity(x)
    assert A.shape == (x.shape[0], groups, N, N)
    assert A.dtype == torch.float64 and torch.isfinite(A).all()
    assert mixer.values(x).shape[-1] % groups == 0


def test_kinds_and_exactness():
    assert PartialShift(C).affinity_kind == "static"
    assert SplitShiftMixer(C).affinity_kind == "dynamic"
    assert CycleMixer(C).affinity_kind == "dynamic"
    assert all(m.exact_av for m in (PartialShift(C), SplitShiftMixer(C), CycleMixer(C)))
    assert sum(p.numel() for p in PartialShift(C).parameters()) == 0


# --------------------------------------------------------------------------------------------
# ShiftViT's shift
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, n_div, size", [(16, 4, (4, 5)), (24, 12, (3, 6)), (40, 12, (5, 4)), (32, 16, (2, 3))],
                         ids=["16-div4", "24-div12", "40-div12", "32-div16"])
def test_partial_shift_matches_definition(dim, n_div, size):
    x = rand(2, *size, dim)
    close(PartialShift(dim, n_div)(x), shiftvit_reference(x, n_div), atol=0)


def test_partial_shift_affinity_is_a_0_1_shift():
    """One 1 per row for the identity groups, and for the shifted ones exactly one zero row
    per position of the vacated border column / row."""
    H, W = 4, 5
    m = PartialShift(16, 4)  # groups: left, right, up, down (4 channels each), no identity
    x = rand(1, H, W, 16)
    A = m.affinity(x)[0]  # (4, 20, 20)
    assert set(A.unique().tolist()) <= {0.0, 1.0}
    rows = A.sum(-1)
    assert rows.max() == 1
    assert [int((rows[g] == 0).sum()) for g in range(4)] == [H, H, W, W]
    # group 0 reads its right neighbour: row (y, x) has its 1 at (y, x + 1)
    assert A[0, 0 * W + 1, 0 * W + 2] == 1 and A[0, 2 * W + 4].sum() == 0
    # with n_div 8, half of the channels stay: their affinity is the identity
    A8 = PartialShift(16, 8).affinity(x)[0]  # g = 2: 8 groups, the last four unshifted
    close(A8[4:], torch.eye(H * W, dtype=torch.float64).expand(4, -1, -1), atol=0)


def test_partial_shift_rejects_bad_settings():
    with pytest.raises(ValueError, match="too small"):
        PartialShift(8, 12)
    with pytest.raises(ValueError, match="n_div"):
        PartialShift(16, 3)


def test_shift_map_and_matrix_agree():
    x = rand(1, 4, 5, 3)
    flat = x.reshape(1, 20, 3)
    for dy, dx in [(0, 1), (0, -2), (1, 0), (-1, 0), (2, -1), (0, 7)]:
        A = shift_matrix(4, 5, dy, dx, "zero", dtype=torch.float64)
        close(shift_map(x, dy, dx).reshape(1, 20, 3), A @ flat, atol=0)
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-2, 0)]:
        A = shift_matrix(4, 5, dy, dx, "keep", dtype=torch.float64)
        close(shift_map(x, dy, dx, "keep").reshape(1, 20, 3), A @ flat, atol=0)
        assert (A.sum(-1) == 1).all()  # 'keep': every row reads exactly one position
    with pytest.raises(ValueError, match="one axis"):
        shift_map(x, 1, 1, "keep")


# --------------------------------------------------------------------------------------------
# S2-MLPv2
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [16, 10], ids=["16", "10-uneven"])
def test_s2_shifts_match_the_papers_pseudocode(dim):
    m = SplitShiftMixer(dim)
    t = rand(2, 5, 4, dim)
    close(m.shift1(t), s2_shift_reference(t, 1), atol=0)
    close(m.shift2(t), s2_shift_reference(t, 2), atol=0)


def test_s2_mixer_matches_the_papers_formula():
    torch.manual_seed(0)
    m = randomized(SplitShiftMixer(12))
    x = rand(2, 5, 6, 12)
    with torch.no_grad():
        v = m.expand(x)
        xs = [s2_shift_reference(v[..., :12], 1), s2_shift_reference(v[..., 12:24], 2), v[..., 24:]]
        a = sum(xs).sum(dim=(1, 2))  # a = Σ_k 1ᵀ X_k: a sum over positions
        sa = m.split_attention
        alpha = sa.fc2(F.gelu(sa.fc1(a))).reshape(2, 3, 12).softmax(dim=1)  # K x C, softmax over k
        y = sum(alpha[:, k, None, None, :] * xs[k] for k in range(3))
        close(m(x), m.proj(y))
        close(m.gates(x), alpha)
    assert sa.fc1.out_features == 3  # hidden width C/4


def test_s2_affinity_rows_carry_the_gates():
    """'keep' borders: every row of every channel's matrix holds one entry, the gate α_k[c]."""
    torch.manual_seed(0)
    m = randomized(SplitShiftMixer(8))
    x = rand(2, 4, 5, 8)
    with torch.no_grad():
        A, alpha = m.affinity(x), m.gates(x)
    close(alpha.sum(1), torch.ones(2, 8, dtype=torch.float64))
    close(A.sum(-1), alpha.reshape(2, 24, 1).expand(-1, -1, 20))
    assert ((A != 0).sum(-1) == 1).all()


# --------------------------------------------------------------------------------------------
# CycleMLP
# --------------------------------------------------------------------------------------------
def test_cycle_offsets():
    assert cycle_offsets(7, 3) == [0, 1, -1, 0, 1, -1, 0]
    assert cycle_offsets(6, 5) == [0, 1, 2, -2, -1, 0]
    assert cycle_offsets(4, 1) == [0, 0, 0, 0]


@pytest.mark.parametrize("cin, cout, k, axis, size", [
    (6, 5, 3, "w", (4, 5)), (6, 5, 3, "h", (4, 5)), (7, 4, 5, "w", (3, 6)), (5, 3, 2, "h", (4, 3)),
    (2, 3, 3, "w", (3, 3)),  # fewer channels than the cycle
], ids=["k3-w", "k3-h", "k5-w", "k2-h", "2ch-k3"])
def test_cycle_fc_matches_its_definition(cin, cout, k, axis, size):
    torch.manual_seed(0)
    fc = randomized(CycleFC(cin, cout, k, axis))
    x = rand(2, *size, cin)
    with torch.no_grad():
        close(fc(x), cycle_fc_reference(fc, x))


@pytest.mark.parametrize("k, axis", [(3, "w"), (3, "h"), (5, "w")])
def test_cycle_fc_matches_the_authors_deformable_convolution(k, axis):
    """The authors compute Cycle FC as torchvision's deform_conv2d with a 1x1 kernel, one
    offset group per input channel and a fixed (dy, dx) per channel."""
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    cin, cout, H, W = 7, 4, 5, 6
    fc = randomized(CycleFC(cin, cout, k, axis))
    x = rand(2, H, W, cin)
    offset = torch.zeros(1, 2 * cin, 1, 1, dtype=torch.float64)
    for c, d in enumerate(cycle_offsets(cin, k)):
        offset[0, 2 * c + (0 if axis == "h" else 1)] = d  # (dy, dx) pairs
    with torch.no_grad():
        ref = ops.deform_conv2d(x.permute(0, 3, 1, 2), offset.expand(2, -1, H, W), fc.weight[:, :, None, None],
                                fc.bias)
        close(fc(x), ref.permute(0, 2, 3, 1))


def test_cycle_mixer_matches_its_formula():
    torch.manual_seed(0)
    m = randomized(CycleMixer(9))
    x = rand(2, 4, 5, 9)
    with torch.no_grad():
        h, w, c = cycle_fc_reference(m.sfc_h, x), cycle_fc_reference(m.sfc_w, x), x @ m.mlp_c.weight.t()
        a = (h + w + c).mean(dim=(1, 2))
        rw = m.reweight
        alpha = rw.fc2(F.gelu(rw.fc1(a))).reshape(2, 9, 3).softmax(dim=-1)  # the authors' (C, 3) layout
        y = h * alpha[:, None, None, :, 0] + w * alpha[:, None, None, :, 1] + c * alpha[:, None, None, :, 2]
        close(m(x), m.proj(y))
    assert m.sfc_h.axis == "w" and m.sfc_w.axis == "h"  # sfc_h: the 1 x 3 pseudo-kernel, along W


def test_cycle_affinity_support_is_static():
    """The affinity changes with the input only through the per-channel gates: its zero
    pattern is the same for two inputs, and A / α is the 0/1 shift pattern."""
    torch.manual_seed(0)
    m = randomized(CycleMixer(6))
    x1, x2 = rand(1, 4, 4, 6, seed=1), rand(1, 4, 4, 6, seed=2)
    with torch.no_grad():
        A1, A2 = m.affinity(x1), m.affinity(x2)
    assert torch.equal(A1 != 0, A2 != 0)
    assert not torch.allclose(A1, A2)
    pattern = A1 / A1.abs().amax(dim=(-1, -2), keepdim=True)
    assert set(pattern.unique().tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------------
# Models (tiny configurations)
# --------------------------------------------------------------------------------------------
IMG = 32
NC = 10
CONFIGS = {
    "shiftvit": lambda **kw: ShiftViT(**{**dict(embed_dim=16, depths=(1, 1, 2, 1), n_div=8, num_classes=NC), **kw}),
    "shiftvit-gn1": lambda **kw: ShiftViT(**{**dict(embed_dim=16, depths=(1, 1, 1, 1), n_div=8, norm="gn1",
                                                    num_classes=NC), **kw}),
    "s2mlpv2": lambda **kw: S2MLPv2(**{**dict(img_size=28, depths=(1, 2), dims=(16, 32), num_classes=NC), **kw}),
    "cyclemlp": lambda **kw: CycleMLP(**{**dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), num_classes=NC), **kw}),
}
SIZE = {"shiftvit": IMG, "shiftvit-gn1": IMG, "s2mlpv2": 28, "cyclemlp": IMG}
NAMES = list(CONFIGS)


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return CONFIGS[name](**kw)


def image(*size, chans=3, batch=2, seed=1):
    size = size * 2 if len(size) == 1 else size
    return torch.randn(batch, chans, *size, generator=torch.Generator().manual_seed(seed))


def check_backward(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (x.shape[0], NC) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(x.shape[0]) % NC).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_head(name):
    model = build(name)
    x = image(SIZE[name])
    assert count_params(model) < 1_000_000
    check_backward(model, x)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        close(model.forward_head(feats), model(x), atol=1e-6)
    assert feats.ndim == 4 and feats.shape[-1] == model.num_features
    assert pre.shape == (2, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_intermediates_and_features(name):
    model = build(name).eval()
    x = image(SIZE[name])
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        last = model.forward_intermediates(x, indices=[-1])
        fx = FeatureExtractor(build(name), out_indices=(0, -1)).eval()
        two = fx(x)
    assert len(maps) == len(model.feature_info) == len(model.stages)
    for f, info in zip(maps, model.feature_info):
        assert f.shape[:2] == (2, info["num_chs"])
        assert all(abs(s - SIZE[name] / info["reduction"]) < 1 for s in f.shape[2:])
    close(last[0], maps[-1], atol=0)
    assert [f.shape[1] for f in two] == fx.channels()


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = build(name).eval()
    x = image(SIZE[name])
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name, size", [("shiftvit", (68, 44)), ("shiftvit", (36, 100)), ("cyclemlp", (67, 45)),
                                        ("cyclemlp", (40, 33)), ("s2mlpv2", (70, 42))],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_other_input_sizes(name, size):
    model = build(name)
    x = image(*size)
    check_backward(model, x)
    with torch.no_grad():
        maps = model.eval().forward_intermediates(x)
    for f, info in zip(maps, model.feature_info):
        assert all(abs(side - s / info["reduction"]) < 1 for side, s in zip(f.shape[2:], size))


@pytest.mark.parametrize("name", NAMES)
def test_input_checks(name):
    model = build(name).eval()
    with pytest.raises(ValueError, match="in_chans"):
        model(image(SIZE[name], chans=1))
    with pytest.raises(ValueError, match="smaller"):
        model(image(model.min_input_size - 1))
    one = build(name, in_chans=1).eval()
    with torch.no_grad():
        assert one(image(SIZE[name], chans=1)).shape == (2, NC)


def test_s2mlpv2_needs_multiples_of_the_patch():
    with pytest.raises(ValueError, match="patch size"):
        build("s2mlpv2").eval()(image(30))


def test_model_argument_errors():
    with pytest.raises(ValueError, match="norm"):
        ShiftViT(norm="ln")
    with pytest.raises(ValueError, match="act"):
        ShiftViT(act="silu")
    with pytest.raises(ValueError, match="one entry per stage"):
        S2MLPv2(depths=(1, 1, 1), dims=(8, 16))
    with pytest.raises(ValueError, match="one entry per stage"):
        CycleMLP(depths=(1, 1), dims=(8, 16, 32), mlp_ratios=(4, 4))


@pytest.mark.parametrize("name", ["shiftvit", "s2mlpv2", "cyclemlp"])
def test_drop_path(name):
    model = build(name, drop_path_rate=0.5)
    x = image(SIZE[name], batch=8)
    torch.manual_seed(1)
    with torch.no_grad():
        a, b = model.train()(x), model(x)
        c, d = model.eval()(x), model(x)
    assert not torch.equal(a, b)
    close(c, d, atol=0)


def test_shiftvit_block_shifts_the_residual_stream():
    """The shift is applied to the block's input itself; the MLP adds to the shifted map."""
    torch.manual_seed(0)
    blk = randomized(ShiftViTBlock(8, n_div=4, mlp_ratio=2.0))
    x = rand(2, 4, 5, 8)
    with torch.no_grad():
        s = shiftvit_reference(x, 4)
        close(blk(x), s + blk.mlp(blk.norm(s)))


def test_shiftvit_uses_batchnorm_and_biasless_merging():
    with torch.device("meta"):
        m = mixlab.create_model("shiftvit_tiny")
    sd = m.state_dict()
    assert "stages.1.downsample.pre_norm.running_var" in sd and "stages.1.downsample.proj.bias" not in sd
    assert "stem.norm.running_mean" in sd and "norm.running_mean" in sd
    assert all(k.startswith(("stem.", "stages.", "norm.", "head.")) for k in sd)


FAMILY_MODELS = ["shiftvit_tiny", "shiftvit_small", "shiftvit_base", "s2mlpv2_small", "s2mlpv2_medium",
                 "cyclemlp_b1", "cyclemlp_b2"]


def test_registered_models_and_families():
    assert set(mixlab.list_models(family="shiftvit")) == {"shiftvit_tiny", "shiftvit_small", "shiftvit_base"}
    assert set(mixlab.list_models(family="s2mlp")) == {"s2mlpv2_small", "s2mlpv2_medium"}
    assert set(mixlab.list_models(family="cyclemlp")) == {"cyclemlp_b1", "cyclemlp_b2"}


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_state_dict_is_detected_as_mixlab(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    assert model.pretrained_cfg["architecture"] == name
    assert detect_format(model.state_dict()) == "mixlab"


# --------------------------------------------------------------------------------------------
# Published figures (meta device)
# --------------------------------------------------------------------------------------------
# name -> (params M, GMACs, source). ShiftViT: the authors' code (microsoft/SPACH,
# shiftvit_r2_tiny / _small / _base) measured; S2-MLPv2: the paper (Small/7 and Medium/7,
# 25M / 6.9G and 55M / 16.3G); CycleMLP: the paper (B1 15.2M / 2.1G, B2 26.8M / 3.9G).
FIGURES = {
    "shiftvit_tiny": (28.57, 4.58),
    "shiftvit_small": (50.30, 8.74),
    "shiftvit_base": (89.03, 15.54),
    "s2mlpv2_small": (25.0, 6.9),
    "s2mlpv2_medium": (55.0, 16.3),
    "cyclemlp_b1": (15.2, 2.1),
    "cyclemlp_b2": (26.8, 3.9),
}
# the seed table's ShiftViT row (28 / 50 / 88 M, 4.4 / 8.5 / 15.2 G): parameters without the
# classifier, and (within 5%) the GMACs
SEED_SHIFTVIT = {"shiftvit_tiny": (28.0, 4.4), "shiftvit_small": (50.0, 8.5), "shiftvit_base": (88.0, 15.2)}


@pytest.fixture(scope="module")
def measured():
    out = {}
    for name in FAMILY_MODELS:
        with torch.device("meta"):
            model = mixlab.create_model(name).eval()
            macs, _ = count_macs(model, torch.zeros(1, 3, 224, 224))
        head = sum(p.numel() for p in model.head.parameters())
        out[name] = (count_params(model) / 1e6, macs / 1e9, (count_params(model) - head) / 1e6)
    return out


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_published_figures(name, measured):
    params, gmacs, _ = measured[name]
    ref_p, ref_g = FIGURES[name]
    assert abs(params - ref_p) / ref_p < 0.01, (name, params, ref_p)
    assert abs(gmacs - ref_g) / ref_g < 0.05, (name, gmacs, ref_g)


@pytest.mark.parametrize("name", list(SEED_SHIFTVIT))
def test_shiftvit_seed_row_counts_the_backbone(name, measured):
    _, gmacs, backbone = measured[name]
    seed_p, seed_g = SEED_SHIFTVIT[name]
    assert abs(backbone - seed_p) / seed_p < 0.01, (name, backbone, seed_p)
    assert abs(gmacs - seed_g) / seed_g < 0.05, (name, gmacs, seed_g)


# --------------------------------------------------------------------------------------------
# Specifications and nano proposals
# --------------------------------------------------------------------------------------------
NANO = {
    "nano_shiftvit": "patch2 / shift:2x40:mlp_ratio=2 / shift:4x80:mlp_ratio=2 / shift:9x160:mlp_ratio=2",
    "nano_s2mlp": "patch2 / s2mlp:2x40:mlp_ratio=3 / s2mlp:3x80:mlp_ratio=3 / s2mlp:3x160:mlp_ratio=3",
    "nano_cyclemlp": "patch2 / cycle:2x40 / cycle:4x80 / cycle:2x160",
}


def test_spec_mixers_are_registered():
    assert MIXERS["shift"].options == {"n_div": 12}
    assert MIXERS["s2mlp"].options == {}
    assert MIXERS["cycle"].options == {"kernel": 3}


def test_spec_blocks_are_the_families_blocks():
    m = create_from_spec("spec:patch2 / shift:1x16:n_div=4 / s2mlp:1x32 / cycle:1x48:kernel=5", img_size=32,
                         num_classes=NC)
    assert isinstance(m, SpecNet)
    assert isinstance(m.stages[0].blocks[0], ShiftViTBlock) and m.stages[0].blocks[0].mixer.n_div == 4
    assert isinstance(m.stages[1].blocks[0].mixer, SplitShiftMixer)
    assert isinstance(m.stages[2].blocks[0].mixer, CycleMixer) and m.stages[2].blocks[0].mixer.kernel_size == 5
    assert "partial shift" in m.stage_mixers[0] and "kernel=5" in m.stage_mixers[2]


@pytest.mark.parametrize("name", list(NANO))
def test_nano_proposals(name):
    """About 1.1-1.3M parameters at 32x32 RGB and 28x28 grey (10 classes), one SGD step
    changes every parameter, and both sizes run."""
    torch.manual_seed(0)
    model = create_from_spec("spec:" + NANO[name], img_size=32, num_classes=NC)
    grey = create_from_spec("spec:" + NANO[name], img_size=28, in_chans=1, num_classes=NC)
    for m in (model, grey):
        assert 1.0e6 <= count_params(m) <= 1.3e6, (name, count_params(m))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model.train()(image(32, batch=4)), torch.arange(4))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        assert grey.eval()(image(28, chans=1)).shape == (2, NC)
