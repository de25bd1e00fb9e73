"""Global context modules for CNNs (mixlab.layers.context, mixlab.mixers.context) and their
insertion into ResNet: shapes, gradients, the mixer contract, criss-cross against a brute-force
loop, identity at init, overheads on ResNet-50 (meta device) and the `mixlab info --set` option."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mixlab import create_model
from mixlab.analysis import profile_model
from mixlab.cli import main
from mixlab.layers.context import BAM, GatherExcite, SqueezeExcite
from mixlab.mixers.base import aggregate, flatten_tokens
from mixlab.mixers.context import (CONTEXT_MODULES, CrissCrossAttention, GlobalContextBlock, NonLocalBlock,
                                   context_spec)
from mixlab.models.resnet import ResNet

FACTORIES = {
    "se": lambda c: SqueezeExcite(c),
    "ge": lambda c: GatherExcite(c),
    "ge_extent2": lambda c: GatherExcite(c, extent=2),
    "ge_theta": lambda c: GatherExcite(c, extent=4, param=True),
    "bam": lambda c: BAM(c),
    "nonlocal": lambda c: NonLocalBlock(c),
    "crisscross": lambda c: CrissCrossAttention(c),
    "crisscross_r2": lambda c: CrissCrossAttention(c, recurrence=2),
    "gc": lambda c: GlobalContextBlock(c),
}


def _wake(m: torch.nn.Module) -> torch.nn.Module:
    """Randomise the zero-initialised parameters (NL's BN γ, CC's γ, GC's last layer) so that
    gradients reach every parameter and the blocks are not the identity."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, NonLocalBlock):
                mod.proj[1].weight.copy_(torch.rand(mod.proj[1].weight.shape, generator=g) + 0.5)
            if isinstance(mod, CrissCrossAttention):
                mod.gamma.fill_(0.7)
            if isinstance(mod, GlobalContextBlock):
                last = mod.transform[-1]
                last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.1)
                last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.1)
    return m


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_module_shape_and_gradients(name, hw):
    torch.manual_seed(0)
    m = _wake(FACTORIES[name](32))
    x = torch.randn(2, *hw, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname} gets no gradient"
    if name.startswith("ge") and name != "ge_theta":
        assert sum(p.numel() for p in m.parameters()) == 0  # GE-θ⁻ is parameter-free


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_ge_theta_global_extent_is_a_learned_weighted_sum_over_the_whole_map(hw):
    """GE-θ, global extent: one depthwise kernel of the map's size (a learned weight per channel
    and position) and BatchNorm gather a 1x1 map; its sigmoid gates every position."""
    C = 16
    torch.manual_seed(0)
    m = GatherExcite(C, extent=0, param=True, feat_size=hw)
    assert sum(p.numel() for p in m.parameters()) == C * hw[0] * hw[1] + 2 * C
    x = torch.randn(2, *hw, C, requires_grad=True)
    m.eval()  # fresh running statistics: BN(z) = z / sqrt(1 + eps)
    with torch.no_grad():
        w = m.gather[0].weight[:, 0]  # (C, h, w)
        z = torch.einsum("bhwc,chw->bc", x, w) / (1 + m.gather[1].eps) ** 0.5
        torch.testing.assert_close(m(x), x * z.sigmoid()[:, None, None, :])
    m.train()  # batch statistics
    (m(x) * torch.randn(2, *hw, C)).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match=rf"built for {hw[0]}x{hw[1]} maps, got 9x9"):
        m(torch.randn(1, 9, 9, C))
    with pytest.raises(ValueError, match="needs feat_size"):
        GatherExcite(C, extent=0, param=True)


def test_ge_theta_global_in_resnet50_follows_the_stage_sizes():
    """Each bottleneck's kernel covers its stage's map (56, 28, 14, 7 at 224; rounded up for odd
    sizes, as the stem and strides do): ResNet-50 + GE-θ global has 31.11M parameters."""
    with torch.device("meta"):
        m = create_model("resnet50", context="ge_theta_global")
        odd = create_model("resnet50", context="ge_theta_global", img_size=(100, 90))
    sizes = [blk.context.feat_size for st in m.stages for blk in st.blocks]
    assert sizes == [(56, 56)] * 3 + [(28, 28)] * 4 + [(14, 14)] * 6 + [(7, 7)] * 3
    per_stage = ((3, 256, 56, 56), (4, 512, 28, 28), (6, 1024, 14, 14), (3, 2048, 7, 7))  # blocks, C, h, w
    extra = sum(n * (c * h * w + 2 * c) for n, c, h, w in per_stage)  # kernel and BN per bottleneck
    assert sum(p.numel() for p in m.parameters()) == 25_557_032 + extra == 31_106_600
    assert [st.blocks[0].context.feat_size for st in odd.stages] == [(25, 23), (13, 12), (7, 6), (4, 3)]


