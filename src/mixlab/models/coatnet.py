"""CoAtNet (Dai et al., NeurIPS 2021, "CoAtNet: Marrying Convolution and Attention for All
Data Sizes", arXiv:2106.04803): convolution stages first, then relative-attention stages,
the C-C-T-T layout.

* S0, the stem: a 3x3 stride-2 convolution, BatchNorm + activation, a 3x3 stride-1
  convolution (no bias), as in timm's ``maxxvit.Stem``;
* S1, S2 (``C``): MBConv blocks, pre-norm with BatchNorm: ``x + conv1x1(SE(dw3x3(conv1x1(BN(x)))))``
  with expansion 4, BatchNorm + activation after each of the first two convolutions and a
  squeeze-excitation of ratio 0.25; the first block of a stage downsamples (its shortcut:
  2x2 average pooling and a 1x1 convolution to the new width);
* S3, S4 (``T``): transformer blocks, ``x + Attn(LN(x))`` with CoAtNet's relative attention
  (:class:`~mixlab.mixers.rel_attention.RelativeAttention`, head dim 32) and ``x + MLP(LN(x))``
  (ratio 4, GELU); the first block of a stage pools (2x2 average) both its shortcut (then a
  1x1 projection to the new width) and its normalised input before attention — the paper's
  ``x ← Proj(Pool(x)) + Attention(Pool(Norm(x)))``.

Two configurations, both from ``timm/models/maxxvit.py`` (timm 1.0.31, read locally):

* ``variant='paper'`` — timm's ``coatnet_0_224`` config, written to follow the paper: GELU
  everywhere, MBConv expansion from the output width, SE (SiLU, reduction from the output
  width) after the second BatchNorm, biases on the shortcut and last 1x1 convolution;
  attention widened in ``qkv`` (heads = out/32); head: average pooling, LayerNorm, a
  768-wide tanh pre-logits layer (TF MaxViT/CoAtNet's head), classifier. One difference from
  timm's default: the stride of a downsampling MBConv block sits in its first 1x1 conv
  (``stride_mode='1x1'``, the paper's choice, timm's ``conv_stride_mode='1x1'``), not in the
  depthwise conv (``stride_mode='dw'``, timm's default). The parameters are the same;
  ``coatnet_0``: 25.04M (paper: 25M), 4.14 GMACs at 224 (paper: 4.2G; with ``'dw'``, as
  timm's ``coatnet_0_224``, 4.55);
* ``variant='rw'`` — Ross Wightman's ``coatnet_0_rw_224`` (trained weights in timm): SiLU,
  an activation after the pre-norm, expansion from the input width, stride by average
  pooling before the first 1x1 (``stride_mode='pool'``), SE (ReLU, reduction from the expanded width) between the
  depthwise convolution and its norm, no biases on shortcuts and last 1x1; attention width
  the input's, widened in ``proj``; depths 2-3-7-2, stem 32-64; a final LayerNorm then
  pooling and classifier. 27.44M, 4.42 GMACs (timm: 27.44M / 4.41).

Feature maps are channels-last between blocks; the MBConv block
(:class:`mixlab.layers.conv_blocks.MBConvBlock`) works on its NCHW view.
Downsampling rounds up (3x3/2 convolutions and 2x2 pooling with ``ceil_mode``), equal to
timm's for every even size, so the model takes any input size. The relative bias tables are
built for the stage grids at ``img_size``; on another grid they are resampled bicubically.
timm's state dicts convert (:data:`TIMM_RULES`; 1x1 convolutions become linear layers).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import ClassifierHead, DropPath, Mlp, stochastic_depth_rates, to_2tuple
from ..layers.conv_blocks import MBCONV_VARIANTS, STRIDE_MODES, MBConvBlock, avg_pool_2x2, init_conv_fan_out
from ..mixers.rel_attention import RelativeAttention
from ..registry import register_layout, register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .blocks import MetaBlock
from .nano import register_nano

__all__ = ["CoAtNet", "RelAttnBlock", "TIMM_RULES"]


class _Shortcut(nn.Module):
    """The transformer block's shortcut on a channels-last map: optional 2x2 pooling, optional
    linear projection to the new width."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, bias: bool):
        super().__init__()
        self.pool = avg_pool_2x2() if stride == 2 else None
        self.expand = nn.Linear(in_chs, out_chs, bias=bias) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.expand(x)


