"""Learnable tree filter v2: the Borůvka MST against a plain Kruskal (and scipy), the linear-time
filter against a brute-force all-pairs computation along the tree, gradients (gradcheck), the
mixer contract, the ResNet-50 context module's overhead (authors' placement) and the
``treefilter`` spec mixer."""
from __future__ import annotations

import math

import pytest
import torch

import mixlab
import mixlab.models.tree_filter  # noqa: F401  (registers the spec mixer)
from mixlab.analysis import count_macs, count_params
from mixlab.mixers import context as ctx
from mixlab.layers.tree_filter import (bfs_tree, grid_edges, minimum_spanning_tree,
                                       parent_edge_values, tree_filter)
from mixlab.mixers.tree_filter import TreeFilterBlock, TreeFilterMixer
from test_nano import mixer_calls
from test_parity import _fast_init  # noqa: F401


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def kruskal(H, W, weight):
    """Plain Kruskal with union-find: the list of MST edge ids (ties by edge id)."""
    ends = grid_edges(H, W).tolist()
    root = list(range(H * W))

    def find(a):
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    chosen = []
    for e in sorted(range(len(ends)), key=lambda e: (float(weight[e]), e)):
        a, b = find(ends[e][0]), find(ends[e][1])
        if a != b:
            root[a] = b
            chosen.append(e)
    return chosen


def brute_force_affinity(H, W, edges, d):
    """S[g, i, j] = Π exp(-d_e[g]) over the tree path i..j, walking the tree from every i."""
    ends = grid_edges(H, W).tolist()
    N, G = H * W, d.shape[1]
    adj = {v: [] for v in range(N)}
    for e in edges:
        u, v = ends[e]
        adj[u].append((v, e))
        adj[v].append((u, e))
    S = torch.zeros(G, N, N, dtype=d.dtype)
    for i in range(N):
        stack, seen = [(i, torch.zeros(G, dtype=d.dtype))], {i}
        while stack:
            v, dist = stack.pop()
            S[:, i, v] = torch.exp(-dist)
            for u, e in adj[v]:
                if u not in seen:
                    seen.add(u)
                    stack.append((u, dist + d[e]))
    return S