def test_rejects_nchw_or_tokens():
    with pytest.raises(ValueError, match="channels-last"):
        NonLocalBlock(8)(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="power of two"):
        GatherExcite(8, extent=3, param=True)


# -- the mixer contract -------------------------------------------------------------------------
MIXERS = {"nonlocal": lambda c: NonLocalBlock(c), "nonlocal_subsample": lambda c: NonLocalBlock(c, subsample=True),
          "crisscross": lambda c: CrissCrossAttention(c),
          "crisscross_r2": lambda c: CrissCrossAttention(c, recurrence=2), "gc": lambda c: GlobalContextBlock(c)}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    torch.manual_seed(0)
    m = _wake(MIXERS[name](16)).double().eval()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    A = m.affinity(x)
    N = 35
    M = 3 * 4 if name == "nonlocal_subsample" else N  # 2x2 max-pooled keys and values, odd sizes rounded up
    assert A.shape == (2, 1, N, M)
    assert m.affinity_kind == "dynamic"
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 1, N, dtype=torch.float64))
    assert m.values(x).shape[:2] == (2, M)
    torch.testing.assert_close(m.explicit_forward(x), m(x), rtol=1e-10, atol=1e-10)
    assert m.exact_av == (name != "crisscross_r2")
    if m.exact_av:  # a single pass: forward is project(A·V) literally
        torch.testing.assert_close(m.project(aggregate(A, m.values(x)), x), m(x), rtol=1e-10, atol=1e-10)


def test_non_local_subsampling_reads_max_pooled_keys_and_values():
    """The subsampling trick: φ and g max-pooled 2x2 (every position in some window), the same
    weights as the full block; a quarter of the attention products."""
    torch.manual_seed(0)
    full = _wake(NonLocalBlock(16)).double().eval()
    sub = NonLocalBlock(16, subsample=True).double().eval()
    sub.load_state_dict(full.state_dict())
    x = torch.randn(2, 6, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        q = full.theta(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        k = torch.nn.functional.pad(full.phi(x.permute(0, 3, 1, 2)), (0, 1), value=float("-inf"))
        v = torch.nn.functional.pad(full.g(x.permute(0, 3, 1, 2)), (0, 1), value=float("-inf"))
        pool = lambda t: t.unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2)).flatten(2)  # noqa: E731
        y = (q @ pool(k)).softmax(-1) @ pool(v).transpose(1, 2)
        torch.testing.assert_close(sub(x), full.project(y, x))
    from mixlab.analysis import count_macs
    B, N, M, inner = 2, 30, 9, 8  # 6x5 queries, 3x3 pooled keys, C/2 channels
    saved = count_macs(full, x)[0] - count_macs(sub, x)[0]
    assert saved == 2 * B * N * inner * (N - M)  # both products, (N x C/2)(C/2 x M) and (N x M)(M x C/2)


def test_criss_cross_affinity_is_row_and_column():
    torch.manual_seed(0)
    H, W = 4, 6
    m = _wake(CrissCrossAttention(16)).double()
    A = m.affinity(torch.randn(2, H, W, 16, dtype=torch.float64))[:, 0]
    hs, ws = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    cross = (hs[:, None] == hs[None, :]) | (ws[:, None] == ws[None, :])  # (N, N): same row or same column
    assert (A[:, ~cross] == 0).all()
    assert (A[:, cross] > 0).all()
    assert (cross.sum(-1) == H + W - 1).all()


