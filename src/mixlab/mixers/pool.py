"""Pooling (PoolFormer): the simplest static affinity, ``avgpool(x) - x``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Mixer, conv_toeplitz


class Pooling(Mixer):
    """PoolFormer's token mixer ``AvgPool_kxk(x) - x`` (stride 1, padding k//2, padded
    positions not counted) on a (B, H, W, C) map.

    ``affinity`` is (B, 1, N, N), shared by all channels: 1/|window(i)| for the positions
    j in i's window, minus the identity.
    """

    affinity_kind = "static"

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd to keep the map size, got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)
        y = F.avg_pool2d(y, self.pool_size, 1, self.pool_size // 2, count_include_pad=False)
        return y.permute(0, 2, 3, 1) - x

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        k = self.pool_size
        window = conv_toeplitz(x.new_ones(1, 1, k, k), H, W)[0]
        A = window / window.sum(dim=-1, keepdim=True) - torch.eye(H * W, dtype=x.dtype, device=x.device)
        return A.view(1, 1, H * W, H * W).expand(B, -1, -1, -1)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"
