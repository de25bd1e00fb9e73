"""RepLKNet (Ding et al., CVPR 2022): the large-kernel mixer against the mixer contract before
and after re-parameterization, re-parameterization and fusion of whole models, the published
sizes, the model API on a tiny configuration, the authors' checkpoint layout (against an NCHW
re-implementation of their network with their module names) and the ``largekernel`` spec mixer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixlab
import mixlab.models.replknet  # noqa: F401  (registers the model, the spec mixer and the layout)
from mixlab.analysis import count_params, profile_model
from mixlab.mixers.base import conv_toeplitz
from mixlab.mixers.large_kernel import ReparamLargeKernelConv
from mixlab.models.base import FeatureExtractor
from mixlab.models.replknet import RepLKNet, reparameterize
from mixlab.weights import convert_state_dict, detect_format
from test_parity import randomize_

C = 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)


def prepared(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, random weights and BatchNorm statistics (scales away from 1)."""
    torch.manual_seed(seed)
    return randomize_(module, seed).double().eval()


def bn_scale_shift(bn: nn.BatchNorm2d):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


# --------------------------------------------------------------------------------------------
# the mixer: two branches, then one kernel
# --------------------------------------------------------------------------------------------
CASES = [(7, 3, (2, 6, 7, C)), (13, 5, (2, 9, 8, C)), (9, 5, (1, 4, 5, C)), (5, None, (2, 6, 6, C))]
IDS = ["7+3", "13+5", "9+5-map-smaller-than-kernel", "5-no-small-branch"]


@pytest.mark.parametrize("k, small, shape", CASES, ids=IDS)
def test_unmerged_mixer_is_the_sum_of_two_toeplitz_matrices(k, small, shape):
    m = prepared(ReparamLargeKernelConv(C, k, small))
    x = torch.randn(shape, dtype=torch.float64)
    B, H, W, _ = shape
    with torch.no_grad():
        y = m(x)
        A = m.affinity(x)
        close(m.explicit_forward(x), y)
        # the affinity written out from the parameters: T(s_K·w_K) + T(s_k·w_k)
        sL, tL = bn_scale_shift(m.large.bn)
        expected = conv_toeplitz(m.large.conv.weight * sL.reshape(-1, 1, 1, 1), H, W)
        bias = tL
        if small:
            sS, tS = bn_scale_shift(m.small.bn)
            expected = expected + conv_toeplitz(m.small.conv.weight * sS.reshape(-1, 1, 1, 1), H, W)
            bias = bias + tS
        close(A, expected.expand(B, -1, -1, -1))
        close(m.project(torch.zeros(B, H * W, C, dtype=torch.float64), x), bias.expand(B, H, W, C))
    assert A.shape == (B, C, H * W, H * W)
    assert m.affinity_kind == "static" and m.exact_av and not m.reparameterized


@pytest.mark.parametrize("k, small, shape", CASES, ids=IDS)
def test_reparameterized_mixer_is_one_toeplitz_matrix_and_the_same_operator(k, small, shape):
    m = prepared(ReparamLargeKernelConv(C, k, small))
    x = torch.randn(shape, dtype=torch.float64)
    B, H, W, _ = shape
    with torch.no_grad():
        y, A = m(x), m.affinity(x)
        m.reparameterize()
        assert m.reparameterized and m.large is None and m.small is None
        assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
        assert [n for n, _ in m.named_parameters()] == ["merged.weight", "merged.bias"]
        assert m.merged.kernel_size == (k, k) and m.merged.groups == C
        close(m(x), y)
        close(m.affinity(x), A)
        close(m.affinity(x)[0], conv_toeplitz(m.merged.weight, H, W))
        close(m.explicit_forward(x), m(x))
        m.reparameterize()  # a second call changes nothing
        close(m(x), y)


def test_merged_kernel_is_the_small_kernel_added_at_the_centre():
    m = prepared(ReparamLargeKernelConv(C, 7, 3))
    with torch.no_grad():
        sL, tL = bn_scale_shift(m.large.bn)
        sS, tS = bn_scale_shift(m.small.bn)
        wL = m.large.conv.weight * sL.reshape(-1, 1, 1, 1)
        wS = m.small.conv.weight * sS.reshape(-1, 1, 1, 1)
        m.reparameterize()
    w = m.merged.weight
    close(w[:, :, 2:5, 2:5], wL[:, :, 2:5, 2:5] + wS)
    ring = torch.ones(7, 7, dtype=torch.bool)
    ring[2:5, 2:5] = False
    close(w[:, :, ring], wL[:, :, ring])
    close(m.merged.bias, tL + tS)


