"""Convolution blocks that several families build from (NCHW convolutions, each followed by a
BatchNorm that ``fuse()`` can fold):

* :func:`conv_bn`: a bias-free convolution and a BatchNorm (RepLKNet's unit);
* :class:`MBConv` (MobileNetV2's inverted residual) and :class:`FusedMBConv` (EfficientNetV2's),
  the blocks of CETNet's convolutional embeddings (:mod:`mixlab.layers.embed`);
* :class:`MBConvBlock`, CoAtNet's pre-norm MBConv block with squeeze-excitation
  (:class:`ConvSqueezeExcite`), on a channels-last map;
* :class:`ResidualConvBlock`, the residual frame of ResNet's blocks (and BoTNet's, LR-Net's).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .drop import DropPath

#: MBConvBlock's two configurations: the CoAtNet paper's and Ross Wightman's (timm's ``_rw`` models)
MBCONV_VARIANTS = ("paper", "rw")
#: where an MBConvBlock's stride 2 goes: its first 1x1 conv (the paper), the depthwise conv, a pooling first
STRIDE_MODES = ("1x1", "dw", "pool")


def conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
            relu: bool = False) -> nn.Sequential:
    """A bias-free convolution (padding k // 2) and a BatchNorm, optionally a ReLU, as an
    ``nn.Sequential`` with children ``conv``, ``bn`` (, ``act``) (so that ``fuse`` folds the pair)."""
    layers = OrderedDict(conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups,
                                        bias=False),
                         bn=nn.BatchNorm2d(out_chs))
    if relu:
        layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def _conv_bn_act(in_chs, out_chs, kernel_size, stride=1, groups=1, act_layer=nn.SiLU) -> nn.Sequential:
    """conv (bias-free, padding k // 2), BatchNorm, optional activation, as children 0, 1 (, 2)
    (the state-dict names of CETNet's blocks)."""
    layers = [nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_chs)]
    if act_layer is not None:
        layers.append(act_layer())
    return nn.Sequential(*layers)


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv (NCHW): 3x3 conv (stride s) to ``in_chs * expansion``, BN, act,
    then a 1x1 conv + BN to ``out_chs``; with expansion 1 just the 3x3 conv + BN + act to
    ``out_chs``. Identity shortcut when the stride is 1 and the widths match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: float = 1.0, act_layer=nn.SiLU):
        super().__init__()
        if expansion == 1:
            self.conv = _conv_bn_act(in_chs, out_chs, 3, stride, act_layer=act_layer)
            self.proj = nn.Identity()
        else:
            hidden = int(round(in_chs * expansion))
            self.conv = _conv_bn_act(in_chs, hidden, 3, stride, act_layer=act_layer)
            self.proj = _conv_bn_act(hidden, out_chs, 1, act_layer=None)
        self.residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.conv(x))
        return x + y if self.residual else y


