"""The learnable tree filter's algorithm: a minimum spanning tree of the image grid, and
linear-time filtering along it.

Sources: Song et al., "Learnable Tree Filter for Structure-preserving Feature Transform"
(NeurIPS 2019, v1) and "Rethinking Learnable Tree Filter for Generic Feature Transform"
(NeurIPS 2020, v2); the authors' code, StevenGrove/TreeFilter-Torch (v1) and
StevenGrove/LearnableTreeFilterV2 (``cvpods/layers/tree_filter_core.py``: grid edges,
Borůvka MST, BFS ordering; ``csrc/tree_filter/refine.cu``: the two passes). Their MST and
BFS are CUDA/C++ kernels; here everything is vectorised torch, batched over the images:

* :func:`grid_edges`: the 4-connected H x W grid, vertical edges (i, i + W) first, then
  horizontal ones (i, i + 1), row-major vertices (the authors' order);
* :func:`minimum_spanning_tree`: Borůvka's algorithm without gradient (as the authors
  compute it). Edges are ranked once per image (argsort, so ties break by edge index and
  all keys are distinct); each round every component takes its cheapest outgoing edge with
  one ``scatter_reduce(amin)``, mutual choices are broken and the components merged by
  pointer jumping. At most ceil(log2 N) rounds, each O(E) tensor work; no loop over pixels;
* :func:`bfs_tree`: roots the tree and orders it by BFS depth, the frontier expanded level
  by level with vectorised gathers over the whole batch. The root is a tree centre by
  default (two extra sweeps: farthest vertex a from any vertex, farthest b from a, then the
  middle of the a-b path), which halves the number of levels the filter loops over;
* :func:`tree_filter`: ``out_i = Σ_j S_ij x_j`` with ``S_ij`` the product of the edge
  affinities along the tree path from i to j (``S_ii = 1``), in two passes over the BFS
  levels: leaves -> root ``U_v = x_v + Σ_children w_c U_c``, root -> leaves
  ``out_v = (1 - w_v²) U_v + w_v out_parent(v)`` (refine.cu's recurrences). A Python loop
  over the levels (the tree's depth D, not over pixels) with one ``index_add`` / gather per
  level on all images at once: O(N·C) work, O(D) kernel launches, differentiable by autograd
  with respect to the features and the edge affinities;
* :func:`tree_distance_matrix`: the dense (B, G, N, N) path lengths Σ d along the tree,
  for the analysis-only dense affinity ``exp(-D)`` (O(N²) memory).

Everything works on the ``meta`` device too (MAC counting): the tree's structure is then
built on the CPU from all-equal weights, and the filtering runs on shapes only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def grid_edges(H: int, W: int, device=None) -> torch.Tensor:
    """The (E, 2) endpoints of the 4-connected H x W grid: (H-1)·W vertical edges, then H·(W-1) horizontal."""
    idx = torch.arange(H * W, device=device).view(H, W)
    vert = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)], 1)
    horiz = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], 1)
    return torch.cat([vert, horiz], 0)


def grid_edge_distance(feat: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """Squared Euclidean distances between grid neighbours of a (B, H, W, C) map, in
    :func:`grid_edges` order: (B, E), or (B, E, G) summed within ``groups`` channel groups."""
    B, H, W, C = feat.shape
    dv = feat[:, 1:, :, :] - feat[:, :-1, :, :]
    dh = feat[:, :, 1:, :] - feat[:, :, :-1, :]
    sq = torch.cat([(dv * dv).reshape(B, -1, C), (dh * dh).reshape(B, -1, C)], 1)
    if groups is None:
        return sq.sum(-1)
    if C % groups:
        raise ValueError(f"{C} embedding channels cannot be split into {groups} groups")
    return sq.reshape(B, sq.shape[1], groups, C // groups).sum(-1)


@torch.no_grad()
def minimum_spanning_tree(weight: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Borůvka's MST of each image's grid graph: ``weight`` (B, E) in :func:`grid_edges` order
    -> (B, E) bool mask of the N - 1 tree edges (ties broken by edge index)."""
    B, E = weight.shape
    N = H * W
    if E != (H - 1) * W + H * (W - 1):
        raise ValueError(f"a {H}x{W} grid has {(H - 1) * W + H * (W - 1)} edges, got {E} weights")
    if weight.is_meta:  # shapes only: any spanning tree will do (bfs_tree builds one on the CPU)
        return torch.zeros(B, E, dtype=torch.bool, device="meta")
    dev = weight.device
    in_tree = torch.zeros(B, E, dtype=torch.bool, device=dev)
    if E == 0:
        return in_tree
    ends = grid_edges(H, W, dev)
    eu, ev = ends[:, 0].expand(B, E), ends[:, 1].expand(B, E)
    order = torch.sort(weight, dim=1, stable=True).indices  # rank -> edge
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(E, device=dev).expand(B, E).contiguous())
    comp = torch.arange(N, device=dev).repeat(B, 1)  # component label of each vertex (a vertex id)
    self_id = torch.arange(N, device=dev).expand(B, N)
    for _ in range(max(N, 2).bit_length() + 1):
        cu, cv = comp.gather(1, eu), comp.gather(1, ev)
        cross = cu != cv
        if not bool(cross.any()):
            break
        key = torch.where(cross, rank, E)
        best = torch.full((B, N), E, dtype=rank.dtype, device=dev)
        best.scatter_reduce_(1, cu, key, "amin").scatter_reduce_(1, cv, key, "amin")
        has = best < E  # component slots that picked an edge this round
        edge = order.gather(1, best.clamp(max=E - 1))
        hit = torch.zeros(B, E, dtype=torch.long, device=dev).scatter_add_(1, edge, has.long())
        in_tree |= hit > 0
        ou, ov = cu.gather(1, edge), cv.gather(1, edge)
        parent = torch.where(has, torch.where(ou == self_id, ov, ou), self_id)
        back = parent.gather(1, parent)
        parent = torch.where((back == self_id) & (self_id < parent), self_id, parent)  # a mutual pick: one root
        while True:
            nxt = parent.gather(1, parent)
            if torch.equal(nxt, parent):
                break
            parent = nxt
        comp = parent.gather(1, comp)
    return in_tree


