"""PVT v1 (Wang et al., 2021, "Pyramid Vision Transformer: A Versatile Backbone for Dense
Prediction without Convolutions"): a four-stage transformer pyramid whose attention reads
keys and values from a spatially reduced map
(:class:`~mixlab.mixers.sra.SpatialReductionAttention`).

Architecture as in the authors' repository (whai362/PVT, ``classification/pvt.py``,
class ``PyramidVisionTransformer``; timm has only PVT v2):

* every stage starts with a patch embedding: a convolution whose kernel equals its stride
  (4 for the first stage, 2 after), then a LayerNorm (PyTorch's default eps 1e-5);
* a learned absolute position embedding per stage (truncated normal, std 0.02), then
  dropout; in the last stage a class token is prepended first and the embedding has one
  more position for it (the only class token of PVT v1);
* pre-norm blocks (LayerNorm eps 1e-6): spatial-reduction attention with reduction ratios
  8-4-2-1 and 1-2-5-8 heads (``qkv_bias=True``), a GELU MLP of ratio 8-8-4-4;
* the final LayerNorm (eps 1e-6) over the last stage's sequence, the class token, a linear
  classifier (no dropout before it).

Widths 64-128-320-512 for every size; depths: tiny 2-2-2-2, small 3-4-6-3, medium
3-4-18-3, large 3-8-27-3. Initialisation: truncated-normal (std 0.02) linear layers with
zero biases, PyTorch's default for the convolutions, as the authors.

Between stages the maps are channels-last (B, H, W, C); the last stage carries a
(B, 1 + N, C) sequence, class token first. Each stage's patch embedding can be replaced
(``embed_layer``, e.g. a convolutional embedding as in CETNet): a callable
``(in_chs, out_chs, stride, stage_index) -> nn.Module`` whose module maps an **NCHW** tensor
(B, in_chs, H, W) (the image for stage 0, the previous stage's map permuted to NCHW after)
to a **channels-last** map (B, H', W', out_chs). Position embeddings are resampled to the
grid it produces when that differs from the one computed at ``img_size``.

Input sizes: the image must be a multiple of the first patch size (4) and large enough
that every stage's map covers its reduction cell (32 for the paper's models); the later
2x2 embeddings, like the authors' convolutions, floor odd maps (7x7 -> 3x3). Position
embeddings are resampled for other sizes by :class:`~mixlab.layers.AbsolutePosEmbed`
(bicubic, antialiased; the authors interpolate bilinearly without antialiasing).

The authors' checkpoints convert (``patch_embed{i}`` -> ``stages.{i-1}.embed``,
``pos_embed{i}`` -> ``stages.{i-1}.pos_embed.pos_embed``, ``block{i}.{j}.attn`` ->
``stages.{i-1}.blocks.{j}.mixer``, ``head`` -> ``head.fc``; see :data:`AUTHORS_RULES`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..layers import AbsolutePosEmbed, ClassifierHead, PatchEmbed, stochastic_depth_rates
from ..layers.embed import cetnet_embed_layer
from ..mixers.sra import SpatialReductionAttention
from ..registry import register_layout, register_model, register_spec_mixer
from .base import MixlabModel, build, init_weights_cetnet, init_weights_vit, patch_grid
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["PVT", "PVTPatchEmbed", "PVTStage", "AUTHORS_RULES"]


class PVTPatchEmbed(PatchEmbed):
    """PVT's patch embedding: a ``stride`` x ``stride`` convolution of stride ``stride``, then
    a LayerNorm; NCHW in, channels-last (B, H/stride, W/stride, C) out.

    ``floor=False`` (the first stage, on the image) refuses a size that is not a multiple of
    the stride, as mixlab's :class:`~mixlab.layers.PatchEmbed`; ``floor=True`` (later
    stages) floors it as the authors' convolution does, refusing only a map smaller than one
    patch.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, floor: bool = True):
        super().__init__(stride, in_chs, out_chs, norm_layer=nn.LayerNorm)
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.floor:
            return super().forward(x)
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H < ph or W < pw:
            raise ValueError(f"a {H}x{W} feature map is smaller than the {ph}x{pw} patch embedding; "
                             f"use a larger input image")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def default_embed_layer(in_chs: int, out_chs: int, stride: int, stage_index: int) -> nn.Module:
    """The paper's embedding of stage ``stage_index``: conv (kernel = stride) + LayerNorm."""
    return PVTPatchEmbed(in_chs, out_chs, stride, floor=stage_index > 0)


class PVTStage(nn.Module):
    """Patch embedding, position embedding (+ class token, last stage), dropout, blocks."""

    def __init__(self, embed: nn.Module, pos_embed: AbsolutePosEmbed, blocks: Sequence[nn.Module],
                 drop_rate: float = 0.0):
        super().__init__()
        self.embed = embed
        self.pos_embed = pos_embed
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor | None = None):
        """NCHW in; out: the (B, H, W, C) map, or with ``cls_token`` the (B, 1 + H·W, C)
        sequence; and the grid (H, W)."""
        x = self.embed(x)
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        if cls_token is not None:
            t = torch.cat([cls_token.expand(B, -1, -1).to(t.dtype), t], dim=1)
        t = self.pos_drop(self.pos_embed(t, (H, W)))
        return self.blocks(t if cls_token is not None else t.reshape(B, H, W, C)), (H, W)


