"""Dynamic depthwise convolution: every image gets its own k x k kernel per channel,
predicted from the image itself, so the affinity is a banded Toeplitz matrix per channel
whose entries depend on the input (Han et al., "On the Connection between Local Attention
and Dynamic Depth-wise Convolution", ICLR 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, conv_toeplitz, flatten_tokens


class DynamicDepthwiseConv(Mixer):
    """Depthwise k x k convolution (stride 1, zero padding k // 2) on a (B, H, W, C) map
    whose kernels are a function of the input:

        K(x) = W_2 · ReLU(BN(W_1 · mean_{h,w} x)) + b_2        (B, C, k, k)

    global average pooling, a 1x1 reduction to C / ``reduction`` channels (no bias),
    BatchNorm, ReLU and a 1x1 expansion to C·k·k values: one kernel per channel and per
    sample, nothing shared across channels or heads (the authors' ``DynamicDWConv``). The
    two 1x1 layers are convolutions on the pooled (B, C, 1, 1) map, as in the authors' code
    (so their checkpoints load without reshaping, and ViT-style linear initialisation does
    not touch them). A static per-channel bias follows the convolution.

    ``affinity`` is (B, C, N, N): for sample b and channel c the Toeplitz matrix of the
    kernel K(x)[b, c] (``conv_toeplitz``), so ``forward == A(x)·V + bias`` exactly, with
    V = X. The BatchNorm of the kernel generator sees the batch's pooled features in
    training (a batch of one cannot be trained, as in the authors' code); ``forward`` and
    ``affinity`` compute the kernels the same way in either mode.
    """

    affinity_kind = "dynamic"
    fuse_pairs = (("reduce", "bn"),)  # see mixlab.layers.fuse

    def __init__(self, dim: int, kernel_size: int = 7, reduction: int = 4, bias: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"the dynamic depthwise convolution keeps the map size with padding k // 2, which needs "
                             f"an odd kernel size; got {kernel_size}")
        if dim // reduction < 1:
            raise ValueError(f"dim {dim} is too small for reduction {reduction}")
        self.dim = dim
        self.kernel_size = kernel_size
        hidden = dim // reduction
        self.reduce = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, dim * kernel_size * kernel_size, 1)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample depthwise kernels K(x), (B, C, k, k), for a (B, H, W, C) input."""
        pooled = x.mean(dim=(1, 2)).reshape(x.shape[0], -1, 1, 1)
        k = self.expand(self.act(self.bn(self.reduce(pooled))))
        return k.reshape(x.shape[0], self.dim, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        k = self.kernels(x)
        # the batch folded into the channels: one grouped convolution applies every sample's kernels
        xs = x.permute(0, 3, 1, 2).reshape(1, B * C, H, W)
        bias = self.bias.repeat(B) if self.bias is not None else None
        y = F.conv2d(xs, k.reshape(B * C, 1, self.kernel_size, self.kernel_size), bias,
                     padding=self.kernel_size // 2, groups=B * C)
        return y.reshape(B, C, H, W).permute(0, 2, 3, 1)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        k = self.kernels(x).reshape(B * C, 1, self.kernel_size, self.kernel_size)
        return conv_toeplitz(k, H, W).reshape(B, C, H * W, H * W)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
