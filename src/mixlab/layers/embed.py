"""Stems and embeddings: from pixels to tokens, and between stages.

Every module here takes and returns channels-last (B, H, W, C) tensors, except the
stems, which take the NCHW image batch.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv_blocks import FusedMBConv, MBConv
from .helpers import to_2tuple


class PatchEmbed(nn.Module):
    """Patchify stem: a convolution whose kernel equals its stride (ViT, Swin, ConvNeXt,
    Mixer), then an optional norm. Input NCHW image, output (B, H/p, W/p, C).

    The input size must be a multiple of the patch size: anything else would silently
    drop pixels, so it raises a ValueError naming the constraint.
    """

    def __init__(self, patch_size=16, in_chans: int = 3, embed_dim: int = 768, norm_layer=None, bias: bool = True):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"input size {H}x{W} is not divisible by the patch size {ph}x{pw}; "
                f"use a size that is a multiple of {ph} (for example {max(ph, H // ph * ph)}x{max(pw, W // pw * pw)})")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvEmbed(nn.Module):
    """A strided convolution between (or before) stages, with optional norms before and
    after: ConvNeXt's LN + 2x2/2 conv, PoolFormer's overlapping 3x3/2 (and 7x7/4 stem),
    Container's 2x2/2 conv + LN. Channels-last in and out (the stem variant takes NCHW
    when ``nchw_input``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 2, stride: int = 2, padding: int = 0,
                 pre_norm=None, post_norm=None, nchw_input: bool = False, bias: bool = True):
        super().__init__()
        self.stride = stride
        self.nchw_input = nchw_input
        self.pre_norm = pre_norm(in_chs) if pre_norm else nn.Identity()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=bias)
        self.post_norm = post_norm(out_chs) if post_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nchw_input:
            x = self.pre_norm(x).permute(0, 3, 1, 2)
        H, W = x.shape[-2:]
        k = self.proj.kernel_size
        p = self.proj.padding
        if H + 2 * p[0] < k[0] or W + 2 * p[1] < k[1]:
            raise ValueError(f"feature map {H}x{W} is too small for a {k[0]}x{k[1]} stride-{self.stride} "
                             f"embedding; use a larger input image")
        return self.post_norm(self.proj(x).permute(0, 2, 3, 1))


def OverlapPatchEmbed(in_chs, out_chs, patch_size=7, stride=4, padding=2, norm_layer=None, nchw_input=True):
    """Overlapping patch embedding (kernel larger than stride), e.g. PoolFormer's 7x7/4 stem."""
    return ConvEmbed(in_chs, out_chs, patch_size, stride, padding, post_norm=norm_layer, nchw_input=nchw_input)


class PatchMerging(nn.Module):
    """Swin's downsampling: concatenate each 2x2 neighbourhood (4C), LayerNorm, linear to 2C.

    Odd sizes are zero-padded on the bottom/right first.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # channel order [x(0,0), x(1,0), x(0,1), x(1,1)] as in Swin's reference code
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class ResNetStem(nn.Module):
    """ResNet's stem: 7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max pool (NCHW in, NHWC out)."""

    fuse_pairs = (("conv", "bn"),)  # see mixlab.layers.fuse

    def __init__(self, in_chans: int = 3, out_chs: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x)))).permute(0, 2, 3, 1)


class ConvStem(nn.Module):
    """Convolutional stem ("Early convolutions help transformers see better"): a stack of
    3x3 stride-2 convolutions with BatchNorm and ReLU, then a 1x1 projection.

    ``channels`` lists the width of each 3x3 convolution; the total stride is
    ``2 ** len(channels)``. NCHW in, NHWC out.
    """

    def __init__(self, in_chans: int = 3, channels=(48, 96, 192, 384), embed_dim: int = 384):
        super().__init__()
        layers = []
        prev = in_chans
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            prev = c
        layers.append(nn.Conv2d(prev, embed_dim, 1))
        self.stride = 2 ** len(channels)
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.stride or W % self.stride:
            raise ValueError(f"input size {H}x{W} is not divisible by the stem's stride {self.stride}")
        return self.convs(x).permute(0, 2, 3, 1)


# -- CETNet's convolutional embeddings (Wang et al., "Convolutional Embedding Makes Hierarchical Vision
# Transformer Stronger", ECCV 2022): CETNet's own, and put into Swin and PVT with conv_embed=True
CONV_EMBED_BLOCKS = ("mbconv", "fused")