def test_criss_cross_matches_brute_force_loop():
    torch.manual_seed(0)
    H, W, C = 3, 5, 16
    m = _wake(CrissCrossAttention(C)).double()
    x = torch.randn(2, H, W, C, dtype=torch.float64)
    xc = x.permute(0, 3, 1, 2)
    q, k, v = m.query(xc), m.key(xc), m.value(xc)
    out = torch.empty_like(x)
    for b in range(2):
        for i in range(H):
            for j in range(W):
                keys = [(r, j) for r in range(H) if r != i] + [(i, c) for c in range(W)]  # H + W - 1 positions
                e = torch.stack([q[b, :, i, j] @ k[b, :, r, c] for r, c in keys])
                a = e.softmax(0)
                agg = sum(a[n] * v[b, :, r, c] for n, (r, c) in enumerate(keys))
                out[b, i, j] = x[b, i, j] + m.gamma * agg
    torch.testing.assert_close(m(x), out, rtol=1e-10, atol=1e-10)


def test_global_context_affinity_rows_are_one_softmax_map():
    torch.manual_seed(0)
    m = _wake(GlobalContextBlock(16)).double()
    x = torch.randn(2, 4, 6, 16, dtype=torch.float64)
    A = m.affinity(x)
    torch.testing.assert_close(A, A[:, :, :1].expand_as(A))  # every query has the same row
    torch.testing.assert_close(A[:, 0, 0], m.attn(x.permute(0, 3, 1, 2)).flatten(1).softmax(-1))
    assert torch.linalg.matrix_rank(A[0, 0]) == 1


def test_gather_excite_global_gather_is_uniform_av():
    torch.manual_seed(0)
    m = GatherExcite(16)
    x = torch.randn(2, 6, 10, 16, dtype=torch.float64)
    A = m.gather_affinity(x)
    assert A.shape == (2, 1, 60, 60) and torch.all(A == 1 / 60)
    gathered = aggregate(A, flatten_tokens(x)).reshape(x.shape)
    torch.testing.assert_close(gathered, x.mean(dim=(1, 2), keepdim=True).expand_as(x))
    torch.testing.assert_close(m(x), x * gathered.sigmoid())
    with pytest.raises(NotImplementedError):
        GatherExcite(16, extent=2).gather_affinity(x)


@pytest.mark.parametrize("cls", [NonLocalBlock, CrissCrossAttention, GlobalContextBlock])
def test_residual_blocks_are_identity_at_init(cls):
    torch.manual_seed(0)
    kw = {"recurrence": 2} if cls is CrissCrossAttention else {}
    m = cls(32, **kw)
    x = torch.randn(2, 6, 10, 32)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_se_and_bam_are_the_papers_gates():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 32)
    se = SqueezeExcite(32)
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((1, 2))))))
    torch.testing.assert_close(se(x), x * s[:, None, None])
    bam = BAM(32).eval()
    att = bam.attention(x)
    assert att.shape == x.shape
    torch.testing.assert_close(bam(x), x + x * att)
    assert bam.spatial[3].dilation == (4, 4) and bam.spatial[6].dilation == (4, 4)


# -- insertion into ResNet ----------------------------------------------------------------------
def _tiny(**kw):
    return ResNet(**{**dict(depths=(1, 1, 1, 1), widths=(8, 16, 16, 16), stem_width=8, num_classes=5), **kw})


# every module after a stage; inside every bottleneck those the papers put there (and one mixer)
INSERTIONS = ([(n, "stage") for n in CONTEXT_MODULES]
              + [(n, "block") for n in ("se", "ge", "ge_theta", "ge_theta_global", "gc", "nonlocal")])


@pytest.mark.parametrize("name,placement", INSERTIONS)
def test_insertion_into_tiny_resnet(name, placement):
    # the tree filter's edge term needs edges: a 2x2 map in the last stage, not 1x1
    size = 64 if name == "tree_filter" else 32
    torch.manual_seed(0)
    model = _wake(_tiny(context=name, context_stages=(1, 3), context_placement=placement, img_size=size))
    ctx_keys = [k for k in model.state_dict() if ".context." in k]
    if name not in ("ge",):  # GE-θ⁻ has no parameters
        assert ctx_keys and all(k.startswith(("stages.1.", "stages.3.")) for k in ctx_keys)
        if placement == "block":
            assert all(".blocks.0.context." in k for k in ctx_keys)
        else:
            assert all(k.split(".")[2] == "context" for k in ctx_keys)
    x = torch.randn(2, 3, size, size)
    y = model(x)
    assert y.shape == (2, 5)
    y.sum().backward()
    for k, p in model.named_parameters():
        if ".context." in k:
            assert p.grad is not None, k
    assert "+ " + name in model.stage_mixers[1] and "+" not in model.stage_mixers[0]
    feats = model.forward_intermediates(x)
    assert [f.shape[1] for f in feats] == [32, 64, 64, 64]


