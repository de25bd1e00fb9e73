"""Depthwise convolution: a static, sparse affinity, one banded Toeplitz matrix per channel."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Mixer, conv_toeplitz, flatten_tokens


class DepthwiseConv(Mixer):
    """Depthwise k x k convolution (stride 1, zero 'same' padding, any kernel size and
    dilation) on a (B, H, W, C) map.

    ``affinity`` is (B, C, N, N): for channel c, A[c, i, j] is the kernel tap that output
    position i applies to input position j (zero outside the kernel's reach). The bias,
    if any, belongs to the output transform W, so ``forward == A·V + bias``.
    """

    affinity_kind = "static"

    def __init__(self, dim: int, kernel_size: int = 7, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", dilation=dilation, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        A = conv_toeplitz(self.conv.weight, H, W, self.conv.dilation)
        return A.unsqueeze(0).expand(B, -1, -1, -1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return y.reshape(x.shape)
