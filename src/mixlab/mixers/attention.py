"""Global multi-head self-attention: a dynamic, dense affinity A = softmax(Q K^T / sqrt(d))."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, flatten_tokens


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     attn_drop: float, training: bool) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v with a learned additive bias (relative positions, window masks).

    PyTorch's fused CPU kernel gives no gradient for an attention mask, so when the bias needs
    one SDPA falls back to its math path, whose safe softmax adds passes for fully masked rows
    (which these biases never have) and which scales both q and k; the plain formula skips those
    (Swin-T training step: see docs/performance.md). Otherwise SDPA with the bias as its mask.
    """
    if q.device.type == "cpu" and bias.requires_grad and torch.is_grad_enabled():
        attn = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        if training and attn_drop > 0:
            attn = F.dropout(attn, attn_drop)
        return attn @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn_drop if training else 0.0)


class QKVAttention(Mixer):
    """What softmax attention mixers share once they have their queries, keys and values:
    ``_qkv(x)`` returns q (B, heads, N, d) and k, v (B, heads, M, d); ``proj`` / ``proj_drop``
    are the output transform W; ``scale`` multiplies q·kᵀ (1/sqrt(d): the value
    ``F.scaled_dot_product_attention`` uses by default, which ``forward`` relies on)."""

    affinity_kind = "dynamic"

    def _qkv(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.project(o.transpose(1, 2).flatten(2), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(Q Kᵀ · scale): (B, heads, N, M)."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, M, C) values (heads side by side)."""
        return self._qkv(x)[2].transpose(1, 2).flatten(2)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_drop(self.proj(y))
        return y.reshape(x.shape[:-1] + y.shape[-1:])


class Attention(QKVAttention):
    """Multi-head self-attention over all N positions (ViT / DeiT), through
    ``F.scaled_dot_product_attention``.

    Takes a (B, H, W, C) map or a (B, N, C) sequence (with class tokens, for ViT) and
    returns the same shape. ``affinity`` is (B, heads, N, N), rows summing to one.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        t = flatten_tokens(x)
        B, N, _ = t.shape
        qkv = self.qkv(t).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
