"""Tests of the spatial mixers against the contract of ``mixlab.mixers.base``:

``explicit_forward(x) == forward(x)``, the shape and the properties of ``affinity(x)``,
``affinity_kind``, the error messages, and window attention's handling of padding.
"""
from __future__ import annotations

import math

import pytest
import torch

from mixlab.mixers import (Attention, ContainerMixer, DepthwiseConv, Pooling, TokenMixingMLP, WindowAttention,
                           expand_groups)

ATOL = 1e-10
ZERO_INIT = ("bias", "sa_weight", "alpha", "beta")


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-9)


def prepare(mixer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, eval mode, and every zero-initialised (or one-initialised) parameter set to
    random values so that no comparison can pass because a term is zero."""
    g = torch.Generator().manual_seed(seed + 1000)
    mixer = mixer.double().eval()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.rsplit(".", 1)[-1] in ZERO_INIT:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, p in mixer.named_parameters():
            assert p.abs().max() > 0, f"parameter {name} is still all zero"
    return mixer


# --------------------------------------------------------------------------------------------
# The cases: (id, factory, input shape, expected affinity groups G)
# --------------------------------------------------------------------------------------------
C = 16
CASES = [
    ("attention-map", lambda: Attention(C, num_heads=4), (2, 5, 6, C), 4),
    ("attention-tokens", lambda: Attention(C, num_heads=4), (2, 17, C), 4),
    ("window-8x8-w4", lambda: WindowAttention(C, 2, window_size=4, shift_size=0), (2, 8, 8, C), 2),
    ("window-8x8-w4-shift2", lambda: WindowAttention(C, 2, window_size=4, shift_size=2), (2, 8, 8, C), 2),
    ("window-9x11-w4-padded", lambda: WindowAttention(C, 2, window_size=4, shift_size=0), (2, 9, 11, C), 2),
    ("window-9x11-w4-shift2-padded", lambda: WindowAttention(C, 2, window_size=4, shift_size=2), (2, 9, 11, C), 2),
    ("window-3x3-smaller-than-w4", lambda: WindowAttention(C, 2, window_size=4, shift_size=2), (2, 3, 3, C), 2),
    ("window-3x6-smaller-on-one-side", lambda: WindowAttention(C, 2, window_size=4, shift_size=2), (2, 3, 6, C), 2),
    ("dwconv-k3", lambda: DepthwiseConv(C, kernel_size=3), (2, 7, 9, C), C),
    ("dwconv-k7", lambda: DepthwiseConv(C, kernel_size=7), (2, 7, 9, C), C),
    ("dwconv-k4-even", lambda: DepthwiseConv(C, kernel_size=4), (2, 7, 9, C), C),
    ("dwconv-k3-dilation2", lambda: DepthwiseConv(C, kernel_size=3, dilation=2), (2, 7, 9, C), C),
    ("dwconv-k4-dilation2", lambda: DepthwiseConv(C, kernel_size=4, dilation=2), (2, 7, 9, C), C),
    ("dwconv-k3-nobias", lambda: DepthwiseConv(C, kernel_size=3, bias=False), (2, 7, 9, C), C),
    ("pooling-3", lambda: Pooling(3), (2, 6, 7, C), 1),
    ("pooling-5", lambda: Pooling(5), (2, 6, 7, C), 1),
    ("container-dynamic+conv", lambda: ContainerMixer(C, 2, dynamic=True, static="conv", kernel_size=3),
     (2, 5, 6, C), C),
    ("container-conv-only", lambda: ContainerMixer(C, 2, dynamic=False, static="conv", kernel_size=3),
     (2, 5, 6, C), C),
    ("container-dynamic+dense", lambda: ContainerMixer(C, 2, dynamic=True, static="dense", num_tokens=30),
     (2, 5, 6, C), 2),
    ("container-dynamic+dense-2heads", lambda: ContainerMixer(C, 4, dynamic=True, static="dense", num_tokens=30,
                                                              static_heads=2), (2, 5, 6, C), 4),
    ("container-dynamic-only", lambda: ContainerMixer(C, 2, dynamic=True, static=None), (2, 5, 6, C), 2),
    ("container-convex", lambda: ContainerMixer(C, 2, dynamic=True, static="conv", kernel_size=5, mix="convex"),
     (2, 5, 6, C), C),
    ("container-free", lambda: ContainerMixer(C, 2, dynamic=True, static="conv", kernel_size=5, mix="free"),
     (2, 5, 6, C), C),
    ("container-dense-free", lambda: ContainerMixer(C, 2, dynamic=True, static="dense", num_tokens=30, mix="free"),
     (2, 5, 6, C), 2),
    ("token-mlp", lambda: TokenMixingMLP(30, 12, grid_size=(5, 6)), (2, 5, 6, C), C),
]
CASE_IDS = [c[0] for c in CASES]


def make(case, seed=0):
    _, factory, shape, groups = case
    torch.manual_seed(seed)
    mixer = prepare(factory(), seed)
    x = torch.randn(shape, dtype=torch.float64)
    return mixer, x, groups


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_explicit_forward_equals_forward(case):
    mixer, x, _ = make(case)
    with torch.no_grad():
        y = mixer(x)
        y_explicit = mixer.explicit_forward(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    close(y_explicit, y)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_affinity_shape(case):
    mixer, x, groups = make(case)
    N = math.prod(x.shape[1:-1])
    with torch.no_grad():
        A = mixer.affinity(x)
    assert A.shape == (x.shape[0], groups, N, N)
    assert A.dtype == torch.float64
    assert torch.isfinite(A).all()
    # the groups split the value channels evenly
    assert mixer.values(x).shape[-1] % groups == 0


# --------------------------------------------------------------------------------------------
# Properties of the affinities
# --------------------------------------------------------------------------------------------
ROW_STOCHASTIC = [c for c in CASES if c[0].startswith(("attention", "window", "container-dynamic-only"))]


@pytest.mark.parametrize("case", ROW_STOCHASTIC, ids=[c[0] for c in ROW_STOCHASTIC])
def test_attention_rows_sum_to_one(case):
    """Softmax rows; for window attention also with padding and shift: padded keys are
    masked out and the kept (real) keys still carry all of the weight."""
    mixer, x, _ = make(case)
    with torch.no_grad():
        A = mixer.affinity(x)
    assert (A >= 0).all()
    close(A.sum(-1), torch.ones(A.shape[:-1], dtype=A.dtype))


def _window_affinity_8x8(shift: int, batch: int):
    """Affinity of a 4x4-window attention on an 8x8 map, and the (64, 64) mask of position
    pairs that share an unshifted window."""
    torch.manual_seed(0)
    m = prepare(WindowAttention(C, 2, window_size=4, shift_size=shift))
    x = torch.randn(batch, 8, 8, C, dtype=torch.float64)
    with torch.no_grad():
        A = m.affinity(x)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    win = (ys // 4 * 2 + xs // 4).flatten()  # window id of each position
    return A, win[:, None] == win[None, :]


def test_window_attention_unshifted_is_block_diagonal():
    A, same = _window_affinity_8x8(shift=0, batch=2)
    assert (A[..., ~same] == 0).all(), "attention leaks outside the query's window"
    assert (A[..., same] > 0).all(), "attention must be positive everywhere inside the window"
    close(A.sum(-1), torch.ones(2, 2, 64, dtype=torch.float64))


def test_window_attention_shifted_differs_from_unshifted_pattern():
    """The shifted layer's affinity has non-zeros across the unshifted window borders."""
    A, same = _window_affinity_8x8(shift=2, batch=1)
    assert (A[..., ~same] != 0).any()


def test_dwconv_centre_row_holds_the_kernel_taps():
    torch.manual_seed(0)
    m = prepare(DepthwiseConv(C, kernel_size=3))
    x = torch.randn(2, 7, 7, C, dtype=torch.float64)
    with torch.no_grad():
        A = m.affinity(x)
    assert A.shape == (2, C, 49, 49)
    centre = 3 * 7 + 3
    row = A[:, :, centre]  # (B, C, 49)
    expected = torch.zeros(C, 49, dtype=torch.float64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            expected[:, (3 + dy) * 7 + (3 + dx)] = m.conv.weight[:, 0, dy + 1, dx + 1]
    close(row, expected.expand(2, -1, -1), atol=0)
    assert int((row[0] != 0).sum(-1).max()) == 9


def test_dwconv_corner_row_is_truncated_by_zero_padding():
    torch.manual_seed(0)
    m = prepare(DepthwiseConv(C, kernel_size=3))
    x = torch.randn(1, 7, 7, C, dtype=torch.float64)
    with torch.no_grad():
        row = m.affinity(x)[0, :, 0]  # top-left output position
    w = m.conv.weight[:, 0]
    expected = torch.zeros(C, 49, dtype=torch.float64)
    for ky in (1, 2):
        for kx in (1, 2):
            expected[:, (ky - 1) * 7 + (kx - 1)] = w[:, ky, kx]
    close(row, expected, atol=0)


def test_pooling_rows_sum_to_zero():
    m = Pooling(3)
    x = torch.randn(2, 6, 7, 4, dtype=torch.float64)
    A = m.affinity(x)
    close(A.sum(-1), torch.zeros(2, 1, 42, dtype=torch.float64))
    # interior row: 1/9 on the 3x3 neighbourhood, -8/9 on the diagonal
    i = 2 * 7 + 3
    assert A[0, 0, i, i].item() == pytest.approx(1 / 9 - 1)
    assert A[0, 0, i, i + 1].item() == pytest.approx(1 / 9)
    # corner row: 4 positions counted (padding excluded)
    assert A[0, 0, 0, 0].item() == pytest.approx(1 / 4 - 1)


CONTAINER_MIXED = [c for c in CASES if c[0].startswith("container") and c[0] not in
                   ("container-conv-only", "container-dynamic-only")]


@pytest.mark.parametrize("case", CONTAINER_MIXED, ids=[c[0] for c in CONTAINER_MIXED])
def test_container_affinity_is_the_mix(case):
    mixer, x, groups = make(case)
    with torch.no_grad():
        alpha, beta = mixer.mix_weights()
        D = mixer.dynamic_affinity(x)
        S = mixer.static_affinity(x)
        A = mixer.affinity(x)
    if mixer.mix == "convex":
        close(alpha + beta, torch.ones((), dtype=torch.float64))
        close(alpha, torch.sigmoid(mixer.sa_weight.detach())[0])
    else:
        close(alpha, mixer.alpha.detach()[0])
        close(beta, mixer.beta.detach()[0])
    assert float(alpha.detach()) != 0 and float(beta.detach()) != 0  # both parts really contribute
    D_exp = D.repeat_interleave(groups // D.shape[1], dim=1)
    S_exp = S.repeat_interleave(groups // S.shape[1], dim=1)
    close(A, alpha * D_exp + beta * S_exp)
    close(A, alpha * expand_groups(D, groups) + beta * expand_groups(S, groups))


def test_container_single_part_mix_weights():
    dyn = prepare(ContainerMixer(C, 2, dynamic=True, static=None))
    stat = prepare(ContainerMixer(C, 2, dynamic=False, static="conv", kernel_size=3))
    x = torch.randn(1, 4, 5, C, dtype=torch.float64)
    assert [float(t) for t in dyn.mix_weights()] == [1.0, 0.0]
    assert [float(t) for t in stat.mix_weights()] == [0.0, 1.0]
    with torch.no_grad():
        close(dyn.affinity(x), dyn.dynamic_affinity(x))
        close(stat.affinity(x), stat.static_affinity(x))


def test_container_static_conv_affinity_matches_dwconv():
    """The Container's convolution affinity is the same Toeplitz matrix as DepthwiseConv's."""
    torch.manual_seed(0)
    cm = prepare(ContainerMixer(C, 2, dynamic=False, static="conv", kernel_size=5))
    dw = prepare(DepthwiseConv(C, kernel_size=5))
    with torch.no_grad():
        dw.conv.weight.copy_(cm.conv.weight)
    x = torch.randn(1, 6, 7, C, dtype=torch.float64)
    with torch.no_grad():
        close(cm.static_affinity(x), dw.affinity(x))


@pytest.mark.parametrize("dynamic", [True, False], ids=["mixed", "conv-only"])
def test_container_even_kernel(dynamic):
    torch.manual_seed(0)
    m = prepare(ContainerMixer(C, 2, dynamic=dynamic, static="conv", kernel_size=4))
    x = torch.randn(1, 6, 6, C, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        assert y.shape == x.shape
        close(m.explicit_forward(x), y)


@pytest.mark.parametrize("heads, static_heads", [(4, 3), (4, 6)], ids=["4-heads-3-static", "4-heads-6-static"])
def test_container_dense_static_heads_not_nested(heads, static_heads):
    torch.manual_seed(0)
    m = prepare(ContainerMixer(12, heads, dynamic=True, static="dense", num_tokens=30, static_heads=static_heads))
    x = torch.randn(1, 5, 6, 12, dtype=torch.float64)
    with torch.no_grad():
        close(m.explicit_forward(x), m(x))


# --------------------------------------------------------------------------------------------
# affinity_kind
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer, kind", [
    (Attention(C, 4), "dynamic"),
    (WindowAttention(C, 2, 4), "dynamic"),
    (WindowAttention(C, 2, 4, 2), "dynamic"),
    (DepthwiseConv(C, 3), "static"),
    (Pooling(3), "static"),
    (TokenMixingMLP(30, 12), "static"),
    (ContainerMixer(C, 2, dynamic=True, static="conv"), "mixed"),
    (ContainerMixer(C, 2, dynamic=True, static="dense", num_tokens=30), "mixed"),
    (ContainerMixer(C, 2, dynamic=False, static="conv"), "static"),
    (ContainerMixer(C, 2, dynamic=True, static=None), "dynamic"),
], ids=["attention", "window", "window-shifted", "dwconv", "pooling", "token-mlp", "container-mixed-conv",
        "container-mixed-dense", "container-static", "container-dynamic"])
def test_affinity_kind(mixer, kind):
    assert mixer.affinity_kind == kind


def test_exact_av_flags():
    assert TokenMixingMLP(30, 12).exact_av is False
    for m in (Attention(C, 4), WindowAttention(C, 2, 4), DepthwiseConv(C, 3), Pooling(3),
              ContainerMixer(C, 2)):
        assert m.exact_av is True


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_token_mlp_rejects_other_token_count():
    m = TokenMixingMLP(30, 12, grid_size=(5, 6))
    x = torch.randn(1, 5, 7, 8)
    with pytest.raises(ValueError, match="img_size"):
        m(x)
    with pytest.raises(ValueError, match="img_size"):
        m.affinity(x)


def test_dense_container_rejects_other_token_count():
    m = ContainerMixer(C, 2, dynamic=True, static="dense", num_tokens=30)
    x = torch.randn(1, 5, 7, C)
    with pytest.raises(ValueError, match="img_size"):
        m(x)
    with pytest.raises(ValueError, match="img_size"):
        m.affinity(x)


def test_attention_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        WindowAttention(10, 3, 4)
    with pytest.raises(ValueError, match="divisible"):
        ContainerMixer(10, 3)


@pytest.mark.parametrize("window, shift", [(4, 4), (4, 5), (7, 7), ((4, 6), (1, 6))],
                         ids=["shift=window", "shift>window", "7-7", "rect-shift=window-w"])
def test_window_shift_must_be_smaller_than_window(window, shift):
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(C, 2, window_size=window, shift_size=shift)


def test_container_bad_configurations():
    with pytest.raises(ValueError):
        ContainerMixer(C, 2, dynamic=False, static=None)
    with pytest.raises(ValueError):
        ContainerMixer(C, 2, static="bogus")
    with pytest.raises(ValueError):
        ContainerMixer(C, 2, mix="bogus")
    with pytest.raises(ValueError, match="num_tokens"):
        ContainerMixer(C, 2, static="dense")


def test_pooling_rejects_even_size():
    with pytest.raises(ValueError, match="odd"):
        Pooling(4)


def test_mixer_rejects_bad_rank():
    with pytest.raises(ValueError, match="shape"):
        Attention(C, 4)(torch.randn(C))


# --------------------------------------------------------------------------------------------
# Window attention and padding
# --------------------------------------------------------------------------------------------
def window_attention_reference(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin's (shifted) window attention written position by position in the original
    coordinates, with padding ignored: query (y, x) sees the real keys that share its
    window and its region in the cyclically shifted, padded frame."""
    B, H, W, Cx = x.shape
    win, shift = m.window_and_shift(H, W)
    wh, ww = win
    sh, sw = shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    heads, d = m.num_heads, m.head_dim
    qkv = m.qkv(x).reshape(B, H, W, 3, heads, d)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    table = m.relative_position_bias_table  # ((2*Wh-1)*(2*Ww-1), heads) of the *configured* window
    Th, Tw = m.window_size

    def region(c, size, w, s):
        if not s:
            return 0
        return 0 if c < size - w else (1 if c < size - s else 2)

    def frame(y, x_):  # coordinates in the shifted, padded frame
        sy, sx = (y - sh) % Hp, (x_ - sw) % Wp
        return sy, sx, (sy // wh, sx // ww), (region(sy, Hp, wh, sh), region(sx, Wp, ww, sw))

    info = {(y, x_): frame(y, x_) for y in range(H) for x_ in range(W)}
    out = torch.zeros(B, H, W, heads, d, dtype=x.dtype)
    for (y, x_), (sy, sx, wq, rq) in info.items():
        keys = [(ky, kx) for (ky, kx), (_, _, wk, rk) in info.items() if wk == wq and rk == rq]
        kk = torch.stack([k[:, ky, kx] for ky, kx in keys], dim=2)  # (B, heads, n, d)
        vv = torch.stack([v[:, ky, kx] for ky, kx in keys], dim=2)
        bias = []
        for ky, kx in keys:
            ty, tx = info[(ky, kx)][:2]
            dy, dx = sy % wh - ty % wh, sx % ww - tx % ww
            bias.append(table[(dy + Th - 1) * (2 * Tw - 1) + (dx + Tw - 1)])
        bias = torch.stack(bias, dim=-1)  # (heads, n)
        logits = (q[:, y, x_].unsqueeze(2) * kk).sum(-1) * m.scale + bias  # (B, heads, n)
        out[:, y, x_] = (logits.softmax(-1).unsqueeze(-1) * vv).sum(2)
    return m.proj(out.reshape(B, H, W, Cx))


@pytest.mark.parametrize("size, window, shift", [
    ((9, 9), 4, 0), ((9, 9), 4, 2), ((9, 11), 4, 2), ((8, 8), 4, 2), ((3, 6), 4, 2), ((10, 7), (4, 3), (2, 1)),
], ids=["9x9-w4", "9x9-w4-s2", "9x11-w4-s2", "8x8-w4-s2", "3x6-w4-s2", "10x7-w4x3-s2x1"])
def test_window_attention_matches_reference_and_ignores_padding(size, window, shift):
    torch.manual_seed(0)
    m = prepare(WindowAttention(C, 2, window_size=window, shift_size=shift))
    x = torch.randn(2, *size, C, dtype=torch.float64)
    with torch.no_grad():
        close(m(x), window_attention_reference(m, x))


def test_window_attention_perturbation_reaches_exactly_the_affinity_readers():
    """On a padded, shifted 9x9 map, changing the input at the last real position (8, 8)
    changes exactly the outputs whose affinity row reads (8, 8), nothing else."""
    torch.manual_seed(0)
    m = prepare(WindowAttention(C, 2, window_size=4, shift_size=2))
    x = torch.randn(1, 9, 9, C, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        # the last real row/column must only see real keys: perturbing position (8, 8)
        # changes no output outside its (shifted) window group
        x2 = x.clone()
        x2[0, 8, 8] += 1.0
        y2 = m(x2)
        A = m.affinity(x)
    changed = (y2 - y).abs().amax(-1)[0].flatten() > 0
    readers = A[0, :, :, 8 * 9 + 8].abs().amax(0) > 0  # queries that attend to (8, 8)
    assert torch.equal(changed, readers)


@pytest.mark.parametrize("size", [(9, 9), (9, 11), (3, 3)], ids=["9x9", "9x11", "3x3"])
def test_window_attention_padded_shifted_gradients(size):
    torch.manual_seed(0)
    m = WindowAttention(C, 2, window_size=4, shift_size=2).train()
    x = torch.randn(2, *size, C, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert m.relative_position_bias_table.grad.abs().sum() > 0


def test_every_mixer_is_exported_from_the_package():
    """Every subclass of ``Mixer`` defined in a module of ``mixlab.mixers`` is in ``mixlab.mixers.__all__``
    (and so importable as ``from mixlab.mixers import Name``)."""
    import importlib
    import inspect
    import pkgutil

    import mixlab.mixers as package
    from mixlab.mixers.base import Mixer

    defined = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        defined |= {name for name, obj in vars(module).items()
                    if inspect.isclass(obj) and issubclass(obj, Mixer) and obj.__module__ == module.__name__}
    assert len(defined) > 30  # the walk found the modules
    assert sorted(defined - set(package.__all__)) == []
    assert all(getattr(package, name).__name__ == name for name in defined)