def test_mixer_training_mode_and_errors():
    m = ReparamLargeKernelConv(C, 7, 3)
    x = torch.randn(4, 6, 6, C)
    y = m(x)  # training mode: the BatchNorms use the batch's statistics
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(RuntimeError, match="eval"):
        m.reparameterize()
    with pytest.raises(ValueError, match="odd"):
        ReparamLargeKernelConv(C, 8, 3)
    with pytest.raises(ValueError, match="odd"):
        ReparamLargeKernelConv(C, 7, 4)
    with pytest.raises(ValueError, match="larger"):
        ReparamLargeKernelConv(C, 5, 7)


# --------------------------------------------------------------------------------------------
# published size
# --------------------------------------------------------------------------------------------
def test_published_size():
    """The paper's (and the authors' README's) 79M / 15.3G are the re-parameterized
    network's figures; trained with its small branches the network has 79.9M parameters
    (mmpretrain's model zoo: 79.9M train / 79.5M deploy, 15.6G / 15.4G by mmcv's counter)."""
    deploy = profile_model("replknet_31b", reparameterized=True)
    assert abs(deploy.mparams / 79 - 1) < 0.01, deploy.mparams
    assert abs(deploy.gmacs / 15.3 - 1) < 0.05, deploy.gmacs
    train = profile_model("replknet_31b")
    assert abs(train.mparams / 79.9 - 1) < 0.01, train.mparams
    assert abs(train.gmacs / 15.3 - 1) < 0.05, train.gmacs
    # each block adds a 5x5 kernel and two BatchNorms per channel; after merging, a bias
    dw = sum(n * d * (25 + 4 - 1) for n, d in zip((2, 2, 18, 2), (128, 256, 512, 1024)))
    assert train.params - deploy.params == dw
    with torch.device("meta"):
        merged = mixlab.create_model("replknet_31b").eval().reparameterize()
    assert count_params(merged) == deploy.params
    assert mixlab.registry.model_family("replknet_31b") == "replknet"


# --------------------------------------------------------------------------------------------
# the model API and re-parameterization on a tiny configuration
# --------------------------------------------------------------------------------------------
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), kernel_sizes=(13, 11, 7, 5), small_kernel=3, num_classes=10)


def tiny(**kw):
    torch.manual_seed(0)
    return RepLKNet(**{**TINY, **kw})


def test_tiny_model_api():
    model = tiny()
    assert count_params(model) < 1_000_000
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        torch.testing.assert_close(model(x), logits)
        maps = model.forward_intermediates(x)
        assert model(torch.randn(1, 3, 50, 50)).shape == (1, 10)  # odd maps: stride-2 convs round up
    assert feats.shape == (2, 2, 2, 48) and logits.shape == (2, 10)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4), (2, 48, 2, 2)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32] and model.min_input_size == 32
    fx = FeatureExtractor(tiny(), out_indices=(0, 2)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in fx(x)] == [16, 32]
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([3, 4]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.reset_classifier(0)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 48)
    with torch.no_grad():
        assert tiny(in_chans=1).eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert detect_format(model.state_dict()) == "mixlab"
    assert model.stage_mixers[0] == "large-kernel depthwise conv 13x13 + 3x3 (re-parameterizable)"
    # a pair of blocks per depth unit: RepLK then ConvFFN
    assert [type(b).__name__ for b in model.stages[2].blocks] == ["RepLKBlock", "ConvFFN"] * 2


