"""Container: a learned mix of a dynamic and a static affinity, A = α·A_attn + β·A_static."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mixer, aggregate, conv_toeplitz, expand_groups, flatten_tokens


class ContainerMixer(Mixer):
    """Container's context aggregation (Gao et al., 2021) on a (B, H, W, C) map:

        Y = ((α·A_sa(X) + β·A_static) · V) · W,     V = X·W_v

    * ``dynamic``: include multi-head self-attention A_sa = softmax(QK^T/sqrt(d)) (Q, K, V
      from one projection of width 3C, as in the authors' code);
    * ``static``: 'conv' — a depthwise k x k convolution on V (Container, Container-Light);
      'dense' — a learned N x N matrix per static head (Container-PAM; fixed input size);
      None — no static part;
    * ``mix``: 'convex' — α = sigmoid(w), β = 1 - α from one learned scalar (the released
      Container-Light code); 'free' — α and β two learned scalars (the paper's formula).

    With ``dynamic=False`` this is the static-only block of Container-Light's first three
    stages (α = 0, β = 1); with ``static=None`` a plain attention block (α = 1, β = 0).
    ``affinity`` returns the mixed matrix, (B, C, N, N) when a convolution is involved,
    (B, heads, N, N) otherwise; ``static_affinity`` / ``dynamic_affinity`` and
    ``mix_weights`` expose the two parts and their share.
    """

    def __init__(self, dim: int, num_heads: int = 8, dynamic: bool = True, static: str | None = "conv",
                 kernel_size: int = 5, num_tokens: int | None = None, static_heads: int = 1,
                 mix: str = "convex", qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if not dynamic and static is None:
            raise ValueError("a Container mixer needs a dynamic part, a static part, or both")
        if static not in ("conv", "dense", None):
            raise ValueError(f"static must be 'conv', 'dense' or None, got {static!r}")
        if mix not in ("convex", "free"):
            raise ValueError(f"mix must be 'convex' or 'free', got {mix!r}")
        if dynamic and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.dynamic, self.static, self.mix = dim, num_heads, dynamic, static, mix
        self.affinity_kind = "mixed" if (dynamic and static) else ("dynamic" if dynamic else "static")
        self.qkv = nn.Linear(dim, 3 * dim if dynamic else dim, bias=qkv_bias)
        if static == "conv":
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim)
        elif static == "dense":
            if not num_tokens:
                raise ValueError("a dense static affinity needs num_tokens (the fixed N = H*W)")
            if dim % static_heads:
                raise ValueError(f"dim {dim} is not divisible by static_heads {static_heads}")
            self.num_tokens = num_tokens
            self.static_a = nn.Parameter(torch.zeros(static_heads, num_tokens, num_tokens))
            nn.init.trunc_normal_(self.static_a, std=0.02)
        if dynamic and static:
            if mix == "convex":
                self.sa_weight = nn.Parameter(torch.zeros(1))
            else:
                self.alpha = nn.Parameter(torch.ones(1))
                self.beta = nn.Parameter(torch.ones(1))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    # -- the two parts ---------------------------------------------------------------
    def mix_weights(self):
        """(α, β) as tensors: the shares of the dynamic and static affinity."""
        one = self.proj.weight.new_ones(())
        if not (self.dynamic and self.static):
            return (one, one * 0) if self.dynamic else (one * 0, one)
        if self.mix == "convex":
            a = torch.sigmoid(self.sa_weight)[0]
            return a, 1 - a
        return self.alpha[0], self.beta[0]

    def _split(self, x: torch.Tensor):
        B, H, W, C = x.shape
        p = self.qkv(x)
        if not self.dynamic:
            return None, None, p
        return p[..., :C], p[..., C:2 * C], p[..., 2 * C:]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, C = t.shape[0], t.shape[-1]
        return t.reshape(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2)

    def _static_out(self, v: torch.Tensor) -> torch.Tensor:
        if self.static == "conv":
            return self.conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        self._check_tokens(v)
        return aggregate(self.static_a.unsqueeze(0).expand(v.shape[0], -1, -1, -1), flatten_tokens(v)).reshape(v.shape)

    def _check_tokens(self, x: torch.Tensor) -> None:
        n = x.shape[1] * x.shape[2]
        if n != self.num_tokens:
            raise ValueError(f"this Container-PAM layer has a dense static affinity for {self.num_tokens} positions, "
                             f"got {x.shape[1]}x{x.shape[2]} = {n}; build the model with img_size set to the size "
                             f"you will feed it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self._split(x)
        alpha, beta = self.mix_weights()
        out = 0
        if self.dynamic:
            o = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v),
                                               dropout_p=self.attn_drop if self.training else 0.0)
            o = o.transpose(1, 2).reshape(B, H, W, C)
            out = alpha * o if self.static else o
        if self.static:
            s = self._static_out(v)
            out = out + beta * s if self.dynamic else s
        return self.proj_drop(self.proj(out))

    def dynamic_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(QK^T/sqrt(d)) per head, (B, heads, N, N)."""
        q, k, _ = self._split(x)
        q, k = self._heads(q), self._heads(k)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)

    def static_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The static matrix: (B, C, N, N) for the convolution, (B, static_heads, N, N) dense."""
        B, H, W, _ = x.shape
        if self.static == "conv":
            A = conv_toeplitz(self.conv.weight, H, W)
        else:
            self._check_tokens(x)
            A = self.static_a
        return A.unsqueeze(0).expand(B, -1, -1, -1)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.mix_weights()
        if not self.static:
            return self.dynamic_affinity(x)
        S = self.static_affinity(x)
        if not self.dynamic:
            return S
        D = self.dynamic_affinity(x)
        groups = math.lcm(D.shape[1], S.shape[1])
        return alpha * expand_groups(D, groups) + beta * expand_groups(S, groups)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(self._split(x)[2])

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.static == "conv":
            _, beta = self.mix_weights()
            y = y + beta * self.conv.bias  # the convolution's bias is part of the output transform
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, dynamic={self.dynamic}, static={self.static}, mix={self.mix}"
