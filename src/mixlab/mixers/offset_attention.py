"""Attention with a learned bias per head and per spatial offset (|Δy|, |Δx|): LeViT's (Graham et al.,
"LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", ICCV 2021) and EfficientFormer's
(Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", 2022) attention, the mixer of
EfficientFormer's 3D blocks (:mod:`mixlab.models.efficientformer`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import to_2tuple
from .base import Mixer, flatten_tokens, token_grid


def offset_index(H: int, W: int, device=None) -> torch.Tensor:
    """(N, N) index of |Δy|·W + |Δx| between the positions of an H x W grid (row-major)."""
    ys = torch.arange(H, device=device).repeat_interleave(W)
    xs = torch.arange(W, device=device).repeat(H)
    return (ys[:, None] - ys[None, :]).abs() * W + (xs[:, None] - xs[None, :]).abs()


def resample_offset_bias(table: torch.Tensor, old_size, new_size) -> torch.Tensor:
    """A (heads, h·w) bias table over offsets (|Δy|, |Δx|) of an h x w grid, resampled to
    the offsets of an H x W grid: (heads, H·W).

    The table is mirrored into the full (2h-1) x (2w-1) table of signed offsets, resampled
    bicubically (corners not aligned) to (2H-1) x (2W-1) — Swin's rule for relative
    position bias tables — and its quadrant of non-negative offsets taken back.
    """
    h, w = to_2tuple(old_size)
    H, W = to_2tuple(new_size)
    if (h, w) == (H, W):
        return table
    heads = table.shape[0]
    t = table.reshape(heads, h, w)
    rows = torch.cat([t.flip(1)[:, :-1], t], dim=1)  # Δy = -(h-1) .. h-1
    full = torch.cat([rows.flip(2)[:, :, :-1], rows], dim=2)  # Δx = -(w-1) .. w-1
    work = full if full.dtype in (torch.float32, torch.float64) else full.float()
    out = F.interpolate(work.unsqueeze(0), size=(2 * H - 1, 2 * W - 1), mode="bicubic", align_corners=False)[0]
    return out[:, H - 1:, W - 1:].reshape(heads, H * W).to(table.dtype)


class OffsetBiasAttention(Mixer):
    """Multi-head self-attention with a learned bias per head and per spatial offset
    (|Δy|, |Δx|), EfficientFormer's (and LeViT's) attention, on a (B, H, W, C) map or a
    (B, N, C) sequence of the grid it was built for.

    Keys and queries have ``key_dim`` channels per head, values ``attn_ratio · key_dim``;
    ``qkv`` produces, per head, [query, key, value]. ``affinity`` is (B, heads, N, N):
    ``softmax(q·kᵀ/√key_dim + bias)``, rows summing to one; ``forward == A·V·W`` exactly
    (through ``F.scaled_dot_product_attention`` with the bias as an additive mask).
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0, grid_size=(7, 7),
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.grid_size = to_2tuple(grid_size)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        gh, gw = self.grid_size
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, gh * gw))
        # kept in the state dict under timm's / the authors' name, so that their checkpoints load strictly
        self.register_buffer("attention_bias_idxs", offset_index(gh, gw), persistent=True)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, "
                f"grid_size={self.grid_size}")

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return token_grid(x, self.grid_size)

    def bias(self, H: int, W: int) -> torch.Tensor:
        """The (heads, N, N) attention bias on an H x W grid."""
        if (H, W) == self.grid_size:
            return self.attention_biases[:, self.attention_bias_idxs]
        table = resample_offset_bias(self.attention_biases, self.grid_size, (H, W))
        return table[:, offset_index(H, W, table.device)]

    def _qkv(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, _ = t.shape
        qkv = self.qkv(t).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        return qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(H, W).to(q.dtype),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.project(o.transpose(1, 2).flatten(2), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1) + self.bias(H, W)).softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[2].transpose(1, 2).flatten(2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_drop(self.proj(y))
        return y.reshape(x.shape[:-1] + y.shape[-1:])
