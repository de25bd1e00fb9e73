"""RepLKNet's spatial mixer (Ding et al., "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel
Design in CNNs", CVPR 2022): a very large depthwise convolution made trainable by a parallel small
depthwise branch, the two merged into one convolution after training (structural re-parameterization).
The network around it is :mod:`mixlab.models.replknet`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.conv_blocks import conv_bn
from .base import Mixer, conv_toeplitz, flatten_tokens


def _kernel_bias(branch: nn.Sequential):
    """(kernel, bias) of ``branch.bn(branch.conv(v))`` with the BatchNorm's running statistics
    (also after ``fuse`` folded the BatchNorm: then the convolution carries the bias)."""
    conv, bn = branch.conv, branch.bn
    w = conv.weight
    b = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
    if isinstance(bn, nn.BatchNorm2d):
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return w * s.reshape(-1, 1, 1, 1), (b - bn.running_mean) * s + bn.bias
    return w, b


class ReparamLargeKernelConv(Mixer):
    """A K x K depthwise convolution with a parallel k x k one (k < K, both stride 1, zero
    padding to the same size), each followed by a BatchNorm, on a (B, H, W, C) map; or, once
    re-parameterized, the single K x K depthwise convolution with bias they amount to.

    ``affinity`` is (B, C, N, N), static: for the two branches the sum of their Toeplitz
    matrices with the BatchNorm scales folded into the kernels, T(s_K·w_K) + T(s_k·w_k); after
    :meth:`reparameterize` the Toeplitz matrix of the merged kernel, which is the same matrix.
    The BatchNorm shifts form the bias of the output transform, so
    ``forward == A·V + bias`` with V = X. The BatchNorms use their running statistics here,
    so the equality holds in eval mode (in training they normalise with the batch's).
    """

    affinity_kind = "static"

    def __init__(self, dim: int, kernel_size: int = 31, small_kernel: int | None = 5,
                 reparameterized: bool = False):
        super().__init__()
        if kernel_size % 2 == 0 or (small_kernel and small_kernel % 2 == 0):
            raise ValueError(f"the kernels must be odd to be merged at the centre, got {kernel_size} and "
                             f"{small_kernel}")
        if small_kernel and small_kernel > kernel_size:
            raise ValueError(f"the small kernel ({small_kernel}) cannot be larger than the large one ({kernel_size})")
        self.dim = dim
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel or None
        if reparameterized:
            self.large, self.small = None, None
            self.merged = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        else:
            self.large = conv_bn(dim, dim, kernel_size, groups=dim)
            self.small = conv_bn(dim, dim, small_kernel, groups=dim) if small_kernel else None
            self.merged = None

    @property
    def reparameterized(self) -> bool:
        return self.merged is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.permute(0, 3, 1, 2)
        if self.merged is not None:
            y = self.merged(v)
        else:
            y = self.large(v)
            if self.small is not None:
                y = y + self.small(v)
        return y.permute(0, 2, 3, 1)

    def branches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(kernel, bias) of each branch with its BatchNorm folded in (running statistics)."""
        if self.merged is not None:
            return [(self.merged.weight, self.merged.bias)]
        out = [_kernel_bias(self.large)]
        if self.small is not None:
            out.append(_kernel_bias(self.small))
        return out

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single K x K depthwise kernel (C, 1, K, K) and bias (C,) that the branches amount to."""
        parts = self.branches()
        kernel, bias = parts[0]
        for w, b in parts[1:]:
            p = (self.kernel_size - w.shape[-1]) // 2
            kernel = kernel + F.pad(w, [p, p, p, p])
            bias = bias + b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by the one K x K convolution with bias, in place (eval mode)."""
        if self.merged is not None:
            return
        if self.training:
            raise RuntimeError("reparameterize() folds BatchNorm running statistics and is for inference: "
                               "call model.eval() first")
        kernel, bias = self.equivalent_kernel_bias()
        w = self.large.conv.weight
        merged = nn.Conv2d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, groups=self.dim,
                           bias=True, device=w.device, dtype=w.dtype)
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        del self.large, self.small
        self.large, self.small = None, None
        self.merged = merged

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        A = sum(conv_toeplitz(w, H, W) for w, _ in self.branches())
        return A.unsqueeze(0).expand(B, -1, -1, -1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bias = sum(b for _, b in self.branches())
        return (y + bias).reshape(x.shape)

    def extra_repr(self) -> str:
        small = f", small_kernel={self.small_kernel}" if self.small_kernel else ""
        return f"dim={self.dim}, kernel_size={self.kernel_size}{small}, reparameterized={self.reparameterized}"