class MBConv(nn.Module):
    """MobileNetV2's inverted residual (NCHW): 1x1 conv to ``in_chs * expansion`` + BN + act
    (left out for expansion 1), 3x3 depthwise conv (stride s) + BN + act, 1x1 conv + BN to
    ``out_chs``. Identity shortcut when the stride is 1 and the widths match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: float = 2.0, act_layer=nn.SiLU):
        super().__init__()
        hidden = int(round(in_chs * expansion))
        self.expand = _conv_bn_act(in_chs, hidden, 1, act_layer=act_layer) if expansion != 1 else nn.Identity()
        self.dw = _conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act_layer=act_layer)
        self.proj = _conv_bn_act(hidden, out_chs, 1, act_layer=None)
        self.residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.dw(self.expand(x)))
        return x + y if self.residual else y


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's ``make_divisible`` (round to a multiple of 8, never below 90% of ``v``)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def avg_pool_2x2() -> nn.AvgPool2d:
    """2x2 average pooling, stride 2, of an NCHW map; ``ceil_mode`` only matters for odd sizes
    (timm floors, and then fails on its bias table), where the last window averages the positions it covers."""
    return nn.AvgPool2d(2, 2, ceil_mode=True)


class ConvSqueezeExcite(nn.Module):
    """Squeeze-excitation on an NCHW map with 1x1 convolutions: ``x · sigmoid(fc2(act(fc1(mean(x)))))``
    (CoAtNet's; :class:`mixlab.layers.context.SqueezeExcite` is the channels-last one with linear layers)."""

    def __init__(self, chs: int, rd_chs: int, act_layer=nn.SiLU):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd_chs, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_chs, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class MBConvBlock(nn.Module):
    """CoAtNet's pre-norm MBConv block on a channels-last map:
    shortcut + conv3(SE(act(BN(dw3x3(act(BN(conv1(BN(x))))))))).

    ``variant='paper'``: GELU, expansion from the output width, SE (SiLU, reduction from the output
    width) after the second BatchNorm, biases on the shortcut and last 1x1 convolution;
    ``variant='rw'`` (timm's ``coatnet_*_rw``): SiLU, an activation after the pre-norm, expansion from
    the input width, SE (ReLU, reduction from the expanded width) between the depthwise convolution
    and its norm, no biases on the shortcut and last 1x1. ``stride_mode``: see :data:`STRIDE_MODES`.

    The shortcut is the identity, or (stride 2) 2x2 average pooling and / or (new width) a
    1x1 convolution. ``fuse()`` folds the BatchNorms that follow a convolution directly.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, variant: str = "paper", expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, drop_path: float = 0.0, stride_mode: str = "1x1"):
        super().__init__()
        if variant not in MBCONV_VARIANTS:
            raise ValueError(f"unknown CoAtNet variant {variant!r}; use one of {MBCONV_VARIANTS}")
        if stride_mode not in STRIDE_MODES:
            raise ValueError(f"unknown stride_mode {stride_mode!r}; use one of {STRIDE_MODES}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        rw = variant == "rw"
        act = nn.SiLU if rw else nn.GELU
        mid = make_divisible((in_chs if rw else out_chs) * expand_ratio)
        bias = not rw
        self.stride = stride
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut.add_module("pool", avg_pool_2x2())
        if in_chs != out_chs:
            self.shortcut.add_module("expand", nn.Conv2d(in_chs, out_chs, 1, bias=bias))
        self.pre_norm = nn.BatchNorm2d(in_chs)
        self.pre_act = act() if rw else nn.Identity()
        s1, s2 = (stride, 1) if stride_mode == "1x1" else (1, stride) if stride_mode == "dw" else (1, 1)
        self.down = avg_pool_2x2() if stride_mode == "pool" and stride == 2 else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, mid, 1, s1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.act1 = act()
        self.conv2 = nn.Conv2d(mid, mid, 3, s2, 1, groups=mid, bias=False)
        self.se_first = rw  # SE between the depthwise conv and its BatchNorm (timm's `se_early`)
        self.se = ConvSqueezeExcite(mid, int(se_ratio * (mid if rw else out_chs)), nn.ReLU if rw else nn.SiLU)
        self.norm2 = nn.BatchNorm2d(mid)
        self.act2 = act()
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fuse_pairs = (("conv1", "norm1"),) + ((("conv2", "norm2"),) if not rw else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        shortcut = self.shortcut(x)
        x = self.down(self.pre_act(self.pre_norm(x)))
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.conv2(x)
        if self.se_first:
            x = self.act2(self.norm2(self.se(x)))
        else:
            x = self.se(self.act2(self.norm2(x)))
        x = self.drop_path(self.conv3(x)) + shortcut
        return x.permute(0, 2, 3, 1)


def init_conv_fan_out(module: nn.Module) -> None:
    """EfficientNet's convolution init: weights N(0, sqrt(2 / fan_out)), zero bias (other modules untouched)."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResidualConvBlock(nn.Module):
    """What ResNet's blocks (and BoTNet's, LR-Net's) share: ``relu(branch(x) + shortcut(x))`` with a projection
    shortcut (1x1 conv + BN) when the block changes shape, stochastic depth on the branch,
    and the layout: channels-last in and out, the convolutions on the NCHW view.
    ``context(out_chs)``, if given, makes a context module applied to the branch's output
    before the residual addition (where SE and GC blocks go; channels-last in and out)."""

    def _add_residual(self, in_chs: int, out_chs: int, stride: int, drop_path: float, context=None) -> None:
        # called after the branch's layers are made: the order in which modules are created is
        # the order in which they draw their initial weights
        self.context = context(out_chs) if context is not None else None
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.branch(x)
        if self.context is not None:
            y = self.context(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(self.drop_path(y) + shortcut).permute(0, 2, 3, 1)
