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

:class:`~mixlab.layers.embed.ConvolutionalEmbedding` and :class:`~mixlab.layers.embed.CETNetStem` live
in ``mixlab.layers.embed``, so other families reuse them: ``SwinTransformer(conv_embed=True)`` (and PVT
the same way) swaps its patch embedding / patch merging for CETNet's stem and CEs, the
paper's experiment of putting its CE into other ViTs (its Fig. 1: CvT, PVT, Swin, CSWin).
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from ..layers import ClassifierHead, stochastic_depth_rates
from ..layers.embed import CETNetStem, ConvolutionalEmbedding
from ..mixers.lewin import LEWinAttention
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_cetnet
from .blocks import MetaBlock
from .nano import register_nano


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


register_nano("nano_cetnet")  # the arena's nano-zoo line-up


# -- specifications ----------------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    win = st["window"]
    mixer = LEWinAttention(width, st["heads"], win, 0 if index % 2 == 0 else win // 2, proj_drop=drop)
    return MetaBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-5), drop=drop,
                     drop_path=drop_path)


register_spec_mixer("lewin", {"heads": 4, "window": 7},
                    "generic block, LEWin: (shifted) window attention, 3x3 depthwise-conv q/k/v (CETNet)",
                    _spec_block)