class _Pool(nn.Module):
    """2x2 average pooling of a channels-last map."""

    def __init__(self):
        super().__init__()
        self.pool = avg_pool_2x2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RelAttnBlock(nn.Module):
    """CoAtNet's transformer block on a channels-last map:
    ``x = shortcut(x) + Attn(pool(LN(x)))``, ``x = x + MLP(LN(x))``; ``pool`` and the
    shortcut's pooling only when ``stride == 2``, the shortcut's projection only for a new
    width. ``grid_size``: the (output) map the attention's bias table is built for."""

    def __init__(self, dim: int, dim_out: int, grid_size, stride: int = 1, variant: str = "paper", head_dim: int = 32,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        if variant not in MBCONV_VARIANTS:
            raise ValueError(f"unknown CoAtNet variant {variant!r}; use one of {MBCONV_VARIANTS}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        rw = variant == "rw"
        attn_dim = dim if rw else dim_out  # where the width grows: `proj` (rw) or `qkv` (paper)
        if attn_dim % head_dim:
            raise ValueError(f"attention width {attn_dim} is not divisible by head_dim {head_dim}")
        self.shortcut = _Shortcut(dim, dim_out, stride, bias=not rw)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.down = _Pool() if stride == 2 else nn.Identity()
        self.mixer = RelativeAttention(dim, attn_dim // head_dim, grid_size, head_dim=head_dim, dim_out=dim_out,
                                       proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(x) + self.drop_path1(self.mixer(self.down(self.norm1(x))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class _Stem(nn.Module):
    """S0: 3x3/2 conv -> BN -> act -> 3x3/1 conv (no biases); NCHW image in, channels-last out."""

    def __init__(self, in_chans: int, widths, act_layer):
        super().__init__()
        w1, w2 = widths
        self.conv1 = nn.Conv2d(in_chans, w1, 3, 2, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(w1)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(w1, w2, 3, 1, 1, bias=False)
        self.fuse_pairs = (("conv1", "norm1"),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x)))).permute(0, 2, 3, 1)


class _PreLogitsHead(ClassifierHead):
    """Pool -> LayerNorm -> tanh(Linear) pre-logits -> dropout -> classifier (timm's
    ``NormMlpClassifierHead``, the head of timm's paper-style CoAtNets)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, drop_rate: float = 0.0):
        super().__init__(in_features, num_classes, pool="avg", norm_layer=lambda c: nn.LayerNorm(c, eps=1e-6),
                         drop_rate=drop_rate)
        self.pre_logits = nn.Sequential()
        self.pre_logits.add_module("fc", nn.Linear(in_features, hidden))
        self.pre_logits.add_module("act", nn.Tanh())
        self.in_features = hidden  # the classifier's input (for reset)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pre_logits(self.norm(self.pool_features(x))))
        return x if pre_logits else self.fc(x)


def _down(size: int, stride: int) -> int:
    return -(-size // stride)


class CoAtNet(HierarchicalModel):
    """CoAtNet: stem S0, then stages of MBConv (``'C'``) or relative-attention transformer
    (``'T'``) blocks, each stage's first block downsampling by ``strides[i]`` (2 in the paper;
    1 keeps the resolution, for small images).

    ``stem_width``: an int (both stem convs) or a pair; ``variant``: 'paper' or 'rw' (see the
    module docstring); ``stride_mode``: where a downsampling MBConv block strides ('1x1',
    'dw' or 'pool'); ``head_hidden_size``: a tanh pre-logits layer of that width after a
    pooled LayerNorm (timm's paper config), or None for LayerNorm on the map, pooling and the
    classifier. ``img_size`` sets the grids the relative bias tables are built for.
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, stem_width=64,
                 dims=(96, 192, 384, 768), depths=(2, 3, 5, 2), block_types=("C", "C", "T", "T"),
                 strides=(2, 2, 2, 2), variant: str = "paper", head_dim: int = 32, expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, mlp_ratio: float = 4.0, head_hidden_size: int | None = 768,
                 stride_mode: str = "1x1", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        dims, depths, block_types, strides = tuple(dims), tuple(depths), tuple(block_types), tuple(strides)
        if not len(dims) == len(depths) == len(block_types) == len(strides):
            raise ValueError(f"dims {dims}, depths {depths}, block_types {block_types} and strides {strides} "
                             f"must have one entry per stage")
        if any(t not in ("C", "T") for t in block_types):
            raise ValueError(f"block_types are 'C' (MBConv) or 'T' (relative attention), got {block_types}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be 1 or 2, got {strides}")
        if variant not in MBCONV_VARIANTS:
            raise ValueError(f"unknown CoAtNet variant {variant!r}; use one of {MBCONV_VARIANTS}")
        if stride_mode not in STRIDE_MODES:
            raise ValueError(f"unknown stride_mode {stride_mode!r}; use one of {STRIDE_MODES}")
        stem_w = to_2tuple(stem_width)
        img = to_2tuple(img_size)
        act = nn.SiLU if variant == "rw" else nn.GELU
        stem = _Stem(in_chans, stem_w, act)
        grid = (_down(img[0], 2), _down(img[1], 2))
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        prev, reduction = stem_w[1], 2
        for i, (dim, depth, kind, stride) in enumerate(zip(dims, depths, block_types, strides)):
            grid = (_down(grid[0], stride), _down(grid[1], stride))
            reduction *= stride
            blocks = []
            for j in range(depth):
                s, d_in = (stride, prev) if j == 0 else (1, dim)
                if kind == "C":
                    blocks.append(MBConvBlock(d_in, dim, s, variant, expand_ratio, se_ratio, dpr[i][j], stride_mode))
                else:
                    blocks.append(RelAttnBlock(d_in, dim, grid, s, variant, head_dim, mlp_ratio, drop_rate,
                                               dpr[i][j]))
            stages.append(Stage(None, blocks))
            info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            mixers.append("MBConv (depthwise 3x3 conv, SE)" if kind == "C"
                          else f"relative attention (global, {dim // head_dim} heads)")
            prev = dim
        if head_hidden_size:
            norm = nn.Identity()
            head = _PreLogitsHead(prev, num_classes, head_hidden_size, drop_rate)
        else:
            norm = nn.LayerNorm(prev, eps=1e-6)
            head = ClassifierHead(prev, num_classes, pool="avg", drop_rate=drop_rate)
        super().__init__(in_chans, num_classes, img_size, stem=stem, stages=stages, norm=norm, head=head,
                         feature_info=info, stage_mixers=mixers)
        # every downsampling rounds up: any input size runs (below 16 the attention stages see one position)
        self.min_input_size = 16
        self.variant = variant
        self.apply(init_conv_fan_out)  # EfficientNet-style, as timm's CoAtNet conv blocks
        self.apply(init_weights_vit)

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


# ---------------------------------------------------------------------------------------
# registered models
# ---------------------------------------------------------------------------------------
@register_model
def coatnet_0(**kwargs):
    """CoAtNet-0, the paper's (Dai et al. 2021, Table 3: L = 2-2-3-5-2, D = 64-96-192-384-768),
    as timm's ``coatnet_0_224`` config with the MBConv stride in the first 1x1 conv (timm's
    ``conv_stride_mode='1x1'``): 25.04M parameters, 4.14 GMACs at 224 (paper 25M / 4.2G)."""
    return build(CoAtNet, dict(stem_width=64, dims=(96, 192, 384, 768), depths=(2, 3, 5, 2), variant="paper",
                               head_hidden_size=768), kwargs)


@register_model
def coatnet_0_rw_224(**kwargs):
    """timm's ``coatnet_0_rw_224`` (deeper S3, stem 32-64, SiLU MBConvs): 27.44M, 4.42 GMACs
    (timm 27.44M / 4.41)."""
    return build(CoAtNet, dict(stem_width=(32, 64), dims=(96, 192, 384, 768), depths=(2, 3, 7, 2), variant="rw",
                               head_hidden_size=None, stride_mode="pool"), kwargs)


@register_model
def nano_coatnet(**kwargs):
    """Nano CoAtNet for the arena (32x32 RGB, 10 classes; 1.13M parameters): stem 32 (stride
    2), C-C-T-T of widths 32-64-128-160, two blocks each, strides 1-2-1-2 (grids 16-8-8-4 at
    32: attention over 64 and 16 positions), head dim 32 (4 and 5 heads), LayerNorm + linear
    head."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, stem_width=32, dims=(32, 64, 128, 160),
                    depths=(2, 2, 2, 2), strides=(1, 2, 1, 2), variant="paper", head_hidden_size=None)
    return build(CoAtNet, defaults, kwargs)


register_nano("nano_coatnet")  # the arena's nano-zoo line-up


# ---------------------------------------------------------------------------------------
# timm's state dicts -> mixlab names
# ---------------------------------------------------------------------------------------
_BLK = r"^stages\.(\d+)\.blocks\.(\d+)\."
TIMM_RULES = [
    (_BLK + r"conv1_1x1\.(.+)$", r"stages.\1.blocks.\2.conv1.\3"),
    (_BLK + r"conv2_kxk\.(.+)$", r"stages.\1.blocks.\2.conv2.\3"),
    (_BLK + r"conv3_1x1\.(.+)$", r"stages.\1.blocks.\2.conv3.\3"),
    (_BLK + r"se_early\.(.+)$", r"stages.\1.blocks.\2.se.\3"),
    (_BLK + r"norm1\.norm\.(.+)$", r"stages.\1.blocks.\2.norm1.\3"),
    (_BLK + r"attn\.rel_pos\.relative_position_bias_table$", r"stages.\1.blocks.\2.mixer.relative_position_bias_table"),
    (_BLK + r"attn\.(qkv|proj)\.(.+)$", r"stages.\1.blocks.\2.mixer.\3.\4"),
]
register_layout("timm", "coatnet", [_BLK + r"attn\.rel_pos\.relative_position_bias_table$"], TIMM_RULES,
                model_class=CoAtNet,
                mixlab_patterns=[_BLK + r"mixer\.relative_position_bias_table$"])


# ---------------------------------------------------------------------------------------
# the specification language: `relattn` stages
# ---------------------------------------------------------------------------------------
def _spec_relattn(stage: dict, width: int, grid, mlp_ratio: float, drop_path: float, index: int, drop: float):
    mixer = RelativeAttention(width, stage["heads"], grid, proj_drop=drop)
    return MetaBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=lambda c: nn.LayerNorm(c, eps=1e-6), drop=drop,
                     drop_path=drop_path)


register_spec_mixer("relattn", {"heads": 4},
                    "relative attention (global, CoAtNet's 2D relative position bias)", _spec_relattn)
