"""GFNet (Rao et al., 2021, "Global Filter Networks for Image Classification"): a ViT-style
network whose spatial mixer is a learnable global filter in the frequency domain — a
static circulant affinity per channel, applied in O(N log N) by FFTs.

The isotropic models (GFNet-XS, -S, -B) follow the authors' ``gfnet.py`` / ``main_gfnet.py``
(raoyongming/GFNet): 16x16 patch embedding, a learned absolute position embedding, blocks
of ``x + MLP(LN(GlobalFilter(LN(x))))`` — one residual around the filter *and* the MLP,
LayerNorm eps 1e-6, MLP ratio 4 — a final LayerNorm, mean pooling and a linear
classifier. The hierarchical GFNet-H models (``GFNetPyramid`` in the authors' code) use 4x4
patches, 2x2 stride-2 convolutions between four stages, the position embedding at the
first stage only, and LayerScale on the block's residual branch.

Another input size than ``img_size`` is handled the authors' way for fine-tuning: the
position embedding is resampled bicubically and each filter's complex weights are
resampled bicubically (corners aligned) to the new grid (see
:func:`mixlab.mixers.global_filter.resample_filter`). At ``img_size`` the parameters are used
as they are.

The authors' checkpoints convert into these models (``mixlab.weights.convert_state_dict``,
format 'authors-gfnet'): the isotropic layout (``patch_embed.proj``, ``pos_embed``,
``blocks.i.filter.complex_weight``, ``head``) and GFNet-H's (``patch_embed.s.proj``,
``blocks.s.j...``, ``gamma``). timm has no GFNet.

Parameters and GMACs at 224 (``mixlab.analysis.profile_model``; FFTs counted by the
authors' rule, see :mod:`mixlab.analysis.complexity`), against the authors' figures:
GFNet-XS 15.99M / 2.85 (paper 16M / 2.9G, README 2.8G), GFNet-S 24.87M / 4.47 (25M / 4.5G),
GFNet-B 43.12M / 7.91 (43M / 7.9G), GFNet-H-Ti 15.09M / 2.06 (15M / 2.0G), GFNet-H-S
32.16M / 4.62 (32M / 4.5G), GFNet-H-B 53.74M / 8.57 (54M / 8.4G; README figures for GFNet-H).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import (AbsolutePosEmbed, ClassifierHead, ConvEmbed, DropPath, LayerScale, Mlp, PatchEmbed,
                      stochastic_depth_rates)
from ..mixers.global_filter import GlobalFilter
from ..registry import register_layout, register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit, patch_grid
from .nano import register_nano

__all__ = ["GFNet", "GFNetBlock"]


class GFNetBlock(nn.Module):
    """``x + drop_path(ls(mlp(norm2(filter(norm1(x))))))`` on a (B, H, W, C) map: the
    global filter and the MLP share one residual connection (the authors' ``Block``; with
    ``layer_scale`` their ``BlockLayerScale``)."""

    def __init__(self, dim: int, grid_size, mlp_ratio: float = 4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = GlobalFilter(dim, grid_size)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mlp(self.norm2(self.mixer(self.norm1(x))))))


class _PatchPosEmbed(PatchEmbed):
    """Patchify convolution, then a learned absolute position embedding (resampled for
    another grid) and dropout; NCHW image in, (B, H/p, W/p, C) out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, grid_size, drop: float = 0.0):
        super().__init__(patch_size, in_chans, embed_dim)
        self.pos = AbsolutePosEmbed(grid_size, embed_dim)
        self.pos_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        B, H, W, C = x.shape
        x = self.pos(x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)
        return self.pos_drop(x)


