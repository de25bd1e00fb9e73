"""Token-mixing MLP (MLP-Mixer): a static, dense affinity learned per position pair."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Mixer, aggregate, flatten_tokens


class TokenMixingMLP(Mixer):
    """MLP-Mixer's token-mixing MLP: for every channel, ``fc2(GELU(fc1(x_c)))`` over the N
    positions (fc1: N -> hidden, fc2: hidden -> N). The number of tokens is fixed when the
    layer is built; another input size is a ValueError.

    Not of the form A·V: the MLP has a non-linearity. Because GELU(h) = h·Φ(h),
    the output is exactly ``A(x)·V + b(x)`` with V = X and

        A(x)[c] = W2 · diag(Φ(W1 x_c + b1)) · W1        (B, C, N, N)
        b(x)[c] = W2 · (Φ(W1 x_c + b1) ⊙ b1) + b2,

    a data-dependent ("gated") affinity per channel that reduces to the Container paper's
    static ``A = W_MLP^T`` for a single linear layer. ``affinity`` returns A(x);
    ``explicit_forward`` adds b(x) and equals ``forward``.
    """

    affinity_kind = "static"
    exact_av = False

    def __init__(self, num_tokens: int, hidden_tokens: int, grid_size=None, drop: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.grid_size = grid_size
        self.fc1 = nn.Linear(num_tokens, hidden_tokens)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_tokens, num_tokens)
        self.drop2 = nn.Dropout(drop)

    def _check(self, t: torch.Tensor) -> None:
        if t.shape[1] != self.num_tokens:
            grid = f" ({self.grid_size[0]}x{self.grid_size[1]} patches)" if self.grid_size else ""
            raise ValueError(f"the token-mixing MLP was built for {self.num_tokens} tokens{grid}, got {t.shape[1]}; "
                             f"token-mixing MLPs have a fixed input size: build the model with img_size set to "
                             f"the size you will feed it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = flatten_tokens(x)
        self._check(t)
        y = self.drop2(self.fc2(self.drop1(self.act(self.fc1(t.transpose(1, 2))))))
        return y.transpose(1, 2).reshape(x.shape)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        t = flatten_tokens(x)
        self._check(t)
        h = self.fc1(t.transpose(1, 2))  # (B, C, hidden)
        return 0.5 * (1.0 + torch.erf(h / 2 ** 0.5))  # Φ(h)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        g = self._gate(x)  # (B, C, hidden)
        return torch.einsum("nh,bch,hm->bcnm", self.fc2.weight, g, self.fc1.weight)

    def explicit_forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._gate(x)
        offset = (g * self.fc1.bias) @ self.fc2.weight.t() + self.fc2.bias  # (B, C, N)
        y = aggregate(self.affinity(x), self.values(x)) + offset.transpose(1, 2)
        return y.reshape(x.shape)
