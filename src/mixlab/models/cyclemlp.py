"""CycleMLP (Chen, Xie, Ge, Chen, Liang and Luo, 2022, "CycleMLP: A MLP-like Architecture for
Dense Prediction"): the generic pre-norm block with a mixer of two Cycle FC layers (channel FCs
whose input channel c is read at a spatial offset that cycles with c, along W and along H)
and a channel FC, re-weighted by split attention; PVT-like four stages.

The configurations, layer order and initialisation follow the authors' code
(ShoufaChen/CycleMLP, ``cycle_mlp.py``): a 7x7 stride-4 convolution stem without norm, 3x3
stride-2 convolutions between stages (no norm), LayerNorm (eps 1e-5), a final LayerNorm,
average pooling, classifier. Their Cycle FC is a deformable convolution with fixed offsets;
mixlab's (:class:`mixlab.mixers.shift.CycleFC`) shifts and multiplies instead, with the
same result.
"""
from __future__ import annotations

import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, OverlapPatchEmbed, stochastic_depth_rates
from ..mixers.shift import CycleFC, CycleMixer
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .nano import register_nano
from .blocks import MetaBlock


class CycleMLP(HierarchicalModel):
    """CycleMLP: overlapping 7x7/4 stem, four stages joined by 3x3/2 convolutions, blocks of
    LayerNorm + Cycle mixer and LayerNorm + MLP, final LayerNorm, average pooling,
    classifier. ``kernel_size``: the cycle length of the Cycle FC layers (3 in the paper).
    Any input size of at least 32 works (the offsets do not depend on the map size)."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(2, 2, 4, 2),
                 dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4), kernel_size: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        if not len(depths) == len(dims) == len(mlp_ratios):
            raise ValueError(f"depths {tuple(depths)}, dims {tuple(dims)} and mlp_ratios {tuple(mlp_ratios)} "
                             f"must have one entry per stage")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth, ratio) in enumerate(zip(dims, depths, mlp_ratios)):
            down = ConvEmbed(dims[i - 1], dim, 3, 2, 1) if i else None
            blocks = [MetaBlock(dim, CycleMixer(dim, kernel_size, proj_drop=drop_rate), mlp_ratio=ratio,
                                norm_layer=nn.LayerNorm, drop=drop_rate, drop_path=dpr[i][j]) for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size, stem=OverlapPatchEmbed(in_chans, dims[0], 7, 4, 2),
                         stages=stages, norm=nn.LayerNorm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info,
                         stage_mixers=[f"cycle FC 1x{kernel_size} + {kernel_size}x1 + channel FC, split attention"]
                         * len(depths))
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    """The authors' init: truncated normal (std 0.02) for linear and Cycle FC weights, zero
    biases; convolutions keep PyTorch's default."""
    init_weights_vit(m)
    if isinstance(m, CycleFC):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@register_model
def cyclemlp_b1(**kwargs):
    """CycleMLP-B1 (15.16M, 2.12 GMACs; the paper's ImageNet table: 15.2M / 2.1G, the authors'
    README 15M / 2.1G): depths 2-2-4-2, widths 64-128-320-512, MLP ratio 4."""
    return build(CycleMLP, dict(depths=(2, 2, 4, 2)), kwargs)


@register_model
def cyclemlp_b2(**kwargs):
    """CycleMLP-B2 (26.80M, 3.88 GMACs; the paper's ImageNet table: 26.8M / 3.9G, README 27M / 3.9G):
    depths 2-3-10-3, widths 64-128-320-512, MLP ratio 4."""
    return build(CycleMLP, dict(depths=(2, 3, 10, 3)), kwargs)


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    return MetaBlock(width, CycleMixer(width, st["kernel"], proj_drop=drop), mlp_ratio=mlp_ratio,
                     norm_layer=nn.LayerNorm, drop=drop, drop_path=drop_path)


register_spec_mixer("cycle", {"kernel": 3}, "cycle FC (H, W) + channel FC, split attention (CycleMLP)", _spec_block)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# CycleMLP: cycle fully-connected layers along H and W and a channel FC, split attention
register_nano("nano_cyclemlp", "patch2 / cycle:2x40 / cycle:4x80 / cycle:2x160")