class GFNet(HierarchicalModel):
    """GFNet. One stage (``depths=(12,)``, ``embed_dims=(384,)``, ``patch_size=16``) is the
    isotropic network; four stages (``patch_size=4``) the hierarchical GFNet-H, whose
    stages are joined by 2x2 stride-2 convolutions (no norm, as the authors' ``DownLayer``).

    ``layer_scale``: LayerScale init value on every block's residual branch (GFNet-H) or
    None (isotropic GFNet). Each filter is built for its stage's grid at ``img_size``.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims=(384,), depths=(12,), mlp_ratio: float = 4.0, layer_scale: float | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        embed_dims, depths = tuple(embed_dims), tuple(depths)
        if len(embed_dims) != len(depths) or not depths:
            raise ValueError(f"embed_dims {embed_dims} and depths {depths} must list the same (non-zero) number "
                             f"of stages")
        grid = first_grid = patch_grid(img_size, patch_size)
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            down = None
            if i:
                down = ConvEmbed(embed_dims[i - 1], dim, 2, 2)
                grid = (grid[0] // 2, grid[1] // 2)
            blocks = [GFNetBlock(dim, grid, mlp_ratio, norm, drop=drop_rate, drop_path=dpr[i][j],
                                 layer_scale=layer_scale) for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
            mixers.append(f"global filter (FFT, {grid[0]}x{grid[1]})")
        super().__init__(in_chans, num_classes, img_size,
                         stem=_PatchPosEmbed(patch_size, in_chans, embed_dims[0], first_grid, drop=drop_rate),
                         stages=stages, norm=norm(embed_dims[-1]),
                         head=ClassifierHead(embed_dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        self.patch_size = patch_size
        self.apply(init_weights_vit)

    def no_weight_decay(self) -> set[str]:
        return {"stem.pos.pos_embed"}


def _gfnet(defaults: dict, kwargs: dict) -> GFNet:
    return build(GFNet, defaults, kwargs)


@register_model
def gfnet_xs(**kwargs):
    """GFNet-XS: width 384, 12 blocks, 16x16 patches (15.99M, 2.85 GMACs; paper 16M / 2.9G,
    the authors' README 16M / 2.8G)."""
    return _gfnet(dict(patch_size=16, embed_dims=(384,), depths=(12,)), kwargs)


@register_model
def gfnet_s(**kwargs):
    """GFNet-S: width 384, 19 blocks, 16x16 patches (24.87M, 4.47 GMACs; paper 25M / 4.5G)."""
    return _gfnet(dict(patch_size=16, embed_dims=(384,), depths=(19,)), kwargs)


@register_model
def gfnet_b(**kwargs):
    """GFNet-B: width 512, 19 blocks, 16x16 patches (43.12M, 7.91 GMACs; paper 43M / 7.9G)."""
    return _gfnet(dict(patch_size=16, embed_dims=(512,), depths=(19,)), kwargs)


@register_model
def gfnet_h_ti(**kwargs):
    """GFNet-H-Ti: 4x4 patches, widths 64-128-256-512, depths 3-3-10-3, LayerScale 1e-3
    (15.09M, 2.06 GMACs; the authors' README 15M / 2.0G)."""
    return _gfnet(dict(patch_size=4, embed_dims=(64, 128, 256, 512), depths=(3, 3, 10, 3), layer_scale=1e-3),
                  kwargs)


@register_model
def gfnet_h_s(**kwargs):
    """GFNet-H-S: 4x4 patches, widths 96-192-384-768, depths 3-3-10-3, LayerScale 1e-5
    (32.16M, 4.62 GMACs; the authors' README 32M / 4.5G)."""
    return _gfnet(dict(patch_size=4, embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), layer_scale=1e-5),
                  kwargs)


@register_model
def gfnet_h_b(**kwargs):
    """GFNet-H-B: 4x4 patches, widths 96-192-384-768, depths 3-3-27-3, LayerScale 1e-6
    (53.74M, 8.57 GMACs; the authors' README 54M / 8.4G)."""
    return _gfnet(dict(patch_size=4, embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), layer_scale=1e-6),
                  kwargs)


# ---------------------------------------------------------------------------------------
# the authors' checkpoints (GFNet and GFNet-H) -> mixlab names
# ---------------------------------------------------------------------------------------
AUTHORS_RULES = [
    (r"^pos_embed$", "stem.pos.pos_embed"),
    # GFNet-H (the authors' GFNetPyramid): patch_embed.i and blocks.i.j per stage
    (r"^patch_embed\.0\.proj\.(.+)$", r"stem.proj.\1"),
    (r"^patch_embed\.([1-9])\.proj\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^blocks\.(\d+)\.(\d+)\.filter\.(.+)$", r"stages.\1.blocks.\2.mixer.\3"),
    (r"^blocks\.(\d+)\.(\d+)\.gamma$", r"stages.\1.blocks.\2.ls.gamma"),
    (r"^blocks\.(\d+)\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
    # isotropic GFNet: one stage
    (r"^patch_embed\.proj\.(.+)$", r"stem.proj.\1"),
    (r"^blocks\.(\d+)\.filter\.(.+)$", r"stages.0.blocks.\1.mixer.\2"),
    (r"^blocks\.(\d+)\.(.+)$", r"stages.0.blocks.\1.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("authors-gfnet", "gfnet", [r"^blocks\.\d+\.(\d+\.)?filter\.complex_weight$"], AUTHORS_RULES,
                model_class=GFNet, mixlab_patterns=[r"^stages\.\d+\.blocks\.\d+\.mixer\.complex_weight$"])


# ---------------------------------------------------------------------------------------
# the specification language: `gfilter` stages
# ---------------------------------------------------------------------------------------
def _spec_block(stage: dict, width: int, grid, mlp_ratio: float, drop_path: float, index: int, drop: float):
    return GFNetBlock(width, grid, mlp_ratio, drop=drop, drop_path=drop_path)


register_spec_mixer("gfilter", {}, "global filter (FFT)", _spec_block)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# GFNet: a learned global filter in the Fourier domain (a circulant affinity), abs. position embedding
register_nano("nano_gfnet", "patch2 / gfilter:2x40:pos=abs / gfilter:3x80 / gfilter:4x160")
