"""ViT_C and ViT_P (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021).

ViT_P is the plain ViT at the paper's four complexities (its Table 1, left): ViT-Ti / -S with the
MLP ratio cut from 4 to 3 (1GF, 4GF), ViT-B unchanged (18GF) and 3/5 of ViT-L, 14 blocks (36GF).
ViT_C (Table 1, right) replaces the 16x16/16 patchify stem by a small convolutional stem,
3x3 convolutions each followed by BatchNorm and ReLU, then one 1x1 convolution (with bias, no
norm or activation, like the patchify projection) to the transformer width, and removes one
transformer block so that the FLOPs stay those of ViT_P. Every 3x3 convolution either has
stride 2 and doubles the channels or stride 1 and keeps them; the stems' widths are
[24, 48, 96, 192] (1GF), [48, 96, 192, 384] (4GF) and [64, 128, 128, 256, 256, 512] (18GF;
36GF reuses it), strides 2 except the two stride-1 convolutions of the six-conv stem; the total
stride is 16 (14x14 tokens at 224) in all of them. Everything after the stem is ViT: a class
token, a learned position embedding, pre-norm blocks of global multi-head self-attention
(the mixer is :class:`mixlab.mixers.Attention`) and an MLP, a final LayerNorm, a linear head.

Sources: the paper (arXiv 2106.14881: Sec. 3 "Convolutional stem design / details", Table 1)
and the authors' code, facebookresearch/pycls ``pycls/models/vit.py`` (``ViTStemConv``: 3x3
convs without bias + BN + ReLU, a final conv with bias; ``init_weights_vit``: the last 1x1
convolution drawn from N(0, 2 / out_channels)). pycls counts "flops" as multiply-adds, as
mixlab's ``count_macs`` does.

Here: :class:`ViTConvStem` (the stem, NCHW in, NHWC out), :class:`VisionTransformerC` (mixlab's
:class:`~mixlab.models.vit.VisionTransformer` with that stem in place of ``patch_embed``), the
registered ``vit_c_{1,4,18,36}gf`` and ``vit_p_{1,4,36}gf`` (ViT_P-18GF *is*
``vit_base_patch16_224``), ``nano_vit_c`` for the arena, and timm's layout of a ViT whose
``patch_embed`` is a ``HybridEmbed`` over timm's ``ConvStem`` (timm registers no ViT_C model).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import register_layout, register_model
from .base import build, patch_grid
from .nano import register_nano
from .spec import create_from_spec
from .vit import VisionTransformer


class ViTConvStem(nn.Module):
    """The convolutional stem of ViT_C: for each ``channels[i]`` a 3x3 convolution of stride
    ``strides[i]`` (1 or 2; padding 1, no bias), BatchNorm and ReLU; then a 1x1 convolution
    (with bias) to ``embed_dim``. The total stride is the product of ``strides``; inputs whose
    sides are not multiples of it are rejected. NCHW in, NHWC out. The layers sit in one
    ``nn.Sequential`` (``convs``) so that :meth:`MixlabModel.fuse` folds the BatchNorms."""

    def __init__(self, in_chans: int = 3, channels=(24, 48, 96, 192), strides=None, embed_dim: int = 192):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        strides = tuple(int(s) for s in (strides if strides is not None else (2,) * len(channels)))
        if not channels:
            raise ValueError("a convolutional stem needs at least one 3x3 convolution: give channels, "
                             "e.g. (24, 48, 96, 192)")
        if len(strides) != len(channels):
            raise ValueError(f"the stem has {len(channels)} convolutions (channels {list(channels)}) but "
                             f"{len(strides)} strides {list(strides)}; give one stride per convolution")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"stem strides must each be 1 or 2 (the paper's design), got {list(strides)}")
        if any(c < 1 for c in channels) or embed_dim < 1:
            raise ValueError(f"stem widths must be positive, got channels {list(channels)}, embed_dim {embed_dim}")
        layers: list[nn.Module] = []
        prev = in_chans
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(prev, c, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            prev = c
        layers.append(nn.Conv2d(prev, embed_dim, 1))
        self.convs = nn.Sequential(*layers)
        self.channels, self.strides = channels, strides
        self.stride = math.prod(strides)
        # the authors' init of the last 1x1 convolution (pycls init_weights_vit); the 3x3s keep PyTorch's
        nn.init.normal_(self.convs[-1].weight, mean=0.0, std=math.sqrt(2.0 / embed_dim))
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        s = self.stride
        if H % s or W % s:
            raise ValueError(f"input size {H}x{W} is not divisible by the convolutional stem's total stride {s}; "
                             f"use a multiple of {s} (for example {max(s, H // s * s)}x{max(s, W // s * s)})")
        return self.convs(x).permute(0, 2, 3, 1)


class VisionTransformerC(VisionTransformer):
    """ViT with the convolutional stem (ViT_C): :class:`VisionTransformer` built with a patch
    size equal to the stem's total stride (so the token grid, the position embedding, the
    minimum input size and ``feature_info`` are the stem's), its ``patch_embed`` then replaced
    by a :class:`ViTConvStem`. ``stem_channels`` / ``stem_strides`` define the stem; the other
    arguments are :class:`VisionTransformer`'s."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, stem_channels=(24, 48, 96, 192),
                 stem_strides=None, embed_dim: int = 192, depth: int = 11, num_heads: int = 3, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, distilled: bool = False, global_pool: str = "token",
                 layer_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        stem = ViTConvStem(in_chans, stem_channels, stem_strides, embed_dim)  # checks the stem's arguments first
        patch_grid(img_size, stem.stride)  # a clear error for an img_size the stem does not divide
        super().__init__(img_size=img_size, patch_size=stem.stride, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, distilled=distilled, global_pool=global_pool, layer_scale=layer_scale,
                         drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        self.patch_embed = stem.to(self.cls_token.device)
        self.stem_channels, self.stem_strides = stem.channels, stem.strides
        self.stage_mixers = [f"conv stem {'-'.join(map(str, stem.channels))} (stride {stem.stride}), "
                             f"attention (global)"]


# --------------------------------------------------------------------------------------------
# The paper's Table 1
# --------------------------------------------------------------------------------------------
_STEM_6 = dict(stem_channels=(64, 128, 128, 256, 256, 512), stem_strides=(2, 2, 1, 2, 1, 2))

#: ViT_P-nGF: (embed_dim, depth, heads, mlp_ratio); ViT_C-nGF has one block less and the stem below
_VIT_P = {
    "1gf": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=3.0),
    "4gf": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=3.0),
    "18gf": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "36gf": dict(embed_dim=1024, depth=14, num_heads=16, mlp_ratio=4.0),
}
_STEMS = {
    "1gf": dict(stem_channels=(24, 48, 96, 192), stem_strides=(2, 2, 2, 2)),
    "4gf": dict(stem_channels=(48, 96, 192, 384), stem_strides=(2, 2, 2, 2)),
    "18gf": _STEM_6,
    "36gf": _STEM_6,  # "matching stem flops to transformer block flops results in an unreasonably large stem"
}

