"""CvT (Wu et al., ICCV 2021, "CvT: Introducing Convolutions to Vision Transformers"): a
three-stage transformer whose stages start with a convolutional token embedding and whose
attention projects queries, keys and values through depthwise convolutions
(:class:`~mixlab.mixers.conv_attention.ConvAttention`).

Architecture as in the authors' repository (microsoft/CvT, ``lib/models/cls_cvt.py`` with
the CvT-13 / CvT-21 specs of the paper's Table 2) and Hugging Face's ``modeling_cvt.py``
(``CvtConfig`` defaults = microsoft/cvt-13):

* each stage embeds with an overlapping strided convolution (with bias) and a LayerNorm:
  7x7 stride 4 padding 2, then 3x3 stride 2 padding 1 twice (``ConvEmbed``);
* blocks are pre-norm transformer blocks (LayerNorm eps 1e-5; MLP ratio 4) around
  convolutional-projection attention: depthwise 3x3 conv + BatchNorm for q (stride 1), k and
  v (stride 2), then linear projections with bias; scale ``dim ** -0.5`` as the authors;
* no position embedding anywhere; the last stage prepends a class token (truncated normal,
  std 0.02) which bypasses the convolutions and is the pooled feature (LayerNorm, linear head);
* the MLP's activation is the authors' ``QuickGELU`` (``x·σ(1.702·x)``, ``get_cls_model``);
  Hugging Face uses the exact GELU (``act='gelu'``). Parameter counts do not depend on it.
* CvT-13: widths 64-192-384, heads 1-3-6, depths 1-2-10; CvT-21: depths 1-4-16.

Stochastic depth follows the authors' per-stage rule: rates rise linearly inside each stage
from 0 to that stage's rate; a single ``drop_path_rate`` r means (0, 0, r), the shape of
their configs (``DROP_PATH_RATE: [0.0, 0.0, 0.1]``); a sequence gives each stage's rate.
Initialisation: truncated-normal (std 0.02) linear layers with zero bias, unit norms,
PyTorch's default for convolutions (the authors' ``trunc_norm`` init).

Feature maps are channels-last (B, H, W, C) between stages; the class-token stage runs on a
(B, 1 + H·W, C) sequence and passes the grid to each mixer. ``forward_features`` returns the
normalised (B, 1 + N, C) sequence (class token first) when the last stage has a class token,
else the normalised (B, H, W, C) map (then the head averages it, as the authors' code does).
Any input size of at least 16 works (the stages' strides multiply to 16).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed
from ..mixers.conv_attention import ConvAttention
from ..registry import register_layout, register_model, register_spec_mixer
from .base import MixlabModel, build, init_weights_vit
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["CvT", "CvTBlock", "CvTStage", "QuickGELU", "AUTHORS_RULES"]


class QuickGELU(nn.Module):
    """``x · σ(1.702 · x)``, the GELU approximation of the authors' CvT code (from CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class CvTBlock(MetaBlock):
    """The generic pre-norm block around a :class:`ConvAttention`; ``grid`` (the H x W of a
    class-token sequence) is handed to the mixer."""

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x), grid=grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CvTStage(nn.Module):
    """Convolutional token embedding (conv + LayerNorm), an optional class token, blocks.

    ``forward`` takes the NCHW image (first stage) or the previous (B, H, W, C) map and
    returns the (B, H', W', C') map and the (B, 1, C') class token (None without one)."""

    def __init__(self, embed: nn.Module, blocks: Sequence[nn.Module], dim: int, cls_token: bool,
                 drop_rate: float = 0.0):
        super().__init__()
        self.embed = embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor):
        x = self.embed(x)
        B, H, W, C = x.shape
        if self.cls_token is None:
            x = self.pos_drop(x)
            for blk in self.blocks:
                x = blk(x)
            return x, None
        x = self.pos_drop(torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x.reshape(B, H * W, C)], 1))
        for blk in self.blocks:
            x = blk(x, grid=(H, W))
        return x[:, 1:].reshape(B, H, W, C), x[:, :1]