@dataclass
class RootedTree:
    """A batch of rooted spanning trees in BFS order, vertices numbered ``b·N + n`` over the batch.

    ``levels[k]``: the vertices at depth k (all images together); ``parent_pos[k]`` (k >= 1):
    the position of each one's parent in ``levels[k - 1]``; ``parent``/``parent_edge``: each
    vertex's parent and the grid edge to it (the root: itself and -1); ``inverse``: the
    position of every vertex in ``cat(levels)``; ``roots``: (B,) local root indices."""

    levels: list
    parent_pos: list
    parent: torch.Tensor
    parent_edge: torch.Tensor
    inverse: torch.Tensor
    roots: torch.Tensor
    batch: int
    num_vertices: int

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def to(self, device) -> "RootedTree":
        mv = lambda t: t.to(device)  # noqa: E731
        return RootedTree([mv(t) for t in self.levels], [None] + [mv(t) for t in self.parent_pos[1:]],
                          mv(self.parent), mv(self.parent_edge), mv(self.inverse), mv(self.roots), self.batch,
                          self.num_vertices)


def _grid_neighbours(H: int, W: int, device):
    """(N, 4) neighbour indices (up, down, left, right; -1 outside) and their edge ids."""
    n = torch.arange(H * W, device=device)
    y, x = n // W, n % W
    nv = (H - 1) * W
    nbr = torch.stack([n - W, n + W, n - 1, n + 1], 1)
    eid = torch.stack([n - W, n, nv + y * (W - 1) + x - 1, nv + y * (W - 1) + x], 1)
    valid = torch.stack([y > 0, y < H - 1, x > 0, x < W - 1], 1)
    return torch.where(valid, nbr, -1), torch.where(valid, eid, -1)


