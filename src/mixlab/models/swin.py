"""Swin Transformer (Liu et al., 2021): the generic block with shifted-window attention,
in four stages joined by patch merging."""
from __future__ import annotations

import math
import re
from functools import partial

import torch.nn as nn

from ..layers import ClassifierHead, PatchEmbed, PatchMerging, stochastic_depth_rates
from ..layers.embed import CETNetStem, ConvolutionalEmbedding
from ..mixers import WindowAttention
from ..registry import (IMAGENET_MEAN_STD, register_architecture_kwargs, register_default_weights, register_layout,
                        register_model)
from .base import HierarchicalModel, Stage, build, init_weights_cetnet, init_weights_vit
from .blocks import MetaBlock


class SwinTransformer(HierarchicalModel):
    """Swin: patchify stem (4x4) + LayerNorm, then per stage patch merging and blocks that
    alternate regular and shifted (by half a window) window attention. Any input size
    divisible by the patch size works (windows are padded and masked).

    ``conv_embed=True`` is CETNet's "CE generalisation" (Wang et al., ECCV 2022, arXiv
    2207.13317, its Fig. 1): the patchify stem becomes CETNet's convolutional stem (four
    Fused-MBConvs of width ``embed_dim // 2``, a 1x1 convolution, LayerNorm; stride 4, so
    ``patch_size`` must be 4) and each patch merging a convolutional embedding (two MBConvs,
    the first with stride 2, a 1x1 convolution, LayerNorm); see ``mixlab.layers.embed``. Any
    input size of at least 4 pixels then works."""

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, conv_embed: bool = False):
        norm = partial(nn.LayerNorm, eps=1e-5)
        if conv_embed:
            if patch_size != 4:
                raise ValueError(f"conv_embed=True uses CETNet's stride-4 convolutional stem: patch_size must be 4, "
                                 f"got {patch_size}")
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            blocks = [MetaBlock(dim, WindowAttention(dim, heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                                                     qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate),
                                mlp_ratio=mlp_ratio, norm_layer=norm, drop=drop_rate, drop_path=dpr[i][j])
                      for j in range(depth)]
            if i == 0:
                down = None
            elif conv_embed:
                down = ConvolutionalEmbedding(dims[i - 1], dim, 2, 2, "mbconv", 2.0, norm_layer=norm)
            else:
                down = PatchMerging(dims[i - 1], dim, norm)
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size,
                         stem=(CETNetStem(in_chans, embed_dim // 2, embed_dim, norm_layer=norm) if conv_embed
                               else PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm)),
                         stages=stages, norm=norm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=[f"window attention ({window_size}x{window_size}, shifted)"]
                         * len(depths))
        self.min_input_size = patch_size
        self.apply(init_weights_vit)
        if conv_embed:
            for module in [self.stem] + [stage.downsample for stage in self.stages]:
                module.apply(init_weights_cetnet)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


@register_model
def swin_tiny_patch4_window7_224(**kwargs):
    """Swin-T (28.3M, 4.5 GMACs)."""
    return build(SwinTransformer, dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), kwargs)


@register_model
def swin_small_patch4_window7_224(**kwargs):
    """Swin-S (49.6M, 8.7 GMACs)."""
    return build(SwinTransformer, dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), kwargs)


@register_model
def swin_base_patch4_window7_224(**kwargs):
    """Swin-B (87.8M, 15.4 GMACs)."""
    return build(SwinTransformer, dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), kwargs)


# -- checkpoints: timm's and microsoft/Swin-Transformer's names, window size, default weights -------------------
def _rules(merge_at_end: bool) -> list:
    shift = 1 if merge_at_end else 0
    return [
        (r"^patch_embed\.(.+)$", r"stem.\1"),
        (r"^layers\.(\d+)\.downsample\.(.+)$", lambda m: f"stages.{int(m[1]) + shift}.downsample.{m[2]}"),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.(.+)$", r"stages.\1.blocks.\2.mixer.\3"),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]


_BLOCKS = re.compile(r"^layers\.\d+\.blocks\.\d+\.")


def _is_authors(keys: list[str]) -> bool:
    """The authors (and timm < 0.9) merge patches at the END of stage i (layers.0 has one, the last
    has none) and call the classifier `head`; timm >= 0.9 merges at the start."""
    if not any(_BLOCKS.match(k) for k in keys):
        return False
    if any(k.startswith("layers.0.downsample.") for k in keys):
        return True
    return not any(re.match(r"^layers\.\d+\.downsample\.", k) for k in keys) and "head.weight" in keys


def _architecture_kwargs(sd: dict, fmt: str, model: SwinTransformer) -> dict:
    """``window_size`` of a checkpoint whose relative position tables are for another window."""
    table = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
    if table is not None and table.ndim == 2:
        side = math.isqrt(table.shape[0])
        if side * side == table.shape[0] and side % 2 == 1:
            window = (side + 1) // 2
            if (window, window) != tuple(model.stages[0].blocks[0].mixer.window_size):
                return {"window_size": window}
    return {}


register_layout("authors-swin", "swin", _is_authors, _rules(merge_at_end=True), model_class=SwinTransformer,
                broad=True)
register_layout("timm", "swin", [_BLOCKS.pattern], _rules(merge_at_end=False), model_class=SwinTransformer,
                broad=True)
register_architecture_kwargs("swin", _architecture_kwargs)
for _size in ("tiny", "small", "base"):
    register_default_weights(f"swin_{_size}_patch4_window7_224",
                             f"hf-hub:timm/swin_{_size}_patch4_window7_224.ms_in1k", **IMAGENET_MEAN_STD,
                             crop_pct=0.9)
