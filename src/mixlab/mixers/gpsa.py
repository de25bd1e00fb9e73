"""Gated positional self-attention (GPSA), ConViT's mixer (d'Ascoli et al., 2021, "ConViT:
Improving Vision Transformers with Soft Convolutional Inductive Biases").

Per head h, the affinity is a gated mix of a dynamic (content) and a static (positional)
attention matrix,

    A_h = [(1 - σ(λ_h)) · softmax(Q_h K_hᵀ / √d) + σ(λ_h) · softmax(P_h)] / row sums,

where ``P_h[i, j] = v_h · r_ij + b_h`` scores the relative position r_ij = (Δx, Δy, Δx² + Δy²)
of key j seen from query i (``pos_proj``, a linear map from 3 to ``heads``) and λ_h is the
learned gate (``gating_param``, initialised to 1). The values are ``V = X·W_v`` and the
output ``(A·V)·W_o``. The positional part is initialised as a convolution ("local init"):
the heads' attention centres tile a √heads x √heads patch around the query and the
"locality strength" α sharpens them: ``P_h[i, j] = -α·‖r_ij - c_h‖²`` up to a constant per
row, so ``softmax(P_h)`` is a Gaussian of the offset around the centre c_h; W_v starts as
the identity.

Details follow the authors' code (facebookresearch/convit) and timm's ``convit.py``: query
and key come from one projection ``qk`` (width 2C, no bias by default), the value from a
separate ``v``; both softmaxes are taken before mixing, and the mix is divided by its row
sums (mathematically one: both parts are row-stochastic and the gate convex; done literally
by :meth:`GatedPositionalAttention.affinity` and, like the authors, before attention
dropout). Relative positions are computed for the grid of the actual input (rectangular
grids too; the authors' and timm's code assume a square one) and cached per grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import to_2tuple
from .base import Mixer, flatten_tokens

__all__ = ["GatedPositionalAttention", "relative_positions"]


def relative_positions(H: int, W: int, device=None, dtype=None) -> torch.Tensor:
    """(N, N, 3) relative positions of the row-major H x W grid, N = H·W: entry [i, j] is
    (x_j - x_i, y_j - y_i, (x_j - x_i)² + (y_j - y_i)²), the key's offset from the query
    (the channel order of the authors' ``rel_indices``)."""
    ys = torch.arange(H, device=device, dtype=dtype or torch.float32).repeat_interleave(W)
    xs = torch.arange(W, device=device, dtype=dtype or torch.float32).repeat(H)
    dx = xs[None, :] - xs[:, None]
    dy = ys[None, :] - ys[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


class GatedPositionalAttention(Mixer):
    """ConViT's gated positional self-attention (see the module docstring) on a (B, H, W, C)
    map, or on a (B, N, C) sequence of grid tokens (no class token: ConViT adds it after
    its GPSA blocks) whose grid is ``grid_size`` or, failing that, square.

    ``affinity`` is (B, heads, N, N), rows summing to one; :meth:`affinity_parts` returns
    the content affinity, the positional affinity (a batch-expanded view) and the gate σ(λ)
    per head; ``forward`` computes ``project(A·V)`` with the mixed matrix A formed
    explicitly, as the authors do (two N x N matmuls per head: a factored
    ``(1 - σ)·SDPA(Q, K, V) + σ·softmax(P)·V`` would cost a third).
    """

    affinity_kind = "mixed"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality_strength: float = 1.0, grid_size=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.grid_size = to_2tuple(grid_size) if grid_size is not None else None
        self.attn_drop = attn_drop
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self._rel_cache: dict = {}
        nn.init.zeros_(self.pos_proj.bias)
        self.local_init()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, locality_strength={self.locality_strength}"

    # -- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def local_init(self) -> None:
        """The convolutional initialisation of the paper (Sec. 3): W_v = identity, and the
        first k² heads (k = ⌊√heads⌋) get positional scores ``α·(2·c·(Δx, Δy) - ‖Δ‖²)``,
        peaked at centres c on a k x k grid of offsets around the query (spacing 1, centred:
        half-integer offsets for even k). Heads beyond k² keep their initialisation."""
        w = self.v.weight
        self.v.weight.copy_(torch.eye(self.dim, device=w.device, dtype=w.dtype))
        k = int(math.isqrt(self.num_heads))
        center = (k - 1) / 2
        P = self.pos_proj.weight  # (heads, 3): weights of (Δx, Δy, Δx² + Δy²)
        for row in range(k):  # the centre's y offset
            for col in range(k):  # the centre's x offset
                h = row + k * col
                P[h, 0] = 2 * (col - center)
                P[h, 1] = 2 * (row - center)
                P[h, 2] = -1.0
        P.mul_(self.locality_strength)

    # -- the grid --------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim == 4:
            return x.shape[1], x.shape[2]
        N = flatten_tokens(x).shape[1]
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == N:
            return self.grid_size
        side = math.isqrt(N)
        if side * side != N:
            built = f"its grid {self.grid_size[0]}x{self.grid_size[1]} or " if self.grid_size else ""
            raise ValueError(f"a sequence of {N} tokens is neither {built}a square grid; gated positional attention "
                             f"needs the grid: pass a (B, H, W, C) map")
        return side, side

    def rel_indices(self, H: int, W: int) -> torch.Tensor:
        """The (N, N, 3) relative positions of an H x W grid on this module's device and
        dtype (cached per grid, device and dtype)."""
        w = self.pos_proj.weight
        key = (H, W, w.device, w.dtype)
        rel = self._rel_cache.get(key)
        if rel is None or w.device.type == "meta":
            rel = relative_positions(H, W, device=w.device, dtype=w.dtype)
            if w.device.type != "meta":
                self._rel_cache = {key: rel}  # one grid at a time, as the authors' buffer
        return rel

    # -- the two parts and the gate ----------------------------------------------------------
    def gate(self) -> torch.Tensor:
        """σ(λ) per head, (heads,): the share of the positional affinity."""
        return torch.sigmoid(self.gating_param)

    def positional_scores(self, H: int, W: int) -> torch.Tensor:
        """The (heads, N, N) positional logits P = pos_proj(r)."""
        return F.linear(self.rel_indices(H, W), self.pos_proj.weight, self.pos_proj.bias).permute(2, 0, 1)

    def _qk(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, C = t.shape
        qk = self.qk(t).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qk.unbind(0)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def content_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√d) per head, (B, heads, N, N)."""
        q, k = self._qk(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def positional_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(P) per head, (B, heads, N, N): a static view expanded over the batch."""
        H, W = self._grid(x)
        return self.positional_scores(H, W).softmax(dim=-1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)

    def affinity_parts(self, x: torch.Tensor):
        """(content affinity, positional affinity, gate σ(λ) of shape (heads,))."""
        return self.content_affinity(x), self.positional_affinity(x), self.gate()

    def _mix(self, content: torch.Tensor, positional: torch.Tensor) -> torch.Tensor:
        g = self.gate().view(1, -1, 1, 1)
        A = (1 - g) * content + g * positional
        return A / A.sum(dim=-1, keepdim=True)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self.content_affinity(x), self.positional_affinity(x))

    # -- the mixer -------------------------------------------------------------------------
    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(flatten_tokens(x))

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        B = x.shape[0]
        A = self._mix(self.content_affinity(x), self.positional_scores(H, W).softmax(dim=-1).unsqueeze(0))
        if self.training and self.attn_drop > 0:
            A = F.dropout(A, self.attn_drop)  # on the mixed, renormalised matrix, as the authors
        o = A @ self._heads(self.values(x))
        return self.project(o.transpose(1, 2).reshape(B, H * W, self.dim), x)
