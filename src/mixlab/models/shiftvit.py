"""ShiftViT (Wang et al., 2022, "When Shift Operation Meets Vision Transformer: An Extremely
Simple Alternative to Attention Mechanism"): Swin's skeleton with the attention layer
replaced by a partial channel shift — zero parameters, zero multiply-adds, and a static
0/1 affinity.

The configurations are those of the authors' code (microsoft/SPACH, ``models/shiftvit.py``
and ``models/registry.py``, the ``shiftvit_r2_*`` models, which are the paper's Shift-T /
Shift-S / Shift-B: MLP ratio 2, depths 6-8-18-6 and 10-18-36-10).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import (BatchNormNHWC, ClassifierHead, ConvEmbed, DropPath, GroupNorm1NHWC, Mlp, PatchEmbed,
                      stochastic_depth_rates)
from ..mixers.shift import PartialShift
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build
from .nano import register_nano

NORMS = {"bn": BatchNormNHWC, "gn1": GroupNorm1NHWC}


class ShiftViTBlock(nn.Module):
    """``x <- shift(x)``, then ``x + drop_path(mlp(norm(x)))``.

    The shift is not a residual branch: it moves the channels of the residual stream itself
    (the authors' block), and the block's only residual is the MLP's.
    """

    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 2.0, norm_layer=BatchNormNHWC,
                 act_layer=nn.GELU, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.mixer = PartialShift(dim, n_div)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(x)
        return x + self.drop_path(self.mlp(self.norm(x)))


class ShiftViT(HierarchicalModel):
    """ShiftViT: 4x4 patchify stem + norm, four stages of shift blocks joined by norm + 2x2
    stride-2 convolutions (no bias; the authors' patch merging), a final norm, average
    pooling, classifier.

    ``norm``: 'bn' (BatchNorm, the default; the paper's choice) or 'gn1' (GroupNorm with one
    group, the default of the authors' class, which they describe as a stand-in for
    LayerNorm); both have the same parameters. ``n_div``: 4/n_div of the channels shift.
    ``act``: 'gelu' or 'relu'. The authors trained with drop_path_rate 0.2 (T), 0.4 (S),
    0.6 (B).
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, patch_size: int = 4,
                 embed_dim: int = 96, depths=(6, 8, 18, 6), mlp_ratio: float = 2.0, n_div: int = 12,
                 norm: str = "bn", act: str = "gelu", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        if act not in ("gelu", "relu"):
            raise ValueError(f"act must be 'gelu' or 'relu', got {act!r}")
        norm_layer = NORMS[norm]
        act_layer = nn.GELU if act == "gelu" else nn.ReLU
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = ConvEmbed(dims[i - 1], dim, 2, 2, pre_norm=norm_layer, bias=False) if i else None
            blocks = [ShiftViTBlock(dim, n_div, mlp_ratio, norm_layer, act_layer, drop_rate, dpr[i][j])
                      for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        shifted = f"{4 * (dims[0] // n_div) / dims[0]:.0%}"
        super().__init__(in_chans, num_classes, img_size,
                         stem=PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm_layer),
                         stages=stages, norm=norm_layer(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=[f"partial shift ({shifted} of channels, 1 px)"] * len(depths))
        self.norm_kind = norm
        self._init()

    def _init(self):
        """The authors' init: truncated normal (std 0.02) linear and convolution weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _shiftvit(embed_dim, depths, n_div, kwargs):
    return build(ShiftViT, dict(embed_dim=embed_dim, depths=depths, mlp_ratio=2.0, n_div=n_div), kwargs)


@register_model
def shiftvit_tiny(**kwargs):
    """Shift-T (28.57M, 4.58 GMACs; the authors' ``shiftvit_r2_tiny``: width 96, depths
    6-8-18-6, MLP ratio 2, 1/3 of the channels shifted). The seed table rounds it to 28M /
    4.4G, the authors' README (microsoft/SPACH) to 29M / 4.5G."""
    return _shiftvit(96, (6, 8, 18, 6), 12, kwargs)


@register_model
def shiftvit_small(**kwargs):
    """Shift-S (50.30M, 8.74 GMACs; ``shiftvit_r2_small``: width 96, depths 10-18-36-10,
    MLP ratio 2). Seed table 50M / 8.5G; the authors' README 50M / 8.8G."""
    return _shiftvit(96, (10, 18, 36, 10), 12, kwargs)


@register_model
def shiftvit_base(**kwargs):
    """Shift-B (89.03M, 15.54 GMACs; ``shiftvit_r2_base``: width 128, depths 10-18-36-10,
    MLP ratio 2, 1/4 of the channels shifted). Seed table 88M / 15.2G."""
    return _shiftvit(128, (10, 18, 36, 10), 16, kwargs)


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    return ShiftViTBlock(width, st["n_div"], mlp_ratio, BatchNormNHWC, nn.GELU, drop, drop_path)


register_spec_mixer("shift", {"n_div": 12}, "partial shift (ShiftViT block, BatchNorm)", _spec_block)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# ShiftViT: a third of the channels shifted one pixel in four directions, no parameters, BN-MLP
register_nano("nano_shiftvit", "patch2 / shift:2x40:mlp_ratio=2 / shift:4x80:mlp_ratio=2 / shift:9x160:mlp_ratio=2")
