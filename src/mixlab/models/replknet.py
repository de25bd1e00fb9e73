"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design
in CNNs", CVPR 2022; authors' code DingXiaoH/RepLKNet-pytorch): a CNN whose spatial mixer is
a very large depthwise convolution (31, 29, 27, 13 in the four stages of RepLKNet-31B), made
trainable by a parallel small (5x5) depthwise branch that is merged into it after training.

Layout (the authors' ``RepLKNet``)::

    stem:        3x3/2 conv, 3x3 dw conv, 1x1 conv, 3x3/2 dw conv        (each + BN + ReLU)
    stage i:     [RepLK block, ConvFFN block] x depth_i
    RepLK block: x + DropPath(BN(1x1(ReLU(LK(ReLU(BN(1x1(BN(x))))))))),
                 LK(v) = BN(dwconv_KxK(v)) + BN(dwconv_5x5(v))
    ConvFFN:     x + DropPath(BN(1x1(GELU(BN(1x1(BN(x)))))))             (hidden = 4 x width)
    transition:  1x1 conv + BN + ReLU to the next width, 3x3/2 dw conv + BN + ReLU
    head:        BN, global average pooling, linear classifier

Every convolution is bias-free and followed by a BatchNorm (eps 1e-5); weights keep
PyTorch's default initialisation, as in the authors' code.

Re-parameterization: in eval mode each ``BN(dw_K(v)) + BN(dw_5(v))`` equals one K x K
depthwise convolution with bias (the small kernel, scaled by its BN, zero-padded to K x K
and added at the centre); the pair is the mixer
:class:`mixlab.mixers.large_kernel.ReparamLargeKernelConv`. :meth:`RepLKNet.reparameterize` (or the module function
:func:`reparameterize`, for specified models) replaces each pair by that convolution in place;
:meth:`RepLKNet.fuse` does that and folds every remaining BatchNorm into a neighbouring
convolution. The authors' checkpoints convert with ``mixlab.weights.convert_state_dict``
(layout ``'authors-replknet'``, registered here; a re-parameterized checkpoint needs a model
built with ``reparameterized=True``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import BatchNormNHWC, ClassifierHead, DropPath, stochastic_depth_rates
from ..layers.conv_blocks import conv_bn
from ..mixers.large_kernel import ReparamLargeKernelConv
from ..registry import register_layout, register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build
from .nano import register_nano


@torch.no_grad()
def _fold_pre_bn(norm: nn.Module, conv: nn.Conv2d) -> bool:
    """Fold a BatchNorm that comes right before a 1x1 convolution into it (exact: no padding)."""
    if not isinstance(norm, nn.BatchNorm2d):
        return False
    s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    t = norm.bias - norm.running_mean * s
    w = conv.weight[:, :, 0, 0]
    bias = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
    new_bias = bias + w @ t
    conv.weight.mul_(s.reshape(1, -1, 1, 1))
    conv.bias = nn.Parameter(new_bias)
    return True


class RepLKBlock(nn.Module):
    """``x + DropPath(pw2(ReLU(LK(pw1(BN(x))))))``: BatchNorm, 1x1 conv + BN + ReLU to the
    depthwise width, the large-kernel mixer, ReLU, 1x1 conv + BN back (channels-last in and out;
    the convolutions run on the NCHW view)."""

    def __init__(self, dim: int, dw_dim: int, kernel_size: int, small_kernel: int | None = 5, drop_path: float = 0.0,
                 reparameterized: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.pw1 = conv_bn(dim, dw_dim, 1, relu=True)
        self.mixer = ReparamLargeKernelConv(dw_dim, kernel_size, small_kernel, reparameterized)
        self.act = nn.ReLU(inplace=True)
        self.pw2 = conv_bn(dw_dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw1(self.norm(x.permute(0, 3, 1, 2)))
        y = self.act(self.mixer(y.permute(0, 2, 3, 1)))
        y = self.pw2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(y)

    def fold_batchnorm(self) -> bool:
        """Fold the leading BatchNorm into the first 1x1 convolution (eval mode, exact)."""
        if _fold_pre_bn(self.norm, self.pw1.conv):
            self.norm = nn.Identity()
            return True
        return False


class ConvFFN(nn.Module):
    """``x + DropPath(pw2(GELU(pw1(BN(x)))))`` with 1x1 convolutions + BN (channels-last in and out)."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.pw1 = conv_bn(dim, hidden, 1)
        self.act = nn.GELU()
        self.pw2 = conv_bn(hidden, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(self.act(self.pw1(self.norm(x.permute(0, 3, 1, 2)))))
        return x + self.drop_path(y.permute(0, 2, 3, 1))

    def fold_batchnorm(self) -> bool:
        if _fold_pre_bn(self.norm, self.pw1.conv):
            self.norm = nn.Identity()
            return True
        return False


class RepLKStem(nn.Sequential):
    """3x3/2 conv, 3x3 depthwise, 1x1, 3x3/2 depthwise, each with BN and ReLU: stride 4
    (NCHW image in, channels-last map out)."""

    def __init__(self, in_chans: int, width: int):
        super().__init__(conv_bn(in_chans, width, 3, 2, relu=True),
                         conv_bn(width, width, 3, 1, groups=width, relu=True),
                         conv_bn(width, width, 1, relu=True),
                         conv_bn(width, width, 3, 2, groups=width, relu=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


class Transition(nn.Sequential):
    """Between stages: 1x1 conv + BN + ReLU to the next width, then a 3x3 stride-2 depthwise
    conv + BN + ReLU (channels-last in and out)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(conv_bn(in_chs, out_chs, 1, relu=True),
                         conv_bn(out_chs, out_chs, 3, 2, groups=out_chs, relu=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def reparameterize(model: nn.Module) -> nn.Module:
    """Merge every :class:`ReparamLargeKernelConv` of ``model`` (a RepLKNet, or a specified
    model with ``largekernel`` stages) into one convolution, in place; eval mode only. Returns
    the model; its outputs are unchanged up to float rounding."""
    for m in list(model.modules()):
        if isinstance(m, ReparamLargeKernelConv):
            if model.training:
                raise RuntimeError("reparameterize() folds BatchNorm running statistics and is for inference: "
                                   "call model.eval() first")
            m.reparameterize()
    return model


class RepLKNet(HierarchicalModel):
    """RepLKNet: the stride-4 convolutional stem, four stages of RepLK + ConvFFN block pairs
    joined by transitions, BatchNorm, average pooling, linear classifier. ``depths`` counts
    block pairs; ``kernel_sizes`` gives each stage's large kernel; ``small_kernel`` the
    parallel branch (None: no branch, as RepLKNet-XL); ``reparameterized=True`` builds the
    merged (inference) structure directly, to load re-parameterized weights."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(2, 2, 18, 2),
                 dims=(128, 256, 512, 1024), kernel_sizes=(31, 29, 27, 13), small_kernel: int | None = 5,
                 dw_ratio: float = 1.0, ffn_ratio: float = 4.0, reparameterized: bool = False, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        if not len(depths) == len(dims) == len(kernel_sizes):
            raise ValueError(f"depths {depths}, dims {dims} and kernel_sizes {kernel_sizes} must have one entry per "
                             f"stage")
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth, k) in enumerate(zip(dims, depths, kernel_sizes)):
            blocks = []
            for j in range(depth):  # a pair shares its drop-path rate, as in the authors' code
                blocks.append(RepLKBlock(dim, int(dim * dw_ratio), k, small_kernel, dpr[i][j], reparameterized))
                blocks.append(ConvFFN(dim, int(dim * ffn_ratio), dpr[i][j]))
            stages.append(Stage(Transition(dims[i - 1], dim) if i else None, blocks))
            info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        small = f" + {small_kernel}x{small_kernel}" if small_kernel else ""
        super().__init__(in_chans, num_classes, img_size, stem=RepLKStem(in_chans, dims[0]), stages=stages,
                         norm=BatchNormNHWC(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info,
                         stage_mixers=[f"large-kernel depthwise conv {k}x{k}{small} (re-parameterizable)"
                                       for k in kernel_sizes])

    def reparameterize(self) -> "RepLKNet":
        """Merge each large + small kernel pair and their BatchNorms into one large
        convolution with bias, in place (eval mode; outputs unchanged). Returns the model."""
        return reparameterize(self)

    def fuse(self) -> "RepLKNet":
        """:meth:`reparameterize`, then fold every BatchNorm into a convolution: those after a
        convolution (``MixlabModel.fuse``) and those before each block's first 1x1
        convolution. Only the final BatchNorm before pooling stays. Eval mode; exact."""
        if self.training:
            raise RuntimeError("fuse() folds BatchNorm running statistics and is for inference: "
                               "call model.eval() first")
        self.reparameterize()
        super().fuse()
        for m in self.modules():
            if isinstance(m, (RepLKBlock, ConvFFN)):
                m.fold_batchnorm()
        return self


@register_model
def replknet_31b(**kwargs):
    """RepLKNet-31B: 79.86M parameters and 15.43 GMACs at 224 as trained; 79.53M / 15.35 GMACs
    re-parameterized (the paper and the authors' README: 79M / 15.3G, the re-parameterized
    model's figures; mmpretrain lists 79.9M train / 79.5M deploy)."""
    return build(RepLKNet, dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), kernel_sizes=(31, 29, 27, 13),
                                small_kernel=5), kwargs)


# ---------------------------------------------------------------------------------------------
# specifications: a RepLK block and a ConvFFN block as one stage block
# ---------------------------------------------------------------------------------------------
class RepLKUnit(nn.Sequential):
    """A RepLK block followed by a ConvFFN block (one 'block' of a ``largekernel`` stage)."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: int | None, ffn_ratio: float, drop_path: float):
        super().__init__(RepLKBlock(dim, dim, kernel_size, small_kernel, drop_path),
                         ConvFFN(dim, int(dim * ffn_ratio), drop_path))


def _spec_block(st, width, grid, ratio, dp, index, drop):
    return RepLKUnit(width, st["kernel"], st["small"] or None, ratio, dp)


register_spec_mixer("largekernel", {"kernel": 13, "small": 5},
                    "RepLKNet: large-kernel dwconv + small parallel branch (BN, re-parameterizable), ConvFFN",
                    _spec_block)


# ---------------------------------------------------------------------------------------------
# the authors' checkpoints (DingXiaoH/RepLKNet-pytorch): the same stem and block lists, the
# transitions in their own list, the mixer under `large_kernel`
# ---------------------------------------------------------------------------------------------
_AUTHORS_REPLKNET = [
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(?:prelkb_bn|preffn_bn)\.(.+)$", r"stages.\1.blocks.\2.norm.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.large_kernel\.lkb_origin\.(.+)$", r"stages.\1.blocks.\2.mixer.large.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.large_kernel\.small_conv\.(.+)$", r"stages.\1.blocks.\2.mixer.small.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.large_kernel\.lkb_reparam\.(.+)$", r"stages.\1.blocks.\2.mixer.merged.\3"),
    (r"^transitions\.(\d+)\.(.+)$", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

register_layout("authors-replknet", "replknet", [r"^stages\.\d+\.blocks\.\d+\.large_kernel\."], _AUTHORS_REPLKNET,
                model_class=RepLKNet)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# RepLKNet: large depthwise kernels (13x13 on 16x16 and 8x8 maps) with a parallel 5x5 branch
register_nano("nano_replknet", ("conv2 / largekernel:2x40:kernel=13 / largekernel:3x80:kernel=13"
                                " / largekernel:3x160:kernel=7"))
