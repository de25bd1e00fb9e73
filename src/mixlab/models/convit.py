"""ConViT (d'Ascoli et al., 2021, "ConViT: Improving Vision Transformers with Soft
Convolutional Inductive Biases"): a DeiT whose first blocks use gated positional
self-attention (:class:`~mixlab.mixers.gpsa.GatedPositionalAttention`), initialised as a
convolution, and whose class token joins only after them.

Architecture as in the authors' repository (facebookresearch/convit) and timm's
``convit.py``:

* 16x16 patch embedding (a convolution with bias), then a learned absolute position
  embedding for the grid tokens only (there is no class token yet);
* ``local_up_to_layer`` (10) pre-norm blocks with GPSA (query/key projection ``qk`` and
  value ``v`` without bias, ``pos_proj`` 3 -> heads, gate ``gating_param`` initialised to 1,
  local init with locality strength 1), LayerNorm eps 1e-6, a GELU MLP of ratio 4;
* the class token is prepended, then plain multi-head self-attention blocks (``qkv``
  without bias) up to ``depth`` (12);
* LayerNorm (eps 1e-6), the class token, a linear classifier.

Widths are ``heads · 48`` as in the paper: ConViT-Ti 4 heads (192), ConViT-S 9 (432),
ConViT-B 16 (768). Initialisation: truncated-normal (std 0.02) linear layers, zero biases,
class token and position embedding truncated-normal 0.02, then the GPSA local init.

Other input sizes (multiples of the patch): the GPSA relative positions are computed for
the actual grid (rectangular too) and the position embedding is resampled bicubically
(:class:`~mixlab.layers.AbsolutePosEmbed`). timm's ConViT state dicts convert (``attn`` ->
``mixer``, ``pos_embed`` -> ``pos_embed.pos_embed``, ``head`` -> ``head.fc``; see
:data:`TIMM_RULES`); the converter resamples a position embedding for another grid.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import AbsolutePosEmbed, ClassifierHead, PatchEmbed, stochastic_depth_rates, to_2tuple
from ..mixers import Attention
from ..mixers.gpsa import GatedPositionalAttention
from ..registry import register_layout, register_model
from .base import MixlabModel, build, init_weights_vit, patch_grid
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["ConViT", "TIMM_RULES"]


class ConViT(MixlabModel):
    """ConViT: ``local_up_to_layer`` GPSA blocks on the (B, H, W, C) patch grid, then the
    class token and ``depth - local_up_to_layer`` self-attention blocks on the (B, 1+N, C)
    sequence. ``embed_dim`` is the total width (timm's ``embed_dim · num_heads``)."""

    mask_stem = "patch_embed"  # where masked image modeling's mask token enters

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 4, local_up_to_layer: int = 10, locality_strength: float = 1.0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, global_pool: str = "token",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes, img_size)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"local_up_to_layer must be between 0 and depth={depth}, got {local_up_to_layer}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = patch_grid(self.img_size, self.patch_size)
        self.embed_dim = self.num_features = embed_dim
        self.local_up_to_layer = local_up_to_layer
        self.num_prefix_tokens = 1
        self.min_input_size = max(self.patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = AbsolutePosEmbed(self.grid_size, embed_dim, num_prefix_tokens=0)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = stochastic_depth_rates(drop_path_rate, [depth])[0]
        norm = partial(nn.LayerNorm, eps=1e-6)
        blocks = []
        for i in range(depth):
            if i < local_up_to_layer:
                mixer = GatedPositionalAttention(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                                 proj_drop=drop_rate, locality_strength=locality_strength,
                                                 grid_size=self.grid_size)
            else:
                mixer = Attention(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                  proj_drop=drop_rate)
            blocks.append(MetaBlock(embed_dim, mixer, mlp_ratio=mlp_ratio, norm_layer=norm, drop=drop_rate,
                                    drop_path=dpr[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool=global_pool, num_prefix_tokens=1, drop_rate=drop_rate)
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size[0], module=f"blocks.{i}")
                             for i in range(depth)]
        n_sa = depth - local_up_to_layer
        self.stage_mixers = [f"gated positional attention ({local_up_to_layer} blocks), then the class token and "
                             f"attention (global, {n_sa} blocks)"]

        self.apply(init_weights_vit)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, GatedPositionalAttention):
                m.local_init()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.pos_embed", "cls_token"}

    def _run(self, x: torch.Tensor, upto: int | None = None, taps=()):
        """Embed, then blocks 0..upto (all by default); returns the last output (the
        sequence, class token first, once it has joined) and the patch-token maps
        (B, C, H, W) after the blocks in ``taps``."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, h, w, C)
        B, h, w, C = x.shape
        x = self.pos_drop(self.pos_embed(x.reshape(B, h * w, C), (h, w)).reshape(B, h, w, C))
        maps = {}
        last = len(self.blocks) - 1
        upto = last if upto is None else upto
        for i, blk in enumerate(self.blocks[: upto + 1]):
            if i == self.local_up_to_layer:
                x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x.reshape(B, h * w, C)], dim=1)
            x = blk(x)
            if i in taps:
                y = self.norm(x) if i == last else x
                y = y.reshape(B, h, w, C) if y.ndim == 4 else y[:, 1:].reshape(B, h, w, C)
                maps[i] = y.permute(0, 3, 1, 2)
        if x.ndim == 4:  # no self-attention block: the class token joins before the final norm
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x.reshape(B, h * w, C)], dim=1)
        return x, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised (B, 1 + N, C) sequence, class token first."""
        return self.norm(self._run(x)[0])

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        """Patch-token maps (B, C, H, W) after the blocks in ``indices`` (the last normalised)."""
        idx = self._normalize_indices(indices)
        _, maps = self._run(x, upto=max(idx), taps=set(idx))
        return [maps[i] for i in idx]


