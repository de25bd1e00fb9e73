"""LR-Net: the local relation layer against the mixer contract and a direct per-window
computation (borders, strides, uneven channel groups); the size of ``lrnet_50`` against the
paper's Table 1; the model API on a tiny configuration; the ``localrelation`` spec mixer and
the ``nano_lrnet`` arena model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixlab
import mixlab.models.lrnet  # noqa: F401  (registers the models and the spec mixer)
from mixlab.analysis import count_macs, count_params
from mixlab.mixers.local_relation import LocalRelation
from mixlab.models.lrnet import LRBlock, LRNet, LRStem
from test_parity import _fast_init, randomize_  # noqa: F401
from test_nano import mixer_calls


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def layer(C, k, m, stride=1, seed=0, composability="sqdiff") -> LocalRelation:
    torch.manual_seed(seed)
    return randomize_(LocalRelation(C, k, m, stride, composability=composability), seed).double().eval()


# --------------------------------------------------------------------------------------------
# Published size and configuration
# --------------------------------------------------------------------------------------------
def test_lrnet_50_parameters_and_gmacs():
    """Table 1: 23.3M parameters, 4.3 GFLOPs (ResNet-50 in the same table: 25.5M, 4.3). Measured
    23.37M and 4.03 GMACs (ResNet-50 counted the same way: 4.09), the window products included."""
    with torch.device("meta"):
        m = mixlab.create_model("lrnet_50")
        x = torch.empty(1, 3, 224, 224)
        n, macs = count_params(m), count_macs(m, x)[0]
        assert m(x).shape == (1, 1000)
    assert abs(n / 1e6 - 23.3) <= 0.01 * 23.3, n
    assert abs(macs / 1e9 - 4.03) <= 0.01 * 4.03, macs


def test_lrnet_50_configuration():
    with torch.device("meta"):
        m = mixlab.create_model("lrnet_50")
    assert isinstance(m.stem, LRStem) and m.stem.conv.kernel_size == (1, 1) and m.stem.conv.out_channels == 64
    assert (m.stem.mixer.kernel_size, m.stem.mixer.stride, m.stem.mixer.groups) == (7, 2, 8)
    assert [len(s.blocks) for s in m.stages] == [3, 4, 6, 3]
    assert all(isinstance(b, LRBlock) for s in m.stages for b in s.blocks)
    first = [s.blocks[0] for s in m.stages]
    assert [b.mixer.dim for b in first] == [100, 200, 400, 800]
    assert [b.mixer.groups for b in first] == [13, 25, 50, 100]  # m = 8: the last of 100 channels' groups has 4
    assert [b.mixer.stride for b in first] == [1, 2, 2, 2] and first[0].mixer.kernel_size == 7
    assert [b.conv3.out_channels for b in first] == [256, 512, 1024, 2048]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]


# --------------------------------------------------------------------------------------------
# The mixer contract and the direct computation
# --------------------------------------------------------------------------------------------
CASES = [  # (id, C, k, m, stride, (B, H, W))
    ("even-groups-3x3", 16, 3, 8, 1, (2, 5, 6)),
    ("uneven-groups-5x5", 20, 5, 8, 1, (2, 6, 5)),
    ("stride2-odd-map", 16, 5, 4, 2, (1, 7, 5)),
    ("stride2-uneven", 12, 3, 8, 2, (2, 6, 6)),
    ("kernel-larger-than-map", 12, 7, 4, 1, (1, 3, 4)),
    ("1x1-map", 8, 7, 8, 1, (2, 1, 1)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("composability", LocalRelation.COMPOSABILITY)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward(case, composability):
    _, C, k, m, s, (B, H, W) = case
    lr = layer(C, k, m, s, composability=composability)
    x = randn(B, H, W, C)
    with torch.no_grad():
        y = lr(x)
        close(lr.explicit_forward(x), y)
        A = lr.affinity(x)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    G = C // m if C % m == 0 else C
    assert y.shape == (B, Ho, Wo, C) and A.shape == (B, G, Ho * Wo, H * W)
    assert lr.values(x).shape == (B, H * W, C)
    assert lr.affinity_kind == "mixed" and lr.exact_av is True


@pytest.mark.parametrize("composability", LocalRelation.COMPOSABILITY)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_against_a_direct_per_window_computation(case, composability):
    """For each output position p' = (s·i, s·j): softmax over the in-image taps p of its k x k
    window of Φ(q_g(p'), k_g(p)) + f_g(p - p'), Φ = -(q - k)² (the paper's) or q·k, zero weight
    elsewhere (taps outside the image do not count); channel c uses group c // m; then the 1x1
    projection."""
    _, C, k, m, s, (B, H, W) = case
    lr = layer(C, k, m, s, composability=composability)
    phi = (lambda a, b: -(a - b) ** 2) if composability == "sqdiff" else (lambda a, b: a * b)
    x = randn(B, H, W, C)
    r = k // 2
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    with torch.no_grad():
        q, key = lr.query(x), lr.key(x)  # (B, H, W, G)
        A = torch.zeros(B, lr.groups, Ho * Wo, H * W, dtype=torch.float64)
        for i in range(Ho):
            for j in range(Wo):
                cy, cx = i * s, j * s
                taps = [(cy + dy, cx + dx, dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                        if 0 <= cy + dy < H and 0 <= cx + dx < W]
                prior = lr.prior(torch.tensor([[dy, dx] for _, _, dy, dx in taps], dtype=torch.float64))
                logits = torch.stack([phi(q[:, cy, cx], key[:, y, x]) for y, x, _, _ in taps], -1) + prior.t()
                w = logits.softmax(-1)  # (B, G, taps)
                for t, (y, x_, _, _) in enumerate(taps):
                    A[:, :, i * Wo + j, y * W + x_] = w[:, :, t]
        Ac = A[:, torch.arange(C) // m]  # per channel
        y_ref = lr.proj(torch.einsum("bcnm,bmc->bnc", Ac, x.reshape(B, H * W, C))).reshape(B, Ho, Wo, C)
        close(lr(x), y_ref)
        ours = lr.affinity(x)
        close(ours, A if C % m == 0 else Ac)
        close(ours.sum(-1), torch.ones(ours.shape[:-1], dtype=torch.float64))
        assert (ours >= 0).all()


@pytest.mark.parametrize("composability", LocalRelation.COMPOSABILITY)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_of_the_hand_written_window_sum(case, composability):
    """forward's window sum has a hand-written backward (one gradient buffer for the k² shifted
    views): finite differences agree with it for the input (which reaches the weights through
    the queries and keys and the values directly), and autograd through the literal A·V
    computation gives the same gradients for the input and every parameter."""
    _, C, k, m, s, (B, H, W) = case
    lr = layer(C, k, m, s, composability=composability).train()
    x = randn(B, H, W, C).requires_grad_()
    if x.numel() <= 600:  # the small cases (strides, uneven groups, clipped windows): finite differences are slow
        assert torch.autograd.gradcheck(lr, (x,), eps=1e-6, atol=1e-6)
    g = randn(*lr(x).shape, seed=3)
    params = [x, *lr.parameters()]
    ours = torch.autograd.grad((lr(x) * g).sum(), params)
    literal = torch.autograd.grad((lr.explicit_forward(x) * g).sum(), params)
    for a, b in zip(ours, literal):
        close(a, b)


def test_count_macs_adds_the_window_products_to_the_layer_and_every_module_above_it():
    """The window products are elementwise (invisible to torch's counter): the layer states
    them, k² per group for Φ and k² per channel for the sum, at every output position."""
    B, H, W, C, k, m = 2, 5, 6, 16, 3, 8
    lr = LocalRelation(C, k, m)
    G, hidden, L = C // m, lr.prior[0].out_features, H * W
    linear = B * L * C * G * 2 + k * k * (2 * hidden + hidden * G) + B * L * C * C  # query, key, prior, proj
    assert count_macs(lr, torch.randn(B, H, W, C))[0] == linear + B * L * k * k * (G + C)
    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    total, per_module = count_macs(model, x)
    calls = mixer_calls(model, x, LocalRelation)
    assert per_module[""] == total and len(calls) == 3  # the stem's layer and one per stage
    for name, (mixer, inp, _) in calls.items():
        assert per_module[name] == count_macs(mixer, inp)[0]  # the layer's own MACs, stated ones included
    assert per_module["stem"] + per_module["stages.0"] + per_module["stages.1"] + per_module["head"] == total
    assert "stages" not in per_module  # a ModuleList is never called: the counter's own figures leave it out too


def test_geometry_prior_is_static_and_offsets_are_centred():
    lr = layer(16, 5, 8)
    off = lr.offsets()
    assert off.shape == (25, 2) and off[12].tolist() == [0, 0] and off[0].tolist() == [-2, -2]
    assert off[1].tolist() == [-2, -1]  # row-major: Δx runs fastest, as F.unfold's taps
    gp = lr.geometry_prior()
    assert gp.shape == (2, 25)
    with torch.no_grad():
        w1, w2 = lr.window_weights(randn(1, 4, 4, 16)), lr.window_weights(randn(1, 4, 4, 16, seed=5))
    assert not torch.allclose(w1, w2)  # the appearance term depends on the input


def test_layer_refuses_bad_arguments_and_input():
    with pytest.raises(ValueError, match="odd"):
        LocalRelation(16, 4)
    with pytest.raises(ValueError, match="m .* must be in 1..16"):
        LocalRelation(16, 3, m=0)
    with pytest.raises(ValueError, match="stride"):
        LocalRelation(16, 3, stride=0)
    with pytest.raises(ValueError, match="composability must be one of"):
        LocalRelation(16, 3, composability="cosine")
    lr = LocalRelation(16, 3)
    with pytest.raises(ValueError, match="built for 16 channels"):
        lr(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) map"):
        lr(torch.randn(1, 16, 16))


# --------------------------------------------------------------------------------------------
# The model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def tiny(**kw) -> LRNet:
    torch.manual_seed(0)
    return LRNet(**{**dict(img_size=32, depths=(1, 1), widths=(8, 16), out_widths=(16, 32), stem_width=8,
                           kernel_size=3, m=4, num_classes=10), **kw})


def test_forward_backward_every_parameter_learns():
    model = randomize_(tiny(), 0).train()  # random BN scales: the zero-initialised last BNs would hide the branches
    out = model(randn(2, 3, 32, 32, dtype=torch.float32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    assert not bad


def test_features_intermediates_and_any_size():
    model = tiny().eval()
    with torch.no_grad():
        maps = model.forward_intermediates(randn(1, 3, 32, 32, dtype=torch.float32))
        assert [tuple(f.shape) for f in maps] == [(1, 16, 8, 8), (1, 32, 4, 4)]
        assert model(randn(1, 3, 36, 20, dtype=torch.float32)).shape == (1, 10)
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="same length"):
        tiny(out_widths=(16,))
    with pytest.raises(TypeError, match="did you mean"):
        mixlab.create_model("lrnet_50", kernel=7)


# --------------------------------------------------------------------------------------------
# spec mixer and nano_lrnet
# --------------------------------------------------------------------------------------------
def test_spec_mixer():
    model = mixlab.create_model("spec:patch2 / localrelation:1x32:kernel=3,m=4", img_size=8, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    blk = model.stages[0].blocks[0]
    assert isinstance(blk, LRBlock) and (blk.mixer.dim, blk.mixer.kernel_size, blk.mixer.m) == (8, 3, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        mixlab.create_model("spec:patch2 / localrelation:1x30", img_size=8)


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1), (16, 3)])
def test_nano_lrnet_size_and_forward(size, chans):
    with torch.device("meta"):
        m = mixlab.create_model("nano_lrnet", img_size=size, in_chans=chans)
        assert m(torch.empty(2, chans, size, size)).shape == (2, 10)
    assert 1.0e6 <= count_params(m) <= 1.3e6, count_params(m)


def test_nano_lrnet_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("nano_lrnet", img_size=16, in_chans=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 1, 16, 16), torch.arange(2)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
        assert mixlab.create_model("nano_lrnet", img_size=28, in_chans=1).eval()(torch.randn(1, 1, 28, 28)).shape \
            == (1, 10)


def test_every_mixer_of_nano_lrnet_keeps_the_contract():
    """As tests/test_nano.py checks every nano model: the input each mixer really sees at 16x16."""
    torch.manual_seed(0)
    model = mixlab.create_model("nano_lrnet", img_size=16).eval()
    seen = mixer_calls(model, torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        assert len(seen) == 8
        for key, (mixer, x, out) in seen.items():
            A = mixer.affinity(x)
            # one row per output position (fewer than the inputs in strided layers), one column per value
            assert A.shape[-2] == out.shape[1] * out.shape[2] and A.shape[-1] == mixer.values(x).shape[1], key
            torch.testing.assert_close(mixer.explicit_forward(x), out, atol=2e-5, rtol=1e-4)
