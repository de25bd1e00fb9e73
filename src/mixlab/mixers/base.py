"""The mixer contract: every spatial mixer is context aggregation ``Y = (A·V)·W``.

A spatial mixer moves information between positions. Each mixer in mixlab has

* ``forward(x)``: the fast path on a channels-last (B, H, W, C) map (global attention
  also takes a (B, N, C) token sequence, which may carry class tokens);
* ``affinity(x)``: the aggregation matrix A, shape (B, G, N, M), for this input: N output
  positions, M value positions (M = N for most mixers; fewer where keys and values come
  from a reduced map, as in PVT's spatial-reduction attention). The G groups split the
  channels of V evenly: channel c of V is aggregated with ``A[:, c // (C // G)]``.
  Attention has G = heads, a depthwise convolution G = C (one Toeplitz matrix per
  channel), pooling and token MLPs G = 1 or C;
* ``values(x)``: V = X·W_v, shape (B, M, C_v), the features that A aggregates;
* ``project(y, x)``: the output transform W applied to the aggregated (B, N, C_v)
  features, returned in the layout of ``x``;
* ``explicit_forward(x)``: ``project(aggregate(affinity(x), values(x)), x)``, the
  formula computed literally, which equals ``forward(x)`` for every mixer whose
  aggregation is exactly A·V (tests check this for each one);
* ``affinity_kind``: 'dynamic' (A depends on X), 'static' (A is a parameter) or 'mixed'.

Static affinities are returned expanded over the batch as a view (no copy); an N x N
matrix per group is large, so ``affinity`` is an analysis tool for modest sizes, never
part of the fast path.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) or (B, N, C) -> (B, N, C)."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim == 3:
        return x
    raise ValueError(f"a mixer takes a (B, H, W, C) map or a (B, N, C) sequence, got shape {tuple(x.shape)}")


def token_grid(x: torch.Tensor, grid_size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) grid of a mixer's input: a map's own, or ``grid_size`` for a (B, N, C) sequence,
    which must then hold exactly that many tokens (for mixers with per-position parameters)."""
    if x.ndim == 4:
        return x.shape[1], x.shape[2]
    gh, gw = grid_size
    if flatten_tokens(x).shape[1] != gh * gw:
        raise ValueError(f"this mixer was built for a {gh}x{gw} grid ({gh * gw} tokens), got "
                         f"{x.shape[1]} tokens; pass a (B, H, W, C) map for another grid")
    return gh, gw


def aggregate(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Apply a grouped affinity A (B, G, N, M) to values V (B, M, C): returns (B, N, C)."""
    B, G, N, M = A.shape
    C = V.shape[-1]
    if C % G:
        raise ValueError(f"{C} value channels cannot be split into {G} affinity groups")
    if V.shape[1] != M:
        raise ValueError(f"the affinity reads {M} value positions but {V.shape[1]} values were given")
    Vg = V.reshape(B, M, G, C // G).transpose(1, 2)
    return (A @ Vg).transpose(1, 2).reshape(B, N, C)


def expand_groups(A: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each of A's G groups so that it has ``groups`` (a multiple of G) groups."""
    G = A.shape[1]
    if G == groups:
        return A
    if groups % G:
        raise ValueError(f"cannot expand {G} affinity groups to {groups}")
    return A.repeat_interleave(groups // G, dim=1)


class Mixer(nn.Module):
    """Base class of spatial mixers (see the module docstring for the contract)."""

    affinity_kind: str = "static"
    #: True when forward(x) == project(affinity(x) @ values(x)) exactly.
    exact_av: bool = True

    def affinity(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """V = X·W_v as (B, N, C_v); the identity for mixers without a value projection."""
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W applied to the aggregated (B, N, C_v) features, in the layout of ``x``."""
        return y.reshape(x.shape[:-1] + y.shape[-1:])

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``project(A·V)`` computed literally from ``affinity`` and ``values``."""
        return self.project(aggregate(self.affinity(x), self.values(x)), x)


def conv_toeplitz(weight: torch.Tensor, H: int, W: int, dilation=(1, 1), pad=None) -> torch.Tensor:
    """The (G, N, N) matrix of a stride-1, zero-padded depthwise convolution on an H x W grid.

    ``weight`` is (G, 1, kh, kw); ``pad`` = (top, left) padding (default: PyTorch's
    'same' rule, extra padding bottom/right for even kernels). Row i of channel g holds the
    kernel taps that output position i reads from the input: A[g, i, j] = w[g, ky, kx]
    where j = (y - top + ky·dy, x - left + kx·dx) lies inside the grid.
    """
    G, _, kh, kw = weight.shape
    dy, dx = dilation
    if pad is None:
        pad = (dy * (kh - 1) // 2, dx * (kw - 1) // 2)
    dev = weight.device
    ys = torch.arange(H, device=dev).view(H, 1, 1, 1)
    xs = torch.arange(W, device=dev).view(1, W, 1, 1)
    ky = torch.arange(kh, device=dev).view(1, 1, kh, 1)
    kx = torch.arange(kw, device=dev).view(1, 1, 1, kw)
    sy = (ys - pad[0] + ky * dy).expand(H, W, kh, kw)
    sx = (xs - pad[1] + kx * dx).expand(H, W, kh, kw)
    valid = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    rows = (ys * W + xs).expand(H, W, kh, kw)[valid]
    cols = (sy * W + sx)[valid]
    taps = (ky * kw + kx).expand(H, W, kh, kw)[valid]
    vals = weight.reshape(G, kh * kw)[:, taps]  # (G, M)
    A = weight.new_zeros(H * W, H * W, G)
    A.index_put_((rows, cols), vals.t(), accumulate=True)
    return A.permute(2, 0, 1)
