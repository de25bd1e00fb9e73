"""CETNet (Wang et al., "Convolutional Embedding Makes Hierarchical Vision Transformer Stronger",
ECCV 2022, arXiv 2207.13317): a hierarchical ViT whose token embeddings are small CNNs.

What is where (the paper's section 3, "Hybrid CNNs/ViTs network design"):

* S0 + S1's convolutional embedding form the stem (:class:`CETNetStem`): four Fused-MBConvs
  (EfficientNetV2's block; strides 2, 1, 2, 1) and one 1x1 convolution to the first stage's
  width, then LayerNorm -- total stride 4;
* S2, S3, S4 each start with a convolutional embedding (:class:`ConvolutionalEmbedding`):
  MBConvs (MobileNetV2's inverted residual; the first with stride 2), a 1x1 convolution to
  the stage's width and LayerNorm. Hidden expansion ratios are 1 or 2 (as in EfficientNetV2);
* every stage's blocks are pre-norm transformer blocks whose mixer is LEWin
  (:class:`mixlab.mixers.lewin.LEWinAttention`): Swin's shifted-window attention with
  CvT-style convolutional q/k/v projections (3x3 depthwise conv, stride 1, padding 1).

The authors released no code, and the supplementary material with the exact per-variant
configuration was not available to us (see ``docs/families/cetnet.md``), so the named
variants ``cetnet_tiny/small/base`` are not registered: depths and widths fitted to the
published parameter counts would carry the paper's name without its architecture. The class
builds any configuration; ``nano_cetnet`` is mixlab's own small member of the family.

:class:`ConvolutionalEmbedding` is reusable: ``SwinTransformer(conv_embed=True)`` (and PVT
the same way) swaps its patch embedding / patch merging for CETNet's stem and CEs, the
paper's experiment of putting its CE into other ViTs (its Fig. 1: CvT, PVT, Swin, CSWin).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from ..layers import ClassifierHead, stochastic_depth_rates
from ..mixers.lewin import LEWinAttention
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .blocks import MetaBlock

BLOCKS = ("mbconv", "fused")


def _conv_bn_act(in_chs, out_chs, kernel_size, stride=1, groups=1, act_layer=nn.SiLU) -> nn.Sequential:
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
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
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


def init_weights_cetnet(module: nn.Module) -> None:
    """Linear layers as ViT/Swin (truncated normal 0.02); convolutions as EfficientNet (He normal, fan-out)."""
    init_weights_vit(module)
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class CETNet(HierarchicalModel):
    """CETNet: convolutional stem (stride 4), then four stages; stages 2-4 start with a
    convolutional embedding (stride 2), and every stage's blocks are pre-norm LEWin
    transformer blocks alternating regular and shifted (by half a window) windows.

    ``stem_chs``: width of the stem's Fused-MBConvs (default ``embed_dim // 2``);
    ``stem_expansions``: their 4 expansion ratios; ``ce_depth`` / ``ce_expansion``: the MBConvs of
    the stage CEs; ``conv_scope`` / ``rel_pos_bias``: see :class:`LEWinAttention`. Any input size
    of at least 4 pixels works (windows are padded and masked, convolutions pad).
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, stem_chs: int | None = None, stem_expansions=(1, 1, 2, 2), ce_depth: int = 2,
                 ce_expansion=2.0, conv_scope: str = "window", rel_pos_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        norm = partial(nn.LayerNorm, eps=1e-5)
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            blocks = [MetaBlock(dim, LEWinAttention(dim, heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                                                    qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate,
                                                    conv_scope=conv_scope, rel_pos_bias=rel_pos_bias),
                                mlp_ratio=mlp_ratio, norm_layer=norm, drop=drop_rate, drop_path=dpr[i][j])
                      for j in range(depth)]
            ce = ConvolutionalEmbedding(dims[i - 1], dim, 2, ce_depth, "mbconv", ce_expansion, norm_layer=norm)
            stages.append(Stage(ce if i else None, blocks))
            info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size,
                         stem=CETNetStem(in_chans, stem_chs or embed_dim // 2, embed_dim, stem_expansions,
                                         norm_layer=norm),
                         stages=stages, norm=norm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info,
                         stage_mixers=[f"LEWin ({window_size}x{window_size} shifted windows, 3x3 dw-conv q/k/v)"]
                         * len(depths))
        self.min_input_size = 4
        self.apply(init_weights_cetnet)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


# The published variants (CETNet-T/S/B) are not registered: their per-variant widths, depths and
# heads are in the paper's supplementary material, which could not be read here, and a model that
# carries a paper's name must have that paper's architecture. ``CETNet(embed_dim=..., depths=...,
# num_heads=...)`` builds any configuration of the family.


@register_model
def nano_cetnet(**kwargs):
    """Nano CETNet for the arena (1.13M parameters, 5.58 MMACs at 32x32 RGB, 10 classes): the same
    stem and CEs, width 24 (stem 12), depths 2-2-4-1, heads 1-2-4-8, 4x4 windows."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, embed_dim=24, depths=(2, 2, 4, 1),
                    num_heads=(1, 2, 4, 8), window_size=4)
    return build(CETNet, defaults, kwargs)


# -- specifications ----------------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    win = st["window"]
    mixer = LEWinAttention(width, st["heads"], win, 0 if index % 2 == 0 else win // 2, proj_drop=drop)
    return MetaBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-5), drop=drop,
                     drop_path=drop_path)


register_spec_mixer("lewin", {"heads": 4, "window": 7},
                    "generic block, LEWin: (shifted) window attention, 3x3 depthwise-conv q/k/v (CETNet)",
                    _spec_block)
