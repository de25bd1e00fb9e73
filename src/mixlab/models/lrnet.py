"""LR-Net (Hu, Zhang, Xie, Lin, ICCV 2019, "Local Relation Networks for Image Recognition",
arXiv 1904.11491, Table 1; the authors' local relation CUDA operator in microsoft/Swin-Transformer,
branch LR-Net, ``ops/local_relation``; the seed ``002_*.txt`` reproduces Table 1).

LR-Net-50 is ResNet-50 with every 3x3 convolution of the bottlenecks replaced by a 7x7 local
relation layer (:class:`~mixlab.mixers.local_relation.LocalRelation`, m = 8 channels per
aggregation group), the bottlenecks widened to keep the FLOPs (inner widths 100-200-400-800
instead of 64-128-256-512, outputs unchanged 256-512-1024-2048), and the stem's 7x7
convolution replaced by a 1x1 convolution (3 -> 64) followed by a 7x7 local relation layer
of stride 2 (then ResNet's 3x3/2 max pool). Each 1x1 convolution and each local relation
layer is followed by BatchNorm (and ReLU inside the branch), as in ResNet. Downsampling
blocks stride in the local relation layer (ResNet v1.5's place of the stride, mixlab's
:class:`~mixlab.models.resnet.Bottleneck`), with ResNet's strided 1x1 projection shortcut.
The paper does not say where the stride sits; the parameter count does not depend on it.

Any input size works (the layer has no size-bound parameter).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import ClassifierHead, stochastic_depth_rates
from ..layers.conv_blocks import ResidualConvBlock
from ..mixers.local_relation import LocalRelation
from ..registry import register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build
from .nano import register_nano

__all__ = ["LRBlock", "LRStem", "LRNet", "lrnet_50", "nano_lrnet"]


class LRBlock(ResidualConvBlock):
    """A bottleneck whose 3x3 convolution is a local relation layer: 1x1 (in -> planes), LR
    k x k (stride here), 1x1 (planes -> out_chs), BatchNorm after each, ReLU, residual.
    NHWC in and out (:class:`~mixlab.layers.conv_blocks.ResidualConvBlock`)."""

    fuse_pairs = (("conv1", "bn1"), ("conv3", "bn3"))

    def __init__(self, in_chs: int, planes: int, out_chs: int, stride: int = 1, drop_path: float = 0.0,
                 kernel_size: int = 7, m: int = 8, composability: str = "sqdiff"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.mixer = LocalRelation(planes, kernel_size, m, stride, composability=composability)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        nn.init.zeros_(self.bn3.weight)  # zero-init the last BN of each residual branch, as ResNet's
        self._add_residual(in_chs, out_chs, stride, drop_path)

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.mixer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
        return self.bn3(self.conv3(y))


class LRStem(nn.Module):
    """LR-Net's stem: 1x1 convolution, BN, ReLU, k x k local relation layer (stride 2 in
    LR-Net), BN, ReLU, and (``pool``) a 3x3/2 max pool. NCHW in, NHWC out."""

    fuse_pairs = (("conv", "bn1"),)

    def __init__(self, in_chans: int = 3, out_chs: int = 64, kernel_size: int = 7, m: int = 8, stride: int = 2,
                 pool: bool = True, composability: str = "sqdiff"):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.mixer = LocalRelation(out_chs, kernel_size, m, stride=stride, composability=composability)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv(x)))
        y = self.act(self.bn2(self.mixer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
        return self.pool(y).permute(0, 2, 3, 1)


class LRNet(HierarchicalModel):
    """ResNet-style network of local relation bottlenecks (see the module docstring):
    ``widths`` the bottlenecks' inner widths, ``out_widths`` their outputs, ``kernel_size``
    and ``m`` of every local relation layer (the stem's too), ``composability`` their Φ
    (``"sqdiff"`` -(q - k)², the paper's, or ``"dot"``), ``stem_stride`` the stride of
    the stem's local relation layer and ``stem_pool`` its max pool (LR-Net: 2 and on, stride 4).
    The first block of each stage after the first strides."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(3, 4, 6, 3),
                 widths=(100, 200, 400, 800), out_widths=(256, 512, 1024, 2048), stem_width: int = 64,
                 stem_stride: int = 2, stem_pool: bool = True, kernel_size: int = 7, m: int = 8,
                 composability: str = "sqdiff", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if not len(depths) == len(widths) == len(out_widths):
            raise ValueError(f"depths {tuple(depths)}, widths {tuple(widths)} and out_widths {tuple(out_widths)} "
                             f"must have the same length")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        prev, reduction = stem_width, stem_stride * (2 if stem_pool else 1)
        for i, (w, out, depth) in enumerate(zip(widths, out_widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(LRBlock(prev, w, out, stride=2 if (i > 0 and j == 0) else 1, drop_path=dpr[i][j],
                                      kernel_size=kernel_size, m=m, composability=composability))
                prev = out
            if i > 0:
                reduction *= 2
            stages.append(Stage(None, blocks))
            info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
            mixers.append(f"local relation {kernel_size}x{kernel_size}, m={m} (bottleneck, width {w})")
        super().__init__(in_chans, num_classes, img_size, stem=LRStem(in_chans, stem_width, kernel_size, m, stem_stride,
                                                                stem_pool, composability),
                         stages=stages, norm=nn.Identity(),
                         head=ClassifierHead(prev, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        for mod in self.modules():  # ResNet's init for the convolutions; the layers keep their own
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")


@register_model
def lrnet_50(**kwargs):
    """LR-Net-50 (7x7, m = 8) at 224: 23.37M parameters, 4.03 GMACs (the paper's Table 1:
    23.3M, 4.3 GFLOPs)."""
    return build(LRNet, dict(depths=(3, 4, 6, 3), widths=(100, 200, 400, 800), kernel_size=7, m=8), kwargs)


@register_model
def nano_lrnet(**kwargs):
    """Nano LR-Net (32x32 RGB, 10 classes by default): LR-Net's stem with its local relation
    layer at stride 1 (1x1 conv, 7x7 LR, 3x3/2 max pool: stride 2), three stages of local relation bottlenecks
    (7x7, m = 8; depths 2-3-2, inner widths 64-128-256, outputs 128-256-512, strides 2-4-8;
    1.09M parameters, 54 MMACs)."""
    return build(LRNet, dict(img_size=32, in_chans=3, num_classes=10, depths=(2, 3, 2), widths=(64, 128, 256),
                             out_widths=(128, 256, 512), stem_width=32, stem_stride=1, kernel_size=7, m=8), kwargs)


register_nano("nano_lrnet")  # the arena's nano-zoo line-up


# -- specifications ---------------------------------------------------------------------------
def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    if width % 4:
        raise ValueError(f"localrelation stage: width {width} must be divisible by 4 (the block is width/4 wide "
                         f"inside)")
    # m channels share one aggregation; a block narrower than m inside has a single group
    block = LRBlock(width, width // 4, width, 1, drop_path, st["kernel"], min(st["m"], width // 4))
    for mod in block.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return block


register_spec_mixer("localrelation", {"kernel": 7, "m": 8},
                    "LR-Net bottleneck: 1x1, local relation layer (width/4; m capped there), 1x1; BatchNorm",
                    _spec_block)