def test_context_keeps_its_own_init():
    torch.manual_seed(0)
    model = _tiny(context="gc")
    for blk in (s.blocks[0] for s in model.stages):
        assert torch.all(blk.context.transform[-1].weight == 0)
    torch.manual_seed(0)
    model = _tiny(context="nonlocal", context_stages=[2])
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = _tiny()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".context." not in k})
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))  # zero-init W_z BN: the block is the identity


@pytest.mark.parametrize("name", ["bam", "nonlocal", "ge_theta", "ge_theta_global"])
def test_fuse_folds_context_batchnorms(name):
    torch.manual_seed(0)
    model = _wake(_tiny(context=name, context_placement="stage", img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    torch.testing.assert_close(model.fuse()(x), y, rtol=1e-5, atol=1e-5)


# the fingerprint of resnet50 built by the code before context modules existed (git HEAD, seed 0)
RESNET50_KEYS_SHA256 = "2e00a587a9b048c7c4f41f7dc4222ea491e5c14b5f26d591618d9a69e4da5a77"
RESNET50_SUMSQ_SEED0 = 83386.7592754703


def test_plain_resnet50_is_unchanged():
    torch.manual_seed(0)
    model = create_model("resnet50")
    sd = model.state_dict()
    assert len(sd) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    keys = hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items()).encode()).hexdigest()
    assert keys == RESNET50_KEYS_SHA256
    sumsq = sum(float(v.double().pow(2).sum()) for v in sd.values() if v.is_floating_point())
    assert sumsq == pytest.approx(RESNET50_SUMSQ_SEED0, rel=1e-9)
    assert all(b.context is None for s in model.stages for b in s.blocks)
    assert model.stage_mixers == ["dense conv 3x3 (bottleneck)"] * 4