def _per_stage(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries but the model has {n} stages")
        return list(value)
    return [value] * n


class CvT(MixlabModel):
    """Convolutional vision Transformer: stages of (conv embedding, conv-projection attention
    blocks), a class token in the last stage (``cls_token``), a LayerNorm and a linear head."""

    mask_stem = "stages.0.embed"  # where masked image modeling's mask token enters

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 num_heads: Sequence[int] = (1, 3, 6), mlp_ratio=4.0, patch_sizes: Sequence[int] = (7, 3, 3),
                 patch_strides: Sequence[int] = (4, 2, 2), patch_paddings: Sequence[int] = (2, 1, 1),
                 kernel_size: int = 3, kv_stride=2, qkv_bias: bool = True, cls_token: bool = True,
                 act: str = "quick_gelu", global_pool: str | None = None, norm_eps: float = 1e-5,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate=0.0):
        super().__init__(in_chans, num_classes, img_size)
        n = len(embed_dims)
        if n == 0:
            raise ValueError("embed_dims is empty: a CvT needs at least one stage")
        for what, seq in (("depths", depths), ("num_heads", num_heads), ("patch_sizes", patch_sizes),
                          ("patch_strides", patch_strides), ("patch_paddings", patch_paddings)):
            if len(seq) != n:
                raise ValueError(f"{what} has {len(seq)} entries but embed_dims has {n}: give one per stage")
        for i, (d, h) in enumerate(zip(embed_dims, num_heads)):
            if d % h:
                raise ValueError(f"stage {i}: width {d} is not divisible by num_heads {h}")
        if act not in ACTS:
            raise ValueError(f"unknown act {act!r}; use one of {sorted(ACTS)}")
        global_pool = global_pool or ("token" if cls_token else "avg")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not cls_token:
            raise ValueError("global_pool='token' needs cls_token=True (a class token in the last stage)")
        ratios = _per_stage(mlp_ratio, n, "mlp_ratio")
        strides_kv = _per_stage(kv_stride, n, "kv_stride")
        if isinstance(drop_path_rate, (list, tuple)):
            rates = _per_stage(drop_path_rate, n, "drop_path_rate")
        else:
            rates = [0.0] * (n - 1) + [drop_path_rate]
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.embed_dim = embed_dims[-1]
        self.has_cls_token = cls_token
        self.num_prefix_tokens = 1 if cls_token else 0
        self.global_pool = global_pool

        norm = lambda d: nn.LayerNorm(d, eps=norm_eps)  # noqa: E731
        act_layer = ACTS[act]
        h, w = self.img_size
        reduction, prev, stages = 1, in_chans, []
        for i in range(n):
            k, s, p = patch_sizes[i], patch_strides[i], patch_paddings[i]
            embed = ConvEmbed(prev, embed_dims[i], k, s, p, post_norm=norm, nchw_input=i == 0)
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            reduction *= s
            last = i == n - 1
            cls = cls_token and last
            dpr = [rates[i] * j / max(depths[i] - 1, 1) for j in range(depths[i])]
            blocks = []
            for j in range(depths[i]):
                mixer = ConvAttention(embed_dims[i], num_heads[i], qkv_bias=qkv_bias, kernel_size=kernel_size,
                                      kv_stride=strides_kv[i], attn_drop=attn_drop_rate, proj_drop=drop_rate,
                                      num_prefix_tokens=int(cls), grid_size=(max(h, 1), max(w, 1)))
                blocks.append(CvTBlock(embed_dims[i], mixer, mlp_ratio=ratios[i], norm_layer=norm,
                                       act_layer=act_layer, drop=drop_rate, drop_path=dpr[j]))
            stages.append(CvTStage(embed, blocks, embed_dims[i], cls, drop_rate))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            tok = ", class token" if cls else ""
            self.stage_mixers.append(f"conv-projection attention (dwconv3x3+BN q/k/v, kv stride {strides_kv[i]}"
                                     f"{tok}, {num_heads[i]} heads)")
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.min_input_size = reduction
        self.norm = norm(embed_dims[-1])
        self.head = ClassifierHead(embed_dims[-1], num_classes, pool=global_pool, num_prefix_tokens=1 if cls_token
                                   else 0, drop_rate=0.0)

        self.apply(init_weights_vit)
        for st in self.stages:
            if st.cls_token is not None:
                nn.init.trunc_normal_(st.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.cls_token" for i, st in enumerate(self.stages) if st.cls_token is not None}

    def _run(self, x: torch.Tensor, upto: int | None = None, taps=()):
        self.check_input(x)
        maps, cls = {}, None
        last = len(self.stages) - 1
        upto = last if upto is None else upto
        for i, st in enumerate(self.stages[: upto + 1]):
            x, cls = st(x)
            if i in taps:
                maps[i] = (self.norm(x) if i == last else x).permute(0, 3, 1, 2)
        return x, cls, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised (B, 1 + N, C) sequence (class token first), or the normalised
        (B, H, W, C) map of a model without a class token."""
        x, cls, _ = self._run(x)
        if cls is None:
            return self.norm(x)
        B, H, W, C = x.shape
        return self.norm(torch.cat([cls, x.reshape(B, H * W, C)], dim=1))

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        """The stage outputs (B, C_i, H_i, W_i) for ``indices`` (the last normalised)."""
        idx = self._normalize_indices(indices)
        _, _, maps = self._run(x, upto=max(idx), taps=set(idx))
        return [maps[i] for i in idx]


_CVT = dict(embed_dims=(64, 192, 384), num_heads=(1, 3, 6), mlp_ratio=4.0, patch_sizes=(7, 3, 3),
            patch_strides=(4, 2, 2), patch_paddings=(2, 1, 1), kv_stride=2, cls_token=True)


@register_model
def cvt_13(**kwargs):
    """CvT-13 (Table 2: 20M, 4.5 GFLOPs at 224): widths 64-192-384, heads 1-3-6, depths 1-2-10."""
    return build(CvT, dict(_CVT, depths=(1, 2, 10)), kwargs)


@register_model
def cvt_21(**kwargs):
    """CvT-21 (Table 2: 32M, 7.1 GFLOPs at 224): widths 64-192-384, heads 1-3-6, depths 1-4-16."""
    return build(CvT, dict(_CVT, depths=(1, 4, 16)), kwargs)


@register_model
def nano_cvt(**kwargs):
    """Nano CvT for the arena (32x32 RGB, 10 classes): the project's stride 2-4-8 skeleton with
    CvT's parts — embeddings 7x7/2, 3x3/2, 3x3/2 (+ LayerNorm), widths 48-96-144, heads 1-2-3,
    depths 1-2-3, conv-projection attention with kv stride 2, a class token in the last stage."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, embed_dims=(48, 96, 144), depths=(1, 2, 3),
                    num_heads=(1, 2, 3), patch_sizes=(7, 3, 3), patch_strides=(2, 2, 2), patch_paddings=(3, 1, 1))
    return build(CvT, dict(_CVT, **defaults), kwargs)


