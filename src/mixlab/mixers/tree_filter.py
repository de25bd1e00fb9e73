"""The learnable tree filter (LTF v2) as a mixer, and as a context module for CNNs.

Song et al., "Rethinking Learnable Tree Filter for Generic Feature Transform" (NeurIPS 2020),
Eq. (4)-(6) and Sec. 3.3; v1: "Learnable Tree Filter for Structure-preserving Feature
Transform" (NeurIPS 2019). Authors' module: StevenGrove/LearnableTreeFilterV2,
``cvpods/layers/tree_filter_v2.py`` (``TreeFilterV2``) and ``tree_filter_core.py``; its
placement in ResNet: ``cvpods/modeling/backbone/resnet.py`` (after res3, res4 and res5,
``TF_NUM_GROUPS=16``, guided by the stage's input). The algorithm (MST, BFS levels, the two
filtering passes) is in :mod:`mixlab.layers.tree_filter`.

For each group g of G (the channels of V split evenly, as for every mixer)::

    y_i = Σ_j S_ij f_j x_j / Σ_j S_ij f_j,   S_ij = Π_{(k,m) on the tree path i..j} exp(-d_km)

* the tree: the minimum spanning tree of the 4-connected grid under the squared distance of
  the guide embedding ``φ(guide)`` (1x1 projection to ``embed_dim`` channels), computed
  without gradient;
* the pairwise term: ``d_km = |ψ(x)_k - ψ(x)_m|²_g + |φ(guide)_k - φ(guide)_m|²_g + β_g²``,
  the group's slice of the feature embedding ψ (1x1, ``embed_dim`` channels) and of the
  guide embedding; ``exp(-β_g²)`` per edge is v2's path-length decay ``exp(-β)^{|E_ij|}``
  (the authors multiply every edge by ``exp(-β²)``; their extra ``exp(-β²)`` on the
  self-weight is common to every term and cancels in the normalisation);
* the unary term (v2's learnable ``f``): ``f_j = σ(W_f x_j)``, one confidence per group
  (1x1, bias-free, zero-initialised), multiplying the values, and normalised by filtering
  ``f`` itself along the same tree (the authors' ``conf_norm``).

So A (B, G, N, N) is ``S_ij f_j / Σ_k S_ik f_k`` (dynamic), V = X, and the module's output
``x + γ·(A·X)`` with γ zero-initialised (:class:`TreeFilterBlock`) or ``W_o(A·X)`` for the
generic block (:class:`TreeFilterMixer` with ``proj=True``). The filtering is exact A·V:
``explicit_forward`` (dense A from :func:`~mixlab.layers.tree_filter.tree_distance_matrix`)
equals ``forward`` (linear-time passes).

Differences from the authors' code: no ``eps`` in the normalisation (Σ_k S_ik f_k >= f_i > 0);
in training the authors use a *random* spanning tree (``RandomSpanningTree``, a randomised
Borůvka kernel in ``csrc/tree_filter/rst.cu``), not described in the paper: here the MST is used
in training and evaluation. The root of the BFS order does not change the result.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.tree_filter import (bfs_tree, grid_edge_distance, minimum_spanning_tree, parent_edge_values,
                                  tree_distance_matrix, tree_filter)
from .base import Mixer, flatten_tokens


class TreeFilterMixer(Mixer):
    """Learnable tree filter v2 on a channels-last (B, H, W, C) map (see the module docstring).

    ``groups``: G, affinity groups (``dim`` and ``embed_dim`` must be divisible by it);
    ``embed_dim``: channels of the feature and guide embeddings (default G: one per group,
    as the authors build it); ``guide_dim``: channels of an external guide map passed to
    ``forward(x, guide)`` (default None: the guide is ``x`` itself); ``residual``: the
    output is ``x + γ·y`` with a learned scalar γ (zero-init; the authors' module);
    ``proj``: a linear output projection ``W_o`` (for the generic block); ``root``: the
    BFS root ('centre' or 'corner'; the result does not depend on it, the speed does).
    """

    affinity_kind = "dynamic"
    exact_av = True

    def __init__(self, dim: int, groups: int = 1, embed_dim: int | None = None, guide_dim: int | None = None,
                 residual: bool = False, proj: bool = False, root: str = "centre"):
        super().__init__()
        embed_dim = groups if embed_dim is None else embed_dim
        if groups < 1 or dim % groups:
            raise ValueError(f"tree filter: dim {dim} must be divisible by groups {groups} (a positive integer)")
        if embed_dim % groups:
            raise ValueError(f"tree filter: embed_dim {embed_dim} must be divisible by groups {groups}")
        if root not in ("centre", "corner"):
            raise ValueError(f"tree filter: root must be 'centre' or 'corner', got {root!r}")
        self.dim, self.groups, self.embed_dim, self.guide_dim, self.root = dim, groups, embed_dim, guide_dim, root
        self.embed = nn.Linear(dim, embed_dim, bias=False)  # ψ: pairwise term of the features
        self.conf = nn.Linear(dim, groups, bias=False)  # W_f: the unary term f = σ(W_f x)
        self.guide = nn.Linear(guide_dim or dim, embed_dim, bias=False)  # φ: the tree and a pairwise term
        self.beta = nn.Parameter(torch.zeros(groups))
        self.gamma = nn.Parameter(torch.zeros(1)) if residual else None
        self.proj = nn.Linear(dim, dim) if proj else None
        nn.init.zeros_(self.conf.weight)
        nn.init.normal_(self.embed.weight, std=0.01)
        nn.init.normal_(self.guide.weight, std=0.01)

    # -- the tree and its weights ----------------------------------------------------------
    def _guide(self, x: torch.Tensor, guide: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"the tree filter takes a channels-last (B, H, W, C) map, got shape {tuple(x.shape)}")
        if self.guide_dim is None:
            if guide is not None:
                raise ValueError("this tree filter is guided by its input; build it with guide_dim= to pass a guide")
            return x
        if guide is None or guide.ndim != 4 or guide.shape[-1] != self.guide_dim:
            got = None if guide is None else tuple(guide.shape)
            raise ValueError(f"this tree filter needs a (B, h, w, {self.guide_dim}) guide map, got {got}")
        if guide.shape[1:3] != x.shape[1:3]:  # the authors' adaptive average pooling to the feature's size
            guide = F.adaptive_avg_pool2d(guide.permute(0, 3, 1, 2), x.shape[1:3]).permute(0, 2, 3, 1)
        return guide

    def tree_terms(self, x: torch.Tensor, guide: torch.Tensor | None = None):
        """The rooted MST, each vertex's parent-edge length d (B·N, G), and the unary f (B, N, G)."""
        g = self.guide(self._guide(x, guide))
        B, H, W, _ = x.shape
        e = self.embed(x)
        with torch.no_grad():
            tree = bfs_tree(minimum_spanning_tree(grid_edge_distance(g), H, W), H, W, self.root)
        d_edges = grid_edge_distance(e, self.groups) + grid_edge_distance(g, self.groups) + self.beta ** 2
        d = parent_edge_values(d_edges, tree)
        f = self.conf(x).sigmoid().reshape(B, H * W, self.groups)
        return tree, d, f

    # -- the contract ----------------------------------------------------------------------
    def affinity(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (B, G, N, N) ``S_ij f_j / Σ_k S_ik f_k`` (O(N²) memory: analysis only)."""
        tree, d, f = self.tree_terms(x, guide)
        A = torch.exp(-tree_distance_matrix(d, tree)) * f.transpose(1, 2).unsqueeze(2)
        return A / A.sum(-1, keepdim=True)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.reshape(x.shape)
        if self.proj is not None:
            y = self.proj(y)
        return x + self.gamma * y if self.gamma is not None else y

    def aggregate(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """A·V by the linear-time tree passes: (B, N, C)."""
        tree, d, f = self.tree_terms(x, guide)
        B, H, W, C = x.shape
        G = self.groups
        fx = f.reshape(B * H * W, G, 1)
        inp = torch.cat([x.reshape(B * H * W, G, C // G) * fx, fx], -1)
        out = tree_filter(inp, torch.exp(-d), tree)
        return (out[..., :-1] / out[..., -1:]).reshape(B, H * W, C)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(self.aggregate(x, guide), x)

    def explicit_forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        from .base import aggregate
        return self.project(aggregate(self.affinity(x, guide), self.values(x)), x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, embed_dim={self.embed_dim}, guide_dim={self.guide_dim}"


class TreeFilterBlock(TreeFilterMixer):
    """The authors' LTF-v2 module as a CNN context block: ``x + γ·TreeFilter(x)`` (γ = 0 at
    init), no output projection, 16 groups with one embedding channel each (``TF_NUM_GROUPS``,
    ``embed_channels = num_groups`` in their ResNet). Channels-last (B, H, W, C) in and out.

    The authors guide the tree of the filter after stage s with the stage's *input*
    (``guide_dim`` = its channels, pooled to the output's size); a context module of
    :data:`mixlab.mixers.context.CONTEXT_MODULES` sees only the stage output, so by default the
    guide is ``x`` itself (``guide_dim=None``), which costs ``dim/2·groups`` more parameters
    per module than the authors' guide layer.
    """

    def __init__(self, dim: int, groups: int = 16, embed_dim: int | None = None, guide_dim: int | None = None,
                 root: str = "centre"):
        super().__init__(dim, groups, embed_dim, guide_dim, residual=True, proj=False, root=root)


__all__ = ["TreeFilterMixer", "TreeFilterBlock"]
