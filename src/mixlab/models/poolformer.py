"""PoolFormer (Yu et al., 2022, "MetaFormer is actually what you need for vision"): the
generic block with the plainest possible mixer, ``avgpool(x) - x``."""
from __future__ import annotations

import re
from functools import partial

import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, GroupNorm1NHWC, OverlapPatchEmbed, stochastic_depth_rates
from ..mixers import Pooling
from ..registry import (IMAGENET_MEAN_STD, register_architecture_kwargs, register_default_weights, register_layout,
                        register_model)
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


# -- checkpoints: timm's and sail-sg/poolformer's names, timm's head, default weights ----------------------------
# the final norm's weights go to whichever place the model has: head.norm (the 'pooled'
# PoolFormer, timm's) or norm (the 'group' PoolFormer, the authors'); timm's pretrained
# PoolFormer weights are the authors', so either placement is a trained network
TIMM_RULES = [
    (r"^stem\.conv\.(.+)$", r"stem.proj.\1"),
    (r"^stages\.(\d+)\.downsample\.conv\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.layer_scale([12])\.scale$", r"stages.\1.blocks.\2.ls\3.gamma"),
    (r"^head\.norm\.(.+)$", (r"head.norm.\1", r"norm.\1")),
]


def _authors_rules(keys: list[str]) -> list:
    """The authors' ``network`` interleaves stages and downsamplings (PatchEmbed, with a ``proj``
    convolution); a downsampling opens the next stage."""
    idx = sorted({int(m[1]) for k in keys if (m := re.match(r"^network\.(\d+)\.", k))})
    down = {i for i in idx if any(re.match(rf"^network\.{i}\.proj\.", k) for k in keys)}
    where, stage = {}, 0
    for i in idx:  # a stage's index, or for a downsampling the stage it opens
        where[i] = stage
        stage += i not in down

    def block(m, rest: str):
        i = int(m[1])
        return None if i in down else f"stages.{where[i]}.blocks.{m[2]}.{rest}"

    return [
        (r"^patch_embed\.proj\.(.+)$", r"stem.proj.\1"),
        (r"^network\.(\d+)\.proj\.(.+)$",
         lambda m: f"stages.{where[int(m[1])]}.downsample.proj.{m[2]}" if int(m[1]) in down else None),
        (r"^network\.(\d+)\.(\d+)\.layer_scale_([12])$", lambda m: block(m, f"ls{m[3]}.gamma")),
        (r"^network\.(\d+)\.(\d+)\.(.+)$", lambda m: block(m, m[3])),
        (r"^norm\.(.+)$", (r"norm.\1", r"head.norm.\1")),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]


def _timm_head_warning(sd: dict, target: dict) -> str | None:
    if "head.norm.weight" in sd and "head.norm.weight" not in target:
        return ("this is timm's PoolFormer checkpoint, which normalises after pooling; the model normalises "
                "the feature map before pooling (head_norm='group', the authors' network), so its outputs "
                "will differ from timm's: build it with head_norm='pooled' to reproduce them "
                "(create_model(..., pretrained=...) does so itself)")
    return None


def _architecture_kwargs(sd: dict, fmt: str, model: PoolFormer) -> dict:
    """timm's checkpoints (and mixlab's of that variant) need timm's head: ``head_norm='pooled'``."""
    if fmt == "timm" or (fmt == "mixlab" and "head.norm.weight" in sd and "norm.weight" not in sd):
        return {"head_norm": "pooled"}
    return {}


register_layout("authors-poolformer", "poolformer", [r"^network\.\d+\."], _authors_rules, model_class=PoolFormer,
                broad=True)
register_layout("timm", "poolformer",
                [r"\.layer_scale[12]\.scale$", r"^stages\.\d+\.downsample\.conv\.", r"^stem\.conv\.weight$"],
                TIMM_RULES, model_class=PoolFormer, broad=True, warning=_timm_head_warning)
register_architecture_kwargs("poolformer", _architecture_kwargs)
for _name in ("poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"):
    register_default_weights(_name, f"hf-hub:timm/{_name}.sail_in1k", **IMAGENET_MEAN_STD,
                             crop_pct=0.95 if _name.startswith("poolformer_m") else 0.9)
