"""EfficientFormer (Li et al., 2022, "EfficientFormer: Vision Transformers at MobileNet
Speed"): PoolFormer-style convolutional stages ("4D" blocks: pooling, BatchNorm conv-MLP)
followed, at the end of the last stage, by a few transformer ("3D") blocks whose attention
carries a learned bias per head and per spatial offset.

Architecture as in the authors' repository (snap-research/EfficientFormer) and timm's
``efficientformer_l1``:

* stem: two 3x3 stride-2 convolutions (with bias), each followed by BatchNorm and ReLU;
* 4D block (``Meta4D``): ``x + ls1·(avgpool3x3(x) - x)`` — no norm before the pooling —
  then ``x + ls2·BN(conv1x1(GELU(BN(conv1x1(x)))))``; LayerScale init 1e-5;
* between stages: a 3x3 stride-2 convolution (with bias) + BatchNorm;
* 3D block (``Meta3D``): the generic pre-norm block with LayerNorm (eps 1e-5), multi-head
  attention of 8 heads with key dim 32 and value dim 4·32 = 128 (``qkv`` holds, per head,
  query, key and value in that order), a learned bias ``attention_biases[h, |Δy|·W + |Δx|]``
  added to the scaled logits, a GELU MLP of ratio 4 and LayerScale 1e-5;
* head: LayerNorm (eps 1e-5), mean over positions, a classifier and a distillation
  classifier whose logits are averaged (both returned when training with
  ``distilled_training = True``), as in timm.

EfficientFormer-L1: widths 48-96-224-448, depths 3-2-6-4, the last block of the last stage
a 3D block: 12.29M parameters, 1.29 GMACs at 224 (timm: 12.29M / 1.29; the paper: 12.3M /
1.3G).

The blocks work on channels-last maps, so the authors' ``Flat`` (NCHW -> tokens) before the
first 3D block is the identity here; it is kept as a parameter-free entry
(:class:`TokenSwitch`) so that block indices, and so state-dict names, match timm's and the
authors' for every variant. timm's state dicts convert (``token_mixer`` -> ``mixer``,
``head`` -> ``head.fc``; see :data:`TIMM_RULES`).

The 3D blocks' attention is :class:`mixlab.mixers.offset_attention.OffsetBiasAttention`. Other
input sizes: timm's and the authors' attention biases are fixed to the 7x7 grid of a 224 input.
Here each attention is built for its grid at ``img_size`` and, on another grid, uses its bias
table resampled bicubically (:func:`mixlab.mixers.offset_attention.resample_offset_bias`, Swin's
rule for relative position tables applied to the mirrored |Δ| table). At ``img_size`` nothing is
resampled.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import ClassifierHead, DropPath, LayerScale, stochastic_depth_rates, to_2tuple
from ..mixers import OffsetBiasAttention, Pooling
from ..registry import (IMAGENET_MEAN_STD, register_default_weights, register_layout, register_model,
                        register_spec_mixer)
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["EfficientFormer", "Meta4DBlock", "TokenSwitch", "TIMM_RULES"]


# ---------------------------------------------------------------------------------------
# the convolutional parts (channels-last in and out; BatchNorms foldable by ``fuse()``)
# ---------------------------------------------------------------------------------------
class _ConvMlpBN(nn.Module):
    """1x1 conv -> BN -> GELU -> dropout -> 1x1 conv -> BN -> dropout on a (B, H, W, C)
    map (the convolutions see its NCHW view)."""

    fuse_pairs = (("fc1", "norm1"), ("fc2", "norm2"))  # see mixlab.layers.fuse

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm1(self.fc1(x.permute(0, 3, 1, 2)))))
        return self.drop(self.norm2(self.fc2(y))).permute(0, 2, 3, 1)


class Meta4DBlock(nn.Module):
    """EfficientFormer's 4D block: ``x + ls1·(pool(x) - x)``, then ``x + ls2·mlp(x)`` with
    the BatchNorm conv-MLP; no norm before either branch."""

    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float = 1e-5):
        super().__init__()
        self.mixer = Pooling(pool_size)
        self.ls1 = LayerScale(dim, layer_scale)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = _ConvMlpBN(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


def meta3d_block(dim: int, grid_size, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float = 1e-5) -> MetaBlock:
    """EfficientFormer's 3D block: the generic pre-norm block (LayerNorm eps 1e-5) with
    :class:`OffsetBiasAttention`, a GELU MLP and LayerScale."""
    mixer = OffsetBiasAttention(dim, key_dim, num_heads, attn_ratio, grid_size, proj_drop=0.0)
    return MetaBlock(dim, mixer, mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm, drop=drop, drop_path=drop_path,
                     layer_scale=layer_scale)


class TokenSwitch(nn.Identity):
    """Where the authors' network switches from NCHW maps to token sequences (their
    ``Flat``). mixlab's blocks all take channels-last maps, so this is the identity; it
    holds the place so that the 3D blocks' indices (and state-dict names) are timm's."""


class _Stem(nn.Sequential):
    """Two 3x3 stride-2 conv + BN + ReLU; NCHW image in, (B, H/4, W/4, C) out."""

    def __init__(self, in_chans: int, out_chs: int):
        super().__init__()
        self.add_module("conv1", nn.Conv2d(in_chans, out_chs // 2, 3, 2, 1))
        self.add_module("norm1", nn.BatchNorm2d(out_chs // 2))
        self.add_module("act1", nn.ReLU())
        self.add_module("conv2", nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1))
        self.add_module("norm2", nn.BatchNorm2d(out_chs))
        self.add_module("act2", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


class _Downsample(nn.Module):
    """3x3 stride-2 convolution + BatchNorm between stages (channels-last in and out)."""

    fuse_pairs = (("conv", "norm"),)

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


def _down(size: int, times: int) -> int:
    for _ in range(times):  # 3x3, stride 2, padding 1: ceil
        size = (size + 1) // 2
    return size


class EfficientFormer(HierarchicalModel):
    """EfficientFormer: conv stem (stride 4), four stages of 4D blocks joined by 3x3/2
    conv + BN, the last ``num_vit`` blocks of the last stage 3D blocks, LayerNorm, mean
    pooling, classifier + distillation classifier (averaged in eval mode).

    ``img_size`` sets the grid the attention biases are learnt for (7x7 at 224); other input
    sizes resample them (see the module docstring).
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(3, 2, 6, 4),
                 dims=(48, 96, 224, 448), num_vit: int = 1, mlp_ratio: float = 4.0, pool_size: int = 3,
                 key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0, layer_scale: float = 1e-5,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have the same length")
        if not 0 <= num_vit <= depths[-1]:
            raise ValueError(f"num_vit must be between 0 and the last stage's depth {depths[-1]}, got {num_vit}")
        img = to_2tuple(img_size)
        last = len(depths) - 1
        grid = (_down(img[0], 2 + last), _down(img[1], 2 + last))  # the last stage's grid at img_size
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            n3d = num_vit if i == last else 0
            blocks: list[nn.Module] = [Meta4DBlock(dim, pool_size, mlp_ratio, drop_rate, dpr[i][j], layer_scale)
                                       for j in range(depth - n3d)]
            if n3d:
                blocks.append(TokenSwitch())
                blocks += [meta3d_block(dim, grid, key_dim, num_heads, attn_ratio, mlp_ratio, drop_rate, dpr[i][j],
                                        layer_scale) for j in range(depth - n3d, depth)]
            stages.append(Stage(_Downsample(dims[i - 1], dim) if i else None, blocks))
            info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            desc = f"pooling {pool_size}x{pool_size}"
            if n3d:
                desc = (f"{desc} ({depth - n3d} blocks), then attention with offset biases ({n3d} blocks)"
                        if n3d < depth else "attention with offset biases")
            mixers.append(desc)
        super().__init__(in_chans, num_classes, img_size, stem=_Stem(in_chans, dims[0]), stages=stages,
                         norm=nn.LayerNorm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        self.head_dist = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distilled = True
        self.distilled_training = False
        self.apply(init_weights_vit)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, distillation logits) of :meth:`forward_features`' output: the pooled
        features through the classifier and through ``head_dist``."""
        feats = self.head(x, pre_logits=True)
        return self.head.fc(feats), self.head_dist(feats)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if pre_logits:
            return self.head(x, pre_logits=True)
        logits, logits_dist = self.forward_heads(x)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        super().reset_classifier(num_classes, pool)
        device = self.norm.weight.device
        self.head_dist = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}


@register_model
def efficientformer_l1(**kwargs):
    """EfficientFormer-L1 (12.29M, 1.29 GMACs; timm 12.29M / 1.29, paper 12.3M / 1.3G)."""
    return build(EfficientFormer, dict(depths=(3, 2, 6, 4), dims=(48, 96, 224, 448), num_vit=1), kwargs)


# ---------------------------------------------------------------------------------------
# timm's state dicts -> mixlab names: only the 3D blocks' mixer and the classifier differ
# ---------------------------------------------------------------------------------------
TIMM_RULES = [
    (r"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.(.+)$", r"stages.\1.blocks.\2.mixer.\3"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("timm", "efficientformer", [r"^stages\.\d+\.blocks\.\d+\.token_mixer\.attention_biases$"],
                TIMM_RULES, model_class=EfficientFormer,
                mixlab_patterns=[r"^stages\.\d+\.blocks\.\d+\.mixer\.attention_biases$"])


# ---------------------------------------------------------------------------------------
# the specification language: `meta4d` and `meta3d` stages
# ---------------------------------------------------------------------------------------
def _spec_meta4d(stage: dict, width: int, grid, mlp_ratio: float, drop_path: float, index: int, drop: float):
    return Meta4DBlock(width, stage["pool"], mlp_ratio, drop, drop_path)


def _spec_meta3d(stage: dict, width: int, grid, mlp_ratio: float, drop_path: float, index: int, drop: float):
    return meta3d_block(width, grid, stage["key_dim"], stage["heads"], stage["attn_ratio"], mlp_ratio, drop, drop_path)


register_spec_mixer("meta4d", {"pool": 3}, "EfficientFormer 4D block (pooling, BN conv-MLP)", _spec_meta4d)
register_spec_mixer("meta3d", {"heads": 8, "key_dim": 32, "attn_ratio": 4},
                    "EfficientFormer 3D block (attention with offset biases)", _spec_meta3d)
register_default_weights("efficientformer_l1", "hf-hub:timm/efficientformer_l1.snap_dist_in1k", **IMAGENET_MEAN_STD,
                         crop_pct=0.95)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# EfficientFormer: pooling 4D blocks, then one attention (3D) block with a learned offset bias
register_nano("nano_efficientformer", ("conv2 / meta4d:2x40 / meta4d:2x80 / meta4d:3x160"
                                       " / meta3d:1x160:downsample=none,heads=4,key_dim=32"))
