"""BoTNet (Srinivas et al., CVPR 2021, "Bottleneck Transformers for Visual Recognition",
arXiv 2101.11605; the authors' reference gist aravindsrinivas/56359b79f0ce4449bcb04ab4b56a57a2;
timm's ``timm/layers/bottleneck_attn.py`` and ``byoanet.py`` read for comparison).

BoTNet-50 is ResNet-50 whose last stage (c5, 3 blocks) replaces each bottleneck's 3x3
convolution by multi-head self-attention (4 heads) with 2D relative position logits
(:class:`~mixlab.mixers.bot.BottleneckAttention`); the first c5 block strides by a 2x2
average pool right after the MHSA (the shortcut is ResNet's strided 1x1 projection). The
block: 1x1 conv, BN, ReLU, MHSA, [2x2 avg pool], BN, ReLU, 1x1 conv (x4), BN, + shortcut,
ReLU. Everything else is :mod:`mixlab.models.resnet` (its stem, its Bottleneck, its init).

timm's ``botnet26t_256`` / ``botnet50ts_256`` are other networks (tiered stem, SiLU,
attention in c4 too, 256 px): only the mixer is checked against timm (tests/test_botnet.py).
The relative position tables fix the largest input (``img_size``); smaller inputs work.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import ClassifierHead, ResNetStem, stochastic_depth_rates, to_2tuple
from ..layers.conv_blocks import ResidualConvBlock
from ..mixers.bot import BottleneckAttention
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build
from .nano import register_nano
from .resnet import Bottleneck

__all__ = ["BoTBlock", "BoTNet", "SmallStem", "botnet50", "nano_botnet"]


def _half(grid) -> tuple[int, int]:
    """The map after a stride-2 layer that rounds up (3x3/2 or 1x1/2 conv, ceil-mode pool)."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


class BoTBlock(ResidualConvBlock):
    """A bottleneck whose 3x3 convolution is BoTNet's MHSA: 1x1 reduce, MHSA (on the
    ``grid_size`` map the block receives), 2x2 average pool when ``stride`` is 2 (ceil mode:
    odd maps give ceil(H/2), like the strided shortcut), 1x1 expand (x4), BatchNorm after each.
    NHWC in and out (:class:`~mixlab.layers.conv_blocks.ResidualConvBlock`)."""

    expansion = 4
    fuse_pairs = (("conv1", "bn1"), ("conv3", "bn3"))

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0, grid_size=(14, 14),
                 num_heads: int = 4, scale_pos_embed: bool = True):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"a BoT block strides by 1 or 2 (a 2x2 average pool), got {stride}")
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.mixer = BottleneckAttention(planes, num_heads, grid_size, scale_pos_embed=scale_pos_embed)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        nn.init.zeros_(self.bn3.weight)  # zero-init the last BN of each residual branch, as ResNet's
        self._add_residual(in_chs, planes * self.expansion, stride, drop_path)

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        y = self.act(self.bn1(self.conv1(x)))
        y = self.mixer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.act(self.bn2(self.pool(y)))
        return self.bn3(self.conv3(y))


class SmallStem(nn.Module):
    """A stride-2 stem for small images: 3x3/2 convolution, BatchNorm, ReLU (NCHW in, NHWC out)."""

    fuse_pairs = (("conv", "bn"),)

    def __init__(self, in_chans: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x))).permute(0, 2, 3, 1)


