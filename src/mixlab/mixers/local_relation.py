"""The local relation layer, LR-Net's mixer (Hu, Zhang, Xie, Lin, ICCV 2019, "Local Relation
Networks for Image Recognition", arXiv 1904.11491; the authors' later CUDA operator in
microsoft/Swin-Transformer, branch LR-Net, ``ops/local_relation``, which fixed how windows
at the border and strides are handled).

Output position p' (a query) aggregates the k x k window Ω(p') of the input around it,

    y_c(p') = Σ_{p ∈ Ω(p')} ω_g(p', p) · x_c(p),   g = c // m   (channel sharing),
    ω_g(p', ·) = softmax_{p ∈ Ω(p')} ( Φ(q_g(p'), k_g(p)) + f_g(p - p') ),

then a 1x1 projection W, part of the layer (Fig. 2 of the paper ends the layer with a 1x1):

* appearance composability Φ: the query and key are 1x1 projections ("channel transformation
  layers") of x to C/m channels, one per aggregation group; Φ is the negative squared
  difference -(q - k)² (``composability="sqdiff"``, the default: the form readers of the
  paper's Sec. 3 give), or the scalar product q·k (``"dot"``, the CUDA operator's default
  ``sim_method=0``); the per-group embedding has one channel, so no 1/sqrt(d) scale;
* geometry prior f(p - p'): a small network of two 1x1 layers with a ReLU between them, on
  the relative position (Δy, Δx) of the window tap, to one logit per group (C/m); static,
  the same for every image; its hidden width (default max(1, G // 2)) is not given in the
  paper;
* channel sharing: the C value channels (the input itself: there is no value transform)
  fall into G = ceil(C/m) groups of m consecutive channels that share one aggregation
  (LR-Net-50's width 100 is not a multiple of m = 8: its last group has 4 channels);
* borders: taps outside the image take no part (the softmax runs over the in-image taps
  only: the CUDA operator gives them the logit -100, this layer excludes them exactly);
* stride s: queries at input positions (0, s, 2s, ...), windows centred there, as the
  CUDA operator does; the output is ceil(H/s) x ceil(W/s).

:meth:`LocalRelation.forward` unfolds the keys (G = C/m channels, a small copy) to get
the logits of every window tap at once, then runs the window sum over the k² taps: for
each, the weighted shifted view of the zero-padded input is added into the output
(elementwise work on views, with no unfolded (B, C·k², L) copy of the input, and a
hand-written backward); taps outside the image have weight zero (their logit is -inf). :meth:`affinity` scatters the window weights into the
dense (B, G, N_out, N_in) matrix, zero outside each window (with G = C, each channel's copy
of its group's weights, when the groups are uneven). ``explicit_forward == forward``
exactly.

MACs: the window products are elementwise, which ``torch.utils.flop_counter`` does not
count, so the layer states them (:meth:`LocalRelation.formula_macs`, added by
:func:`mixlab.analysis.count_macs`): per output position, k² for Φ per group (one product
per tap) and k² per channel for the aggregation, every tap of the window counted (as a
k x k convolution counts its padding).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, flatten_tokens

__all__ = ["LocalRelation"]


class LocalRelation(Mixer):
    """The local relation layer on a (B, H, W, C) map; returns (B, ceil(H/s), ceil(W/s), C).

    ``kernel_size`` k (odd), ``m`` channels per aggregation group, ``stride`` s,
    ``prior_hidden`` the geometry MLP's hidden width (default max(1, G // 2)),
    ``proj_bias`` a bias on the final 1x1 projection (off: a BatchNorm follows in LR-Net),
    ``composability`` Φ: ``"sqdiff"`` -(q - k)² (the paper's, default) or ``"dot"`` q·k.
    """

    affinity_kind = "mixed"  # dynamic appearance term + static geometry prior, inside a static window
    exact_av = True

    COMPOSABILITY = ("sqdiff", "dot")

    def __init__(self, dim: int, kernel_size: int = 7, m: int = 8, stride: int = 1, prior_hidden: int | None = None,
                 proj_bias: bool = False, composability: str = "sqdiff"):
        super().__init__()
        if composability not in self.COMPOSABILITY:
            raise ValueError(f"composability must be one of {self.COMPOSABILITY} (negative squared difference, "
                             f"scalar product), got {composability!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number (a window centred on its query), "
                             f"got {kernel_size}")
        if not 1 <= m <= dim:
            raise ValueError(f"m (channels per aggregation group) must be in 1..{dim}, got {m}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.dim, self.kernel_size, self.m, self.stride = dim, kernel_size, m, stride
        self.composability = composability
        self.groups = math.ceil(dim / m)
        self.scale = 1.0
        hidden = prior_hidden or max(1, self.groups // 2)
        self.query = nn.Linear(dim, self.groups, bias=False)
        self.key = nn.Linear(dim, self.groups, bias=False)
        self.prior = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, self.groups))
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        # the aggregation group of each value channel
        self.register_buffer("channel_group", torch.arange(dim) // m, persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kernel_size={self.kernel_size}, m={self.m}, groups={self.groups}, "
                f"stride={self.stride}, composability={self.composability}")

    # -- pieces ----------------------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"the local relation layer takes a (B, H, W, C) map, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"the layer was built for {self.dim} channels, got {x.shape[-1]}")

    def out_size(self, H: int, W: int) -> tuple[int, int]:
        s = self.stride
        return (H - 1) // s + 1, (W - 1) // s + 1

    def offsets(self, device=None, dtype=None) -> torch.Tensor:
        """(k², 2) relative positions (Δy, Δx) of the window taps, row-major, centre (0, 0)."""
        k, p = self.kernel_size, self.kernel_size // 2
        r = torch.arange(k, device=device, dtype=dtype) - p
        return torch.stack([r.repeat_interleave(k), r.repeat(k)], dim=-1)

    def geometry_prior(self) -> torch.Tensor:
        """f(Δ) for every tap: (G, k²)."""
        w = self.prior[0].weight
        return self.prior(self.offsets(w.device, w.dtype)).t()

    def valid_taps(self, H: int, W: int, device=None) -> torch.Tensor:
        """(k², L) bool: which taps of each output position's window lie inside the H x W input."""
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        return F.unfold(torch.ones(1, 1, H, W, device=device), k, padding=p, stride=s)[0] > 0

    def _tap_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, k², L), -inf at taps outside the image."""
        B, H, W, _ = x.shape
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        q = self.query(x[:, ::s, ::s]).permute(0, 3, 1, 2).reshape(B, self.groups, 1, -1)  # (B, G, 1, L)
        # the keys have G channels (C/m), so their unfolded copy is small
        keys = F.unfold(self.key(x).permute(0, 3, 1, 2), k, padding=p, stride=s).view(B, self.groups, k * k, -1)
        content = q * keys if self.composability == "dot" else -(q - keys).square()
        logits = content * self.scale + self.geometry_prior().unsqueeze(-1)
        return logits.masked_fill(~self.valid_taps(H, W, x.device), float("-inf"))

    def window_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, G, L, k²) for the k² taps of the L = H_out·W_out windows, -inf at taps
        outside the image, and the (L, k²) validity mask."""
        B, H, W, _ = x.shape
        return self._tap_logits(x).transpose(2, 3), self.valid_taps(H, W, x.device).t()

    def window_weights(self, x: torch.Tensor) -> torch.Tensor:
        """ω: (B, G, L, k²), a softmax over each window's in-image taps (zero elsewhere)."""
        return self.window_logits(x)[0].softmax(dim=-1)

    # -- the contract ----------------------------------------------------------------------
    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, N_out, N_in), zero outside each window; G = C (each channel's group's
        weights) when m does not divide C."""
        self._check(x)
        B, H, W, C = x.shape
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        Ho, Wo = self.out_size(H, W)
        w = self.window_weights(x)
        if C % self.m:
            w = w[:, self.channel_group]
        dev = x.device
        yo = torch.arange(Ho, device=dev).view(Ho, 1, 1, 1)
        xo = torch.arange(Wo, device=dev).view(1, Wo, 1, 1)
        ky = torch.arange(k, device=dev).view(1, 1, k, 1)
        kx = torch.arange(k, device=dev).view(1, 1, 1, k)
        sy = (yo * s - p + ky).expand(Ho, Wo, k, k)
        sx = (xo * s - p + kx).expand(Ho, Wo, k, k)
        valid = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        rows = (yo * Wo + xo).expand(Ho, Wo, k, k)[valid]
        cols = (sy * W + sx)[valid]
        taps = (ky * k + kx).expand(Ho, Wo, k, k)[valid]
        A = w.new_zeros(B, w.shape[1], Ho * Wo, H * W)
        A[:, :, rows, cols] = w[:, :, rows, taps]
        return A

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)  # no value transform: the layer aggregates its input

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        Ho, Wo = self.out_size(x.shape[1], x.shape[2])
        return self.proj(y).reshape(x.shape[0], Ho, Wo, -1)

    def formula_macs(self, x_shape) -> int:
        """MACs of the window products for an input of ``x_shape`` (B, H, W, C), which
        ``torch.utils.flop_counter`` cannot see (they are elementwise): k² per group for Φ and
        k² per channel for the aggregation, at each output position. The 1x1 projections are
        matrix products and counted as such."""
        B, H, W, C = x_shape
        Ho, Wo = self.out_size(H, W)
        return B * Ho * Wo * self.kernel_size ** 2 * (self.groups + C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, H, W, C = x.shape
        k, p, m = self.kernel_size, self.kernel_size // 2, self.m
        Ho, Wo = self.out_size(H, W)
        w = self._tap_logits(x).softmax(dim=2).unflatten(-1, (Ho, Wo))  # (B, G, k², Ho, Wo)
        v = F.pad(x.permute(0, 3, 1, 2), (p, p, p, p))  # (B, C, H + 2p, W + 2p), zero outside
        full = C // m  # groups of m channels; a last one of C - full·m channels when m does not divide C
        y = _WindowSum.apply(w[:, :full], v[:, :full * m].unflatten(1, (full, m)), k, self.stride).flatten(1, 2)
        if C % m:
            last = _WindowSum.apply(w[:, full:], v[:, full * m:].unsqueeze(1), k, self.stride).flatten(1, 2)
            y = torch.cat([y, last], dim=1)
        return self.proj(y.permute(0, 2, 3, 1))  # (B, Ho, Wo, C)


def _tap_views(t: torch.Tensor, k: int, s: int, Ho: int, Wo: int):
    """The k² shifted views (..., Ho, Wo) of a padded map ``t`` (..., H + 2p, W + 2p), one per
    window tap, row-major: view (dy, dx) holds the map at (s·i + dy, s·j + dx)."""
    for dy in range(k):
        for dx in range(k):
            yield t[..., dy:dy + s * (Ho - 1) + 1:s, dx:dx + s * (Wo - 1) + 1:s]


class _WindowSum(torch.autograd.Function):
    """y[b, g, c] = Σ_t w[b, g, t] · shift_t(v[b, g, c]) over the k² taps t of the window:
    ``w`` (B, G, k², Ho, Wo) the window weights, ``v`` (B, G, m, H + 2p, W + 2p) the padded
    values, ``y`` (B, G, m, Ho, Wo). One multiply-add per tap on shifted views, forward and
    backward, with the gradient of ``v`` accumulated in one buffer (autograd through the k²
    views would allocate a zero-filled copy of ``v`` for each)."""

    @staticmethod
    def forward(ctx, w, v, k: int, s: int):
        Ho, Wo = w.shape[-2:]
        ctx.save_for_backward(w, v)
        ctx.k, ctx.s = k, s
        y = None
        for t, vt in enumerate(_tap_views(v, k, s, Ho, Wo)):
            wt = w[:, :, t].unsqueeze(2)
            y = wt * vt if y is None else y.addcmul_(wt, vt)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        w, v = ctx.saved_tensors
        Ho, Wo = w.shape[-2:]
        gw = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        gv = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        for t, vt in enumerate(_tap_views(v, ctx.k, ctx.s, Ho, Wo)):
            if gw is not None:
                torch.sum(g * vt, dim=2, out=gw[:, :, t])
        if gv is not None:
            for t, gvt in enumerate(_tap_views(gv, ctx.k, ctx.s, Ho, Wo)):
                gvt.addcmul_(w[:, :, t].unsqueeze(2), g)
        return gw, gv, None, None
