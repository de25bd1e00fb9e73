"""PoolFormer (Yu et al., 2022, "MetaFormer is actually what you need for vision"): the
generic block with the plainest possible mixer, ``avgpool(x) - x``."""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, GroupNorm1NHWC, OverlapPatchEmbed, stochastic_depth_rates
from ..mixers import Pooling
from ..registry import register_model
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .blocks import MetaBlock


class PoolFormer(HierarchicalModel):
    """PoolFormer: 7x7/4 overlapping stem, stages joined by 3x3/2 convolutions, blocks of
    GroupNorm(1) + pooling and GroupNorm(1) + MLP with LayerScale, final GroupNorm, mean
    pooling, classifier.

    ``head_norm``: where the final norm sits. 'group' (default, the authors' network):
    GroupNorm(1) on the final feature map, then mean pooling. 'pooled' (timm's
    ``poolformer_*``): mean pooling first, then a LayerNorm (eps 1e-6) on the pooled
    vector, as ``head.norm``; the parameter count is the same. timm's checkpoints need
    'pooled' to be reproduced exactly (``mixlab.weights.architecture_kwargs`` says so).
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(2, 2, 6, 2),
                 dims=(64, 128, 320, 512), mlp_ratio: float = 4.0, pool_size: int = 3,
                 layer_scale: float | None = 1e-5, head_norm: str = "group", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        if head_norm not in ("group", "pooled"):
            raise ValueError(f"head_norm must be 'group' (the authors' GroupNorm on the final map) or 'pooled' "
                             f"(timm's LayerNorm after pooling), got {head_norm!r}")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = ConvEmbed(dims[i - 1], dim, 3, 2, 1) if i else None
            blocks = [MetaBlock(dim, Pooling(pool_size), mlp_ratio=mlp_ratio, norm_layer=GroupNorm1NHWC,
                                drop=drop_rate, drop_path=dpr[i][j], layer_scale=layer_scale) for j in range(depth)]
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size, stem=OverlapPatchEmbed(in_chans, dims[0], 7, 4, 2),
                         stages=stages, norm=GroupNorm1NHWC(dims[-1]) if head_norm == "group" else nn.Identity(),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate,
                                             norm_layer=partial(nn.LayerNorm, eps=1e-6) if head_norm == "pooled"
                                             else None),
                         feature_info=info, stage_mixers=[f"pooling {pool_size}x{pool_size}"] * len(depths))
        self.head_norm = head_norm
        self.apply(init_weights_vit)


def _poolformer(depths, dims, layer_scale, kwargs):
    return build(PoolFormer, dict(depths=depths, dims=dims, layer_scale=layer_scale), kwargs)


_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)


@register_model
def poolformer_s12(**kwargs):
    """PoolFormer-S12 (11.9M, 1.8 GMACs)."""
    return _poolformer((2, 2, 6, 2), _S, 1e-5, kwargs)


@register_model
def poolformer_s24(**kwargs):
    """PoolFormer-S24 (21.4M, 3.4 GMACs)."""
    return _poolformer((4, 4, 12, 4), _S, 1e-5, kwargs)


@register_model
def poolformer_s36(**kwargs):
    """PoolFormer-S36 (30.9M, 5.0 GMACs)."""
    return _poolformer((6, 6, 18, 6), _S, 1e-6, kwargs)


@register_model
def poolformer_m36(**kwargs):
    """PoolFormer-M36 (56.2M, 8.8 GMACs)."""
    return _poolformer((6, 6, 18, 6), _M, 1e-6, kwargs)


@register_model
def poolformer_m48(**kwargs):
    """PoolFormer-M48 (73.5M, 11.5 GMACs)."""
    return _poolformer((8, 8, 24, 8), _M, 1e-6, kwargs)
