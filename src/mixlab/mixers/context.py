"""Global context blocks for CNNs that are context aggregation ``Y = X + (A·V)·W``.

Three blocks that let a convolutional network see beyond its kernels, each a
:class:`~mixlab.mixers.base.Mixer` (channels-last (B, H, W, C) in and out; the 1x1
convolutions run on the NCHW view ``x.permute(0, 3, 1, 2)``):

* :class:`NonLocalBlock` (Wang et al., "Non-local Neural Networks", CVPR 2018; the
  embedded Gaussian form): a dense, dynamic A = softmax(θ(X)ᵀφ(X)) over all N positions;
* :class:`CrissCrossAttention` (Huang et al., "CCNet: Criss-Cross Attention for Semantic
  Segmentation", ICCV 2019): a sparse, dynamic A, non-zero only on the H + W - 1 positions
  in the row and column of each query;
* :class:`GlobalContextBlock` (Cao et al., "GCNet: Non-local Networks Meet
  Squeeze-Excitation Networks and Beyond", ICCV-W 2019): a rank-1 A, one softmax map over
  positions shared by every query, so every row of A is the same.

The residual is part of the block, so ``project(y, x)`` returns ``x + W(y)``. Every block is
the identity at initialisation, as in the papers' code (zero-init BatchNorm γ of W_z, γ = 0,
zero-init last transform layer). The channel gates (SE, Gather-Excite, BAM) are in
:mod:`mixlab.layers.context`.

:data:`CONTEXT_MODULES` names the gates, these blocks and the Learnable Tree Filter
(:class:`~mixlab.mixers.tree_filter.TreeFilterBlock`) for ``create_model("resnet50", context=NAME, ...)``
(see :class:`mixlab.models.resnet.ResNet`), with the placement each paper uses by default;
:func:`context_spec` checks a model's context options against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.context import BAM, GatherExcite, SqueezeExcite
from .base import Mixer, flatten_tokens
from .tree_filter import TreeFilterBlock


def _nchw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"a context block takes a channels-last (B, H, W, C) map, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


class NonLocalBlock(Mixer):
    """The embedded-Gaussian non-local block (Wang et al., CVPR 2018, Sec. 3.2-3.3).

    θ, φ, g: 1x1 convolutions C -> C/2; A = softmax_j(θ(x_i)ᵀ φ(x_j)) over all N = H·W
    positions (no 1/√d scaling, as in the paper; ``scale=True`` adds it);
    ``z = x + BN(W_z(A·g(x)))`` with W_z a 1x1 convolution C/2 -> C and the BatchNorm's γ
    zero-initialised, so that the block starts as the identity. One affinity group (G = 1).
    φ has no bias: θ_iᵀb_φ is the same for every key j, so softmax ignores it (zero gradient);
    nor has W_z, whose bias the BatchNorm after it removes.

    ``subsample``: the paper's subsampling trick (Sec. 3.3), a 2x2 max pool (stride 2) after φ
    and g, so each query reads M = ⌈H/2⌉·⌈W/2⌉ pooled positions (odd sizes rounded up: every
    position is in some pooling window) and A is (B, 1, N, M), a quarter of the products.
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, reduction: int = 2, scale: bool = False, subsample: bool = False):
        super().__init__()
        inner = max(dim // reduction, 1)
        self.subsample = subsample
        self.theta = nn.Conv2d(dim, inner, 1)
        self.phi = nn.Conv2d(dim, inner, 1, bias=False)  # a bias here shifts each softmax row: dead, left out
        self.g = nn.Conv2d(dim, inner, 1)
        self.proj = nn.Sequential(nn.Conv2d(inner, dim, 1, bias=False), nn.BatchNorm2d(dim))  # W_z + BN (fusable)
        nn.init.zeros_(self.proj[1].weight)
        self.scale = inner ** -0.5 if scale else 1.0

    def extra_repr(self) -> str:
        return "subsample=True" if self.subsample else ""

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, 2, 2, ceil_mode=True) if self.subsample else t

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        xc = _nchw(x)
        q = self.theta(xc).flatten(2).transpose(1, 2)  # (B, N, C/2)
        k = self._pool(self.phi(xc)).flatten(2)  # (B, C/2, M)
        return ((q @ k) * self.scale).softmax(-1).unsqueeze(1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.g(_nchw(x))).flatten(2).transpose(1, 2)  # (B, M, C/2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        y = y.transpose(1, 2).reshape(B, -1, H, W)
        return x + self.proj(y).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = _nchw(x)
        q = self.theta(xc).flatten(2).transpose(1, 2)
        k = self._pool(self.phi(xc)).flatten(2)
        v = self._pool(self.g(xc)).flatten(2).transpose(1, 2)
        y = ((q @ k) * self.scale).softmax(-1) @ v  # (B, N, C/2)
        return self.project(y, x)


