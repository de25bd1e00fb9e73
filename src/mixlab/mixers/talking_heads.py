"""CaiT's two attention mixers (Touvron et al., 2021, "Going deeper with Image Transformers";
reference code: facebookresearch/deit ``cait_models.py`` and timm's ``timm/models/cait.py``).

* :class:`TalkingHeadsAttention` — multi-head self-attention whose heads are mixed linearly
  before and after the softmax (Shazeer et al., 2020, "Talking-Heads Attention"). With
  ``L_h = q_h k_hᵀ / √d`` the per-head logits,

      A_h = Σ_h' W_post[h, h'] · softmax(Σ_h'' W_pre[h', h''] · L_h'' + b_pre[h']) + b_post[h],

  and head h of the output is ``A_h · V_h``: the aggregation is exactly A·V per head, so the
  mixer meets the contract of :mod:`mixlab.mixers.base` (``exact_av``). The rows of A do not
  sum to one (the post-softmax mixing is an arbitrary linear map of probability rows).
* :class:`ClassAttention` — CaiT's class attention: only the class token (position 0 of the
  sequence) queries; keys and values are computed over the whole sequence [cls, patches].
  Its affinity is *rectangular*: (B, heads, 1, N), the class token's softmax row over the N
  tokens it reads (see the class docstring).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, flatten_tokens

__all__ = ["ClassAttention", "TalkingHeadsAttention", "aggregate_rows"]


def _head_dim(dim: int, num_heads: int) -> int:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; choose a number of heads "
                         f"that divides {dim}")
    return dim // num_heads


class TalkingHeadsAttention(Mixer):
    """Global self-attention with talking heads (CaiT's self-attention stage).

    Takes a (B, H, W, C) map or a (B, N, C) sequence and returns the same shape.
    ``qkv`` (with bias when ``qkv_bias``) gives, per token, [q, k, v] for every head;
    ``pre_mix`` and ``post_mix`` are (heads x heads) linear maps with bias over the head
    axis, applied to the logits before the softmax and to the probabilities after it;
    ``proj`` is the output projection. Attention dropout acts on the mixed A.

    ``affinity`` is (B, heads, N, N), the mixed matrix A itself (rows need not sum to one);
    ``forward == project(A·V)`` exactly. The head mixing rules out a fused attention kernel,
    so the forward computes the N x N logits too, and mixes the heads with one batched matrix
    product each (``python benchmarks/vs_timm.py --models cait_xxs24_224``).
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _head_dim(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.pre_mix = nn.Linear(num_heads, num_heads)
        self.post_mix = nn.Linear(num_heads, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"

    def _qkv(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, _ = t.shape
        qkv = self.qkv(t).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, heads, N, d)

    @staticmethod
    def _mix_heads(mix: nn.Linear, a: torch.Tensor) -> torch.Tensor:
        """``mix`` over the head axis of (B, heads, N, M): ``out[:, g] = Σ_h W[g, h] a[:, h] + b[g]``,
        one batched matrix product over the contiguous (heads, N·M) layout (no head-last
        transposes, and the softmax that follows runs over a contiguous axis)."""
        B, h, N, M = a.shape
        return torch.baddbmm(mix.bias.view(1, h, 1), mix.weight.expand(B, h, h), a.reshape(B, h, N * M)).view(B, h, N, M)

    def _mixed_affinity(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
        return self._mix_heads(self.post_mix, self._mix_heads(self.pre_mix, logits).softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        o = self.attn_drop(self._mixed_affinity(q, k)) @ v
        return self.project(o.transpose(1, 2).flatten(2), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(x)
        return self._mixed_affinity(q, k)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)[2].transpose(1, 2).flatten(2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_drop(self.proj(y))
        return y.reshape(x.shape[:-1] + y.shape[-1:])


def aggregate_rows(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A grouped rectangular affinity A (B, G, M, N) applied to values V (B, N, C): (B, M, C).

    The M query rows read the N value rows; channel c of V is aggregated with
    ``A[:, c // (C // G)]`` (the grouping of :func:`~mixlab.mixers.base.aggregate`, which is
    this function for M = N)."""
    B, G, M, N = A.shape
    C = V.shape[-1]
    if C % G or V.shape[1] != N:
        raise ValueError(f"an affinity of shape {tuple(A.shape)} cannot aggregate values of shape {tuple(V.shape)}: "
                         f"they need {N} rows and a multiple of {G} channels")
    Vg = V.reshape(B, N, G, C // G).transpose(1, 2)
    return (A @ Vg).transpose(1, 2).reshape(B, M, C)


class ClassAttention(Mixer):
    """CaiT's class attention on a (B, N, C) sequence whose first token is the class token.

    ``q`` reads the class token only, ``k`` and ``v`` every token (class token included),
    each a linear layer with bias when ``qkv_bias``; ``proj`` is the output projection.
    Returns the class token's update, shape (B, 1, C): the patch tokens are not changed by
    a class-attention block (CaiT freezes them after the self-attention stage).

    ``affinity`` returns only the row that exists: (B, heads, 1, N), the class token's
    softmax over the N tokens (rows sum to one). There is no N x N matrix to report, since
    no other token queries. ``values`` is (B, N, C) and ``project`` maps the aggregated
    (B, 1, C) to the (B, 1, C) update; ``explicit_forward`` computes ``project(A·V)`` with
    the rectangular A (:func:`aggregate_rows`, as the square-only
    :func:`~mixlab.mixers.base.aggregate` cannot) and equals ``forward`` exactly.
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _head_dim(dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] < 1:
            raise ValueError("class attention takes a (B, N, C) token sequence with the class token first, "
                             f"got shape {tuple(x.shape)}")
        return x

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, n, C) -> (B, heads, n, d)
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _qk(self, x: torch.Tensor):
        x = self._check(x)
        return self._split(self.q(x[:, :1])), self._split(self.k(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self._qk(x)
        v = self._split(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.project(o.transpose(1, 2).flatten(2), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self._qk(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self._check(x))

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(y))  # (B, 1, C): the class token's update

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(aggregate_rows(self.affinity(x), self.values(x)), x)