#: the paper's Table 1: name -> (params M, GFLOPs = GMACs at 224, 1000 classes)
PAPER_FIGURES = {
    "vit_p_1gf": (4.8, 1.1), "vit_p_4gf": (18.5, 3.9), "vit_base_patch16_224": (86.7, 17.5),
    "vit_p_36gf": (178.4, 35.9),
    "vit_c_1gf": (4.6, 1.1), "vit_c_4gf": (17.8, 4.0), "vit_c_18gf": (81.6, 17.7), "vit_c_36gf": (167.8, 35.0),
}


def _vit_c(size: str, **kwargs):
    cfg = dict(_VIT_P[size], depth=_VIT_P[size]["depth"] - 1, **_STEMS[size])
    return build(VisionTransformerC, cfg, kwargs)


def _vit_p(size: str, **kwargs):
    return build(VisionTransformer, dict(_VIT_P[size], patch_size=16), kwargs)


@register_model
def vit_c_1gf(**kwargs):
    """ViT_C-1GF: width 192, 11 blocks, 3 heads, MLP ratio 3, stem 24-48-96-192 (paper: 4.6M, 1.1 GF)."""
    return _vit_c("1gf", **kwargs)


@register_model
def vit_c_4gf(**kwargs):
    """ViT_C-4GF: width 384, 11 blocks, 6 heads, MLP ratio 3, stem 48-96-192-384 (paper: 17.8M, 4.0 GF)."""
    return _vit_c("4gf", **kwargs)


