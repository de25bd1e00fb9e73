"""Stochastic depth (DropPath) and LayerScale."""
from __future__ import annotations

import torch
import torch.nn as nn


def drop_path(x: torch.Tensor, p: float, training: bool, scale_by_keep: bool = True) -> torch.Tensor:
    """Drop whole residual branches per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of a sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT / ConvNeXt), last dim = channels."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def stochastic_depth_rates(drop_path_rate: float, depths) -> list[list[float]]:
    """Linearly increasing drop-path rates over all blocks, split per stage."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    out, i = [], 0
    for d in depths:
        out.append(rates[i:i + d])
        i += d
    return out