class BoTNet(HierarchicalModel):
    """ResNet with bottleneck blocks whose stages in ``attn_stages`` (0-based) use
    :class:`BoTBlock` (MHSA with relative positions, ``num_heads`` heads) instead of the 3x3
    convolution. The first block of every stage after the first strides by 2.

    ``stem``: 'resnet' (7x7/2 conv + 3x3/2 max pool, stride 4) or 'small' (one 3x3/2 conv,
    stride 2, for 16-64 px images). ``img_size`` sizes the relative position tables (the
    largest input accepted). ``scale_pos_embed``: see :mod:`mixlab.mixers.bot`.
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(3, 4, 6, 3),
                 widths=(64, 128, 256, 512), stem_width: int = 64, stem: str = "resnet", attn_stages=(3,),
                 num_heads: int = 4, scale_pos_embed: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        if len(depths) != len(widths):
            raise ValueError(f"depths {tuple(depths)} and widths {tuple(widths)} must have the same length")
        bad = [i for i in attn_stages if not 0 <= i < len(depths)]
        if bad:
            raise ValueError(f"attn_stages {tuple(attn_stages)}: stage indices must be in 0..{len(depths) - 1}")
        for i in attn_stages:
            if widths[i] % num_heads:
                raise ValueError(f"stage {i}: width {widths[i]} is not divisible by num_heads {num_heads}")
        grid = to_2tuple(img_size)
        if stem == "resnet":
            stem_mod, grid, reduction = ResNetStem(in_chans, stem_width), _half(_half(grid)), 4
        elif stem == "small":
            stem_mod, grid, reduction = SmallStem(in_chans, stem_width), _half(grid), 2
        else:
            raise ValueError(f"stem {stem!r} is not one of 'resnet', 'small'")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        prev = stem_width
        for i, (w, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                if i in attn_stages:
                    blocks.append(BoTBlock(prev, w, stride, dpr[i][j], grid, num_heads, scale_pos_embed))
                else:
                    blocks.append(Bottleneck(prev, w, stride=stride, drop_path=dpr[i][j]))
                grid = _half(grid) if stride == 2 else grid
                prev = w * Bottleneck.expansion
            if i > 0:
                reduction *= 2
            stages.append(Stage(None, blocks))
            info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
            mixers.append(f"MHSA, {num_heads} heads, 2D relative positions (bottleneck)" if i in attn_stages
                          else "dense conv 3x3 (bottleneck)")
        super().__init__(in_chans, num_classes, img_size, stem=stem_mod, stages=stages, norm=nn.Identity(),
                         head=ClassifierHead(prev, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        for m in self.modules():  # ResNet's init for the convolutions; the MHSA keeps its own
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("mixer.rel_h", "mixer.rel_w"))}


@register_model
def botnet50(**kwargs):
    """BoTNet-50 at 224 (20.86M parameters, 4.02 GMACs; the paper: 20.8M): ResNet-50 with
    MHSA (4 heads, relative positions) in the three c5 blocks."""
    return build(BoTNet, dict(depths=(3, 4, 6, 3), attn_stages=(3,), num_heads=4), kwargs)


@register_model
def nano_botnet(**kwargs):
    """Nano BoTNet (32x32 RGB, 10 classes by default): a 3x3/2 stem, three bottleneck stages
    (depths 2-3-2, inner widths 40-80-160, outputs 160-320-640, strides 2-4-8; 1.16M parameters, 59 MMACs),
    MHSA with 4 heads and relative positions in the last stage (its first block pools 2x2 after
    the MHSA, on the 8x8 map of a 32 px image)."""
    return build(BoTNet, dict(img_size=32, in_chans=3, num_classes=10, depths=(2, 3, 2), widths=(40, 80, 160),
                              stem_width=32, stem="small", attn_stages=(2,), num_heads=4), kwargs)


register_nano("nano_botnet")  # the arena's nano-zoo line-up


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    if width % 4 or (width // 4) % st["heads"]:
        raise ValueError(f"botattn stage: width {width} must be divisible by 4 and width/4 = {width / 4:g} by "
                         f"heads {st['heads']}")
    block = BoTBlock(width, width // 4, 1, drop_path, grid, st["heads"])
    for mod in block.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return block


register_spec_mixer("botattn", {"heads": 4},
                    "BoTNet bottleneck: 1x1, MHSA with 2D relative position logits (width/4), 1x1; BatchNorm",
                    _spec_block)