register_nano("nano_cvt")  # the arena's nano-zoo line-up


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    mixer = ConvAttention(width, st["heads"], kv_stride=st["kv_stride"], proj_drop=drop, grid_size=grid)
    return CvTBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm, drop=drop, drop_path=drop_path)


register_spec_mixer("convattn", {"heads": 4, "kv_stride": 2},
                    "CvT: attention with depthwise-conv + BN projections (k/v strided)", _spec_block)


# ---------------------------------------------------------------------------------------------
# the authors' checkpoints (microsoft/CvT model zoo, ``lib/models/cls_cvt.py``): stages are
# ``stage{i}`` with ``patch_embed.{proj,norm}``, blocks' mixers are ``attn`` (same inner names)
# ---------------------------------------------------------------------------------------------
AUTHORS_RULES = [
    (r"^stage(\d+)\.patch_embed\.proj\.(.+)$", r"stages.\1.embed.proj.\2"),
    (r"^stage(\d+)\.patch_embed\.norm\.(.+)$", r"stages.\1.embed.post_norm.\2"),
    (r"^stage(\d+)\.cls_token$", r"stages.\1.cls_token"),
    (r"^stage(\d+)\.blocks\.(\d+)\.attn\.(.+)$", r"stages.\1.blocks.\2.mixer.\3"),
    (r"^stage(\d+)\.blocks\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
register_layout("authors-cvt", "cvt", [r"^stage\d+\.patch_embed\.proj\."], AUTHORS_RULES, model_class=CvT,
                mixlab_patterns=[r"^stages\.\d+\.blocks\.\d+\.mixer\.conv_proj_q\."])
