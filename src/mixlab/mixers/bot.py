"""Multi-head self-attention with 2D relative position logits, the mixer of BoTNet (Srinivas,
Lin, Parmar, Shlens, Abbeel, Vaswani, CVPR 2021, "Bottleneck Transformers for Visual
Recognition", arXiv 2101.11605; the authors' reference TensorFlow gist
aravindsrinivas/56359b79f0ce4449bcb04ab4b56a57a2; timm's ``timm/layers/bottleneck_attn.py``).

Per head, with q, k, v = X·W_q, X·W_k, X·W_v (1x1 projections, no bias) and head width d,

    A = softmax(s·q·kᵀ + s'·q·rᵀ),   r[i, j] = r_h[y_j - y_i] + r_w[x_j - x_i],

where ``r_h`` ((2H - 1) x d) and ``r_w`` ((2W - 1) x d) are learned embeddings of the
vertical and horizontal offset of key j from query i, shared by the heads (Fig. 4 of the
paper: "content-content" q·kᵀ plus "content-position" q·rᵀ). s = d^-1/2; s' = s in the
authors' gist, which scales q before both products (``scale_pos_embed=True``, the default),
s' = 1 in timm's ``BottleneckAttn`` default (``scale_pos_embed=False``; with it this mixer
equals timm's exactly, tests/test_botnet.py checks it). The output is A·V with no output
projection: in BoTNet the bottleneck's last 1x1 convolution follows.

What is where: :meth:`BottleneckAttention.position_logits` forms q·rᵀ by gathering
``q·r_wᵀ`` and ``q·r_hᵀ`` at each query's offsets (the gist's "rel_to_abs" shifting, done by
indexing); :meth:`affinity` is the (B, heads, N, N) matrix; :meth:`forward` passes the
position logits as an additive mask to ``F.scaled_dot_product_attention``. The tables are
sized for ``grid_size``; a smaller grid uses their central rows (the offsets it has), a
larger one is refused. The 2x2 average pool of BoTNet's strided block is the block's, not
this mixer's (see :mod:`mixlab.models.botnet`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import to_2tuple
from .base import Mixer, flatten_tokens

__all__ = ["BottleneckAttention"]


class BottleneckAttention(Mixer):
    """BoTNet's MHSA on a (B, H, W, C) map (see the module docstring); returns (B, H, W, C).

    ``grid_size``: the (H, W) map the relative tables are built for (the largest accepted);
    ``scale_pos_embed``: scale the position logits by d^-1/2 like the content logits (the
    authors' gist) or not (timm's default).
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 4, grid_size=(14, 14), qkv_bias: bool = False,
                 scale_pos_embed: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; choose heads dividing {dim}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.grid_size = to_2tuple(grid_size)
        gh, gw = self.grid_size
        if gh < 1 or gw < 1:
            raise ValueError(f"grid_size must be positive, got {self.grid_size}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rel_h = nn.Parameter(torch.empty(2 * gh - 1, self.head_dim))
        self.rel_w = nn.Parameter(torch.empty(2 * gw - 1, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gist's init: relative embeddings N(0, d^-1/2); q, k, v projections N(0, 1/fan_in)."""
        nn.init.normal_(self.rel_h, std=self.scale)
        nn.init.normal_(self.rel_w, std=self.scale)
        nn.init.normal_(self.qkv.weight, std=self.dim ** -0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, grid_size={self.grid_size}, "
                f"scale_pos_embed={self.scale_pos_embed}")

    # -- pieces ----------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise ValueError(f"bottleneck attention takes a (B, H, W, C) map (the relative positions need the "
                             f"grid), got shape {tuple(x.shape)}")
        H, W = x.shape[1], x.shape[2]
        gh, gw = self.grid_size
        if H > gh or W > gw:
            raise ValueError(f"a {H}x{W} map is larger than the {gh}x{gw} grid this layer's relative position "
                             f"tables were built for; build the model with a larger img_size")
        return H, W

    def _qkv(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, _ = t.shape
        qkv = self.qkv(t).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, heads, N, d)

    def relative_tables(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (2H - 1, d) and (2W - 1, d) embeddings of offsets -(H-1)..H-1 and -(W-1)..W-1."""
        gh, gw = self.grid_size
        return self.rel_h[gh - H: gh + H - 1], self.rel_w[gw - W: gw + W - 1]

    def position_logits(self, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """q·rᵀ for queries q (B, heads, N, d): (B, heads, N, N), entry [i, j] =
        q_i·(r_h[y_j - y_i] + r_w[x_j - x_i]) (unscaled)."""
        B, h, N, d = q.shape
        rh, rw = self.relative_tables(H, W)
        qg = q.reshape(B, h, H, W, d)
        dev = q.device
        iw = torch.arange(W, device=dev)[None, :] - torch.arange(W, device=dev)[:, None] + W - 1  # [x_i, x_j]
        ih = torch.arange(H, device=dev)[None, :] - torch.arange(H, device=dev)[:, None] + H - 1  # [y_i, y_j]
        lw = torch.take_along_dim(qg @ rw.t(), iw.view(1, 1, 1, W, W), dim=-1)  # (B, h, H, W, W_j)
        lh = torch.take_along_dim(qg @ rh.t(), ih.view(1, 1, H, 1, H), dim=-1)  # (B, h, H, W, H_j)
        return (lh.unsqueeze(-1) + lw.unsqueeze(-2)).reshape(B, h, N, N)

    def _pos_bias(self, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
        p = self.position_logits(q, H, W)
        return p * self.scale if self.scale_pos_embed else p

    # -- the contract ----------------------------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """s·q·kᵀ + s'·q·rᵀ, (B, heads, N, N)."""
        H, W = self._grid(x)
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1)) * self.scale + self._pos_bias(q, H, W)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[2].transpose(1, 2).flatten(2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.reshape(x.shape[:-1] + y.shape[-1:])  # no output projection (the block's 1x1 conv follows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self._grid(x)
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._pos_bias(q, H, W), scale=self.scale)
        return self.project(o.transpose(1, 2).flatten(2), x)
