"""Attention with convolutional projections, CvT's mixer (Wu et al., ICCV 2021, "CvT:
Introducing Convolutions to Vision Transformers", Sec. 3.2).

Before the linear query, key and value projections, the grid tokens go through a
depthwise k x k convolution (no bias) and a BatchNorm, one per projection ("dw_bn"):

    Q = W_q · BN_q(dwconv_q(X)),   K = W_k · BN_k(dwconv_k↓s(X)),   V = W_v · BN_v(dwconv_v↓s(X)),

with stride 1 for the query and stride s (2 in every CvT model: "squeezed" attention) for the
key and the value, padding (k - 1) / 2. On an H x W grid the N = H·W queries therefore
attend to the M = ⌈H/s⌉·⌈W/s⌉ positions of a reduced map. Class tokens (CvT's last stage has
one) bypass the convolutions: they are put in front of the convolved grid tokens before the
linear projections, so they are both queries and keys/values. There is no position
embedding: the convolutions carry the positional information.

The affinity is ``A = softmax(Q Kᵀ · scale)`` per head, shape (B, heads, P + N, P + M) for
P prefix tokens, over the reduced keys; ``values(x)`` returns the P + M values
(B, P + M, C); the output is ``(A·V)·W_o``. ``scale`` is ``dim ** -0.5`` by default, the
*whole* width, not the head width: so do the authors' ``lib/models/cls_cvt.py``
(``self.scale = dim_out ** -0.5``) and Hugging Face's ``modeling_cvt.py``; the paper does
not say. Pass ``scale`` to change it (``head_dim ** -0.5`` is the usual choice).

The BatchNorms make the projections, hence the affinity, depend on the mode: in training
they normalise with the batch's statistics (and update the running ones at every call, so
``affinity`` and ``values`` each update them once more), in eval mode with the running
statistics. ``explicit_forward == forward`` holds in both modes for the same batch; analyse
affinities in eval mode.

Sources: the paper; microsoft/CvT ``lib/models/cls_cvt.py`` (``Attention``: ``conv_proj_q/k/v``
= depthwise conv + BN, ``proj_q/k/v`` linear, the class token split off before the
convolutions and concatenated after); Hugging Face ``models/cvt/modeling_cvt.py``
(``CvtSelfAttention``). Parameter names follow the authors'. The authors' other projection
methods ('avg': average pooling for keys/values, 'linear': none) and query strides other
than 1 (which would shrink the output) are not implemented: no CvT model uses them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import to_2tuple
from .base import Mixer, aggregate

__all__ = ["ConvAttention", "ConvProjection"]


class ConvProjection(nn.Sequential):
    """Depthwise k x k convolution (no bias, padding (k - 1) / 2) and BatchNorm on an NCHW map:
    the authors' ``conv_proj_*`` ('dw_bn'), keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=dim,
                              bias=False)
        self.bn = nn.BatchNorm2d(dim)


class ConvAttention(Mixer):
    """Multi-head attention with convolutional projections (see the module docstring).

    Takes a (B, H, W, C) map, or a (B, P + H·W, C) sequence whose first P tokens are prefix
    (class) tokens. For a sequence the grid comes from the ``grid`` argument, else from
    ``grid_size`` (when it fits the sequence), else it must be square; P is then the sequence
    length minus H·W for a given grid, ``num_prefix_tokens`` otherwise.
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True, kernel_size: int = 3,
                 kv_stride: int = 2, attn_drop: float = 0.0, proj_drop: float = 0.0, num_prefix_tokens: int = 0,
                 grid_size=None, scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (padding (k - 1) / 2 keeps the grid), "
                             f"got {kernel_size}")
        if kv_stride < 1:
            raise ValueError(f"kv_stride must be >= 1, got {kv_stride}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = dim ** -0.5 if scale is None else scale
        self.kernel_size, self.kv_stride = kernel_size, kv_stride
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = to_2tuple(grid_size) if grid_size is not None else None
        self.attn_drop = attn_drop
        self.conv_proj_q = ConvProjection(dim, kernel_size, 1)
        self.conv_proj_k = ConvProjection(dim, kernel_size, kv_stride)
        self.conv_proj_v = ConvProjection(dim, kernel_size, kv_stride)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"kv_stride={self.kv_stride}, scale={self.scale:.4g}")

    # -- the grid and the prefix tokens ------------------------------------------------------
    def _split(self, x: torch.Tensor, grid=None):
        """(prefix tokens (B, P, C), grid map (B, C, H, W)) of the input."""
        if x.ndim == 4:
            if grid is not None and tuple(grid) != tuple(x.shape[1:3]):
                raise ValueError(f"grid {tuple(grid)} given for a {x.shape[1]}x{x.shape[2]} map")
            return x[:, :0].reshape(x.shape[0], 0, x.shape[-1]), x.permute(0, 3, 1, 2)
        if x.ndim != 3:
            raise ValueError(f"convolutional attention takes a (B, H, W, C) map or a (B, P + H*W, C) sequence, "
                             f"got shape {tuple(x.shape)}")
        B, T, C = x.shape
        if grid is not None:
            H, W = grid
            P = T - H * W
            if P < 0:
                raise ValueError(f"a sequence of {T} tokens cannot hold a {H}x{W} grid")
        else:
            P = self.num_prefix_tokens
            N = T - P
            if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == N:
                H, W = self.grid_size
            else:
                H = W = math.isqrt(max(N, 0))
                if N <= 0 or H * W != N:
                    raise ValueError(f"a sequence of {T} tokens ({P} prefix) is not a square grid; pass "
                                     f"grid=(H, W) or a (B, H, W, C) map")
        return x[:, :P], x[:, P:].transpose(1, 2).reshape(B, C, H, W)

    def _tokens(self, prefix: torch.Tensor, conv: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
        """prefix tokens followed by the flattened, convolved grid: (B, P + H'W', C)."""
        t = conv(fmap).flatten(2).transpose(1, 2)
        return torch.cat([prefix, t], dim=1) if prefix.shape[1] else t

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: torch.Tensor, grid=None):
        prefix, fmap = self._split(x, grid)
        q = self.proj_q(self._tokens(prefix, self.conv_proj_q, fmap))
        k = self.proj_k(self._tokens(prefix, self.conv_proj_k, fmap))
        v = self.proj_v(self._tokens(prefix, self.conv_proj_v, fmap))
        return q, k, v

    def reduced_grid(self, H: int, W: int) -> tuple[int, int]:
        """The (H', W') grid of the keys and values: ⌈H / s⌉ x ⌈W / s⌉ for kernel k, stride s."""
        p, k, s = (self.kernel_size - 1) // 2, self.kernel_size, self.kv_stride
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    # -- the mixer -------------------------------------------------------------------------
    def affinity(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        """softmax(Q Kᵀ · scale), (B, heads, P + N, P + M): rows over the reduced keys."""
        q, k, _ = self._qkv(x, grid)
        return (self._heads(q) @ self._heads(k).transpose(-2, -1) * self.scale).softmax(dim=-1)

    def values(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        """The (B, P + M, C) values: prefix tokens, then the reduced grid."""
        return self._qkv(x, grid)[2]

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def explicit_forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        return self.project(aggregate(self.affinity(x, grid), self.values(x, grid)), x)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        q, k, v = self._qkv(x, grid)
        B, T, _ = q.shape
        o = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v),
                                           dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return self.project(o.transpose(1, 2).reshape(B, T, self.dim), x)
