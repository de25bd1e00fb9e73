"""Shift-style mixers: spatial mixing by moving channels, not by weighting positions.

Three families share one primitive, the shift of a channel group by a fixed offset, whose
affinity is a 0/1 matrix: row i (an output position) holds a single 1 at the position it
reads from, or (zero fill) nothing where that position lies outside the map.

* :class:`PartialShift` — ShiftViT (Wang et al., 2022): a fraction of the channels, in four
  groups, moves one pixel left / right / up / down, the rest stays; no parameters, no
  arithmetic. The affinity is static and exact: ``forward == A·X``.
* :class:`SplitShiftMixer` — S2-MLPv2 (Yu et al., 2021): a linear layer expands the channels
  3x, two thirds are shifted (two different four-direction patterns), one third is not, and
  split attention mixes the three branches with per-image, per-channel softmax weights.
* :class:`CycleMixer` — CycleMLP (Chen et al., 2022): Cycle FC layers (a channel FC whose
  input channel c is read at a spatial offset that cycles with c, along W or along H) and a
  plain channel FC, mixed by the same kind of split attention ("MLP reweighting").

For the last two, the split-attention weights α(x) are a function of the whole input (a
pooled statistic), and they scale each branch channel by channel. They fold into the
affinity exactly: A(x)[g] = α(x)[g] · S_g, a fixed 0/1 shift pattern S_g scaled by a
data-dependent scalar. ``forward == project(A(x)·V)`` holds exactly (``exact_av``), and
``affinity_kind`` is 'dynamic' because A depends on the input — although only through
one global gate per channel: the *support* of A (which position reads which) is static.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, flatten_tokens

BORDERS = ("zero", "keep")


# -----------------------------------------------------------------------------------------
# the primitive: a shift and its matrix
# -----------------------------------------------------------------------------------------
def _shift_axis(x: torch.Tensor, d: int, dim: int, border: str) -> torch.Tensor:
    """out[.., i, ..] = x[.., i + d, ..] along ``dim`` where i + d is inside; elsewhere zero
    ('zero') or the position's own value x[.., i, ..] ('keep')."""
    n = x.shape[dim]
    m = min(abs(d), n)
    if m == 0:
        return x
    if d > 0:
        body = x.narrow(dim, m, n - m)
        edge = x.narrow(dim, n - m, m) if border == "keep" else x.new_zeros(
            x.shape[:dim] + (m,) + x.shape[dim + 1:])
        return torch.cat([body, edge], dim)
    body = x.narrow(dim, 0, n - m)
    edge = x.narrow(dim, 0, m) if border == "keep" else x.new_zeros(x.shape[:dim] + (m,) + x.shape[dim + 1:])
    return torch.cat([edge, body], dim)


def shift_map(x: torch.Tensor, dy: int, dx: int, border: str = "zero") -> torch.Tensor:
    """Shift a channels-last (B, H, W, C) map: ``out[:, y, x] = x[:, y + dy, x + dx]``.

    Positions that would read outside the map get zero (``border='zero'``: ShiftViT,
    CycleMLP) or keep their own value (``border='keep'``: the S2-MLP papers' in-place
    pseudo-code, which leaves the border row / column untouched; single-axis shifts only).
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if border == "keep" and dy and dx:
        raise ValueError("border='keep' is defined for shifts along one axis only")
    return _shift_axis(_shift_axis(x, dy, 1, border), dx, 2, border)


def shift_matrix(H: int, W: int, dy: int, dx: int, border: str = "zero", dtype=None, device=None) -> torch.Tensor:
    """The (N, N) 0/1 affinity of :func:`shift_map` on an H x W grid, N = H*W (row-major):
    A[i, j] = 1 where output position i reads input position j."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    ys = torch.arange(H, device=device).view(H, 1).expand(H, W)
    xs = torch.arange(W, device=device).view(1, W).expand(H, W)
    sy, sx = ys + dy, xs + dx
    inside = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    own = ys * W + xs
    cols = torch.where(inside, sy * W + sx, own if border == "keep" else torch.full_like(own, -1)).flatten()
    rows = own.flatten()
    keep = cols >= 0
    A = torch.zeros(H * W, H * W, dtype=dtype, device=device)
    A[rows[keep], cols[keep]] = 1
    return A


