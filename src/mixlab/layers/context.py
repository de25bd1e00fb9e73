"""Global context modules for CNNs: channel gates, and the names by which a model inserts them.

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

:data:`CONTEXT_MODULES` names them all for ``create_model("resnet50", context=NAME, ...)``
(see :class:`mixlab.models.resnet.ResNet`), with the placement each paper uses by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mixers.context import CrissCrossAttention, GlobalContextBlock, NonLocalBlock
from ..mixers.tree_filter import TreeFilterBlock


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


# -- names for model options ------------------------------------------------------------------
PLACEMENTS = ("block", "stage")


@dataclass(frozen=True)
class ContextModuleInfo:
    """A named context module: its factory ``cls(dim, **kwargs)``, default keyword arguments,
    and the placement its paper uses in a ResNet ('block': inside every bottleneck, on the
    residual branch before the addition; 'stage': after the last block of each given stage).
    ``needs_size``: the module is built for one map size (``feat_size``, its (h, w))."""

    cls: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    placement: str = "block"
    stages: tuple = (0, 1, 2, 3)
    paper: str = ""
    needs_size: bool = False

    def build(self, dim: int, feat_size=None, **kwargs) -> nn.Module:
        """The module for ``dim`` channels on maps of ``feat_size`` (h, w); ``kwargs`` override the defaults."""
        kwargs = {**self.kwargs, **kwargs}
        if self.needs_size:
            kwargs["feat_size"] = feat_size
        return self.cls(dim, **kwargs)


#: name -> module; the stages are 0-based (stage 0 = res2/conv2_x ... stage 3 = res5/conv5_x)
CONTEXT_MODULES: dict[str, ContextModuleInfo] = {
    "se": ContextModuleInfo(SqueezeExcite, {}, "block", (0, 1, 2, 3), "SE-ResNet: every bottleneck"),
    "ge": ContextModuleInfo(GatherExcite, {"extent": 0}, "block", (0, 1, 2, 3),
                            "GE-θ⁻, global extent: every bottleneck"),
    "ge_theta": ContextModuleInfo(GatherExcite, {"extent": 8, "param": True}, "block", (0, 1, 2, 3),
                                  "GE-θ, extent 8: every bottleneck"),
    "ge_theta_global": ContextModuleInfo(GatherExcite, {"extent": 0, "param": True}, "block", (0, 1, 2, 3),
                                         "GE-θ, global extent: every bottleneck", needs_size=True),
    "bam": ContextModuleInfo(BAM, {}, "stage", (0, 1, 2), "BAM: after stages 0-2, at the network's "
                             "'bottlenecks' (before each downsampling)"),
    "nonlocal": ContextModuleInfo(NonLocalBlock, {}, "stage", (2,), "one non-local block after res4"),
    "crisscross": ContextModuleInfo(CrissCrossAttention, {"recurrence": 2}, "stage", (1, 2, 3),
                                    "RCCA (R = 2) after res3, res4, res5 (the seed's Mask R-CNN placement)"),
    "gc": ContextModuleInfo(GlobalContextBlock, {}, "block", (0, 1, 2, 3), "GC r16: every bottleneck"),
    "tree_filter": ContextModuleInfo(TreeFilterBlock, {"groups": 16}, "stage", (1, 2, 3),
                                     "LTF-v2 (16 groups, self-guided) after res3, res4, res5"),
}


@dataclass(frozen=True)
class ContextSpec:
    """A resolved model option: which module, in which stages, placed how, with which arguments."""

    name: str
    stages: tuple
    placement: str
    kwargs: dict

    def make(self, dim: int, feat_size=None) -> nn.Module:
        return CONTEXT_MODULES[self.name].build(dim, feat_size, **self.kwargs)

    def describe(self) -> str:
        where = "in every block" if self.placement == "block" else "after the stage"
        return f"{self.name} {where}"


def context_spec(name: str | None, stages=None, placement: str | None = None, num_stages: int = 4,
                 kwargs: dict | None = None) -> ContextSpec | None:
    """Check a model's context options; None when ``name`` is None (no context module)."""
    if name is None:
        if stages is not None or placement is not None or kwargs:
            raise ValueError("context_stages / context_placement / context_args need a context module: "
                             f"pass context=one of {', '.join(CONTEXT_MODULES)}")
        return None
    key = str(name).lower().replace("-", "_")
    if key not in CONTEXT_MODULES:
        raise ValueError(f"unknown context module {name!r}; valid ones: {', '.join(CONTEXT_MODULES)}")
    info = CONTEXT_MODULES[key]
    placement = info.placement if placement is None else placement
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown context_placement {placement!r}; valid ones: {', '.join(PLACEMENTS)}")
    if stages is None:
        stages = info.stages
    elif isinstance(stages, int):
        stages = (stages,)
    out = []
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"context_stages must be stage indices (ints), got {s!r}")
        j = s + num_stages if s < 0 else s
        if not 0 <= j < num_stages:
            raise ValueError(f"context stage {s} is out of range: this model has {num_stages} stages "
                             f"(0..{num_stages - 1})")
        out.append(j)
    if not out:
        raise ValueError("context_stages is empty; give at least one stage index")
    return ContextSpec(key, tuple(sorted(set(out))), placement, {**info.kwargs, **(kwargs or {})})


__all__ = ["SqueezeExcite", "GatherExcite", "BAM", "NonLocalBlock", "CrissCrossAttention", "GlobalContextBlock",
           "TreeFilterBlock",
           "CONTEXT_MODULES", "ContextModuleInfo", "ContextSpec", "context_spec", "PLACEMENTS"]
