"""GFNet: the global filter mixer against the mixer contract (its affinity is the circulant
matrix of the filter's spatial kernel), the FFT MAC formulas of ``count_macs``, the GFNet
models (published sizes, the authors' architecture through their checkpoint layout, other
input sizes), and the ``gfilter`` specification mixer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixlab
import mixlab.models.gfnet  # noqa: F401  (registers the models, the layout and the spec mixer)
from mixlab.analysis import count_macs, count_params, profile_model
from mixlab.layers.pos import resample_abs_pos_embed
from mixlab.mixers.global_filter import GlobalFilter, resample_filter
from mixlab.models.gfnet import GFNet, GFNetBlock
from mixlab.weights import convert_state_dict, detect_format

C = 8


def close(actual, expected, atol=1e-10, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def random_filter(grid, dim=C, seed=0, dtype=torch.float64) -> GlobalFilter:
    """A global filter with O(1) random complex weights (the default init is 0.02·randn)."""
    g = torch.Generator().manual_seed(seed)
    m = GlobalFilter(dim, grid).to(dtype).eval()
    with torch.no_grad():
        m.complex_weight.copy_(torch.randn(m.complex_weight.shape, generator=g, dtype=dtype))
    return m


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------------
# (id, built grid, input shape): even and odd widths, rectangular grids, an input grid other
# than the built one (the filter is resampled), a 1x1 grid
CASES = [
    ("5x6", (5, 6), (2, 5, 6, C)),
    ("5x7-odd-width", (5, 7), (2, 5, 7, C)),
    ("4x4", (4, 4), (2, 4, 4, C)),
    ("built-6x6-run-5x7", (6, 6), (2, 5, 7, C)),
    ("built-3x3-run-8x4", (3, 3), (1, 8, 4, C)),
    ("1x1", (1, 1), (2, 1, 1, C)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward_float64(case):
    _, grid, shape = case
    m = random_filter(grid)
    x = randn(*shape)
    with torch.no_grad():
        y = m(x)
        ye = m.explicit_forward(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert y.abs().max() > 0.1  # the filter really acts
    close(ye, y)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explicit_forward_equals_forward_float32(case):
    """In float32 the FFT path and the N x N matrix product round differently: equal to a
    few float32 ulps of the output's scale."""
    _, grid, shape = case
    m = random_filter(grid, dtype=torch.float32)
    x = randn(*shape, dtype=torch.float32)
    with torch.no_grad():
        y = m(x)
        ye = m.explicit_forward(x)
    assert y.dtype == torch.float32
    scale = y.abs().max().item()
    close(ye, y, atol=2e-6 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_affinity_shape_and_kind(case):
    _, grid, shape = case
    m = random_filter(grid)
    x = randn(*shape)
    N = shape[1] * shape[2]
    A = m.affinity(x)
    assert A.shape == (shape[0], C, N, N)
    assert A.dtype == torch.float64 and torch.isfinite(A).all()
    assert m.values(x).shape == (shape[0], N, C)
    assert m.affinity_kind == "static" and m.exact_av is True
    # static: the same matrix for every sample and every input
    close(A[0], A[-1], atol=0)
    close(m.affinity(randn(*shape, seed=7)), A, atol=0)


def test_affinity_is_the_circulant_matrix_of_the_spatial_kernel():
    """A[c][i, j] = k_c((y_i - y_j) mod H, (x_i - x_j) mod W) with k_c = irfft2 of channel
    c's filter (backward normalisation): checked entry by entry."""
    H, W = 4, 5
    m = random_filter((H, W))
    A = m.affinity(randn(1, H, W, C))[0]
    w = torch.view_as_complex(m.complex_weight.detach())
    k = torch.fft.irfft2(w, s=(H, W), dim=(0, 1))  # (H, W, C)
    for i in range(H * W):
        for j in range(H * W):
            (yi, xi), (yj, xj) = divmod(i, W), divmod(j, W)
            close(A[:, i, j], k[(yi - yj) % H, (xi - xj) % W])
    # circulant: shifting both positions by the same offset (on the torus) changes nothing
    idx = torch.arange(H * W).reshape(H, W)
    shifted = idx.roll((1, 2), dims=(0, 1)).flatten()
    close(A[:, shifted][:, :, shifted], A, atol=0)


def test_all_pass_filter_is_the_identity_and_a_phase_ramp_is_a_shift():
    H, W = 4, 6
    m = GlobalFilter(C, (H, W)).double()
    with torch.no_grad():
        m.complex_weight.zero_()
        m.complex_weight[..., 0] = 1.0  # 1 + 0j at every frequency
    x = randn(2, H, W, C)
    with torch.no_grad():
        close(m(x), x)
        close(m.affinity(x)[0], torch.eye(H * W, dtype=torch.float64).expand(C, -1, -1))
        # e^{-2πi·kx/W}: a circular shift by one column
        kx = torch.arange(W // 2 + 1, dtype=torch.float64)
        phase = -2 * math.pi * kx / W
        m.complex_weight[..., 0] = torch.cos(phase)[None, :, None]
        m.complex_weight[..., 1] = torch.sin(phase)[None, :, None]
        close(m(x), x.roll(1, dims=2))
        A = m.affinity(x)[0, 0]
    # ... whose affinity is the permutation matrix reading position (y, x - 1)
    idx = torch.arange(H * W).reshape(H, W)
    expected = torch.zeros(H * W, H * W, dtype=torch.float64)
    expected[idx.flatten(), idx.roll(1, dims=1).flatten()] = 1.0
    close(A, expected, atol=1e-12)


def test_token_sequence_input_and_its_errors():
    m = random_filter((3, 4))
    x = randn(2, 3, 4, C)
    with torch.no_grad():
        close(m(x.reshape(2, 12, C)), m(x).reshape(2, 12, C))
        close(m.affinity(x.reshape(2, 12, C)), m.affinity(x))
    with pytest.raises(ValueError, match="3x4 grid"):
        m(randn(2, 13, C))


def test_half_precision_input_is_filtered_in_float32_and_returned_in_its_dtype():
    m = random_filter((4, 6), dtype=torch.float32)
    x = randn(2, 4, 6, C, dtype=torch.float32)
    with torch.no_grad():
        y = m(x.to(torch.bfloat16))
        ref = m(x.to(torch.bfloat16).float())
    assert y.dtype == torch.bfloat16
    close(y.float(), ref.to(torch.bfloat16).float(), atol=0, rtol=0)


def test_gradients_reach_the_filter():
    m = GlobalFilter(C, (5, 6))
    x = torch.randn(2, 5, 6, C, requires_grad=True)
    m(x).square().sum().backward()
    assert torch.isfinite(m.complex_weight.grad).all() and m.complex_weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# Other grids: the authors' resampling of the complex weights
# --------------------------------------------------------------------------------------------
def test_resample_filter_shapes_corners_and_constants():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(14, 8, C, 2, generator=g, dtype=torch.float64)
    assert resample_filter(w, (14, 14)) is w  # the built grid: the parameter itself
    r = resample_filter(w, (24, 24))
    assert r.shape == (24, 13, C, 2)
    # corners aligned: the four corner frequencies keep their values
    for a, b in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        close(r[a, b], w[a, b])
    # a rectangular grid gets W//2+1 columns
    assert resample_filter(w, (10, 7)).shape == (10, 4, C, 2)
    # bicubic interpolation keeps a constant filter constant
    const = torch.full((5, 4, C, 2), 0.7, dtype=torch.float64)
    close(resample_filter(const, (9, 13)), torch.full((9, 7, C, 2), 0.7, dtype=torch.float64))


def test_other_map_size_uses_the_resampled_filter_and_the_built_size_uses_the_parameter(monkeypatch):
    m = random_filter((6, 6))
    x = randn(2, 6, 6, C)
    with torch.no_grad():
        y_built = m(x)
        x2 = randn(2, 9, 10, C)
        y_other = m(x2)
        # the same layer with the resampled filter as its parameter, built for 9x10
        ref = GlobalFilter(C, (9, 10)).double()
        ref.complex_weight.copy_(resample_filter(m.complex_weight, (9, 10)))
        close(y_other, ref(x2))

    def refuse(*args, **kwargs):
        raise AssertionError("resampled")

    monkeypatch.setattr("mixlab.mixers.global_filter.resample_filter", refuse)
    with torch.no_grad():
        close(m(x), y_built)  # nothing is resampled at the built size
        with pytest.raises(AssertionError, match="resampled"):
            m(x2)


# --------------------------------------------------------------------------------------------
# MACs of FFTs (mixlab.analysis.count_macs)
# --------------------------------------------------------------------------------------------
class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fft_mac_formulas_on_single_ops(device):
    """By hand: a (2, 14, 14, 8) map, FFT over its 14 x 14 dims -> 2·8 = 16 signals."""
    x = torch.zeros(2, 14, 14, 8, device=device)
    spec = torch.zeros(2, 14, 8, 8, dtype=torch.complex64, device=device)
    w = torch.zeros(14, 8, 8, dtype=torch.complex64, device=device)
    # rfft2: n = 196 real points, ceil(log2 196) = 8
    assert count_macs(Fn(lambda t: torch.fft.rfft2(t, dim=(1, 2), norm="ortho")), x)[0] == 16 * 196 * 8
    # irfft2 from the one-sided 14 x 8 spectrum: n = 112, ceil(log2 112) = 7 (the authors' count)
    assert count_macs(Fn(lambda t: torch.fft.irfft2(t, s=(14, 14), dim=(1, 2))), spec)[0] == 16 * 112 * 7
    # a complex FFT costs twice a real one of the same length
    assert count_macs(Fn(lambda t: torch.fft.fft2(t.to(torch.complex64), dim=(1, 2))), x)[0] == 2 * 16 * 196 * 8
    # 1-D real FFT along one dim: 2·14·8 = 224 signals of 14 points, ceil(log2 14) = 4
    assert count_macs(Fn(lambda t: torch.fft.rfft(t, dim=1)), x)[0] == 224 * 14 * 4
    # complex x complex product: 4 MACs per element; complex x real scalar: 2; real x real: none
    assert count_macs(Fn(lambda t: t * w), spec)[0] == 4 * spec.numel()
    assert count_macs(Fn(lambda t: t * 2.0), spec)[0] == 2 * spec.numel()
    assert count_macs(Fn(lambda t: t * t), x)[0] == 0
    # a length-1 transform costs nothing
    assert count_macs(Fn(lambda t: torch.fft.rfft(t, dim=0)), torch.zeros(1, 5, device=device))[0] == 0


def test_global_filter_macs_on_meta():
    """rfft2 + filter product + irfft2 of one GFNet-XS layer (14 x 14 x 384)."""
    with torch.device("meta"):
        m = GlobalFilter(384, (14, 14))
        x = torch.zeros(1, 14, 14, 384)
    macs, per_module = count_macs(m, x)
    expected = 384 * 196 * 8 + 4 * 14 * 8 * 384 + 384 * 112 * 7
    assert macs == expected == 1_075_200


def test_linear_and_attention_counts_are_unchanged():
    """The added formulas touch FFTs and complex products only."""
    with torch.device("meta"):
        lin = nn.Linear(16, 32)
        x = torch.zeros(4, 16)
    assert count_macs(lin, x)[0] == 4 * 16 * 32
    assert count_macs(Fn(lambda t: t * 3.0 + t * t), x)[0] == 0


# --------------------------------------------------------------------------------------------
# The registered models: published sizes
# --------------------------------------------------------------------------------------------
# name -> (params M, GMACs, source). GFNet paper (Rao et al., NeurIPS 2021) ImageNet table and
# the authors' README (raoyongming/GFNet) for GFNet-H; GMACs with FFTs counted by the
# authors' rule (N·C·ceil(log2 N) per transform, mixlab.analysis.complexity).
PUBLISHED = {
    "gfnet_xs": (16, 2.9, "paper; README 2.8G"),
    "gfnet_s": (25, 4.5, "paper"),
    "gfnet_b": (43, 7.9, "paper"),
    "gfnet_h_ti": (15, 2.0, "README"),
    "gfnet_h_s": (32, 4.5, "README"),
    "gfnet_h_b": (54, 8.4, "README"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameters_and_gmacs(name):
    params, gmacs, _ = PUBLISHED[name]
    p = profile_model(name)
    assert abs(p.params / 1e6 - params) <= 0.01 * params, p.params
    assert abs(p.gmacs - gmacs) <= 0.05 * gmacs, p.gmacs
    assert p.output_shape == (1, 1000)


def test_the_authors_configurations(monkeypatch):
    with torch.device("meta"):
        xs, s = mixlab.create_model("gfnet_xs"), mixlab.create_model("gfnet_s")
        hti = mixlab.create_model("gfnet_h_ti")
    for m, depth in ((xs, 12), (s, 19)):
        assert len(m.stages) == 1 and len(m.stages[0].blocks) == depth
        blk = m.stages[0].blocks[0]
        assert blk.norm1.eps == 1e-6 and blk.mlp.fc1.out_features == 4 * 384
        assert tuple(blk.mixer.complex_weight.shape) == (14, 8, 384, 2)
        assert tuple(m.stem.proj.kernel_size) == (16, 16) and isinstance(blk.ls, nn.Identity)
    assert [s_.blocks[0].mixer.grid_size for s_ in hti.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    small = mixlab.create_model("gfnet_h_ti", img_size=32, depths=(1, 1, 1, 1))  # on the CPU, to read values
    assert torch.all(small.stages[2].blocks[0].ls.gamma == torch.tensor(1e-3))
    # the authors' main_gfnet.py configurations, as the registered functions pass them
    monkeypatch.setattr(mixlab.models.gfnet, "build", lambda cls, defaults, kwargs: defaults)
    configs = {n: getattr(mixlab.models.gfnet, n)() for n in PUBLISHED}
    assert configs["gfnet_xs"] == dict(patch_size=16, embed_dims=(384,), depths=(12,))
    assert configs["gfnet_s"] == dict(patch_size=16, embed_dims=(384,), depths=(19,))
    assert configs["gfnet_b"] == dict(patch_size=16, embed_dims=(512,), depths=(19,))
    assert configs["gfnet_h_ti"] == dict(patch_size=4, embed_dims=(64, 128, 256, 512), depths=(3, 3, 10, 3),
                                         layer_scale=1e-3)
    assert configs["gfnet_h_s"] == dict(patch_size=4, embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3),
                                        layer_scale=1e-5)
    assert configs["gfnet_h_b"] == dict(patch_size=4, embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3),
                                        layer_scale=1e-6)
    assert hti.no_weight_decay() <= {n for n, _ in hti.named_parameters()}
    assert detect_format(xs.state_dict()) == "mixlab" and detect_format(hti.state_dict()) == "mixlab"


# --------------------------------------------------------------------------------------------
# The authors' architecture, through their checkpoint layout
# --------------------------------------------------------------------------------------------
def authors_state_dict(dims, depths, patch, img, num_classes=10, seed=0) -> dict:
    """Random tensors under the authors' names and shapes (gfnet.py: GFNet for one stage,
    GFNetPyramid for several)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        scale = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * scale

    pyramid = len(dims) > 1
    side = img // patch
    sd = {}
    pe = "patch_embed.0" if pyramid else "patch_embed"
    sd[f"{pe}.proj.weight"], sd[f"{pe}.proj.bias"] = r(dims[0], 3, patch, patch, scale=0.1), r(dims[0])
    sd["pos_embed"] = r(1, side * side, dims[0], scale=0.3)
    for s, (d, depth) in enumerate(zip(dims, depths)):
        if s:
            side //= 2
            sd[f"patch_embed.{s}.proj.weight"] = r(d, dims[s - 1], 2, 2, scale=(4 * dims[s - 1]) ** -0.5)
            sd[f"patch_embed.{s}.proj.bias"] = r(d)
        for j in range(depth):
            p = f"blocks.{s}.{j}." if pyramid else f"blocks.{j}."
            for n in ("norm1", "norm2"):
                sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(d, scale=0.2), r(d)
            sd[p + "filter.complex_weight"] = r(side, side // 2 + 1, d, 2, scale=0.5)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * d, d), r(4 * d)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(d, 4 * d), r(d)
            if pyramid:
                sd[p + "gamma"] = r(d, scale=0.5)
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dims[-1], scale=0.2), r(dims[-1])
    sd["head.weight"], sd["head.bias"] = r(num_classes, dims[-1]), r(num_classes)
    return sd


def authors_forward(sd: dict, x: torch.Tensor, dims, depths, patch, pos_embed=None, filters=None) -> torch.Tensor:
    """The authors' network written out with functional ops on their state dict: token
    sequence (B, N, C), x + [gamma·] mlp(LN(irfft2(rfft2(LN(x))·w))) per block, LN, mean, head.
    ``pos_embed`` / ``filters`` replace the state dict's (resampled ones, for other sizes)."""
    pyramid = len(dims) > 1
    pe = "patch_embed.0" if pyramid else "patch_embed"
    y = F.conv2d(x, sd[f"{pe}.proj.weight"], sd[f"{pe}.proj.bias"], stride=patch)
    for s, (d, depth) in enumerate(zip(dims, depths)):
        if s:
            y = F.conv2d(y, sd[f"patch_embed.{s}.proj.weight"], sd[f"patch_embed.{s}.proj.bias"], stride=2)
        B, _, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        if s == 0:
            t = t + (pos_embed if pos_embed is not None else sd["pos_embed"])
        for j in range(depth):
            p = f"blocks.{s}.{j}." if pyramid else f"blocks.{j}."
            u = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6).reshape(B, h, w, d)
            cw = filters[p] if filters is not None else sd[p + "filter.complex_weight"]
            u = torch.fft.rfft2(u, dim=(1, 2), norm="ortho") * torch.view_as_complex(cw.contiguous())
            u = torch.fft.irfft2(u, s=(h, w), dim=(1, 2), norm="ortho").reshape(B, h * w, d)
            u = F.layer_norm(u, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            u = F.linear(F.gelu(F.linear(u, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            t = t + (sd[p + "gamma"] * u if pyramid else u)
        y = t.transpose(1, 2).reshape(B, d, h, w)
    t = F.layer_norm(y.flatten(2).transpose(1, 2), (dims[-1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(t.mean(1), sd["head.weight"], sd["head.bias"])


ARCHS = {
    "isotropic": dict(dims=(32,), depths=(2,), patch=16, img=64),
    "pyramid": dict(dims=(16, 24, 32, 40), depths=(1, 2, 1, 1), patch=4, img=64),
}


def _mixlab_from_authors(arch):
    cfg = ARCHS[arch]
    sd = authors_state_dict(cfg["dims"], cfg["depths"], cfg["patch"], cfg["img"])
    model = GFNet(img_size=cfg["img"], patch_size=cfg["patch"], embed_dims=cfg["dims"], depths=cfg["depths"],
                  num_classes=10, layer_scale=1e-3 if len(cfg["dims"]) > 1 else None).eval()
    model.load_state_dict(convert_state_dict(sd, model), strict=True)
    return sd, model, cfg


@pytest.mark.parametrize("arch", list(ARCHS))
def test_authors_checkpoint_layout_converts_and_gives_their_logits(arch):
    sd, model, cfg = _mixlab_from_authors(arch)
    assert detect_format(sd) == "authors-gfnet"
    assert detect_format(model.state_dict()) == "mixlab"
    x = randn(2, 3, cfg["img"], cfg["img"], dtype=torch.float32)
    with torch.no_grad():
        ours = model(x)
        theirs = authors_forward(sd, x, cfg["dims"], cfg["depths"], cfg["patch"])
    scale = max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    assert theirs.std() > 1e-2 * scale


@pytest.mark.parametrize("arch", list(ARCHS))
def test_another_input_size_resamples_position_embedding_and_filters(arch):
    """Built for 64, run at 96: the same as the authors' network given the position
    embedding resampled (mixlab's bicubic rule) and every filter resampled by the authors'
    fine-tuning rule (resample_filter)."""
    sd, model, cfg = _mixlab_from_authors(arch)
    size = 96
    side = size // cfg["patch"]
    pos = resample_abs_pos_embed(sd["pos_embed"], (side, side))
    filters = {}
    for k, v in sd.items():
        if k.endswith("filter.complex_weight"):
            stage = int(k.split(".")[1]) if len(cfg["dims"]) > 1 else 0
            s = side // 2 ** stage
            filters[k[: -len("filter.complex_weight")]] = resample_filter(v, (s, s))
    x = randn(1, 3, size, size, dtype=torch.float32)
    with torch.no_grad():
        ours = model(x)
        theirs = authors_forward(sd, x, cfg["dims"], cfg["depths"], cfg["patch"], pos_embed=pos, filters=filters)
    scale = max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max() <= 1e-4 * scale


def test_gfnet_xs_built_at_224_runs_at_160_and_is_unchanged_at_224():
    torch.manual_seed(0)
    model = mixlab.create_model("gfnet_xs", depths=(2,)).eval()  # two blocks keep the test fast
    x224, x160 = randn(1, 3, 224, 224, dtype=torch.float32), randn(1, 3, 160, 160, dtype=torch.float32)
    with torch.no_grad():
        out160 = model(x160)
        feats = model.forward_intermediates(x160)
        before = model(x224)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        again = model(x224)
    assert out160.shape == (1, 1000) and torch.isfinite(out160).all()
    assert feats[0].shape == (1, 384, 10, 10)
    close(again, before, atol=0, rtol=0)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing resampled in place


# --------------------------------------------------------------------------------------------
# The model API on small configurations
# --------------------------------------------------------------------------------------------
CONFIGS = {
    "isotropic": lambda **kw: GFNet(**{**dict(img_size=64, patch_size=8, embed_dims=(32,), depths=(2,),
                                              num_classes=10), **kw}),
    "pyramid": lambda **kw: GFNet(**{**dict(img_size=64, patch_size=4, embed_dims=(16, 24, 32, 48),
                                            depths=(1, 1, 2, 1), layer_scale=1e-3, num_classes=10), **kw}),
}


def build(name, **kw):
    torch.manual_seed(0)
    return CONFIGS[name](**kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_and_every_parameter_learns(name):
    model = build(name, drop_path_rate=0.1).train()
    assert count_params(model) < 1_000_000
    x = randn(2, 3, 64, 64, dtype=torch.float32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_intermediates_head_and_classifier_reset(name):
    model = build(name).eval()
    x = randn(2, 3, 64, 64, dtype=torch.float32)
    with torch.no_grad():
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x)
        logits = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
        close(logits, model(x), atol=1e-6, rtol=1e-5)
    last = model.feature_info[-1]
    assert feats.shape == (2, 64 // last["reduction"], 64 // last["reduction"], model.num_features)
    assert pre.shape == (2, model.num_features)
    assert len(maps) == len(model.feature_info) == len(model.stages)
    for f, info in zip(maps, model.feature_info):
        assert f.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    close(maps[-1].permute(0, 2, 3, 1), feats, atol=0, rtol=0)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name, size", [("isotropic", (72, 88)), ("pyramid", (68, 76)), ("pyramid", (32, 32))])
def test_other_and_odd_input_sizes(name, size):
    model = build(name).eval()
    with torch.no_grad():
        out = model(randn(1, 3, *size, dtype=torch.float32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_single_channel_and_input_errors():
    model = build("isotropic", in_chans=1).eval()
    with torch.no_grad():
        assert model(randn(2, 1, 64, 64, dtype=torch.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch size"):
        model(randn(1, 1, 60, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="divisible"):
        GFNet(img_size=60, patch_size=16)
    with pytest.raises(ValueError, match="same"):
        GFNet(embed_dims=(32, 64), depths=(2,))


# --------------------------------------------------------------------------------------------
# The specification mixer and the nano proposal
# --------------------------------------------------------------------------------------------
NANO_GFNET = "patch2 / gfilter:2x40:pos=abs / gfilter:3x80 / gfilter:4x160"


def test_gfilter_spec_builds_gfnet_blocks_for_each_stage_grid():
    m = mixlab.create_model("spec:patch2 / gfilter:1x16 / gfilter:2x32", img_size=32, num_classes=4)
    blocks = [b for s in m.stages for b in s.blocks]
    assert all(isinstance(b, GFNetBlock) for b in blocks)
    assert [b.mixer.grid_size for b in blocks] == [(16, 16), (8, 8), (8, 8)]
    assert m.stage_mixers[0] == "global filter (FFT)"
    with pytest.raises(ValueError, match="unknown option"):
        mixlab.create_model("spec:patch2 / gfilter:1x16:heads=2")


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_nano_gfnet_size(size, chans):
    with torch.device("meta"):
        n = count_params(mixlab.create_model("spec:" + NANO_GFNET, img_size=size, in_chans=chans, num_classes=10))
    assert 1.1e6 <= n <= 1.3e6, n


def test_nano_gfnet_trains_one_step():
    torch.manual_seed(0)
    model = mixlab.create_model("spec:" + NANO_GFNET, img_size=32, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
