"""Spatial-reduction attention (SRA), PVT v1's mixer (Wang et al., 2021, "Pyramid Vision
Transformer: A Versatile Backbone for Dense Prediction without Convolutions", Sec. 3.3;
authors' code: whai362/PVT, ``classification/pvt.py``, class ``Attention``).

Queries come from all N = H·W positions, keys and values from the map reduced by a
non-overlapping R x R convolution (kernel R, stride R, with bias) followed by a LayerNorm:

    X_r = LN(Conv_RxR(X)),        M = ⌊H/R⌋·⌊W/R⌋ reduced positions,
    A_h = softmax(Q_h K_hᵀ · d^-1/2),   Q = X·W_q,  K = X_r·W_k,  V = X_r·W_v,
    Y = concat_h(A_h V_h)·W_o.

So the affinity is (B, heads, N, M): each of the N outputs reads the M reduced values,
and ``values(x)`` returns those M reduced values (B, M, C). With R = 1 there is no
reduction (no convolution, no norm) and SRA is plain multi-head attention with separate
``q`` and ``kv`` projections; it then also takes a (B, N, C) sequence of any length,
class token included (PVT v1's last stage).

Details as the authors': ``q`` (C -> C) and ``kv`` (C -> 2C, keys first) are separate
linear layers (bias ``qkv_bias``), the reduction's LayerNorm has PyTorch's default eps
(1e-5), the scale is ``head_dim ** -0.5``. A map whose side is not a multiple of R is
reduced as the authors' convolution reduces it: ⌊H/R⌋ x ⌊W/R⌋ cells, the last H mod R rows
and W mod R columns contribute no key (they still are queries); a side smaller than R is
refused with a ValueError.

:meth:`SpatialReductionAttention.input_affinity` spreads each reduced key's weight evenly
over its R x R input cell, an (B, heads, N, N) picture for drawing over the image.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import QKVAttention
from .base import flatten_tokens

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(QKVAttention):
    """PVT's spatial-reduction attention (see the module docstring) on a (B, H, W, C) map;
    with ``sr_ratio`` 1 also on a (B, N, C) sequence. Returns the input's shape.

    ``affinity(x)``: (B, heads, N, M), rows summing to one, M = ⌊H/R⌋·⌊W/R⌋ (M = N for R = 1);
    ``values(x)``: the (B, M, C) reduced values; ``explicit_forward(x) == forward(x)``.
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive integer (1: no reduction), got {sr_ratio!r}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, sr_ratio={self.sr_ratio}"

    # -- the reduced map -------------------------------------------------------------------
    def reduced_grid(self, H: int, W: int) -> tuple[int, int]:
        """The (h, w) grid of reduced positions for an H x W map: (⌊H/R⌋, ⌊W/R⌋)."""
        R = self.sr_ratio
        if H < R or W < R:
            raise ValueError(f"a {H}x{W} map is smaller than the spatial reduction's {R}x{R} cell; "
                             f"use a map of at least {R}x{R} (a larger input image) or a smaller sr_ratio")
        return H // R, W // R

    def _check(self, x: torch.Tensor) -> None:
        if self.sr_ratio > 1 and x.ndim != 4:
            raise ValueError(f"spatial-reduction attention with sr_ratio {self.sr_ratio} needs a (B, H, W, C) map "
                             f"(the reduction is a convolution over the grid), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} channels in the last dimension, got shape {tuple(x.shape)}")

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, M, C) tokens keys and values are computed from."""
        if self.sr_ratio == 1:
            return flatten_tokens(x)
        self.reduced_grid(x.shape[1], x.shape[2])
        r = self.sr(x.permute(0, 3, 1, 2))  # (B, C, h, w): the trailing H mod R rows are dropped
        return self.norm(r.flatten(2).transpose(1, 2))

    def _qkv(self, x: torch.Tensor):
        self._check(x)
        t = flatten_tokens(x)
        B, N, C = t.shape
        q = self.q(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self._reduce(x))
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    # -- the contract: QKVAttention's forward, affinity (B, heads, N, M), values (B, M, C), project --
    # -- for drawing -----------------------------------------------------------------------
    def input_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The affinity mapped back to input positions, (B, heads, N, N): each reduced key's
        weight spread evenly over the R x R input cell it was computed from (weight / R² per
        position; positions in the trailing H mod R rows / W mod R columns, which no key
        reads, get zero). Rows still sum to one.

        An approximation, for drawing over the image: the reduction convolution mixes
        channels and weighs each position of its cell differently (and the LayerNorm after
        it is not linear), so a key is not the average of its cell. For R = 1 it equals
        :meth:`affinity` exactly (sequences with class tokens included).
        """
        A = self.affinity(x)
        R = self.sr_ratio
        if R == 1:
            return A
        B, G, N, _ = A.shape
        H, W = x.shape[1], x.shape[2]
        h, w = self.reduced_grid(H, W)
        cells = A.reshape(B, G, N, h, w).repeat_interleave(R, dim=3).repeat_interleave(R, dim=4) / (R * R)
        cells = F.pad(cells, (0, W - w * R, 0, H - h * R))
        return cells.reshape(B, G, N, H * W)
