"""ResNet (He et al., 2016), the convolutional baseline. Its spatial mixer is a dense 3x3
convolution inside a bottleneck: it mixes positions and channels at once, so it is not a
per-channel context aggregation and has no ``affinity`` (the seeds contrast exactly this
with the depthwise convolution)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import ClassifierHead, ResNetStem, stochastic_depth_rates
from ..layers.conv_blocks import ResidualConvBlock
from ..mixers.context import context_spec
from ..registry import IMAGENET_MEAN_STD, register_default_weights, register_layout, register_model
from .base import HierarchicalModel, Stage, build


class _ContextStage(Stage):
    """A stage followed by a context module (``context`` option of :class:`ResNet`)."""

    def __init__(self, downsample, blocks, context: nn.Module):
        super().__init__(downsample, blocks)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(super().forward(x))


class BasicBlock(ResidualConvBlock):
    """ResNet-18/34's block: two 3x3 convolutions with BatchNorm (the first strides), ReLU;
    ``context``: see :class:`~mixlab.layers.conv_blocks.ResidualConvBlock`."""

    expansion = 1
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # see mixlab.layers.fuse

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0, context=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        nn.init.zeros_(self.bn2.weight)  # zero-init the last BN of each residual branch
        self._add_residual(in_chs, planes, stride, drop_path, context)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualConvBlock):
    """1x1 reduce, 3x3 (stride here, ResNet v1.5), 1x1 expand (x4), each with BatchNorm;
    ``context``: see :class:`~mixlab.layers.conv_blocks.ResidualConvBlock`."""

    expansion = 4
    fuse_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0, context=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        nn.init.zeros_(self.bn3.weight)  # zero-init the last BN of each residual branch
        self._add_residual(in_chs, planes * self.expansion, stride, drop_path, context)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class ResNet(HierarchicalModel):
    """ResNet with bottleneck blocks: 7x7/2 stem + max pool, four stages (the first block
    of stages 2-4 strides by 2), global average pooling, classifier.

    Global context modules (:data:`mixlab.mixers.context.CONTEXT_MODULES`: se, ge, ge_theta, ge_theta_global,
    bam, nonlocal, crisscross, gc, tree_filter) are inserted with ``context=NAME``; ``context_stages`` (0-based stage
    indices, default: the module's paper placement), ``context_placement`` ('block': inside
    every bottleneck of those stages, before the residual addition; 'stage': after the last
    block of each of those stages) and ``context_args`` (the module's keyword arguments,
    e.g. ``{"ratio": 0.25}`` for gc). Context modules keep their own initialisation.
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(3, 4, 6, 3),
                 widths=(64, 128, 256, 512), stem_width: int = 64, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, context: str | None = None, context_stages=None,
                 context_placement: str | None = None, context_args: dict | None = None):
        ctx = context_spec(context, context_stages, context_placement, len(depths), context_args)
        made: list[nn.Module] = []

        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        def make(dim: int, stage: int) -> nn.Module:
            # the stage's map: the stem and each stride halve it, rounding up (padding 3 / 1 / 1)
            made.append(ctx.make(dim, tuple(-(-n // (4 * 2 ** stage)) for n in size)))
            return made[-1]

        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        prev = stem_width
        for i, (w, depth) in enumerate(zip(widths, depths)):
            here = ctx is not None and i in ctx.stages
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(prev, w, stride=2 if (i > 0 and j == 0) else 1, drop_path=dpr[i][j],
                                         context=partial(make, stage=i) if here and ctx.placement == "block"
                                         else None))
                prev = w * Bottleneck.expansion
            stages.append(_ContextStage(None, blocks, make(prev, i)) if here and ctx.placement == "stage"
                          else Stage(None, blocks))
            info.append(dict(num_chs=prev, reduction=4 * 2 ** i, module=f"stages.{i}"))
            mixers.append("dense conv 3x3 (bottleneck)" + (f" + {ctx.describe()}" if here else ""))
        super().__init__(in_chans, num_classes, img_size, stem=ResNetStem(in_chans, stem_width), stages=stages,
                         norm=nn.Identity(), head=ClassifierHead(prev, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        own = {id(m) for c in made for m in c.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in own:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model
def resnet50(**kwargs):
    """ResNet-50 (25.6M, 4.1 GMACs)."""
    return build(ResNet, dict(depths=(3, 4, 6, 3)), kwargs)


# -- checkpoints: timm's names, default weights --------------------------------------------------------------
TIMM_RULES = [
    (r"^conv1\.(.+)$", r"stem.conv.\1"),
    (r"^bn1\.(.+)$", r"stem.bn.\1"),
    (r"^layer(\d+)\.(\d+)\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
    (r"^fc\.(.+)$", r"head.fc.\1"),
]

register_layout("timm", "resnet", [r"^layer[1-4]\.\d+\.", r"^conv1\.weight$"], TIMM_RULES, model_class=ResNet,
                broad=True, mixlab_patterns=[r"^stem\.bn\.", r"^stages\.\d+\.blocks\.\d+\.(conv|bn)[123]\."])
register_default_weights("resnet50", "hf-hub:timm/resnet50.a1_in1k", **IMAGENET_MEAN_STD, crop_pct=0.95)
