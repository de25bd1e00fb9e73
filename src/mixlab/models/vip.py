"""Vision Permutator (Hou et al., 2021, "Vision Permutator: A Permutable MLP-Like Architecture
for Visual Recognition"; authors' code: github.com/Andrew-Qibin/VisionPermutator): the
generic block with the Permute-MLP as its mixer — linear layers along the height and along
the width of the map (static affinities along a column / a row) and across channels,
fused by split attention."""
from __future__ import annotations

import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, PatchEmbed, stochastic_depth_rates
from ..mixers.token_mlp import PermuteMLP
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit, patch_grid
from .nano import register_nano
from .blocks import MetaBlock


class VisionPermutator(HierarchicalModel):
    """Vision Permutator: a ``patch_size`` patchify stem, then stages of Permutator blocks
    (LN, Permute-MLP, LN, channel MLP of ratio ``mlp_ratio``), LN, average pooling,
    classifier.

    Between stage i and i+1 a 2x2 stride-2 convolution halves the map when
    ``transitions[i]``; otherwise a 1x1 convolution changes the width if the widths differ,
    and nothing happens if they are equal (the authors' rule). ``segment_dims``: the
    number of channel segments of each stage's Permute-MLP; the authors set it to the
    map's side, so that the height and width layers are C x C. The Permute-MLP fixes the
    input size to ``img_size``. LayerNorm eps 1e-5, stochastic depth rising linearly over
    the blocks, truncated-normal (0.02) linear weights, as the authors.
    """

    def __init__(self, img_size=224, patch_size: int = 7, in_chans: int = 3, num_classes: int = 1000,
                 depths=(4, 3, 8, 3), dims=(192, 384, 384, 384), transitions=(True, False, False, False),
                 segment_dims=(32, 16, 16, 16), mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if not len(depths) == len(dims) == len(segment_dims) or len(transitions) < len(depths) - 1:
            raise ValueError(f"depths, dims and segment_dims need one entry per stage, transitions one per stage "
                             f"after the first; got {len(depths)}, {len(dims)}, {len(segment_dims)} and "
                             f"{len(transitions)}")
        grid = patch_grid(img_size, patch_size)
        reduction = patch_size
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        for i, (dim, depth, seg) in enumerate(zip(dims, depths, segment_dims)):
            down = None
            if i > 0 and transitions[i - 1]:
                if grid[0] % 2 or grid[1] % 2:
                    raise ValueError(f"stage {i} halves a {grid[0]}x{grid[1]} map; use an img_size whose map "
                                     f"stays even there")
                down, grid, reduction = ConvEmbed(dims[i - 1], dim, 2, 2), (grid[0] // 2, grid[1] // 2), reduction * 2
            elif i > 0 and dims[i - 1] != dim:
                down = ConvEmbed(dims[i - 1], dim, 1, 1)
            blocks = [MetaBlock(dim, PermuteMLP(dim, grid, seg, qkv_bias=qkv_bias, proj_drop=drop_rate),
                                mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm, drop=drop_rate, drop_path=dpr[i][j])
                      for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            mixers.append(f"permute-MLP ({grid[0]}x{grid[1]}, {seg} segments)")
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, dims[0]),
                         stages=stages, norm=nn.LayerNorm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        self.apply(init_weights_vit)


def _vip(depths, dims, transitions, segment_dims, kwargs):
    return build(VisionPermutator, dict(patch_size=7, depths=depths, dims=dims, transitions=transitions,
                                        segment_dims=segment_dims, mlp_ratio=3.0), kwargs)


@register_model
def vip_s7(**kwargs):
    """ViP-Small/7 (25.11M, 6.90 GMACs; the paper and the authors' README: 25M / 6.9 GFLOPs;
    PaddleViT's port of the authors' weights: 25.1M / 7.0G)."""
    return _vip((4, 3, 8, 3), (192, 384, 384, 384), (True, False, False, False), (32, 16, 16, 16), kwargs)


@register_model
def vip_m7(**kwargs):
    """ViP-Medium/7 (55.27M, 16.28 GMACs; the authors' README: 55M; PaddleViT's port of the authors'
    weights: 55.3M / 16.4G. The "55534632" comment in the authors' code is 512² more than their own
    definition builds.)"""
    return _vip((4, 3, 14, 3), (256, 256, 512, 512), (False, True, False, False), (32, 32, 16, 16), kwargs)


@register_model
def vip_l7(**kwargs):
    """ViP-Large/7 (87.78M, 24.34 GMACs; the authors' README: 88M; PaddleViT's port of the authors'
    weights: 87.8M / 24.5G)."""
    return _vip((8, 8, 16, 4), (256, 512, 512, 512), (True, False, False, False), (32, 16, 16, 16), kwargs)


# -- specifications -------------------------------------------------------------------------------
def _spec_block(st, width, grid, ratio, drop_path, index, drop):
    return MetaBlock(width, PermuteMLP(width, grid, int(st["segments"]), proj_drop=drop), mlp_ratio=ratio,
                     norm_layer=nn.LayerNorm, drop=drop, drop_path=drop_path)


register_spec_mixer("permute", {"segments": 8}, "ViP permute-MLP",
                    _spec_block)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# Vision Permutator: linear layers along height, width and channels, split-attention fusion
register_nano("nano_vip", "patch2 / permute:2x40:mlp_ratio=3 / permute:2x80:mlp_ratio=3 / permute:4x160:mlp_ratio=3")
