"""Classification heads: pool the features, optional norm / dropout, then a linear layer."""
from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierHead(nn.Module):
    """Pool and classify.

    ``pool``: 'avg' averages a (B, H, W, C) map (or the grid tokens of a (B, P+N, C)
    sequence, skipping the ``num_prefix_tokens`` prefix), 'token' takes the first (class)
    token, '' or None leaves the input as it is. ``norm_layer`` is applied after pooling
    (ConvNeXt, PoolFormer).
    """

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg", num_prefix_tokens: int = 0,
                 norm_layer=None, drop_rate: float = 0.0):
        super().__init__()
        if pool not in ("avg", "token", "", None):
            raise ValueError(f"unknown pool {pool!r}; use 'avg', 'token' or ''")
        self.in_features = in_features
        self.num_classes = num_classes
        self.pool = pool or ""
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = norm_layer(in_features) if norm_layer else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            if x.ndim == 4:
                return x.mean(dim=(1, 2))
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.pool == "token":
            return x[:, 0]
        return x

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(self.pool_features(x)))
        return x if pre_logits else self.fc(x)

    def reset(self, num_classes: int, pool: str | None = None) -> None:
        if pool is not None:
            self.pool = pool
        self.num_classes = num_classes
        device = next(self.parameters(), torch.empty(0)).device
        self.fc = nn.Linear(self.in_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