def _min_input_size(patch_size: int, sr_ratios: Sequence[int]) -> int:
    """The smallest multiple of the patch size whose maps cover every stage's reduction cell."""
    g = 1
    while True:
        side, ok = g, True
        for i, r in enumerate(sr_ratios):
            side = side if i == 0 else side // 2
            if side < max(r, 1):
                ok = False
                break
        if ok:
            return g * patch_size
        g += 1


class PVT(MixlabModel):
    """PVT v1 (see the module docstring). Stage ``i`` embeds with stride ``patch_size``
    (i = 0) or 2, then runs ``depths[i]`` blocks of spatial-reduction attention (reduction
    ``sr_ratios[i]``, ``num_heads[i]`` heads) and MLP (ratio ``mlp_ratios[i]``) at width
    ``embed_dims[i]``. The class token joins the last stage, whose reduction must be 1.

    ``global_pool``: 'token' (the class token, the paper's) or 'avg' (the grid tokens);
    ``embed_layer``: see the module docstring (None: the paper's embedding); ``conv_embed=True``:
    CETNet's convolutional stem and embeddings (:func:`mixlab.layers.embed.cetnet_embed_layer`,
    the CETNet paper's experiment of putting its embedding into PVT).
    """

    mask_stem = "stages.0.embed"  # where masked image modeling's mask token enters

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 4, 6, 3),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, global_pool: str = "token",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 embed_layer: Callable[[int, int, int, int], nn.Module] | None = None, conv_embed: bool = False):
        super().__init__(in_chans, num_classes, img_size)
        if conv_embed:  # CETNet's experiment: its convolutional stem and embeddings in place of PVT's
            if embed_layer is not None:
                raise ValueError("give either embed_layer or conv_embed=True, not both")
            if patch_size != 4:
                raise ValueError(f"conv_embed=True uses CETNet's stride-4 convolutional stem: patch_size must be 4, "
                                 f"got {patch_size}")
            embed_layer = cetnet_embed_layer
        n = len(depths)
        lists = dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        bad = [f"{k} has {len(v)}" for k, v in lists.items() if len(v) != n]
        if n < 1 or bad:
            raise ValueError(f"one value per stage is needed: depths has {n} stage(s) but {', '.join(bad)}"
                             if bad else "depths must list at least one stage")
        if any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one block, got depths {tuple(depths)}")
        if sr_ratios[-1] != 1:
            raise ValueError(f"the last stage carries the class token, so its attention must be global: "
                             f"sr_ratios[-1] must be 1, got {sr_ratios[-1]}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.patch_size = patch_size
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.num_prefix_tokens = 1
        self.embed_dim = self.num_features = embed_dims[-1]
        self.min_input_size = _min_input_size(patch_size, sr_ratios)
        embed_layer = embed_layer or default_embed_layer

        grid = patch_grid(self.img_size, patch_size)
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        norm = partial(nn.LayerNorm, eps=1e-6)
        stages, prev = [], in_chans
        for i in range(n):
            if i > 0:
                grid = (grid[0] // 2, grid[1] // 2)
            dim, last = embed_dims[i], i == n - 1
            blocks = [MetaBlock(dim, SpatialReductionAttention(dim, num_heads[i], sr_ratios[i], qkv_bias=qkv_bias,
                                                               attn_drop=attn_drop_rate, proj_drop=drop_rate),
                                mlp_ratio=mlp_ratios[i], norm_layer=norm, drop=drop_rate, drop_path=dpr[i][j])
                      for j in range(depths[i])]
            embed = embed_layer(prev, dim, patch_size if i == 0 else 2, i)
            stages.append(PVTStage(embed, AbsolutePosEmbed(grid, dim, num_prefix_tokens=1 if last else 0), blocks,
                                   drop_rate))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.norm = norm(embed_dims[-1])
        self.head = ClassifierHead(embed_dims[-1], num_classes, pool=global_pool, num_prefix_tokens=1)
        reduction = [patch_size * 2 ** i for i in range(n)]
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=reduction[i], module=f"stages.{i}")
                             for i in range(n)]
        self.stage_mixers = [f"spatial-reduction attention (R={r}, {h} head{'s' if h > 1 else ''})"
                             + (" + class token" if i == n - 1 else "")
                             for i, (r, h) in enumerate(zip(sr_ratios, num_heads))]

        self.apply(init_weights_vit)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if conv_embed:
            for stage in self.stages:
                stage.embed.apply(init_weights_cetnet)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # the authors' choice: the position embeddings are decayed

    def _run(self, x: torch.Tensor, upto: int | None = None, taps=()):
        """Stages 0..upto (all by default): the last output and the NCHW maps of ``taps``
        (the last stage's without the class token, after the final norm)."""
        self.check_input(x)
        last = len(self.stages) - 1
        upto = last if upto is None else upto
        maps = {}
        for i, stage in enumerate(self.stages[: upto + 1]):
            if i > 0:
                x = x.permute(0, 3, 1, 2)  # the embedding takes NCHW (as the authors reshape)
            x, (H, W) = stage(x, self.cls_token if i == last else None)
            if i in taps:
                if i == last:
                    y = self.norm(x)[:, 1:]
                    maps[i] = y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2)
                else:
                    maps[i] = x.permute(0, 3, 1, 2)
        return x, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised (B, 1 + N, C) sequence of the last stage, class token first."""
        return self.norm(self._run(x)[0])

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        """The stage outputs (B, C_i, H_i, W_i) in ``indices`` (the last normalised, without
        the class token)."""
        idx = self._normalize_indices(indices)
        _, maps = self._run(x, upto=max(idx), taps=set(idx))
        return [maps[i] for i in idx]


_SIZES = {
    "tiny": (2, 2, 2, 2),
    "small": (3, 4, 6, 3),
    "medium": (3, 4, 18, 3),
    "large": (3, 8, 27, 3),
}


def _pvt(size: str, kwargs) -> PVT:
    defaults = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                    depths=_SIZES[size], sr_ratios=(8, 4, 2, 1), qkv_bias=True)
    return build(PVT, defaults, kwargs)


@register_model
def pvt_tiny(**kwargs):
    """PVT-Tiny (13.23M, 1.93 GMACs; paper 13.2M / 1.9 GFLOPs): depths 2-2-2-2."""
    return _pvt("tiny", kwargs)


@register_model
def pvt_small(**kwargs):
    """PVT-Small (24.49M, 3.82 GMACs; paper 24.5M / 3.8 GFLOPs): depths 3-4-6-3."""
    return _pvt("small", kwargs)


@register_model
def pvt_medium(**kwargs):
    """PVT-Medium (44.21M, 6.66 GMACs; paper 44.2M / 6.7 GFLOPs): depths 3-4-18-3."""
    return _pvt("medium", kwargs)


@register_model
def pvt_large(**kwargs):
    """PVT-Large (61.37M, 9.81 GMACs; paper 61.4M / 9.8 GFLOPs): depths 3-8-27-3."""
    return _pvt("large", kwargs)


@register_model
def nano_pvt(**kwargs):
    """Nano PVT for the arena (1.13M parameters, 45 MMACs at 32x32 RGB, 10 classes): PVT's first
    three stages scaled down, widths 40-80-160, heads 1-2-5, MLP ratios 8-8-4, two blocks
    each, on 16x16, 8x8 and 4x4 grids (a 2x2 stem, then 2x2 embeddings). The reductions
    4-2-1 make every stage attend to the same 4x4 grid of keys, as PVT's 8-4-2-1 keep it at
    7x7 at 224; a fourth stage would run on 2x2 tokens and attend to 2x2 keys. The class
    token joins the last stage. Runs from 8x8 up (28x28 floors 7 -> 3 before stage 3)."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, patch_size=2, embed_dims=(40, 80, 160),
                    num_heads=(1, 2, 5), mlp_ratios=(8, 8, 4), depths=(2, 2, 2), sr_ratios=(4, 2, 1), qkv_bias=True)
    return build(PVT, defaults, kwargs)