class ShiftPattern:
    """Contiguous channel groups, each shifted by its own (dy, dx); channels outside every
    group stay in place. ``groups``: (start, stop, dy, dx) tuples, disjoint."""

    def __init__(self, groups, border: str = "zero"):
        if border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
        self.groups = sorted(tuple(int(v) for v in g) for g in groups)
        self.border = border

    def segments(self, channels: int):
        """Every channel range with its offset, identity ranges included, in channel order."""
        out, at = [], 0
        for a, b, dy, dx in self.groups:
            if a > at:
                out.append((at, a, 0, 0))
            if b > a:
                out.append((a, b, dy, dx))
            at = max(at, b)
        if at < channels:
            out.append((at, channels, 0, 0))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[..., a:b] if not (dy or dx) else shift_map(x[..., a:b], dy, dx, self.border)
                 for a, b, dy, dx in self.segments(x.shape[-1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def matrices(self, channels: int, H: int, W: int, dtype=None, device=None) -> torch.Tensor:
        """(channels, N, N): the shift matrix of every channel."""
        segs = self.segments(channels)
        mats = {}
        index = torch.empty(channels, dtype=torch.long)
        for a, b, dy, dx in segs:
            if (dy, dx) not in mats:
                mats[(dy, dx)] = len(mats)
            index[a:b] = mats[(dy, dx)]
        stack = torch.stack([shift_matrix(H, W, dy, dx, self.border, dtype, device) for dy, dx in mats])
        return stack[index.to(stack.device)]


def _four_way(start: int, width: int, order, border: str) -> ShiftPattern:
    """``width`` channels from ``start`` in four equal parts (``width // 4`` rounding as the
    papers' ``c//4, c//2, 3c//4`` boundaries), shifted by the four offsets in ``order``."""
    cuts = [start + width * q // 4 for q in range(5)]
    return ShiftPattern([(cuts[q], cuts[q + 1], *order[q]) for q in range(4)], border)


# -----------------------------------------------------------------------------------------
# ShiftViT
# -----------------------------------------------------------------------------------------
class PartialShift(Mixer):
    """ShiftViT's shift operation on a (B, H, W, C) map: with g = C // n_div, channels
    [0, g) read their right neighbour (the map moves one pixel left), [g, 2g) their left
    neighbour (moves right), [2g, 3g) the one below (moves up), [3g, 4g) the one above
    (moves down); positions shifted in from outside are zero; channels from 4g on are left
    as they are. ``4/n_div`` of the channels move (1/3 for ShiftViT-T/S, 1/4 for -B).

    ``affinity`` is (B, G, N, N), static: a 0/1 matrix per group of channels with one 1 per
    row (the identity for unshifted channels), and a zero row where a shifted channel reads
    from outside the map. G = C / gcd(C, g) groups of equal size, so that each lies in one
    shift direction. No parameters; ``forward == A·X`` exactly.
    """

    affinity_kind = "static"

    def __init__(self, dim: int, n_div: int = 12):
        super().__init__()
        if n_div < 4:
            raise ValueError(f"n_div must be >= 4 (four shifted groups of C // n_div channels), got {n_div}")
        if dim // n_div < 1:
            raise ValueError(f"dim {dim} is too small for n_div {n_div}: each of the four shifted groups "
                             f"has dim // n_div = 0 channels")
        self.dim, self.n_div = dim, n_div
        g = dim // n_div
        self.pattern = ShiftPattern([(0, g, 0, 1), (g, 2 * g, 0, -1), (2 * g, 3 * g, 1, 0), (3 * g, 4 * g, -1, 0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pattern(x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        g = C // self.n_div
        size = math.gcd(C, g)
        mats = self.pattern.matrices(C, H, W, x.dtype, x.device)[::size]  # one per group of `size` channels
        return mats.unsqueeze(0).expand(B, -1, -1, -1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_div={self.n_div} ({4 * (self.dim // self.n_div)} channels shifted)"


# -----------------------------------------------------------------------------------------
# split attention (S2-MLPv2's fusion, CycleMLP's "MLP reweighting")
# -----------------------------------------------------------------------------------------
class SplitAttention(nn.Module):
    """Softmax weights over K branches, per image and per channel, from a pooled summary:
    ``α = softmax_k(fc2(GELU(fc1(pool(Σ_k X_k)))))`` with fc1: C -> hidden, fc2: hidden -> K·C.

    ``pool``: 'sum' over positions (the S2-MLPv2 paper's ``a = Σ_k 1ᵀX_k``) or 'mean'
    (CycleMLP's and ViP's code). ``layout``: how fc2's K·C outputs are read, 'kc' (K blocks
    of C: the paper's reshape to K x C) or 'ck' (C blocks of K, interleaved: CycleMLP's and
    ViP's ``reshape(B, C, K)``). Returns (B, K, C).
    """

    def __init__(self, dim: int, branches: int = 3, hidden: int | None = None, pool: str = "mean",
                 layout: str = "ck"):
        super().__init__()
        if pool not in ("sum", "mean"):
            raise ValueError(f"pool must be 'sum' or 'mean', got {pool!r}")
        if layout not in ("kc", "ck"):
            raise ValueError(f"layout must be 'kc' or 'ck', got {layout!r}")
        self.dim, self.branches, self.pool, self.layout = dim, branches, pool, layout
        hidden = hidden or max(1, dim // 4)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, branches * dim)

    def forward(self, total: torch.Tensor) -> torch.Tensor:
        """``total``: Σ_k X_k, a (B, H, W, C) map; returns α, (B, K, C)."""
        a = total.sum(dim=(1, 2)) if self.pool == "sum" else total.mean(dim=(1, 2))
        logits = self.fc2(self.act(self.fc1(a)))
        B = logits.shape[0]
        if self.layout == "ck":
            logits = logits.view(B, self.dim, self.branches).transpose(1, 2)
        else:
            logits = logits.view(B, self.branches, self.dim)
        return logits.softmax(dim=1)


def _weighted_sum(branches, alpha: torch.Tensor) -> torch.Tensor:
    """Σ_k α[:, k] ⊙ X_k for channels-last maps X_k (B, H, W, C) and α (B, K, C)."""
    out = None
    for k, xk in enumerate(branches):
        term = xk * alpha[:, k, None, None, :]
        out = term if out is None else out + term
    return out


# -----------------------------------------------------------------------------------------
# S2-MLPv2
# -----------------------------------------------------------------------------------------
class SplitShiftMixer(Mixer):
    """S2-MLPv2's spatial-shift block on a (B, H, W, C) map:

        V = X·W_1 + b_1 (C -> 3C), split into V_1, V_2, V_3;
        V_1 <- shift₁(V_1), V_2 <- shift₂(V_2) (V_3 unshifted);
        α = SplitAttention(V_1 + V_2 + V_3)  (B, 3, C), softmax over the branches;
        Y = (Σ_k α_k ⊙ V_k)·W_2 + b_2.

    shift₁ moves the four quarters of its channels along w, w, h, h (offsets -1, +1, -1,
    +1: the paper's ``spatial_shift1`` on its w x h x c layout, with w our W axis), shift₂
    along h, h, w, w. As in the paper's pseudo-code (in-place slice assignments), the row or
    column a shift vacates keeps its own value (``border='keep'``); PyTorch ports that run
    that code literally propagate the first row instead, because in-place copies between
    overlapping slices are not buffered in PyTorch. The split attention pools by summing over
    positions (the paper's ``a = Σ_k 1ᵀX_k``) and has a hidden width of C/4 (``sa_ratio``),
    which gives the paper's 25M parameters for S2-MLPv2-Small/7 (a C -> C hidden layer would
    give 32M).

    ``affinity`` is (B, 3C, N, N), one matrix per value channel: α_k(x)[c] times the 0/1
    shift matrix of channel c in branch k (the identity for the third branch). ``values``
    is V (B, N, 3C); ``project`` sums the three branches and applies W_2. Exact A·V.
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, sa_ratio: float = 0.25, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 3 * dim)
        self.split_attention = SplitAttention(dim, 3, max(1, int(dim * sa_ratio)), pool="sum", layout="kc")
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        left, right, up, down = (0, -1), (0, 1), (-1, 0), (1, 0)  # (dy, dx) read offsets
        self.shift1 = _four_way(0, dim, (left, right, up, down), "keep")
        self.shift2 = _four_way(0, dim, (up, down, left, right), "keep")

    def _branches(self, x: torch.Tensor):
        v = self.expand(x)
        C = self.dim
        return [self.shift1(v[..., :C]), self.shift2(v[..., C:2 * C]), v[..., 2 * C:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self._branches(x)
        alpha = self.split_attention(xs[0] + xs[1] + xs[2])
        return self.proj_drop(self.proj(_weighted_sum(xs, alpha)))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """α(x), (B, 3, C): the split-attention weight of each branch and channel."""
        xs = self._branches(x)
        return self.split_attention(xs[0] + xs[1] + xs[2])

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        kw = dict(dtype=x.dtype, device=x.device)
        S = torch.cat([self.shift1.matrices(C, H, W, **kw), self.shift2.matrices(C, H, W, **kw),
                       torch.eye(H * W, **kw).expand(C, -1, -1)])  # (3C, N, N)
        return self.gates(x).reshape(B, 3 * C, 1, 1) * S

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(self.expand(x))

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = self.dim
        y = y[..., :C] + y[..., C:2 * C] + y[..., 2 * C:]
        return self.proj_drop(self.proj(y)).reshape(x.shape[:-1] + (C,))


# -----------------------------------------------------------------------------------------
# CycleMLP
# -----------------------------------------------------------------------------------------
def cycle_offsets(channels: int, kernel_size: int) -> list[int]:
    """The offset at which Cycle FC reads input channel c: ``(c + k//2) % k - k//2``
    (CycleMLP's pseudo-kernel of size k along one axis): 0, 1, -1, 0, 1, -1, ... for k = 3."""
    k = kernel_size
    return [(c + k // 2) % k - k // 2 for c in range(channels)]


class CycleFC(nn.Module):
    """Cycle FC on a (B, H, W, C_in) map: ``out[y, x, o] = Σ_c W[o, c]·X[p_c(y, x), c] + b[o]``
    where p_c moves (y, x) by ``cycle_offsets(C_in, k)[c]`` along ``axis`` ('w': CycleMLP's
    ``sfc_h``, a 1 x k pseudo-kernel; 'h': its ``sfc_w``, k x 1), reading zero outside the map.

    The authors compute it with a deformable convolution (1x1 kernel, fixed offsets); here
    the input channels are shifted in k strided groups (channel c with c % k = r moves by the
    r-th offset) and one linear layer, with its columns in the same order, mixes them: the
    same result, exactly, without a deformable-convolution kernel.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, axis: str = "w",
                 bias: bool = True):
        super().__init__()
        if axis not in ("h", "w"):
            raise ValueError(f"axis must be 'h' or 'w', got {axis!r}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.axis = kernel_size, axis
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.trunc_normal_(self.weight, std=0.02)
        k = kernel_size
        residues = [r for r in range(k) if r < in_features]
        self.offsets = [(r + k // 2) % k - k // 2 for r in residues]  # offset of the channels c % k == r
        order = [c for r in residues for c in range(r, in_features, k)]  # input channels, grouped by residue
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """The input with channel c moved by its offset, channels regrouped by residue
        (in the order of ``self.order``)."""
        k, dim = self.kernel_size, 1 if self.axis == "h" else 2
        parts = [_shift_axis(x[..., r::k], d, dim, "zero") for r, d in enumerate(self.offsets)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.shifted(x), self.weight[:, self.order], self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, axis={self.axis!r}, "
                f"bias={self.bias is not None}")


class CycleMixer(Mixer):
    """CycleMLP's token mixer on a (B, H, W, C) map (the authors' ``CycleMLP`` layer):

        h = CycleFC_w(X), w = CycleFC_h(X), c = X·W_c (no bias);
        α = softmax over the branches of reweight(mean over positions of h + w + c);
        Y = (α_h ⊙ h + α_w ⊙ w + α_c ⊙ c)·W_p + b_p.

    The attribute names are the authors' (``sfc_h`` is the 1 x k Cycle FC, whose offsets run
    along W; ``sfc_w`` the k x 1 one, along H; ``mlp_c``; ``reweight``; ``proj``), and so is
    the interleaved (C, 3) layout of the reweighting output.

    As an aggregation: a Cycle FC is a sum over the k offsets d of S_d·(X_d·W_d), where X_d
    holds the input channels read at offset d and S_d is the 0/1 shift by d. So V has
    (2k+1)·C channels — X_d·W_d for each offset of each Cycle FC (the bias joins the offset-0
    block, which is not shifted), then X·W_c — and ``affinity`` is (B, (2k+1)·C, N, N):
    α(x)[branch, c] times the shift matrix of that block (the identity for offset 0 and the
    channel branch). ``project`` sums the 2k+1 blocks and applies W_p. Exact A·V.
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, kernel_size: int = 3, qkv_bias: bool = False, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.sfc_h = CycleFC(dim, dim, kernel_size, axis="w")
        self.sfc_w = CycleFC(dim, dim, kernel_size, axis="h")
        self.reweight = SplitAttention(dim, 3, max(1, dim // 4), pool="mean", layout="ck")
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _branches(self, x: torch.Tensor):
        return [self.sfc_h(x), self.sfc_w(x), self.mlp_c(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self._branches(x)
        alpha = self.reweight(xs[0] + xs[1] + xs[2])
        return self.proj_drop(self.proj(_weighted_sum(xs, alpha)))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """α(x), (B, 3, C): the weight of the W-cycle, H-cycle and channel branch per channel."""
        xs = self._branches(x)
        return self.reweight(xs[0] + xs[1] + xs[2])

    def _blocks(self):
        """(branch index, Cycle FC or None, residue r, (dy, dx)) for each of the 2k+1 value
        blocks: the offsets of ``sfc_h`` (branch 0), of ``sfc_w`` (1), then ``mlp_c`` (2)."""
        out = []
        for b, fc in enumerate((self.sfc_h, self.sfc_w)):
            for r, d in enumerate(fc.offsets):
                out.append((b, fc, r, (d, 0) if fc.axis == "h" else (0, d)))
        out.append((2, None, None, (0, 0)))
        return out

    def values(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        parts = []
        for _, fc, r, _ in self._blocks():
            if fc is None:
                parts.append(self.mlp_c(x))
            else:
                v = F.linear(x[..., r::k], fc.weight[:, r::k])
                parts.append(v + fc.bias if (fc.bias is not None and fc.offsets[r] == 0) else v)
        return flatten_tokens(torch.cat(parts, dim=-1))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        kw = dict(dtype=x.dtype, device=x.device)
        alpha = self.gates(x)  # (B, 3, C)
        blocks = []
        for b, _, _, (dy, dx) in self._blocks():
            S = shift_matrix(H, W, dy, dx, "zero", **kw)
            blocks.append(alpha[:, b, :, None, None] * S)  # (B, C, N, N)
        return torch.cat(blocks, dim=1)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = self.dim
        y = y.reshape(*y.shape[:-1], -1, C).sum(dim=-2)
        return self.proj_drop(self.proj(y)).reshape(x.shape[:-1] + (C,))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