def test_reparameterize_and_fuse_keep_the_outputs():
    model = randomize_(tiny(), 7)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="eval"):
        model.reparameterize()
    model.eval()
    with torch.no_grad():
        before = model(x)
        n_before = count_params(model)
        assert model.reparameterize() is model
        merged = model(x)
        assert model.fuse() is model
        fused = model(x)
    scale = before.abs().max().item()
    assert before.std() > 1e-2 * scale
    assert (merged - before).abs().max().item() <= 1e-4 * scale
    assert (fused - before).abs().max().item() <= 1e-4 * scale
    mixers = [m for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert len(mixers) == 5 and all(m.reparameterized for m in mixers)
    # merged: each mixer lost its small kernel and its two BatchNorms, gained a bias
    assert n_before - count_params(tiny().eval().reparameterize()) == sum(
        m.dim * (9 + 4 - 1) for m in mixers)
    # fused: only the final BatchNorm before pooling is left
    assert [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == ["norm"]


def test_reparameterized_weights_load_into_a_model_built_merged():
    model = randomize_(tiny(), 2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.reparameterize()
        expected = model(x)
    deploy = tiny(reparameterized=True).eval()
    assert deploy.state_dict().keys() == model.state_dict().keys()
    deploy.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), expected)


def test_fuse_then_reparameterize_compose():
    """``MixlabModel.fuse``'s plain BatchNorm folding first (branches carry a bias), then
    re-parameterization: the same operator."""
    model = randomize_(tiny(), 4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        mixlab.models.base.MixlabModel.fuse(model)  # folds each branch's BN into its conv
        assert model.stages[0].blocks[0].mixer.large.conv.bias is not None
        after = model.reparameterize()(x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


# --------------------------------------------------------------------------------------------
# the authors' layout: an NCHW network with their module names, written from their code
# --------------------------------------------------------------------------------------------
def _cb(cin, cout, k, stride=1, groups=1, relu=False, merged=False):
    if merged:
        return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    if relu:
        seq.add_module("nonlinear", nn.ReLU())
    return seq


class _RefLK(nn.Module):
    def __init__(self, c, k, small, merged):
        super().__init__()
        if merged:
            self.lkb_reparam = _cb(c, c, k, groups=c, merged=True)
        else:
            self.lkb_origin = _cb(c, c, k, groups=c)
            self.small_conv = _cb(c, c, small, groups=c)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        return self.lkb_origin(x) + self.small_conv(x)


class _RefRepLKBlock(nn.Module):
    def __init__(self, c, k, small, merged):
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(c)
        self.pw1 = _cb(c, c, 1, relu=True)
        self.large_kernel = _RefLK(c, k, small, merged)
        self.pw2 = _cb(c, c, 1)

    def forward(self, x):
        return x + self.pw2(F.relu(self.large_kernel(self.pw1(self.prelkb_bn(x)))))


class _RefConvFFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(c)
        self.pw1, self.pw2 = _cb(c, 4 * c, 1), _cb(4 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(F.gelu(self.pw1(self.preffn_bn(x))))


class _RefRepLKNet(nn.Module):
    def __init__(self, depths, dims, kernels, small, merged=False, num_classes=10):
        super().__init__()
        w = dims[0]
        self.stem = nn.ModuleList([_cb(3, w, 3, 2, relu=True), _cb(w, w, 3, 1, w, relu=True), _cb(w, w, 1, relu=True),
                                   _cb(w, w, 3, 2, w, relu=True)])
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, (d, c, k) in enumerate(zip(depths, dims, kernels)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList([blk for _ in range(d) for blk in (_RefRepLKBlock(c, k, small, merged),
                                                                            _RefConvFFN(c))])
            self.stages.append(stage)
            if i < len(depths) - 1:
                self.transitions.append(nn.Sequential(_cb(c, dims[i + 1], 1, relu=True),
                                                      _cb(dims[i + 1], dims[i + 1], 3, 2, dims[i + 1], relu=True)))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for layer in self.stem:
            x = layer(x)
        for i, stage in enumerate(self.stages):
            for blk in stage.blocks:
                x = blk(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.head(self.norm(x).mean((2, 3)))


@pytest.mark.parametrize("merged", [False, True], ids=["training-time", "re-parameterized"])
def test_authors_checkpoint_converts_and_gives_the_same_logits(merged):
    torch.manual_seed(0)
    ref = randomize_(_RefRepLKNet(TINY["depths"], TINY["dims"], TINY["kernel_sizes"], 3, merged), 9).double().eval()
    sd = ref.state_dict()
    assert detect_format(sd) == "authors-replknet"
    model = tiny(reparameterized=merged).double().eval()
    model.load_state_dict(convert_state_dict(sd, model), strict=True)
    for size in (64, 96):
        x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            a, b = model(x), ref(x)
        close(a, b, atol=1e-9 * b.abs().max().item())
        assert b.std() > 1e-2 * b.abs().max()


# --------------------------------------------------------------------------------------------
# specifications
# --------------------------------------------------------------------------------------------
NANO = "conv2 / largekernel:2x40:kernel=13 / largekernel:3x80:kernel=13 / largekernel:3x160:kernel=7"


def test_nano_spec_trains_one_step_and_reparameterizes():
    spec = "spec:" + NANO
    with torch.device("meta"):
        for size, chans in ((32, 3), (28, 1)):
            n = count_params(mixlab.create_model(spec, img_size=size, in_chans=chans, num_classes=10))
            assert 1.1e6 <= n <= 1.3e6, n
    torch.manual_seed(0)
    model = mixlab.create_model(spec, img_size=32, num_classes=10)
    mixers = [m for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert [m.kernel_size for m in mixers] == [13] * 5 + [7] * 3 and all(m.small_kernel == 5 for m in mixers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in model.parameters())
    opt.step()
    assert F.cross_entropy(model(x), y).item() != loss.item()
    model.eval()
    with torch.no_grad():
        before = model(x)
        after = reparameterize(model)(x)
    assert all(m.reparameterized for m in mixers)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    gray = mixlab.create_model(spec, img_size=28, in_chans=1, num_classes=10)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_spec_mixer_options():
    from mixlab.registry import MIXERS
    assert MIXERS["largekernel"].options == {"kernel": 13, "small": 5}
    m = mixlab.create_model("spec:patch2 / largekernel:1x16:kernel=9,small=0", img_size=16, num_classes=3)
    mixer = m.stages[0].blocks[0][0].mixer
    assert mixer.kernel_size == 9 and mixer.small is None
    assert m.stage_mixers[0].endswith("(kernel=9, small=0)")