@register_model
def vit_c_18gf(**kwargs):
    """ViT_C-18GF: width 768, 11 blocks, 12 heads, MLP ratio 4, stem 64-128-128-256-256-512 with strides
    2-2-1-2-1-2 (paper: 81.6M, 17.7 GF)."""
    return _vit_c("18gf", **kwargs)


@register_model
def vit_c_36gf(**kwargs):
    """ViT_C-36GF: width 1024, 13 blocks, 16 heads, MLP ratio 4, ViT_C-18GF's stem (paper: 167.8M, 35.0 GF)."""
    return _vit_c("36gf", **kwargs)


@register_model
def vit_p_1gf(**kwargs):
    """ViT_P-1GF: ViT-Ti/16 with MLP ratio 3 (paper: 4.8M, 1.1 GF)."""
    return _vit_p("1gf", **kwargs)


@register_model
def vit_p_4gf(**kwargs):
    """ViT_P-4GF: ViT-S/16 with MLP ratio 3 (paper: 18.5M, 3.9 GF)."""
    return _vit_p("4gf", **kwargs)


@register_model
def vit_p_36gf(**kwargs):
    """ViT_P-36GF: ViT-L/16's width and heads with 14 blocks (paper: 178.4M, 35.9 GF)."""
    return _vit_p("36gf", **kwargs)


# --------------------------------------------------------------------------------------------
# nano_vit_c: nano_vit's skeleton with a convolutional stem and one block less
# --------------------------------------------------------------------------------------------
#: nano_vit is ``patch4 / attention:6x128:heads=4,pos=abs``; the stride-4 stem below costs
#: about one of its blocks (15.6 vs 13.6 MMACs at 32x32), so one block goes, as in the paper
NANO_SPEC = "conv4 / attention:5x128:heads=4,pos=abs"
NANO_STEM = dict(channels=(64, 128, 128), strides=(2, 2, 1))


@register_model
def nano_vit_c(img_size=32, in_chans: int = 3, num_classes: int = 10, **kwargs):
    """Nano ViT_C for the arena: ``nano_vit``'s network (width 128, 4 heads, average-pooled tokens,
    a learned absolute position embedding on the stride-4 grid) with a 3x3 stem 64(/2)-128(/2)-128(/1)
    + BN + ReLU and a 1x1 convolution to 128 in place of the 4x4 patchify, and 5 blocks instead of 6.
    The specification ``conv4 / attention:5x128:heads=4,pos=abs`` builds the same network with the
    spec language's conv stem (32-64, no stride-1 convolution); the stem is then replaced."""
    model = create_from_spec("spec:" + NANO_SPEC, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                             **kwargs)
    model.stem = ViTConvStem(in_chans, NANO_STEM["channels"], NANO_STEM["strides"], model.feature_info[0]["num_chs"])
    model.spec = dict(model.spec, name="nano_vit_c",
                      stem=dict(type="conv", size=4, channels=list(NANO_STEM["channels"]),
                                strides=list(NANO_STEM["strides"])))
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture="nano_vit_c")
    model.stage_mixers = [f"conv stem 64-128-128 (stride 4), {model.stage_mixers[0]}"]
    return model


register_nano("nano_vit_c")  # the arena's nano-zoo line-up


# --------------------------------------------------------------------------------------------
# timm's layout: VisionTransformer(embed_layer=HybridEmbed(backbone=ConvStem(...), proj=False))
# --------------------------------------------------------------------------------------------
def _timm_stem_key(m) -> str:
    i, part, rest = int(m[1]), m[2], m[3]
    return f"patch_embed.convs.{3 * i + (0 if part == 'conv' else 1)}.{rest}"


TIMM_RULES = [
    (r"^patch_embed\.backbone\.(\d+)\.(conv|bn)\.(.+)$", _timm_stem_key),
    (r"^pos_embed$", "pos_embed.pos_embed"),
    (r"^blocks\.(\d+)\.attn\.(.+)$", r"blocks.\1.mixer.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^fc_norm\.(.+)$", r"head.norm.\1"),
]
register_layout("timm", "vit_c", [r"^patch_embed\.backbone\.\d+\.conv\.weight$"], TIMM_RULES,
                model_class=VisionTransformerC)

