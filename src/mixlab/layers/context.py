"""Global context modules for CNNs that are channel gates.

The gates here rescale features with a context summary; they are not A·V aggregations
(outputs are ``x·s(x)``, a product of the input with a gate, not a weighted sum of values):

* :class:`SqueezeExcite` (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018);
* :class:`GatherExcite` (Hu et al., "Gather-Excite: Exploiting Feature Context in
  Convolutional Neural Networks", NeurIPS 2018), GE-θ⁻ and GE-θ;
* :class:`BAM` (Park et al., "BAM: Bottleneck Attention Module", BMVC 2018).

The blocks that are context aggregation ``Y = X + (A·V)·W`` (non-local, criss-cross, global
context) are mixers and live in :mod:`mixlab.mixers.context`; the Learnable Tree Filter v2
(filtering along a minimum spanning tree of the feature grid) in
:mod:`mixlab.mixers.tree_filter`. Every module takes and returns
a channels-last (B, H, W, C) map, like the mixers; convolutions see ``x.permute(0, 3, 1, 2)``.

:data:`mixlab.mixers.context.CONTEXT_MODULES` names the gates and those blocks for
``create_model("resnet50", context=NAME, ...)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _nchw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"a context module takes a channels-last (B, H, W, C) map, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018, Sec. 3): a channel gate, not an A·V aggregation.

    squeeze: global average pooling to a (B, C) descriptor; excitation: FC C -> C/r, ReLU,
    FC -> C, sigmoid; the output is ``x · s`` (each channel rescaled; r = 16 in the paper).
    """

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        inner = max(dim // reduction, 1)
        self.fc1 = nn.Linear(dim, inner)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(inner, dim)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) channel gate s."""
        return self.fc2(self.act(self.fc1(x.mean(dim=(1, 2))))).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, None, None, :]


class GatherExcite(nn.Module):
    """Gather-Excite (Hu et al., NeurIPS 2018, Sec. 3): a gate ``x · σ(interp(ξ_G(x)))``, not an A·V
    aggregation as a whole.

    * GE-θ⁻ (``param=False``, parameter-free): gather ξ_G is average pooling, over the whole
      map for ``extent=0`` (global extent: the gate is σ(mean_j x_j), broadcast over
      positions), else a (2e-1) x (2e-1) average pool with stride e. Global average pooling
      is itself A·V with a uniform A = 1/N (every entry): :meth:`gather_affinity` returns it.
    * GE-θ (``param=True``): gather is log2(e) depthwise 3x3 stride-2 convolutions, each with
      BatchNorm (ReLU between them), for an extent e = 2, 4, 8, ...; for the global extent
      (``extent=0``) one depthwise convolution whose kernel covers the whole map, with
      BatchNorm, so ``feat_size`` (the map's (h, w), fixed when the model is built) is needed.

    Excite: the gathered map is interpolated back (nearest) to H x W and passed through a sigmoid.
    """

    def __init__(self, dim: int, extent: int = 0, param: bool = False, feat_size=None):
        super().__init__()
        self.extent, self.param = extent, param
        self.feat_size = None
        if param and extent == 0:
            if feat_size is None:
                raise ValueError("GE-θ with global extent needs feat_size, the (h, w) of the map it gathers "
                                 "(its depthwise kernel covers the whole map)")
            self.feat_size = (feat_size, feat_size) if isinstance(feat_size, int) else tuple(feat_size)
            self.gather = nn.Sequential(nn.Conv2d(dim, dim, self.feat_size, groups=dim, bias=False),
                                        nn.BatchNorm2d(dim))
        elif param:
            if extent < 2 or extent & (extent - 1):
                raise ValueError(f"GE-θ needs an extent that is 0 (global) or a power of two >= 2, got {extent}")
            layers: list[nn.Module] = []
            for i in range(int(math.log2(extent))):
                if i:
                    layers.append(nn.ReLU(inplace=True))
                layers += [nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim)]
            self.gather = nn.Sequential(*layers)
        elif extent < 0 or extent == 1:
            raise ValueError(f"GE-θ⁻ needs extent 0 (global) or >= 2, got {extent}")

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """ξ_G(x) as an NCHW map (B, C, h, w) at the gather's resolution."""
        xc = _nchw(x)
        if self.feat_size is not None and tuple(xc.shape[-2:]) != self.feat_size:
            raise ValueError(f"GE-θ with global extent was built for {self.feat_size[0]}x{self.feat_size[1]} maps, "
                             f"got {xc.shape[-2]}x{xc.shape[-1]}; build the model for this input size (img_size)")
        if self.param:
            return self.gather(xc)
        if self.extent == 0:
            return xc.mean(dim=(2, 3), keepdim=True)
        k = 2 * self.extent - 1
        return F.avg_pool2d(xc, k, stride=self.extent, padding=k // 2, count_include_pad=False)

    def gather_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """GE-θ⁻ with global extent: the uniform (B, 1, N, N) A of its gather (A·X = the mean at every position)."""
        if self.param or self.extent != 0:
            raise NotImplementedError("gather_affinity is defined for the global, parameter-free GE-θ⁻ only")
        B, H, W, _ = x.shape
        return x.new_full((1, 1, 1, 1), 1.0 / (H * W)).expand(B, 1, H * W, H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gathered(x)
        if g.shape[-2:] != x.shape[1:3]:
            g = F.interpolate(g, size=x.shape[1:3], mode="nearest")
        return x * g.sigmoid().permute(0, 2, 3, 1)


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., BMVC 2018, Sec. 3): a gate ``x · (1 + σ(M_c + M_s))``,
    not an A·V aggregation.

    Channel branch M_c (B, C): global average pooling, MLP C -> C/r (BatchNorm, ReLU) -> C.
    Spatial branch M_s (B, H, W): 1x1 conv C -> C/r, two 3x3 convs with dilation d = 4, 1x1
    conv to one map (BatchNorm and ReLU after each but the last). r = 16, d = 4 in the paper;
    the two are broadcast to C x H x W and summed before the sigmoid. Layers followed by a
    BatchNorm have no bias (the BatchNorm subtracts it again; it would only get zero gradients).
    """

    def __init__(self, dim: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        inner = max(dim // reduction, 1)
        self.channel = nn.Sequential(nn.Linear(dim, inner, bias=False), nn.BatchNorm1d(inner),
                                     nn.ReLU(inplace=True), nn.Linear(inner, dim))
        layers: list[nn.Module] = [nn.Conv2d(dim, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [nn.Conv2d(inner, inner, 3, padding=dilation, dilation=dilation, bias=False),
                       nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(inner, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """σ(M_c + M_s) as a channels-last (B, H, W, C) map."""
        m_c = self.channel(x.mean(dim=(1, 2)))[:, None, None, :]
        m_s = self.spatial(_nchw(x)).permute(0, 2, 3, 1)
        return (m_c + m_s).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.attention(x))


__all__ = ["SqueezeExcite", "GatherExcite", "BAM"]