class CrissCrossAttention(Mixer):
    """Criss-cross attention (Huang et al., CCNet, ICCV 2019, Sec. 3.2), optionally recurrent.

    Q, K: 1x1 convolutions C -> C/8, V: 1x1 convolution C -> C (all with bias, as in the
    authors' code, except K: q·b_k is the same for all keys of a query, so softmax ignores a
    key bias, which only ever gets a zero gradient). Query (i, j) attends to the H + W - 1
    positions of its column j and its row i (itself once: the column branch masks it out),
    one softmax over them all;
    ``y = x + γ·Σ A·V`` with the scalar γ initialised to 0. ``recurrence`` R > 1 applies
    the same module (shared weights) R times, the paper's RCCA (R = 2 lets every position
    reach every other one). One affinity group (G = 1).

    The contract (``affinity`` / ``values`` / ``project``) describes one pass: A is the
    sparse (B, 1, N, N) matrix of that pass. With R > 1, ``forward`` composes R such passes,
    each with its own input, so it is not a single A·V (``exact_av`` is False), and
    ``explicit_forward`` applies the literal formula R times.
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, reduction: int = 8, recurrence: int = 1):
        super().__init__()
        if recurrence < 1:
            raise ValueError(f"recurrence must be >= 1, got {recurrence}")
        inner = max(dim // reduction, 1)
        self.query = nn.Conv2d(dim, inner, 1)
        self.key = nn.Conv2d(dim, inner, 1, bias=False)  # see the docstring
        self.value = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.recurrence = recurrence
        self.exact_av = recurrence == 1

    def _attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The criss-cross weights of one pass: column part (B, H, W, H) and row part (B, H, W, W)."""
        xc = _nchw(x)
        q, k = self.query(xc), self.key(xc)
        H = q.shape[2]
        e_col = torch.einsum("bchw,bcgw->bhwg", q, k)  # key (g, w) in the query's column
        e_row = torch.einsum("bchw,bchv->bhwv", q, k)  # key (h, v) in the query's row
        self_pos = torch.eye(H, dtype=torch.bool, device=q.device).view(1, H, 1, H)
        e_col = e_col.masked_fill(self_pos, float("-inf"))  # the query itself is counted in its row
        a = torch.cat([e_col, e_row], dim=-1).softmax(-1)
        return a[..., :H], a[..., H:]

    def _one_pass(self, x: torch.Tensor) -> torch.Tensor:
        a_col, a_row = self._attention(x)
        v = self.value(_nchw(x))
        y = torch.einsum("bhwg,bcgw->bhwc", a_col, v) + torch.einsum("bhwv,bchv->bhwc", a_row, v)
        return x + self.gamma * y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self._one_pass(x)
        return x

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The dense (B, 1, N, N) matrix of one pass: row (h, w) is non-zero only at (h', w) and (h, w')."""
        a_col, a_row = self._attention(x)
        B, H, W, _ = a_col.shape
        eye_h = torch.eye(H, dtype=a_col.dtype, device=a_col.device)
        eye_w = torch.eye(W, dtype=a_col.dtype, device=a_col.device)
        A = a_col.unsqueeze(-1) * eye_w.view(1, 1, W, 1, W) + a_row.unsqueeze(-2) * eye_h.view(1, H, 1, H, 1)
        return A.reshape(B, 1, H * W, H * W)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(_nchw(x)).flatten(2).transpose(1, 2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * y.reshape(x.shape)

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = super().explicit_forward(x)
        return x


class GlobalContextBlock(Mixer):
    """The global context (GC) block (Cao et al., GCNet, ICCV-W 2019, Sec. 4.2), 'att' pooling
    and 'add' fusion.

    Context modelling: a = softmax over positions of W_k x (a 1x1 convolution C -> 1), the
    same for every query, so A (B, 1, N, N) has N identical rows (rank 1) and V = X;
    transform: 1x1 conv C -> C·ratio -> LayerNorm -> ReLU -> 1x1 conv -> C (ratio 1/16 in
    the paper's default; implemented as linear layers on the pooled (B, C) context, which
    is the same map); fusion: ``y = x + transform(Σ_j a_j x_j)`` broadcast over positions.
    The last layer is zero-initialised (the authors' ``last_zero_init``): the identity at init.
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, ratio: float = 1 / 16):
        super().__init__()
        inner = max(int(round(dim * ratio)), 1)
        self.attn = nn.Conv2d(dim, 1, 1, bias=False)  # W_k; a bias would cancel in the softmax
        self.transform = nn.Sequential(nn.Linear(dim, inner), nn.LayerNorm(inner), nn.ReLU(inplace=True),
                                       nn.Linear(inner, dim))
        nn.init.kaiming_normal_(self.attn.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax over the N positions, (B, N)."""
        return self.attn(_nchw(x)).flatten(1).softmax(-1)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention_map(x)
        return a[:, None, None, :].expand(-1, 1, a.shape[1], -1)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.transform(y).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention_map(x)
        context = (a.unsqueeze(1) @ flatten_tokens(x)).squeeze(1)  # (B, C)
        return x + self.transform(context)[:, None, None, :]


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
