"""Relative attention (CoAtNet): global self-attention whose logits carry a learned bias per
head and per 2D offset, ``A = softmax(q_i·k_jᵀ/√d + w_{i-j})``.

Dai et al., "CoAtNet: Marrying Convolution and Attention for All Data Sizes" (NeurIPS 2021),
section 2.1, eq. (3): the "pre-normalisation" relative attention, where a translation-invariant
weight ``w_{i-j}`` (like a depthwise convolution kernel, but over the whole map) is added to
the attention logits before the softmax. The offsets i - j of an H x W map take (2H-1)(2W-1)
values; the bias is a table of that many rows per head, indexed as in Swin / timm
(``timm.layers.pos_embed_rel.RelPosBias``, used by ``timm/models/maxxvit.py``'s CoAtNet).

Unlike Swin's window attention, the attention is global: the table is built for the whole
feature map at the model's ``img_size`` (``grid_size``). On another grid the table is resampled
bicubically (corners not aligned) from (2h-1) x (2w-1) to (2H-1) x (2W-1) offsets, Swin's rule
for relative position tables (also mixlab's checkpoint converter's and EfficientFormer's).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.helpers import to_2tuple
from .attention import biased_attention
from .base import Mixer, flatten_tokens, token_grid
from .window import relative_position_index

__all__ = ["RelativeAttention", "resample_rel_bias_table"]


def resample_rel_bias_table(table: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """A ((2h-1)·(2w-1), heads) relative position bias table for an h x w grid, resampled
    bicubically (corners not aligned) to the ((2H-1)·(2W-1), heads) table of an H x W grid."""
    (h, w), (H, W) = to_2tuple(old_grid), to_2tuple(new_grid)
    if (h, w) == (H, W):
        return table
    L, heads = table.shape
    if L != (2 * h - 1) * (2 * w - 1):
        raise ValueError(f"a relative position table for a {h}x{w} grid has {(2 * h - 1) * (2 * w - 1)} rows, "
                         f"got {L}")
    grid = table.t().reshape(1, heads, 2 * h - 1, 2 * w - 1)
    work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
    out = F.interpolate(work, size=(2 * H - 1, 2 * W - 1), mode="bicubic", align_corners=False)
    return out.reshape(heads, -1).t().to(table.dtype)


class RelativeAttention(Mixer):
    """Multi-head global self-attention with a learned 2D relative position bias, on a
    (B, H, W, C) map or a (B, N, C) sequence of the grid it was built for.

    ``qkv`` maps ``dim`` to ``3 · heads · head_dim`` channels laid out head-first (for each
    head its query, key and value: timm's ``head_first`` layout of ``Attention2d``); ``proj``
    maps ``heads · head_dim`` to ``dim_out`` (default ``dim``: CoAtNet's first transformer
    block of a stage widens here). ``relative_position_bias_table`` holds
    ((2h-1)·(2w-1), heads) biases for the ``grid_size`` = (h, w) map; ``window_size`` is the
    same grid (the name mixlab's checkpoint converter reads to resample loaded tables).

    ``affinity`` is (B, heads, N, N), ``softmax(q·kᵀ/√head_dim + bias)``, rows summing to one;
    ``forward == project(A·V)`` exactly (``F.scaled_dot_product_attention`` with the bias as
    its additive mask).
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, num_heads: int, grid_size=(7, 7), head_dim: int | None = None,
                 dim_out: int | None = None, qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pass head_dim or "
                                 f"choose heads dividing {dim}")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.grid_size = to_2tuple(grid_size)
        if min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.window_size = self.grid_size
        inner = num_heads * head_dim
        self.dim_out = dim_out or dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, self.dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        gh, gw = self.grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(gh, gw, gh, gw), persistent=False)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, grid_size={self.grid_size}, dim_out={self.dim_out}"

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return token_grid(x, self.grid_size)

    def bias(self, H: int, W: int) -> torch.Tensor:
        """The (heads, N, N) bias ``w_{i-j}`` on an H x W grid (the table resampled if the grid
        is not the one it was built for)."""
        if (H, W) == self.grid_size:
            table, index = self.relative_position_bias_table, self.relative_position_index
        else:
            table = resample_rel_bias_table(self.relative_position_bias_table, self.grid_size, (H, W))
            index = relative_position_index(H, W, H, W).to(table.device)
        N = H * W
        return table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def _qkv(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, _ = t.shape
        qkv = self.qkv(t).view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        return qkv.unbind(0)  # each (B, heads, N, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        q, k, v = self._qkv(x)
        bias = self.bias(H, W).unsqueeze(0).to(q.dtype)
        o = biased_attention(q, k, v, bias, self.scale, self.attn_drop, self.training)
        return self.project(o.transpose(1, 2).flatten(2), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1) + self.bias(H, W).to(q.dtype)).softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[2].transpose(1, 2).flatten(2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_drop(self.proj(y))
        return y.reshape(x.shape[:-1] + y.shape[-1:])