def _blocks_chs():
    return [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3  # output channels of resnet50's bottlenecks


BASE = 25_557_032


def test_overheads_on_resnet50_meta():
    stage_chs = (256, 512, 1024, 2048)
    cases = [
        # SE-ResNet-50, r = 16 in every bottleneck: 28.09M in the SE paper
        (dict(context="se"), sum(2 * c * (c // 16) + c // 16 + c for c in _blocks_chs())),
        (dict(context="ge"), 0),
        # BAM after stages 0-2 (i = C/16): channel MLP 2Ci + 2i + C (BN1d incl.), spatial Ci + 18i² + 7i + 1
        (dict(context="bam"), sum(3 * c * (c // 16) + 18 * (c // 16) ** 2 + 9 * (c // 16) + c + 1
                                   for c in stage_chs[:3])),
        # one non-local block after res4 (the seed's "+Non-Local, stage 4": +2.09M)
        (dict(context="nonlocal", context_stages=(2,)), 4 * 1024 * 512 + 2 * 512 + 2 * 1024),
        # criss-cross after res3, res4, res5 (the seed's "+CCNet, 345": +6.88M)
        (dict(context="crisscross", context_stages=(1, 2, 3)),
         sum(2 * c * (c // 8) + c // 8 + c * c + c + 1 for c in stage_chs[1:])),
        # GC r4 in every bottleneck of res3-res5 (the seed's "+GCNet": +10.0M)
        (dict(context="gc", context_stages=(1, 2, 3), context_args={"ratio": 0.25}),
         sum(c + 2 * c * (c // 4) + c // 4 + 2 * (c // 4) + c for c in _blocks_chs()[3:])),
        # LTF-v2 after res3, res4, res5, 16 groups, self-guided: three 1x1 embeddings C -> 16 (features,
        # confidence, guide), 16 edge biases β, the residual γ (the paper's guided version: +0.14M)
        (dict(context="tree_filter"), sum(3 * 16 * c + 16 + 1 for c in stage_chs[1:])),
    ]
    for kw, extra in cases:
        with torch.device("meta"):
            model = create_model("resnet50", **kw)
        assert sum(p.numel() for p in model.parameters()) == BASE + extra, kw
    # MACs of the non-local block at 14x14: four 1x1 convs (C x C/2) and two N x N x C/2 products
    plain, nl = profile_model("resnet50"), profile_model("resnet50", context="nonlocal", context_stages=[2])
    n, c = 14 * 14, 1024
    assert nl.macs - plain.macs == 4 * n * c * (c // 2) + 2 * n * n * (c // 2)


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown context module 'senet'.*se, ge, ge_theta, ge_theta_global, bam, nonlocal"):
        create_model("resnet50", context="senet")
    with pytest.raises(ValueError, match=r"context stage 4 is out of range.*4 stages \(0\.\.3\)"):
        _tiny(context="se", context_stages=[1, 4])
    with pytest.raises(ValueError, match="need a context module"):
        _tiny(context_stages=[1])
    with pytest.raises(ValueError, match="unknown context_placement"):
        _tiny(context="se", context_placement="everywhere")
    with pytest.raises(TypeError, match="context_stage"):  # a misspelt option: build() suggests the name
        create_model("resnet50", context_stage=[1])
    assert context_spec("gc", -1).stages == (3,)


def test_info_set_passes_model_options(capsys):
    assert main(["info", "resnet50", "--set", "context=nonlocal", "--set", "context_stages=[2]", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == BASE + 4 * 1024 * 512 + 2 * 512 + 2 * 1024
    assert "nonlocal" in [p for p in d["parts"] if p["name"] == "stages.2"][0]["mixer"]
    assert main(["info", "resnet50", "--set", "context=gc", "--set", "context_args={ratio: 0.25}"]) == 0
    out = capsys.readouterr().out
    assert "context=gc" in out.splitlines()[0] and "gc in every block" in out
    assert main(["info", "resnet50", "--set", "context=se", "--set", "context_stages=[7]"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["info", "resnet50", "--set", "context"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_context_modules_in_spec_models():
    """Any CNN written as a specification takes a context module after a stage (``context=NAME``), which keeps
    its own initialisation (GC's zero-initialised last layer makes it the identity at first)."""
    torch.manual_seed(0)
    m = create_model("spec:conv2 / basic:1x16 / basic:1x32:context=gc", img_size=32, num_classes=3)
    gc = m.stages[1].blocks[-1]
    assert isinstance(gc, GlobalContextBlock) and "context=gc" in m.stage_mixers[1]
    assert gc.transform[-1].weight.abs().sum() == 0
    x = torch.randn(2, 32, 8, 8).permute(0, 2, 3, 1)
    torch.testing.assert_close(gc(x), x)
    y = m(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    with pytest.raises(ValueError, match="context 'senet' is not one of none, se, ge"):
        create_model("spec:conv2 / basic:1x16:context=senet", img_size=32)


@pytest.mark.parametrize("mixer", ["basic", "bottleneck"])
def test_context_modules_inside_every_block_of_a_spec_stage(mixer):
    """``context_placement=block``: one module on the residual branch of every basic or bottleneck
    block of the stage (an SE-ResNet-18 in the spec language), keeping its own initialisation; the
    stage-size ones get the stage's map size; the block's output is relu(context(branch) + shortcut)."""
    torch.manual_seed(0)
    m = create_model(f"spec:conv2 / {mixer}:2x16:context=gc,context_placement=block / "
                     f"{mixer}:2x32:context=ge_theta_global,context_placement=block", img_size=32, num_classes=3)
    blocks = [b for st in m.stages for b in st.blocks]
    assert len(blocks) == 4 and all(b.context is not None for b in blocks)  # nothing appended after the stages
    assert all(isinstance(b.context, GlobalContextBlock) and b.context.transform[-1].weight.abs().sum() == 0
               for b in blocks[:2])
    assert [b.context.feat_size for b in blocks[2:]] == [(8, 8), (8, 8)]
    assert "context=gc in every block" in m.stage_mixers[0]
    blk = _wake(blocks[0]).eval()
    x = torch.randn(2, 16, 16, 16)  # (B, H, W, C), the stage's input
    with torch.no_grad():
        branch = blk.branch(x.permute(0, 3, 1, 2))
        shortcut = x.permute(0, 3, 1, 2) if blk.downsample is None else blk.downsample(x.permute(0, 3, 1, 2))
        ref = torch.relu(blk.context(branch.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + shortcut)
        torch.testing.assert_close(blk(x), ref.permute(0, 2, 3, 1))
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match="not of convnext; use context_placement=stage"):
        create_model("spec:conv2 / convnext:1x16:context=se,context_placement=block", img_size=32)
    with pytest.raises(ValueError, match="needs a context module"):
        create_model(f"spec:conv2 / {mixer}:1x16:context_placement=block", img_size=32)
