"""CaiT (Touvron et al., 2021, "Going deeper with Image Transformers"): a deep ViT made
trainable by LayerScale and talking-heads attention, with the class token kept out of the
self-attention stage and brought in only by a few class-attention blocks at the end.

Architecture as in the authors' ``cait_models.py`` (facebookresearch/deit) and timm's
``timm/models/cait.py`` (timm 1.0.31):

* 16x16 patch embedding (a convolution with bias), a learned absolute position embedding
  on the patch tokens only (no class-token entry), dropout ``drop_rate``;
* ``depth`` self-attention blocks (the generic pre-norm :class:`MetaBlock`): LayerNorm
  (eps 1e-6), :class:`~mixlab.mixers.talking_heads.TalkingHeadsAttention` (qkv with bias),
  a GELU MLP of ratio 4, LayerScale on both branches (init 1e-5 at depth 24, the paper's
  rule) and stochastic depth at the *same* rate ``drop_path_rate`` in every block (the
  authors' rule, not the linear ramp of ViT/DeiT); ``drop_rate`` also drops after the
  attention projection and in the MLP;
* ``depth_token_only`` (2) class-attention blocks (:class:`ClassAttentionBlock`): the class
  token (a learned parameter, never position-embedded) is concatenated *in front of* the
  frozen patch tokens, normalised, and only it is updated, by
  :class:`~mixlab.mixers.talking_heads.ClassAttention` and a GELU MLP, both LayerScaled;
  no dropout and no stochastic depth there (as the authors);
* final LayerNorm (eps 1e-6) over [cls, patches], the classifier on the class token
  (``global_pool='avg'`` averages the patch tokens instead).

Sizes at 224 px, 1000 classes: ``cait_xxs24_224`` (width 192, 4 heads) 11.96M parameters,
``cait_s24_224`` (width 384, 8 heads) 46.92M, as timm's.

Other input sizes (multiples of the patch) resample the position embedding bicubically.
timm's state dicts convert (``attn`` -> ``mixer``, ``proj_l`` / ``proj_w`` -> ``pre_mix`` /
``post_mix``, ``gamma_i`` -> ``lsi.gamma``, ``blocks_token_only`` -> ``cls_blocks``; see
:data:`TIMM_RULES`). Departures from timm: dropout follows the authors (``drop_rate`` on the
positions and inside the self-attention blocks, no dropout before the classifier, where
timm's ``drop_rate`` drops only there), and ``forward_intermediates`` returns the last map
normalised by the final norm, as mixlab's ViT does.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import AbsolutePosEmbed, ClassifierHead, DropPath, LayerScale, Mlp, PatchEmbed, to_2tuple
from ..mixers.talking_heads import ClassAttention, TalkingHeadsAttention
from ..registry import register_layout, register_model
from .base import MixlabModel, block_token_maps, build, init_weights_vit, patch_grid
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["Cait", "ClassAttentionBlock", "TIMM_RULES"]


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block on ``u = [cls, patches]`` (B, 1 + N, C):
    ``cls += ls1·CA(norm1(u))``, then ``cls += ls2·mlp(norm2(cls))``; the patches pass
    unchanged. Returns the sequence with the updated class token in front.

    Key names are the generic block's (``norm1``, ``mixer``, ``ls1``, ``norm2``, ``mlp``,
    ``ls2``). The authors' block takes the class token and the patches as two arguments;
    one sequence in and out is the same computation.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer=nn.LayerNorm, layer_scale: float = 1e-5, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        cls, x = u[:, :1], u[:, 1:]
        cls = cls + self.drop_path(self.ls1(self.mixer(self.norm1(u))))
        cls = cls + self.drop_path(self.ls2(self.mlp(self.norm2(cls))))
        return torch.cat([cls, x], dim=1)


class Cait(MixlabModel):
    """CaiT: patch embedding + absolute positions (patches only), ``depth`` talking-heads
    self-attention blocks with LayerScale, ``depth_token_only`` class-attention blocks that
    insert and update the class token, LayerNorm, classifier on the class token.

    ``forward_features`` returns the normalised (B, 1 + N, C) sequence [cls, patches];
    ``feature_info`` / ``forward_intermediates`` expose the self-attention blocks' patch maps
    (B, C, H/p, W/p), the last normalised by the final norm.
    """

    mask_stem = "patch_embed"  # where masked image modeling's mask token enters

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 192,
                 depth: int = 24, num_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale: float = 1e-5, depth_token_only: int = 2, mlp_ratio_token_only: float = 4.0,
                 global_pool: str = "token", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes, img_size)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if depth < 1 or depth_token_only < 0:
            raise ValueError(f"depth must be >= 1 and depth_token_only >= 0, got {depth} and {depth_token_only}")
        if global_pool == "token" and depth_token_only == 0:
            raise ValueError("global_pool='token' needs class-attention blocks (depth_token_only >= 1); "
                             "use global_pool='avg' without them")
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = patch_grid(self.img_size, self.patch_size)
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.min_input_size = max(self.patch_size)
        norm = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = AbsolutePosEmbed(self.grid_size, embed_dim, num_prefix_tokens=0)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*[
            MetaBlock(embed_dim, TalkingHeadsAttention(embed_dim, num_heads, qkv_bias=qkv_bias,
                                                       attn_drop=attn_drop_rate, proj_drop=drop_rate),
                      mlp_ratio=mlp_ratio, norm_layer=norm, drop=drop_rate, drop_path=drop_path_rate,
                      layer_scale=layer_scale)
            for _ in range(depth)])
        self.cls_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio_token_only, qkv_bias, norm, layer_scale)
            for _ in range(depth_token_only)])
        self.norm = norm(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool=global_pool, num_prefix_tokens=1)
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size[0], module=f"blocks.{i}")
                             for i in range(depth)]
        self.stage_mixers = ["talking-heads attention (global)", "class attention"]

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights_vit)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _embed(self, x: torch.Tensor):
        self.check_input(x)
        x = self.patch_embed(x)  # (B, h, w, C)
        B, h, w, C = x.shape
        return self.pos_drop(self.pos_embed(x.reshape(B, h * w, C), (h, w))), (h, w)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The class token through the class-attention blocks over the patch tokens ``x``;
        returns [cls, patches] (B, 1 + N, C), not yet normalised."""
        u = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_blocks:
            u = blk(u)
        return u

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._embed(x)
        return self.norm(self.forward_cls(self.blocks(x)))

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        x, grid = self._embed(x)  # patch tokens only: the class token joins in forward_cls
        return block_token_maps(self.blocks, x, self._normalize_indices(indices), self.norm, grid)