register_nano("nano_pvt")  # the arena's nano-zoo line-up


# ---------------------------------------------------------------------------------------
# specifications: the `sra` mixer
# ---------------------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    mixer = SpatialReductionAttention(width, st["heads"], st["sr_ratio"], qkv_bias=True, proj_drop=drop)
    return MetaBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop=drop,
                     drop_path=drop_path)


register_spec_mixer("sra", {"heads": 2, "sr_ratio": 2},
                    "spatial-reduction attention (PVT v1: keys/values from an RxR stride-R conv + LN)", _spec_block)


# ---------------------------------------------------------------------------------------
# the authors' state dicts (whai362/PVT, classification/pvt.py) -> mixlab names
# ---------------------------------------------------------------------------------------
def _stage(m) -> int:
    return int(m[1]) - 1


AUTHORS_RULES = [
    (r"^patch_embed([1-4])\.(proj|norm)\.(weight|bias)$", lambda m: f"stages.{_stage(m)}.embed.{m[2]}.{m[3]}"),
    (r"^pos_embed([1-4])$", lambda m: f"stages.{_stage(m)}.pos_embed.pos_embed"),
    (r"^block([1-4])\.(\d+)\.attn\.(.+)$", lambda m: f"stages.{_stage(m)}.blocks.{m[2]}.mixer.{m[3]}"),
    (r"^block([1-4])\.(\d+)\.(.+)$", lambda m: f"stages.{_stage(m)}.blocks.{m[2]}.{m[3]}"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("authors-pvt", "pvt", [r"^block[1-4]\.\d+\.attn\.(q|kv)\.weight$", r"^pos_embed[1-4]$"],
                AUTHORS_RULES, model_class=PVT, mixlab_patterns=[r"^stages\.\d+\.blocks\.\d+\.mixer\.kv\.weight$"])
