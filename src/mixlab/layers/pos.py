"""Position encodings: learned absolute (resampled to new grid sizes) and conditional
(a depthwise convolution of the features themselves, CPVT / Container)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import to_2tuple


def resample_abs_pos_embed(pos_embed: torch.Tensor, new_size, old_size=None, num_prefix_tokens: int = 0,
                           mode: str = "bicubic") -> torch.Tensor:
    """Resample a (1, P + H*W, C) learned position embedding to a new grid, keeping the P
    prefix-token (class / distillation) embeddings as they are."""
    new_size = to_2tuple(new_size)
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.isqrt(n_grid))
        if side * side != n_grid:
            raise ValueError(f"cannot infer the grid of a position embedding with {n_grid} positions; give old_size")
        old_size = (side, side)
    old_size = to_2tuple(old_size)
    if tuple(old_size) == tuple(new_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = grid.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_size, mode=mode, align_corners=False, antialias=mode != "nearest")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class AbsolutePosEmbed(nn.Module):
    """Learned absolute position embedding for P prefix tokens plus an H x W grid, added to a
    (B, P + H*W, C) token sequence; resampled bicubically when the grid differs from the one
    it was built for (the ViT fine-tuning-at-another-resolution rule)."""

    def __init__(self, grid_size, dim: int, num_prefix_tokens: int = 0, std: float = 0.02):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        n = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def forward(self, x: torch.Tensor, grid_size) -> torch.Tensor:
        pe = self.pos_embed
        if tuple(grid_size) != self.grid_size:
            pe = resample_abs_pos_embed(pe, grid_size, self.grid_size, self.num_prefix_tokens)
        return x + pe


class ConditionalPosEnc(nn.Module):
    """Conditional position encoding: ``x + dwconv_kxk(x)`` on a (B, H, W, C) map."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def sincos_pos_embed_2d(dim: int, grid_size, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The fixed 2-D sine-cosine position table of MAE ("Masked Autoencoders Are Scalable Vision
    Learners", He et al. 2022), (1, P + H*W, dim) with zero rows for the P prefix tokens: the first half
    of the channels encodes a token's column, the second its row, each as sin(pos·ω) beside cos(pos·ω)
    with ω = 1 / 10000^(k / (dim/4)), k = 0 .. dim/4 - 1 (the Transformer's frequencies)."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine position table needs a width divisible by 4, got {dim}")
    h, w = to_2tuple(grid_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (H*W, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([axis(cols), axis(rows)], dim=1).float()  # (H*W, dim)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), table]).unsqueeze(0)