def random_mixer(cls=TreeFilterMixer, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(**kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.eval()


# -- the spanning tree ----------------------------------------------------------------------
@pytest.mark.parametrize("H, W", [(4, 5), (1, 7), (6, 1), (7, 6), (2, 2)])
def test_boruvka_mst_matches_kruskal(H, W):
    B = 3
    w = torch.rand(B, (H - 1) * W + H * (W - 1), generator=torch.Generator().manual_seed(H * 10 + W),
                   dtype=torch.float64)
    w[2] = torch.randint(0, 3, w[2].shape, generator=torch.Generator().manual_seed(0)).double()  # many ties
    mask = minimum_spanning_tree(w, H, W)
    for b in range(B):
        ref = kruskal(H, W, w[b])
        assert int(mask[b].sum()) == H * W - 1
        assert math.isclose(float(w[b][mask[b]].sum()), float(w[b][ref].sum()), rel_tol=1e-12, abs_tol=1e-12)
        if b < 2:  # distinct weights: the MST is unique
            assert set(mask[b].nonzero().flatten().tolist()) == set(ref)
    tree = bfs_tree(mask, H, W)  # a spanning tree: BFS reaches every vertex
    assert sorted(torch.cat(tree.levels).tolist()) == list(range(B * H * W))


def test_mst_total_weight_matches_scipy():
    sparse = pytest.importorskip("scipy.sparse")
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    H, W = 5, 6
    w = torch.rand(2, (H - 1) * W + H * (W - 1), generator=torch.Generator().manual_seed(3)) + 0.1
    mask = minimum_spanning_tree(w, H, W)
    ends = grid_edges(H, W).numpy()
    for b in range(2):
        graph = sparse.coo_matrix((w[b].numpy(), (ends[:, 0], ends[:, 1])), shape=(H * W, H * W))
        total = csgraph.minimum_spanning_tree(graph).sum()
        assert math.isclose(float(w[b][mask[b]].sum()), float(total), rel_tol=1e-6)


def test_centre_root_is_a_tree_centre_and_shallower():
    H, W = 9, 9
    w = torch.rand(2, (H - 1) * W + H * (W - 1), generator=torch.Generator().manual_seed(5))
    mask = minimum_spanning_tree(w, H, W)
    centre, corner = bfs_tree(mask, H, W, "centre"), bfs_tree(mask, H, W, "corner")
    assert centre.depth <= corner.depth
    depth_of = {}
    for k, lv in enumerate(centre.levels):
        for v in lv.tolist():
            depth_of[v] = k
    for b in range(2):  # eccentricity of the root = ceil(diameter / 2): check against all BFS roots
        eccs = [bfs_tree(mask[b:b + 1], H, W, r).depth for r in range(H * W)]
        assert max(depth_of[b * H * W + v] for v in range(H * W)) == min(eccs)


# -- the filter -------------------------------------------------------------------------------
@pytest.mark.parametrize("root", ["centre", "corner"])
def test_filter_matches_brute_force(root):
    """The module's output on a 4x5 grid, recomputed from scratch: Kruskal on the guide
    distances, all-pairs path products, S·(f x) / S·f, the output projection."""
    H, W, C, G = 4, 5, 6, 3
    m = random_mixer(dim=C, groups=G, embed_dim=6, proj=True, root=root)
    x = randn(2, H, W, C)
    with torch.no_grad():
        out = m(x)
        for b in range(2):
            xb = x[b].reshape(H * W, C)
            e, g = m.embed(xb), m.guide(xb)
            ends = grid_edges(H, W)
            dg = ((g[ends[:, 0]] - g[ends[:, 1]]) ** 2)
            edges = kruskal(H, W, dg.sum(-1))
            de = ((e[ends[:, 0]] - e[ends[:, 1]]) ** 2)
            d = de.view(-1, G, 2).sum(-1) + dg.view(-1, G, 2).sum(-1) + m.beta ** 2  # (E, G)
            S = brute_force_affinity(H, W, edges, d)
            f = torch.sigmoid(m.conf(xb))  # (N, G)
            xg = xb.view(H * W, G, C // G)
            num = torch.einsum("gij,jg,jgc->igc", S, f, xg)
            den = torch.einsum("gij,jg->ig", S, f)
            y = m.proj((num / den[..., None]).reshape(H * W, C))
            torch.testing.assert_close(out[b].reshape(H * W, C), y, atol=1e-12, rtol=1e-10)
            A = m.affinity(x[b:b + 1])[0]
            torch.testing.assert_close(A, S * f.t()[:, None, :] / den.t()[:, :, None], atol=1e-12, rtol=1e-10)


def test_low_level_filter_is_the_path_product_sum_and_gradchecks():
    H, W, G, K = 3, 4, 2, 2
    E = (H - 1) * W + H * (W - 1)
    wts = torch.rand(1, E, generator=torch.Generator().manual_seed(7))
    mask = minimum_spanning_tree(wts, H, W)
    tree = bfs_tree(mask, H, W)
    d_edges = torch.rand(1, E, G, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = randn(H * W, G, K, seed=9).requires_grad_()
    dv = parent_edge_values(d_edges, tree).clone().requires_grad_()
    S = brute_force_affinity(H, W, mask[0].nonzero().flatten().tolist(), d_edges[0])
    torch.testing.assert_close(tree_filter(x, torch.exp(-dv), tree), torch.einsum("gij,jgk->igk", S, x))
    assert torch.autograd.gradcheck(lambda a, b: tree_filter(a, torch.exp(-b), tree), (x, dv))


def test_module_gradcheck():
    m = random_mixer(TreeFilterBlock, dim=4, groups=2, embed_dim=4)
    x = randn(1, 3, 3, 4, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))
    m.zero_grad()
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# -- the contract -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 5), (1, 1, 6), (1, 5, 1), (1, 1, 1), (2, 7, 3)])
@pytest.mark.parametrize("cls", [TreeFilterMixer, TreeFilterBlock])
def test_mixer_contract(shape, cls):
    B, H, W = shape
    kw = dict(proj=True) if cls is TreeFilterMixer else {}
    m = random_mixer(cls, dim=8, groups=4, embed_dim=8, **kw)
    x = randn(B, H, W, 8)
    torch.testing.assert_close(m.explicit_forward(x), m(x), atol=1e-10, rtol=0)
    A = m.affinity(x)
    assert A.shape == (B, 4, H * W, H * W) and m.affinity_kind == "dynamic" and m.exact_av
    torch.testing.assert_close(A.sum(-1), torch.ones(B, 4, H * W, dtype=A.dtype))
    assert (A > 0).all()  # a spanning tree connects everything
    assert m.values(x).shape == (B, H * W, 8)


def test_batch_is_independent_and_guide_option():
    m = random_mixer(TreeFilterBlock, dim=8, groups=2, guide_dim=3)
    x, guide = randn(3, 5, 4, 8), randn(3, 10, 8, 3, seed=2)  # the guide is pooled to 5 x 4
    out = m(x, guide)
    for b in range(3):
        torch.testing.assert_close(m(x[b:b + 1], guide[b:b + 1]), out[b:b + 1], atol=1e-12, rtol=0)
    torch.testing.assert_close(m.explicit_forward(x, guide), out, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="guide"):
        m(x)
    with pytest.raises(ValueError, match="guided by its input"):
        random_mixer(TreeFilterBlock, dim=8, groups=2)(x, guide)


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="divisible by groups"):
        TreeFilterMixer(10, groups=4)
    with pytest.raises(ValueError, match="embed_dim"):
        TreeFilterMixer(8, groups=4, embed_dim=6)
    with pytest.raises(ValueError, match="root"):
        TreeFilterMixer(8, groups=4, root="leaf")
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        TreeFilterMixer(8, groups=4)(torch.zeros(2, 5, 8))


def test_identity_at_init_and_meta_device():
    m = TreeFilterBlock(32)
    x = torch.randn(2, 6, 7, 32)
    torch.testing.assert_close(m(x), x)  # γ = 0
    with torch.device("meta"):
        mm = TreeFilterBlock(32)
        assert mm(torch.zeros(2, 6, 7, 32)).shape == (2, 6, 7, 32)


# -- ResNet-50 with the context module -----------------------------------------------------
def test_resnet50_overhead_authors_placement(monkeypatch):
    """After res3, res4, res5 (stages 1-3), 16 groups: +172,083 parameters self-guided
    (+143,411 with the authors' stage-input guide, the paper's +0.14M)."""
    entry = ctx.ContextModuleInfo(TreeFilterBlock, {"groups": 16}, "stage", (1, 2, 3),
                                  "LTF-v2 (16 groups) after res3, res4, res5")
    monkeypatch.setitem(ctx.CONTEXT_MODULES, "tree_filter", entry)
    with torch.device("meta"):
        base = mixlab.create_model("resnet50")
        tf = mixlab.create_model("resnet50", context="tree_filter")
        x = torch.zeros(1, 3, 224, 224)
        macs = count_macs(tf, x)[0] - count_macs(base, x)[0]
    assert count_params(tf) - count_params(base) == sum(3 * c * 16 + 16 + 1 for c in (512, 1024, 2048)) == 172083
    assert macs == sum(3 * c * 16 * n for c, n in ((512, 28 ** 2), (1024, 14 ** 2), (2048, 7 ** 2)))
    guided = sum(count_params(TreeFilterBlock(c, 16, guide_dim=c // 2)) for c in (512, 1024, 2048))
    assert guided == 143411
    small = mixlab.create_model("resnet50", context="tree_filter", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                                 stem_width=8, num_classes=5).eval()
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 5)


# -- the spec mixer -------------------------------------------------------------------------
def test_spec_mixer():
    torch.manual_seed(0)
    m = mixlab.create_model("spec:patch2 / treefilter:1x16:groups=4 / treefilter:1x32", img_size=16,
                            num_classes=3).double().eval()
    assert "tree filter" in m.stage_mixers[0]
    x = randn(2, 3, 16, 16)
    assert m(x).shape == (2, 3)
    mixers = [mod for mod in m.modules() if isinstance(mod, TreeFilterMixer)]
    assert [mx.groups for mx in mixers] == [4, 8]
    seen = mixer_calls(m, x, TreeFilterMixer)
    assert len(seen) == 2
    with torch.no_grad():
        for mx, inp, out in seen.values():
            torch.testing.assert_close(mx.explicit_forward(inp), out, atol=1e-10, rtol=0)