def _cait(defaults: dict, kwargs: dict) -> Cait:
    return build(Cait, defaults, kwargs)


@register_model
def cait_xxs24_224(**kwargs):
    """CaiT-XXS-24 at 224 (width 192, 4 heads, 24 + 2 blocks; 11.96M, as timm's)."""
    return _cait(dict(embed_dim=192, depth=24, num_heads=4, layer_scale=1e-5), kwargs)


@register_model
def cait_s24_224(**kwargs):
    """CaiT-S-24 at 224 (width 384, 8 heads, 24 + 2 blocks; 46.92M, as timm's)."""
    return _cait(dict(embed_dim=384, depth=24, num_heads=8, layer_scale=1e-5), kwargs)


@register_model
def nano_cait(**kwargs):
    """The arena's CaiT: 4x4 patches on 32x32 RGB, width 128, 4 heads, 4 self-attention +
    2 class-attention blocks (six blocks, as ``nano_vit``), 10 classes; LayerScale 0.1, the
    paper's init for shallow CaiTs (depth <= 18)."""
    return _cait(dict(img_size=32, patch_size=4, num_classes=10, embed_dim=128, depth=4, num_heads=4,
                      layer_scale=0.1), kwargs)


register_nano("nano_cait")  # the arena's nano-zoo line-up


# ---------------------------------------------------------------------------------------
# timm's state dicts -> mixlab names
# ---------------------------------------------------------------------------------------
TIMM_RULES = [
    (r"^pos_embed$", r"pos_embed.pos_embed"),
    (r"^blocks\.(\d+)\.attn\.proj_l\.(weight|bias)$", r"blocks.\1.mixer.pre_mix.\2"),
    (r"^blocks\.(\d+)\.attn\.proj_w\.(weight|bias)$", r"blocks.\1.mixer.post_mix.\2"),
    (r"^blocks\.(\d+)\.attn\.(.+)$", r"blocks.\1.mixer.\2"),
    (r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma"),
    (r"^blocks_token_only\.(\d+)\.attn\.(.+)$", r"cls_blocks.\1.mixer.\2"),
    (r"^blocks_token_only\.(\d+)\.gamma_([12])$", r"cls_blocks.\1.ls\2.gamma"),
    (r"^blocks_token_only\.(\d+)\.(.+)$", r"cls_blocks.\1.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("timm", "cait", [r"^blocks_token_only\.\d+\.attn\.", r"^blocks\.\d+\.attn\.proj_l\."],
                TIMM_RULES, model_class=Cait, mixlab_patterns=[r"^cls_blocks\.\d+\.mixer\."])
