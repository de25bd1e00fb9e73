"""The generic block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

One block, generic over its spatial mixer (the MetaFormer view): ViT, DeiT, Swin,
MLP-Mixer, PoolFormer and Container are all this block with another mixer, norm or
position encoding. Families whose block truly differs (ConvNeXt, ResNet) define their own.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import DropPath, LayerScale, Mlp


class MetaBlock(nn.Module):
    """Pre-norm residual block over a channels-last map or token sequence.

    ``pos``: an optional module applied first (conditional position encoding, which adds
    its own residual); ``layer_scale``: LayerScale init value or None.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU, drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 pos: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.pos = pos if pos is not None else nn.Identity()
        self.norm1 = norm_layer(dim)
        self.mixer = mixer
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos(x)
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
