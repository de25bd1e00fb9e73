"""Normalisation layers for channels-last and channels-first tensors."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last (channel) dimension of a (..., C) tensor (channels-last)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (channels-first)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BatchNormNHWC(nn.BatchNorm2d):
    """BatchNorm2d applied to a channels-last (B, H, W, C) tensor.

    State-dict keys are those of ``nn.BatchNorm2d``; the NCHW view is zero-copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GroupNorm1NHWC(nn.GroupNorm):
    """GroupNorm with a single group (normalises over C, H and W jointly, as PoolFormer's
    ``GroupNorm(1, C)``) for a channels-last (B, H, W, C) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(1, num_channels, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x.permute(0, 3, 1, 2), 1, self.weight, self.bias, self.eps)
        return y.permute(0, 2, 3, 1)


class Affine(nn.Module):
    """Per-channel affine transform ``alpha * x + beta`` (ResMLP's normalisation)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)
