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

:meth:`LocalRelation.forward` unfolds keys and values over the windows (``F.unfold``, zero
padding, and a validity mask); :meth:`affinity` scatters the window weights into the dense
(B, G, N_out, N_in) matrix, zero outside each window (with G = C, each channel's copy of
its group's weights, when the groups are uneven). ``explicit_forward == forward`` exactly.
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

    def window_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, G, L, k²) for the k² taps of the L = H_out·W_out windows, -inf at taps
        outside the image, and the (L, k²) validity mask."""
        B, H, W, _ = x.shape
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        Ho, Wo = self.out_size(H, W)
        L = Ho * Wo
        q = self.query(x[:, ::s, ::s]).reshape(B, L, self.groups).transpose(1, 2)  # (B, G, L)
        keys = F.unfold(self.key(x).permute(0, 3, 1, 2), k, padding=p, stride=s)  # (B, G·k², L)
        keys = keys.view(B, self.groups, k * k, L).transpose(2, 3)  # (B, G, L, k²)
        valid = F.unfold(x.new_ones(1, 1, H, W), k, padding=p, stride=s)[0].t() > 0  # (L, k²)
        if self.composability == "dot":
            # q·k as a (1 x 1) @ (1 x k²) product per window, so that MAC counters see it
            content = (q.reshape(B, self.groups, L, 1, 1) @ keys.unsqueeze(-2)).squeeze(-2)
        else:
            # -(q - k)², the square as a (1 x 1) @ (1 x 1) product per tap, so that MAC counters see it
            d = (q.unsqueeze(-1) - keys).unsqueeze(-1).unsqueeze(-1)  # (B, G, L, k², 1, 1)
            content = -(d @ d).reshape(B, self.groups, L, k * k)
        logits = content * self.scale + self.geometry_prior().unsqueeze(1)
        return logits.masked_fill(~valid, float("-inf")), valid

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, H, W, C = x.shape
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        w = self.window_weights(x)  # (B, G, L, k²)
        v = F.unfold(x.permute(0, 3, 1, 2), k, padding=p, stride=s)  # (B, C·k², L)
        L = v.shape[-1]
        # the window sums as (1 x k²) @ (k² x m) products, so that MAC counters see them
        if C % self.m == 0:
            v = v.view(B, self.groups, self.m, k * k, L).permute(0, 1, 4, 3, 2)  # (B, G, L, k², m)
            y = (w.unsqueeze(-2) @ v).squeeze(-2).permute(0, 2, 1, 3).reshape(B, L, C)
        else:
            v = v.view(B, C, k * k, L).transpose(2, 3).unsqueeze(-1)  # (B, C, L, k², 1)
            y = (w[:, self.channel_group].unsqueeze(-2) @ v).reshape(B, C, L).transpose(1, 2)
        return self.project(y, x)
