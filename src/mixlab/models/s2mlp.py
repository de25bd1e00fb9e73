"""S2-MLPv2 (Yu, Li, Cai, Sun and Li, 2021, "S2-MLPv2: Improved Spatial-Shift MLP
Architecture for Vision"): the generic pre-norm block with a spatial-shift mixer — channels
expanded 3x, two thirds shifted in two four-direction patterns, the three branches fused by
split attention — in a two-level pyramid of 7x7 then 2x2 patches.

The authors' code is not public; this follows the paper. Its models share Vision
Permutator's skeleton (ViP-Small/7 and -Medium/7, whose parameter and FLOP counts the paper
reports for S2-MLPv2 too): a 7x7 patchify stem without norm, a 2x2 stride-2 convolution
between the two levels, LayerNorm (eps 1e-5), channel MLPs of ratio 3, a final LayerNorm,
average pooling and a linear classifier.
"""
from __future__ import annotations

import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, PatchEmbed, stochastic_depth_rates
from ..mixers.shift import SplitShiftMixer
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .nano import register_nano
from .blocks import MetaBlock


class S2MLPv2(HierarchicalModel):
    """S2-MLPv2: ``patch_size`` x ``patch_size`` patchify stem (no norm), then one stage per
    entry of ``depths`` / ``dims`` (stages after the first open with a 2x2 stride-2
    convolution), blocks of LayerNorm + spatial-shift mixer and LayerNorm + MLP, a final
    LayerNorm, average pooling, classifier. Input sizes must be multiples of ``patch_size``."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, patch_size: int = 7,
                 depths=(4, 14), dims=(192, 384), mlp_ratio: float = 3.0, sa_ratio: float = 0.25,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have one entry per stage")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = ConvEmbed(dims[i - 1], dim, 2, 2) if i else None
            blocks = [MetaBlock(dim, SplitShiftMixer(dim, sa_ratio, proj_drop=drop_rate), mlp_ratio=mlp_ratio,
                                norm_layer=nn.LayerNorm, drop=drop_rate, drop_path=dpr[i][j]) for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, dims[0]),
                         stages=stages, norm=nn.LayerNorm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=["spatial shift x2 + identity, split attention"] * len(depths))
        self.apply(init_weights_vit)


@register_model
def s2mlpv2_small(**kwargs):
    """S2-MLPv2-Small/7 (25.13M, 6.90 GMACs; the paper's Table 1: 25M / 6.9G): 7x7 patches,
    4 blocks of width 192 on 32x32, then 14 of width 384 on 16x16, MLP ratio 3."""
    return build(S2MLPv2, dict(depths=(4, 14), dims=(192, 384)), kwargs)


@register_model
def s2mlpv2_medium(**kwargs):
    """S2-MLPv2-Medium/7 (55.30M, 16.28 GMACs; the paper: 55M / 16.3G): 7x7 patches, 7 blocks of
    width 256 on 32x32, then 17 of width 512 on 16x16 (ViP-Medium/7's layout), MLP ratio 3."""
    return build(S2MLPv2, dict(depths=(7, 17), dims=(256, 512)), kwargs)


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    return MetaBlock(width, SplitShiftMixer(width, proj_drop=drop), mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm,
                     drop=drop, drop_path=drop_path)


register_spec_mixer("s2mlp", {}, "spatial shift + split attention (S2-MLPv2)", _spec_block)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# S2-MLPv2: channel expansion, two four-way spatial shifts and an identity, split attention
register_nano("nano_s2mlp", "patch2 / s2mlp:2x40:mlp_ratio=3 / s2mlp:3x80:mlp_ratio=3 / s2mlp:3x160:mlp_ratio=3")
