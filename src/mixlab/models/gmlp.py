"""gMLP (Liu et al., 2021, "Pay attention to MLPs"): one residual branch per block, a channel
MLP whose hidden features pass a spatial gating unit — a static N x N affinity on one half
of the channels, gating the other half elementwise."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import ClassifierHead, DropPath, PatchEmbed
from ..mixers.token_mlp import SpatialGatingMLP
from ..registry import (INCEPTION_MEAN_STD, register_default_weights, register_layout, register_model,
                        register_spec_mixer)
from .base import HierarchicalModel, Stage, build, init_weights_mixer, patch_grid
from .nano import register_nano


class GMLPBlock(nn.Module):
    """``x + drop_path(mixer(norm(x)))`` with the gMLP branch (:class:`SpatialGatingMLP`) as
    its mixer; channels-last (B, H, W, C) or (B, N, C) in and out."""

    def __init__(self, dim: int, hidden_dim: int, num_tokens: int, grid_size=None, norm_layer=None,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm = (norm_layer or partial(nn.LayerNorm, eps=1e-6))(dim)
        self.mixer = SpatialGatingMLP(dim, hidden_dim, num_tokens, grid_size, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class GMLP(HierarchicalModel):
    """gMLP: patchify stem, ``depth`` gMLP blocks (LN, fc1 to ``mlp_ratio``·C, GELU, spatial
    gating unit, fc2), LN, average pooling, classifier. The gating unit's token layer fixes
    the input size to ``img_size``.

    As timm (the authors released no code): LayerNorm eps 1e-6 in the blocks and at the end,
    1e-5 inside the gating unit; the same stochastic-depth rate in every block;
    Xavier-uniform linear layers with tiny biases, a zero classifier, and the paper's
    gating init (token weights near zero, bias 1).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 256, depth: int = 30, mlp_ratio: float = 6.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        grid = patch_grid(img_size, patch_size)
        n = grid[0] * grid[1]
        hidden = int(mlp_ratio * embed_dim)
        blocks = [GMLPBlock(embed_dim, hidden, n, grid, drop=drop_rate, drop_path=drop_path_rate)
                  for _ in range(depth)]
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, embed_dim),
                         stages=[Stage(None, blocks)], norm=nn.LayerNorm(embed_dim, eps=1e-6),
                         head=ClassifierHead(embed_dim, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=[dict(num_chs=embed_dim, reduction=patch_size, module="stages.0")],
                         stage_mixers=[f"spatial gating unit ({n} tokens)"])
        self.min_input_size = patch_size
        init_weights_mixer(self)  # the gating units' token layers (not nn.Linear) keep the paper's init


@register_model
def gmlp_s16_224(**kwargs):
    """gMLP-S (19.42M, 4.39 GMACs; timm ``gmlp_s16_224``; paper Table: 20M / 4.5 GFLOPs)."""
    return build(GMLP, dict(patch_size=16, embed_dim=256, depth=30, mlp_ratio=6.0), kwargs)


@register_model
def gmlp_b16_224(**kwargs):
    """gMLP-B (73.08M, 15.72 GMACs; timm ``gmlp_b16_224``; paper Table: 73M / 15.8 GFLOPs)."""
    return build(GMLP, dict(patch_size=16, embed_dim=512, depth=30, mlp_ratio=6.0), kwargs)


# -- timm's names -------------------------------------------------------------------------------
register_layout("timm", "gmlp", [r"^blocks\.\d+\.mlp_channels\.gate\."], [
    (r"^blocks\.(\d+)\.mlp_channels\.gate\.(norm|proj)\.(weight|bias)$", r"stages.0.blocks.\1.mixer.\2.\3"),
    (r"^blocks\.(\d+)\.mlp_channels\.(fc[12])\.(weight|bias)$", r"stages.0.blocks.\1.mixer.\2.\3"),
    (r"^blocks\.(\d+)\.norm\.(weight|bias)$", r"stages.0.blocks.\1.norm.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
], model_class=GMLP)


# -- specifications -------------------------------------------------------------------------------
def _spec_block(st, width, grid, ratio, drop_path, index, drop):
    hidden = 2 * max(1, round(ratio * width / 2))  # even: a gate half and a value half
    return GMLPBlock(width, hidden, grid[0] * grid[1], grid, drop=drop, drop_path=drop_path)


register_spec_mixer("gmlp", {}, "gMLP spatial gating unit", _spec_block)
register_default_weights("gmlp_s16_224", "hf-hub:timm/gmlp_s16_224.ra3_in1k", **INCEPTION_MEAN_STD)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# gMLP: spatial gating unit (a linear token layer on half of the expanded channels gates the other half)
register_nano("nano_gmlp", "patch4 / gmlp:8x128:mlp_ratio=6")