_SIZES = {
    "tiny": dict(embed_dim=4 * 48, num_heads=4),
    "small": dict(embed_dim=9 * 48, num_heads=9),
    "base": dict(embed_dim=16 * 48, num_heads=16),
}


def _convit(size: str, **kwargs) -> ConViT:
    return build(ConViT, dict(depth=12, local_up_to_layer=10, locality_strength=1.0, **_SIZES[size]), kwargs)


@register_model
def convit_tiny(**kwargs):
    """ConViT-Ti (5.71M, 1.25 GMACs; timm 5.71M / 1.25): width 192, 4 heads, 10 GPSA + 2 SA blocks."""
    return _convit("tiny", **kwargs)


@register_model
def convit_small(**kwargs):
    """ConViT-S (27.78M, 5.75 GMACs; timm 27.78M / 5.75): width 432, 9 heads, 10 GPSA + 2 SA blocks."""
    return _convit("small", **kwargs)


@register_model
def nano_convit(**kwargs):
    """Nano ConViT for the arena (about 1.2M parameters at 32x32 RGB, 10 classes): 4x4 patches,
    width 128, 4 heads, 4 GPSA + 2 SA blocks."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                    local_up_to_layer=4)
    return build(ConViT, defaults, kwargs)


register_nano("nano_convit")  # the arena's nano-zoo line-up


# ---------------------------------------------------------------------------------------
# timm's state dicts -> mixlab names
# ---------------------------------------------------------------------------------------
TIMM_RULES = [
    (r"^blocks\.(\d+)\.attn\.(.+)$", r"blocks.\1.mixer.\2"),
    (r"^pos_embed$", r"pos_embed.pos_embed"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("timm", "convit", [r"^blocks\.\d+\.attn\.(pos_proj\.weight|gating_param)$"], TIMM_RULES,
                model_class=ConViT, mixlab_patterns=[r"^blocks\.\d+\.mixer\.gating_param$"])