def _per_block(value, depth: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{what} has {len(values)} entries for {depth} blocks; give one per block or a single value")
    return values


class ConvolutionalEmbedding(nn.Module):
    """CETNet's convolutional embedding (CE): a few MBConv (or Fused-MBConv) blocks, the first
    with ``stride``, then a 1x1 convolution to ``out_chs`` and a LayerNorm.

    Arguments:
        in_chs, out_chs: input and output widths.
        stride: the first block's stride (2 between stages: the resolution halves, rounding up).
        depth: number of conv blocks (CETNet: 2, strides ``stride`` then 1).
        block: 'mbconv' (S2-S4 of CETNet) or 'fused' (the stem's Fused-MBConv).
        expansion: hidden expansion ratio of each block (a number, or one per block; 1 or 2 in CETNet).
        mid_chs: the blocks' width (default ``in_chs``: the blocks keep the width, the 1x1
            convolution "matches the channels").
        project: False leaves out the 1x1 convolution and the norm (CETNet's S0); then the blocks
            end at ``out_chs``.
        act_layer: the blocks' activation (SiLU, EfficientNetV2's); norm_layer: the output norm.
        nchw_input: take an NCHW batch (a stem) instead of a channels-last map.

    Channels-last (B, H, W, C) in (unless ``nchw_input``), channels-last (B, ceil(H/s), ceil(W/s),
    out_chs) out; any input size works (3x3 convolutions with padding 1).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, depth: int = 2, block: str = "mbconv",
                 expansion: float | Sequence[float] = 2.0, mid_chs: int | None = None, project: bool = True,
                 act_layer=nn.SiLU, norm_layer=partial(nn.LayerNorm, eps=1e-5), nchw_input: bool = False):
        super().__init__()
        if block not in CONV_EMBED_BLOCKS:
            raise ValueError(f"block must be one of {CONV_EMBED_BLOCKS}, got {block!r}")
        if depth < 1:
            raise ValueError(f"a convolutional embedding needs depth >= 1, got {depth}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        mid = (mid_chs or in_chs) if project else out_chs
        cls = MBConv if block == "mbconv" else FusedMBConv
        exps = _per_block(expansion, depth, "expansion")
        self.stride = stride
        self.nchw_input = nchw_input
        self.blocks = nn.Sequential(*[cls(in_chs if i == 0 else mid, mid, stride if i == 0 else 1, exps[i], act_layer)
                                      for i in range(depth)])
        self.proj = nn.Conv2d(mid, out_chs, 1) if project else nn.Identity()
        self.norm = norm_layer(out_chs) if project and norm_layer else nn.Identity()

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks and the 1x1 projection on an NCHW map (no norm)."""
        return self.proj(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nchw_input:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.forward_nchw(x).permute(0, 2, 3, 1))


class CETNetStem(nn.Module):
    """CETNet's convolutional stem, S0 + S1's CE (stride 4, NCHW in, channels-last out):
    S0: Fused-MBConv (stride 2, ``in_chans`` -> ``stem_chs``, expansion ``expansions[0]``),
    Fused-MBConv (stride 1); S1's CE: Fused-MBConv (stride 2), Fused-MBConv (stride 1),
    1x1 conv to ``embed_dim``, LayerNorm."""

    def __init__(self, in_chans: int, stem_chs: int, embed_dim: int, expansions=(1, 1, 2, 2), act_layer=nn.SiLU,
                 norm_layer=partial(nn.LayerNorm, eps=1e-5)):
        super().__init__()
        if len(expansions) != 4:
            raise ValueError(f"the stem has 4 Fused-MBConvs: give 4 expansion ratios, got {tuple(expansions)}")
        self.s0 = ConvolutionalEmbedding(in_chans, stem_chs, 2, 2, "fused", tuple(expansions[:2]), project=False,
                                         act_layer=act_layer, nchw_input=True)
        self.s1 = ConvolutionalEmbedding(stem_chs, embed_dim, 2, 2, "fused", tuple(expansions[2:]),
                                         act_layer=act_layer, norm_layer=norm_layer, nchw_input=True)
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s1(self.s0.forward_nchw(x))


def cetnet_embed_layer(in_chs: int, out_chs: int, stride: int, stage_index: int) -> nn.Module:
    """CETNet's embeddings as a stage-embedding factory (``PVT(embed_layer=...)``, which
    ``PVT(conv_embed=True)`` uses): the convolutional stem for the first stage (stride 4, width
    ``out_chs // 2`` inside), a convolutional embedding (two MBConvs, stride 2) for the others;
    NCHW in, channels-last out."""
    if stage_index == 0:
        if stride != 4:
            raise ValueError(f"CETNet's convolutional stem has stride 4; the first embedding asks for {stride}")
        return CETNetStem(in_chs, max(1, out_chs // 2), out_chs)
    return ConvolutionalEmbedding(in_chs, out_chs, stride, 2, "mbconv", 2.0, nchw_input=True)
