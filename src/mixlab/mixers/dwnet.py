"""DWNet's spatial mixer (Han et al., "On the Connection between Local Attention and Dynamic Depth-wise
Convolution", ICLR 2022): a 1x1 convolution, a static or dynamic depthwise convolution and another 1x1
convolution, each with BatchNorm, the unit that replaces Swin's window attention in
:mod:`mixlab.models.dwnet`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.fuse import bn_scale_shift, fuse_conv_bn
from .base import Mixer, flatten_tokens
from .conv import DepthwiseConv
from .dynamic_conv import DynamicDepthwiseConv


class DWNetMixer(Mixer):
    """The DWNet unit: 1x1 conv, BN, ReLU, depthwise k x k conv (static or dynamic), BN,
    ReLU, 1x1 conv, BN, on a (B, H, W, C) map (the 1x1 layers run on its NCHW view).

    * ``values(x)`` = ReLU(BN(W_in·x)), (B, N, C);
    * ``affinity(x)``: (B, C, N, N), the depthwise convolution's Toeplitz matrix per channel
      — the same for every sample (``dynamic=False``, ``affinity_kind`` 'static') or the
      Toeplitz matrix of the kernels predicted from the values (``dynamic=True``, 'dynamic');
    * ``project(y)`` = BN(W_out·ReLU(BN(y + bias))).
    """

    fuse_pairs = (("proj_in", "bn_in"), ("proj_out", "bn_out"))  # see mixlab.layers.fuse

    def __init__(self, dim: int, kernel_size: int = 7, dynamic: bool = False, reduction: int = 4):
        super().__init__()
        self.dynamic = dynamic
        self.affinity_kind = "dynamic" if dynamic else "static"
        self.proj_in = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn_in = nn.BatchNorm2d(dim)
        self.act = nn.ReLU(inplace=True)
        if dynamic:
            self.conv = DynamicDepthwiseConv(dim, kernel_size, reduction)
        else:
            if kernel_size % 2 == 0:
                raise ValueError(f"DWNet's depthwise convolution needs an odd kernel size, got {kernel_size}")
            self.conv = DepthwiseConv(dim, kernel_size)
        self.bn = nn.BatchNorm2d(dim)
        self.proj_out = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(dim)

    def _values_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn_in(self.proj_in(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(y.permute(0, 3, 1, 2)))
        return self.bn_out(self.proj_out(y)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self.conv(self._values_map(x)))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.affinity(self._values_map(x))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(self._values_map(x))

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.conv.project(y, x)  # the depthwise convolution's bias, in x's (B, H, W, C) layout
        return self._out(y)

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the BatchNorm after the depthwise convolution into it (eval mode, exact): into
        the static kernel and bias, or into the dynamic kernel generator's last layer (the
        kernels of channel c scale with BN's s_c) and the bias."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        if self.dynamic:
            s, t = bn_scale_shift(self.bn)
            conv = self.conv
            k2 = conv.kernel_size ** 2
            conv.expand.weight.mul_(s.repeat_interleave(k2).reshape(-1, 1, 1, 1))
            conv.expand.bias.mul_(s.repeat_interleave(k2))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
            conv.bias = nn.Parameter(bias * s + t)
        else:
            self.conv.conv = fuse_conv_bn(self.conv.conv, self.bn)
        self.bn = nn.Identity()
