"""Token-mixing MLPs: MLP-Mixer's token MLP, ResMLP's token layer, gMLP's spatial gating unit,
ViP's Permute-MLP.

:class:`TokenMixingMLP` (MLP-Mixer) mixes positions with a two-layer MLP across them (its GELU
makes the affinity data-dependent, see the class). The other three mix positions with learned
matrices that do not depend on the input (static affinities), each in another way:

* :class:`TokenLinear` (ResMLP): one N x N linear layer across all patches, the same for
  every channel. A = W_tokens exactly.
* :class:`SpatialGatingMLP` (gMLP): channel expansion, then the hidden channels are split
  in two halves (u, v); v is normalised and mixed across positions by an N x N linear
  layer, and the result gates u elementwise. A = W_tokens acting on V = LN(v); the gate
  is part of the (position-wise) output transform.
* :class:`PermuteMLP` (Vision Permutator): three branches, a linear layer along each
  column (height), along each row (width) and across channels, fused by a per-channel
  split attention. Each spatial branch is static along a column / row.

Token-mixing layers are built for a number of tokens (a grid); another input size is a
ValueError that says to build the model with ``img_size`` set to the size it will see.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import Mlp, to_2tuple
from .base import Mixer, aggregate, flatten_tokens


def check_tokens(t: torch.Tensor, num_tokens: int, grid_size, what: str) -> None:
    """Raise a ValueError unless the (B, N, C) sequence ``t`` has the ``num_tokens`` a layer with
    per-position weights (``what``) was built for."""
    if t.shape[1] != num_tokens:
        grid = f" ({grid_size[0]}x{grid_size[1]} patches)" if grid_size else ""
        raise ValueError(f"the {what} was built for {num_tokens} tokens{grid}, got {t.shape[1]}; linear token "
                         f"mixing fixes the input size: build the model with img_size set to the size you will "
                         f"feed it")


class TokenProjection(nn.Module):
    """``y = W·t + b`` across the N positions of a (B, N, C) sequence: W is (N, N), b (N,)
    is one bias per output position, and both are shared by all channels.

    Its parameters are ``weight`` and ``bias`` (the names of an ``nn.Linear(N, N)``), but it
    is not an ``nn.Linear``: whole-model initialisers that re-draw linear layers (ViT's
    truncated normal) leave its initialisation, which the model chooses, alone.
    """

    def __init__(self, num_tokens: int, grid_size=None, std: float = 0.02, bias: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.weight = nn.Parameter(torch.empty(num_tokens, num_tokens))
        self.bias = nn.Parameter(torch.empty(num_tokens))
        self.reset_parameters(std, bias)

    def reset_parameters(self, std: float = 0.02, bias: float = 0.0) -> None:
        """Normal weights of standard deviation ``std`` (truncated at ±2, as ``init_weights_vit``) and
        a constant bias."""
        nn.init.trunc_normal_(self.weight, std=std)
        nn.init.constant_(self.bias, bias)

    def check(self, t: torch.Tensor) -> None:
        """Raise a ValueError unless ``t`` (B, N, C) has the number of tokens this layer was built for."""
        check_tokens(t, self.num_tokens, self.grid_size, "token-mixing layer")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.check(t)
        # one batched product with the bias added in it (W·t then + b would write the output twice)
        return torch.baddbmm(self.bias[:, None], self.weight.expand(t.shape[0], -1, -1), t)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"


class TokenLinear(Mixer):
    """ResMLP's token mixing: one linear layer across the N patches, shared by the channels.

    ``affinity`` is (B, 1, N, N): the layer's weight itself (static, dense, not normalised:
    rows may hold negative weights and need not sum to one). ``values`` is X, and
    ``project`` adds the layer's bias, one value per output position; so
    ``forward == project(A·V)`` exactly.
    """

    affinity_kind = "static"
    exact_av = True

    def __init__(self, num_tokens: int, grid_size=None):
        super().__init__()
        self.proj = TokenProjection(num_tokens, grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(flatten_tokens(x)).reshape(x.shape)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        t = flatten_tokens(x)
        self.proj.check(t)
        N = t.shape[1]
        return self.proj.weight.view(1, 1, N, N).expand(t.shape[0], -1, -1, -1)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (y + self.proj.bias[:, None]).reshape(x.shape)


class SpatialGatingMLP(Mixer):
    """gMLP's block branch ("Pay attention to MLPs", Liu et al. 2021): ``fc1`` (C -> hidden),
    GELU, split the hidden channels into u (first half) and v (second half), the spatial
    gating unit ``s = u ⊙ (W·LN(v) + b)`` with W an N x N linear layer across positions,
    then ``fc2`` (hidden/2 -> C).

    As context aggregation: A = W (B, 1, N, N, static), V = LN(v) (B, N, hidden/2), and the
    output transform is ``project(y, x) = fc2(u(x) ⊙ (y + b))``. The gate u is computed from
    the same position's input only, so every bit of spatial mixing is in A, and
    ``forward == project(A·V)`` exactly (``exact_av``). The output transform is not a
    fixed matrix, though: it is multiplicative in the input. :meth:`gated_affinity` gives
    the equivalent data-dependent affinity per hidden channel c,
    ``A(x)[c] = diag(u_c(x))·W``, with which the gating unit is ``A(x)·V + u ⊙ b``.

    The token layer is initialised as the paper says (weights near zero, bias 1), so that
    each block starts as a plain channel MLP (``s ≈ u``).
    """

    affinity_kind = "static"
    exact_av = True

    def __init__(self, dim: int, hidden_dim: int, num_tokens: int, grid_size=None, act_layer=nn.GELU,
                 norm_eps: float = 1e-5, drop: float = 0.0):
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"the gMLP hidden width must be even (it is split into a gate and a value half), "
                             f"got {hidden_dim}")
        self.dim = dim
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.LayerNorm(hidden_dim // 2, eps=norm_eps)
        self.proj = TokenProjection(num_tokens, grid_size, std=1e-6, bias=1.0)
        self.fc2 = nn.Linear(hidden_dim // 2, dim)
        self.drop2 = nn.Dropout(drop)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v): the gate and value halves of the hidden features, each (B, N, hidden/2)."""
        t = flatten_tokens(x)
        self.proj.check(t)
        u, v = self.drop1(self.act(self.fc1(t))).chunk(2, dim=-1)
        return u, v

    def _out(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(s)).reshape(x.shape[:-1] + (self.dim,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._halves(x)
        return self._out(u * self.proj(self.norm(v)), x)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        t = flatten_tokens(x)
        self.proj.check(t)
        N = t.shape[1]
        return self.proj.weight.view(1, 1, N, N).expand(t.shape[0], -1, -1, -1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._halves(x)[1])

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        u = self._halves(x)[0]
        return self._out(u * (y + self.proj.bias[:, None]), x)

    def gated_affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The data-dependent affinity ``diag(u_c(x))·W`` per hidden channel c: (B, hidden/2, N, N)."""
        u = self._halves(x)[0]  # (B, N, C')
        return u.transpose(1, 2).unsqueeze(-1) * self.proj.weight


class PermuteMLP(Mixer):
    """Vision Permutator's Permute-MLP ("weighted" variant; Hou et al. 2021) on a (B, H, W, C)
    map built for one grid (H, W).

    The C channels are cut into ``segment_dim`` segments of S = C / segment_dim channels.
    The height branch treats, for every column and segment, the H x S values as one vector
    and maps it with a linear layer (``mlp_h``, H·S -> H·S): it mixes positions along the
    column together with the S channels of the segment, with the same weights for every
    column and segment. The width branch does the same along rows (``mlp_w``); the channel
    branch is a linear layer over channels (``mlp_c``). The three outputs are fused by split
    attention — ``reweight``, an MLP on their spatial mean, gives per channel three weights
    that a softmax normalises — and projected (``proj``). The authors' models set
    ``segment_dim`` = H = W, so that ``mlp_h`` and ``mlp_w`` are C x C.

    As context aggregation. Because the branch layers also mix the channels inside a
    segment, one position affinity per channel group cannot express them: the affinity has
    one group per branch and channel pair (s_out, s_in) of a segment, and the values repeat
    the input for each pair. With n = (y, x):

    * ``A_h[s_out, s_in][(y', x'), (y, x)] = mlp_h.weight[y'·S + s_out, y·S + s_in]`` if
      x = x' (zero elsewhere: static along a column), S² groups;
    * ``A_w[s_out, s_in][(y', x'), (y, x)] = mlp_w.weight[x'·S + s_out, x·S + s_in]`` if
      y = y' (static along a row), S² groups;
    * the identity for the channel branch, S groups;

    so G = 2·S² + S groups of ``segment_dim`` channels. ``values`` is (B, N, G·segment_dim):
    the input channel (segment, s_in) repeated for every s_out of both spatial branches, then
    ``mlp_c(x)``. ``project`` sums over s_in (and adds the branch biases, if any), fuses the
    three branches with the split attention and applies ``proj``. ``forward ==
    project(A·V)`` exactly. The split attention is data-dependent, but it is a weight per
    channel (and sample), the same at every position; the affinity is static.
    """

    affinity_kind = "static"
    exact_av = True

    def __init__(self, dim: int, grid_size, segment_dim: int = 8, qkv_bias: bool = False, proj_drop: float = 0.0):
        super().__init__()
        if segment_dim < 1 or dim % segment_dim:
            raise ValueError(f"the Permute-MLP's {dim} channels cannot be cut into {segment_dim} segments "
                             f"(segment_dim must divide the width)")
        if dim < 4:
            raise ValueError(f"the Permute-MLP needs at least 4 channels (its split attention is C/4 wide), got {dim}")
        self.dim = dim
        self.grid_size = to_2tuple(grid_size)
        self.segment_dim = segment_dim
        self.seg_width = S = dim // segment_dim
        H, W = self.grid_size
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(H * S, H * S, bias=qkv_bias)
        self.mlp_w = nn.Linear(W * S, W * S, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"the Permute-MLP takes a (B, H, W, C) map, got shape {tuple(x.shape)}")
        if tuple(x.shape[1:3]) != self.grid_size:
            H, W = self.grid_size
            raise ValueError(f"the Permute-MLP was built for a {H}x{W} map, got {x.shape[1]}x{x.shape[2]}; its "
                             f"height and width layers fix the input size: build the model with img_size set to "
                             f"the size you will feed it")

    def _fuse(self, h: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Split attention over the three branches, each (B, N, C), then the projection."""
        B, _, C = c.shape
        a = self.reweight((h + w + c).mean(dim=1))  # (B, 3C), channel-major: [c0 b0, c0 b1, c0 b2, c1 b0, ...]
        a = a.reshape(B, 1, C, 3).softmax(dim=-1)
        y = h * a[..., 0] + w * a[..., 1] + c * a[..., 2]
        return self.proj_drop(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, H, W, C = x.shape
        g, S = self.segment_dim, self.seg_width
        xs = x.reshape(B, H, W, g, S)
        # height branch: per column and segment, one (H·S) vector
        h = self.mlp_h(xs.permute(0, 3, 2, 1, 4).reshape(B, g, W, H * S))
        h = h.reshape(B, g, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H * W, C)
        # width branch: per row and segment, one (W·S) vector
        w = self.mlp_w(xs.permute(0, 1, 3, 2, 4).reshape(B, H, g, W * S))
        w = w.reshape(B, H, g, W, S).permute(0, 1, 3, 2, 4).reshape(B, H * W, C)
        c = self.mlp_c(x).reshape(B, H * W, C)
        return self._fuse(h, w, c).reshape(B, H, W, C)

    # -- context aggregation ---------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """G = 2·S² + S affinity groups (S = channels per segment)."""
        return 2 * self.seg_width ** 2 + self.seg_width

    def axial_affinities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The height and width branches' affinities, each (S, S, N, N) indexed by
        (s_out, s_in, output position, input position), positions in row-major order."""
        H, W = self.grid_size
        S = self.seg_width
        Wh = self.mlp_h.weight.reshape(H, S, H, S).permute(1, 3, 0, 2)  # (s_out, s_in, y', y)
        Ww = self.mlp_w.weight.reshape(W, S, W, S).permute(1, 3, 0, 2)  # (s_out, s_in, x', x)
        eye_w = torch.eye(W, dtype=Wh.dtype, device=Wh.device)
        eye_h = torch.eye(H, dtype=Ww.dtype, device=Ww.device)
        A_h = torch.einsum("abpq,rs->abprqs", Wh, eye_w).reshape(S, S, H * W, H * W)
        A_w = torch.einsum("abrs,pq->abprqs", Ww, eye_h).reshape(S, S, H * W, H * W)
        return A_h, A_w

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        S, N = self.seg_width, x.shape[1] * x.shape[2]
        A_h, A_w = self.axial_affinities()
        eye = torch.eye(N, dtype=A_h.dtype, device=A_h.device).expand(S, N, N)
        A = torch.cat([A_h.reshape(S * S, N, N), A_w.reshape(S * S, N, N), eye])
        return A.unsqueeze(0).expand(x.shape[0], -1, -1, -1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, H, W, C = x.shape
        g, S = self.segment_dim, self.seg_width
        t = x.reshape(B, H * W, g, S).transpose(2, 3)  # (B, N, s_in, segment)
        rep = t.unsqueeze(2).expand(B, H * W, S, S, g).reshape(B, H * W, S * S * g)  # (s_out, s_in, segment)
        return torch.cat([rep, rep, self.mlp_c(x).reshape(B, H * W, C)], dim=-1)

    def _collect(self, y: torch.Tensor, bias: torch.Tensor | None, bias_shape) -> torch.Tensor:
        """Sum a branch's (B, N, S·S·g) aggregate over s_in into (B, N, C) in channel order (segment, s)."""
        B, N, _ = y.shape
        g, S = self.segment_dim, self.seg_width
        out = y.reshape(B, N, S, S, g).sum(dim=3).transpose(2, 3)  # (B, N, segment, s_out)
        if bias is not None:
            H, W = self.grid_size
            out = (out.reshape(B, H, W, g, S) + bias.reshape(bias_shape)).reshape(B, N, g, S)
        return out.reshape(B, N, g * S)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        H, W = self.grid_size
        S = self.seg_width
        k = S * S * self.segment_dim
        h = self._collect(y[..., :k], self.mlp_h.bias, (H, 1, 1, S))  # bias of output (y', s_out)
        w = self._collect(y[..., k:2 * k], self.mlp_w.bias, (W, 1, S))  # bias of output (x', s_out)
        c = y[..., 2 * k:]
        return self._fuse(h, w, c).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, segment_dim={self.segment_dim}"


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
        check_tokens(t, self.num_tokens, self.grid_size, "token-mixing MLP")

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