def _bfs(nbr_t, eid_g, roots_g, total):
    """Level-synchronous BFS over the forest ``nbr_t`` ((V, 4) tree neighbours, -1 for none):
    a tree neighbour that is not a vertex's parent is its child, so no visited set is needed.
    Returns the levels, parent positions, parents, parent edges and depths."""
    dev = roots_g.device
    levels, ppos, dirs = [roots_g], [None], [None]
    frontier, fpar = roots_g, torch.full_like(roots_g, -1)
    while True:
        cand = nbr_t[frontier]  # (F, 4)
        f_idx, d_idx = ((cand >= 0) & (cand != fpar.unsqueeze(1))).nonzero(as_tuple=True)
        if f_idx.numel() == 0:
            break
        fpar, frontier = frontier[f_idx], cand[f_idx, d_idx]
        levels.append(frontier)
        ppos.append(f_idx)
        dirs.append(d_idx)
    parent = torch.arange(total, device=dev)
    pedge = torch.full((total,), -1, dtype=torch.long, device=dev)
    depth = torch.zeros(total, dtype=torch.long, device=dev)
    if len(levels) > 1:
        kids = torch.cat(levels[1:])
        pars = torch.cat([levels[k - 1][ppos[k]] for k in range(1, len(levels))])
        parent[kids] = pars
        pedge[kids] = eid_g[pars, torch.cat(dirs[1:])]
        depth[kids] = torch.cat([torch.full_like(levels[k], k) for k in range(1, len(levels))])
    return levels, ppos, parent, pedge, depth


@torch.no_grad()
def bfs_tree(in_tree: torch.Tensor, H: int, W: int, root: str | int = "centre") -> RootedTree:
    """Root the spanning trees given by the (B, E) edge mask and order them by BFS depth.

    ``root``: 'centre' (a centre of each tree: the middle of a longest path, found by two
    extra BFS sweeps), 'corner' (vertex 0) or a vertex index used for every image."""
    B, E = in_tree.shape
    N = H * W
    target = in_tree.device
    if in_tree.is_meta:
        in_tree = minimum_spanning_tree(torch.zeros(B, E, device="cpu"), H, W)
    dev = in_tree.device
    nbr, eid = _grid_neighbours(H, W, dev)
    offs = (torch.arange(B, device=dev) * N).view(B, 1, 1)
    if E:
        flag = (eid >= 0).unsqueeze(0) & in_tree.gather(1, eid.clamp(min=0).view(1, -1).expand(B, -1)).view(B, N, 4)
    else:  # a single pixel
        flag = torch.zeros(B, N, 4, dtype=torch.bool, device=dev)
    nbr_t = torch.where(flag, nbr.unsqueeze(0) + offs, -1).reshape(B * N, 4)  # tree neighbours
    eid_g = eid.unsqueeze(0).expand(B, N, 4).reshape(B * N, 4)
    base = torch.arange(B, device=dev) * N
    if root == "centre":
        _, _, _, _, d0 = _bfs(nbr_t, eid_g, base, B * N)
        a = d0.view(B, N).argmax(1)
        _, _, par, _, da = _bfs(nbr_t, eid_g, base + a, B * N)
        far = da.view(B, N).argmax(1)
        diam = da.view(B, N).gather(1, far[:, None]).squeeze(1)
        keep = diam // 2  # the centre lies at depth floor(D/2) from a on the a-b path
        cur = base + far
        for _ in range(int(diam.max()) - int(keep.min())):
            cur = torch.where(da[cur] > keep, par[cur], cur)
        roots = cur - base
    elif root == "corner":
        roots = torch.zeros(B, dtype=torch.long, device=dev)
    elif isinstance(root, int) and 0 <= root < N:
        roots = torch.full((B,), root, dtype=torch.long, device=dev)
    else:
        raise ValueError(f"root must be 'centre', 'corner' or a vertex index in [0, {N}), got {root!r}")
    levels, ppos, parent, pedge, _ = _bfs(nbr_t, eid_g, base + roots, B * N)
    perm = torch.cat(levels)
    if perm.numel() != B * N:
        raise ValueError("the edge mask is not a spanning tree of every image's grid")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(B * N, device=dev)
    tree = RootedTree(levels, ppos, parent, pedge, inverse, roots, B, N)
    return tree.to(target) if target != dev else tree


