"""Vision Transformer (Dosovitskiy et al., 2021) and DeiT (Touvron et al., 2021).

An isotropic stack of the generic block with global self-attention as its mixer, on a
sequence of 16x16 (or 14x14) patch tokens with a class token (and DeiT's distillation
token) in front and a learned absolute position embedding, resampled when the input size
differs from the one the model was built for.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from ..layers import AbsolutePosEmbed, ClassifierHead, PatchEmbed, stochastic_depth_rates, to_2tuple
from ..mixers import Attention
from ..registry import (IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, register_architecture_kwargs, register_default_weights,
                        register_layout, register_model)
from .base import MixlabModel, TokenEncoder, block_token_maps, build, init_weights_vit, patch_grid
from .blocks import MetaBlock


class VisionTransformer(MixlabModel):
    """ViT / DeiT. ``distilled=True`` adds DeiT's distillation token and second head: in
    eval mode the two heads' logits are averaged; in training mode with
    ``distilled_training = True`` both are returned (class logits, distillation logits)."""

    mask_stem = "patch_embed"  # where masked image modeling's mask token enters

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 distilled: bool = False, global_pool: str = "token", layer_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes, img_size)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = patch_grid(self.img_size, self.patch_size)
        self.embed_dim = self.num_features = embed_dim
        self.distilled = distilled
        self.distilled_training = False
        self.num_prefix_tokens = 2 if distilled else 1
        self.min_input_size = max(self.patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = AbsolutePosEmbed(self.grid_size, embed_dim, self.num_prefix_tokens)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = stochastic_depth_rates(drop_path_rate, [depth])[0]
        self.blocks = nn.Sequential(*[
            MetaBlock(embed_dim, Attention(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                           proj_drop=drop_rate),
                      mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop=drop_rate,
                      drop_path=dpr[i], layer_scale=layer_scale)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = ClassifierHead(embed_dim, num_classes, pool=global_pool, num_prefix_tokens=self.num_prefix_tokens,
                                   drop_rate=drop_rate)
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled and num_classes > 0 else (
            nn.Identity() if distilled else None)
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size[0], module=f"blocks.{i}")
                             for i in range(depth)]
        self.stage_mixers = ["attention (global)"]

        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_weights_vit)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def token_encoder(self) -> TokenEncoder:
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"MAE needs square patches, this model has {self.patch_size}")
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        return TokenEncoder(self.patch_embed, self.pos_embed, prefix, self.blocks, self.norm, self.patch_size[0])

    def _embed(self, x: torch.Tensor):
        self.check_input(x)
        x = self.patch_embed(x)  # (B, h, w, C)
        B, h, w, C = x.shape
        x = x.reshape(B, h * w, C)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(self.pos_embed(x, (h, w))), (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._embed(x)
        return self.norm(self.blocks(x))

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, distillation logits) of :meth:`forward_features`' output: the class token
        through the classifier, the distillation token through ``head_dist`` (distilled models only)."""
        if not self.distilled:
            raise ValueError("forward_heads: this VisionTransformer has no distillation head (distilled=False)")
        return self.head.fc(self.head.drop(x[:, 0])), self.head_dist(x[:, 1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if not self.distilled:
            return self.head(x, pre_logits=pre_logits)
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        logits, logits_dist = self.forward_heads(x)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        super().reset_classifier(num_classes, pool)
        if self.distilled:
            device = self.cls_token.device
            self.head_dist = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        x, grid = self._embed(x)
        return block_token_maps(self.blocks, x, self._normalize_indices(indices), self.norm, grid,
                                self.num_prefix_tokens)


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _vit(size: str, patch_size: int = 16, **kwargs):
    return build(VisionTransformer, dict(patch_size=patch_size, **_SIZES[size]), kwargs)


@register_model
def vit_tiny_patch16_224(**kwargs):
    """ViT-Ti/16 (5.7M)."""
    return _vit("tiny", **kwargs)


@register_model
def vit_small_patch16_224(**kwargs):
    """ViT-S/16 (22.1M)."""
    return _vit("small", **kwargs)


@register_model
def vit_base_patch16_224(**kwargs):
    """ViT-B/16 (86.6M)."""
    return _vit("base", **kwargs)


@register_model
def vit_large_patch16_224(**kwargs):
    """ViT-L/16 (304.3M)."""
    return _vit("large", **kwargs)


@register_model
def vit_huge_patch14_224(**kwargs):
    """ViT-H/14 (630.8M)."""
    return _vit("huge", patch_size=14, **kwargs)


@register_model
def deit_tiny_patch16_224(**kwargs):
    """DeiT-Ti: the ViT-Ti/16 architecture, trained with the DeiT recipe."""
    return _vit("tiny", **kwargs)


@register_model
def deit_small_patch16_224(**kwargs):
    """DeiT-S: the ViT-S/16 architecture."""
    return _vit("small", **kwargs)


@register_model
def deit_base_patch16_224(**kwargs):
    """DeiT-B: the ViT-B/16 architecture."""
    return _vit("base", **kwargs)


@register_model
def deit_tiny_distilled_patch16_224(**kwargs):
    """DeiT-Ti with a distillation token and head."""
    return _vit("tiny", distilled=True, **kwargs)


@register_model
def deit_small_distilled_patch16_224(**kwargs):
    """DeiT-S with a distillation token and head."""
    return _vit("small", distilled=True, **kwargs)


@register_model
def deit_base_distilled_patch16_224(**kwargs):
    """DeiT-B with a distillation token and head."""
    return _vit("base", distilled=True, **kwargs)


# -- checkpoints: timm's (and facebookresearch/deit's) names, input size, default weights -----------------------
TIMM_RULES = [
    (r"^pos_embed$", "pos_embed.pos_embed"),
    (r"^blocks\.(\d+)\.attn\.(.+)$", r"blocks.\1.mixer.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^fc_norm\.(.+)$", r"head.norm.\1"),
]


def _architecture_kwargs(sd: dict, fmt: str, model: VisionTransformer) -> dict:
    """``img_size`` of a checkpoint whose position embedding is for another grid (otherwise it is resampled)."""
    pos = next((sd[k] for k in ("pos_embed.pos_embed", "pos_embed") if k in sd), None)
    proj = sd.get("patch_embed.proj.weight")
    if pos is not None and proj is not None and pos.ndim == 3:
        for p in (model.num_prefix_tokens, 1, 2, 0):
            side = math.isqrt(max(pos.shape[1] - p, 0))
            if side and side * side == pos.shape[1] - p:
                img = side * proj.shape[-1]
                return {"img_size": img} if (img, img) != tuple(model.img_size) else {}
    return {}


# broad: other ViT-like families' checkpoints (CaiT, ConViT, ...) share these names; theirs are checked first
register_layout("timm", "vit", [r"^blocks\.\d+\.attn\.qkv\.", r"^pos_embed$", r"^cls_token$"], TIMM_RULES,
                model_class=VisionTransformer, broad=True, mixlab_patterns=[r"^pos_embed\.pos_embed$"])
register_architecture_kwargs("vit", _architecture_kwargs)
for _size in ("tiny", "small", "base"):
    for _distilled in ("", "distilled_"):
        _name = f"deit_{_size}_{_distilled}patch16_224"
        register_default_weights(_name, f"hf-hub:timm/{_name}.fb_in1k", **IMAGENET_MEAN_STD, crop_pct=0.9)
for _size in ("tiny", "small", "base", "large"):
    _name = f"vit_{_size}_patch16_224"
    register_default_weights(_name, f"hf-hub:timm/{_name}.augreg_in21k_ft_in1k", **INCEPTION_MEAN_STD, crop_pct=0.9)