def parent_edge_values(edge_values: torch.Tensor, tree: RootedTree) -> torch.Tensor:
    """Per-vertex values of the edge to the parent: (B, E, *rest) -> (B·N, *rest); the root gets edge 0's
    value (never used)."""
    B, E = edge_values.shape[:2]
    if E == 0:
        return edge_values.new_zeros((B * tree.num_vertices,) + edge_values.shape[2:])
    b = torch.arange(B, device=edge_values.device).repeat_interleave(tree.num_vertices)
    return edge_values[b, tree.parent_edge.clamp(min=0)]


def tree_filter(x: torch.Tensor, w: torch.Tensor, tree: RootedTree) -> torch.Tensor:
    """``out_i = Σ_j S_ij x_j`` along the tree: ``x`` (B·N, G, K) features, ``w`` (B·N, G) the
    affinity of each vertex's edge to its parent (the root's is ignored). Two passes over the
    BFS levels (see the module docstring): O(B·N·G·K) work, differentiable in ``x`` and ``w``."""
    lv, pp = tree.levels, tree.parent_pos
    xs = [x.index_select(0, idx) for idx in lv]
    ws = [None] + [w.index_select(0, idx).unsqueeze(-1) for idx in lv[1:]]
    up = [None] * len(lv)
    up[-1] = xs[-1]
    for k in range(len(lv) - 1, 0, -1):  # leaves -> root
        up[k - 1] = xs[k - 1].index_add(0, pp[k], ws[k] * up[k])
    down = [up[0]]
    for k in range(1, len(lv)):  # root -> leaves
        down.append((1 - ws[k] * ws[k]) * up[k] + ws[k] * down[k - 1].index_select(0, pp[k]))
    return torch.cat(down).index_select(0, tree.inverse)


def tree_distance_matrix(d: torch.Tensor, tree: RootedTree) -> torch.Tensor:
    """Dense path lengths along the tree: ``d`` (B·N, G) the length of each vertex's edge to its
    parent -> (B, G, N, N), ``D[b, g, i, j] = Σ d over the path i..j``. O(N²) memory (analysis only).

    Top-down over the levels: the distance column of v is its parent's plus d_v for the
    vertices outside v's subtree and minus d_v inside it."""
    B, N = tree.batch, tree.num_vertices
    G = d.shape[1]
    lv, pp = tree.levels, tree.parent_pos
    dev = d.device
    local = torch.arange(B * N, device=dev) % N
    # ancestors (self included) of every vertex, as (B·N, N) rows, and distances to the root
    anc = [torch.nn.functional.one_hot(local[lv[0]], N).bool()]
    rdist = [d.new_zeros(lv[0].numel(), G)]
    for k in range(1, len(lv)):
        anc.append(anc[k - 1].index_select(0, pp[k]) | torch.nn.functional.one_hot(local[lv[k]], N).bool())
        rdist.append(rdist[k - 1].index_select(0, pp[k]) + d.index_select(0, lv[k]))
    order = tree.inverse
    anc_rows = torch.cat(anc).index_select(0, order).view(B, N, N)  # [b, i, v]: v is an ancestor of i
    r = torch.cat(rdist).index_select(0, order).view(B, N, G)
    b_of = torch.arange(B * N, device=dev) // N
    # column of the root: D[i, root] = r_i
    cols = [r[b_of[lv[0]]].transpose(1, 2)]  # (B, G, N)
    for k in range(1, len(lv)):
        v = lv[k]
        inside = anc_rows[b_of[v], :, local[v]].unsqueeze(1).to(d.dtype)  # (F, 1, N): i in subtree(v)
        cols.append(cols[k - 1].index_select(0, pp[k]) + d.index_select(0, v).unsqueeze(-1) * (1 - 2 * inside))
    D = torch.cat(cols).index_select(0, order).view(B, N, G, N)  # [b, j, g, i]
    return D.permute(0, 2, 3, 1)


__all__ = ["grid_edges", "grid_edge_distance", "minimum_spanning_tree", "RootedTree", "bfs_tree",
           "parent_edge_values", "tree_filter", "tree_distance_matrix"]
