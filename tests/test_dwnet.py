"""DWNet and dynamic DWNet (Han et al., ICLR 2022): the dynamic depthwise convolution and the
DWNet unit against the mixer contract, the published sizes, the model API on a tiny
configuration, BatchNorm folding, the authors' checkpoint layout (against an NCHW
re-implementation of their network written from their paper and code), and the spec mixers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixlab
import mixlab.models.dwnet  # noqa: F401  (registers the models, spec mixers and layout)
from mixlab.analysis import count_params, profile_model
from mixlab.mixers.base import conv_toeplitz
from mixlab.mixers.dwnet import DWNetMixer
from mixlab.mixers.dynamic_conv import DynamicDepthwiseConv
from mixlab.models.base import FeatureExtractor
from mixlab.models.dwnet import DWNet
from mixlab.weights import convert_state_dict, detect_format
from test_parity import randomize_

C = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)


def prepared(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, every weight, bias and BatchNorm statistic random (no zero bias,
    no identity-like BatchNorm hides a term)."""
    torch.manual_seed(seed)
    return randomize_(module, seed).double().eval()


# --------------------------------------------------------------------------------------------
# the dynamic depthwise convolution
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, shape, bias", [(3, (2, 5, 6, C), True), (7, (3, 7, 9, C), True),
                                            (5, (2, 4, 4, C), False), (7, (2, 3, 3, C), True)],
                         ids=["k3", "k7", "k5-nobias", "k7-map-smaller-than-kernel"])
def test_dynamic_dwconv_is_exactly_av(k, shape, bias):
    m = prepared(DynamicDepthwiseConv(C, k, bias=bias))
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        A = m.affinity(x)
        close(m.explicit_forward(x), y)
    B, H, W, _ = shape
    assert y.shape == x.shape
    assert A.shape == (B, C, H * W, H * W) and A.dtype == torch.float64
    assert m.affinity_kind == "dynamic" and m.exact_av


def test_dynamic_dwconv_affinity_is_the_toeplitz_matrix_of_each_samples_kernel():
    m = prepared(DynamicDepthwiseConv(C, 5))
    x = torch.randn(3, 6, 7, C, dtype=torch.float64)
    with torch.no_grad():
        A = m.affinity(x)
        kernels = m.kernels(x)
        for b in range(3):
            close(A[b], conv_toeplitz(kernels[b].unsqueeze(1), 6, 7))
            # and the kernel is what the generator makes of this sample alone (eval mode)
            close(kernels[b], m.kernels(x[b:b + 1])[0])
    # dynamic: the samples get different kernels, so different affinities
    assert (A[0] - A[1]).abs().max() > 1e-3
    # the centre row of an interior position holds the k x k taps around it
    i = 3 * 7 + 3
    row = A[0, :, i].reshape(C, 6, 7)
    close(row[:, 1:6, 1:6], kernels[0])


def test_dynamic_dwconv_matches_a_per_sample_convolution_in_training_mode_too():
    """Training mode: the generator's BatchNorm normalises over the batch; forward, the
    explicit A·V and a per-sample loop of ordinary convolutions agree."""
    torch.manual_seed(0)
    m = DynamicDepthwiseConv(C, 3).double().train()
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(4, 5, 5, C, dtype=torch.float64)
    y = m(x)
    k = m.kernels(x)
    loop = torch.cat([F.conv2d(x[b:b + 1].permute(0, 3, 1, 2), k[b].unsqueeze(1), m.bias, padding=1, groups=C)
                      for b in range(4)]).permute(0, 2, 3, 1)
    close(y, loop)
    close(m.explicit_forward(x), y)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_dynamic_dwconv_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        DynamicDepthwiseConv(C, 4)


# --------------------------------------------------------------------------------------------
# the DWNet unit (1x1, BN, ReLU, dwconv, BN, ReLU, 1x1, BN)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("shape", [(2, 6, 7, C), (2, 9, 9, C)], ids=["6x7", "9x9"])
def test_dwnet_unit_is_exactly_av(dynamic, shape):
    m = prepared(DWNetMixer(C, 7, dynamic=dynamic))
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        A = m.affinity(x)
        close(m.explicit_forward(x), y)
    B, H, W, _ = shape
    assert A.shape == (B, C, H * W, H * W)
    assert m.affinity_kind == ("dynamic" if dynamic else "static") and m.exact_av
    same = torch.allclose(A[0], A[1])
    assert same != dynamic  # static: one matrix for all samples; dynamic: one per sample
    if not dynamic:
        close(A[0], conv_toeplitz(m.conv.conv.weight, H, W))


def test_dwnet_unit_layer_order():
    """The unit written out with plain functional calls in the authors' order."""
    m = prepared(DWNetMixer(C, 7))
    x = torch.randn(2, 8, 8, C, dtype=torch.float64)

    def bn(t, mod):
        return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

    t = x.permute(0, 3, 1, 2)
    t = F.relu(bn(F.conv2d(t, m.proj_in.weight), m.bn_in))
    t = F.relu(bn(F.conv2d(t, m.conv.conv.weight, m.conv.conv.bias, padding=3, groups=C), m.bn))
    t = bn(F.conv2d(t, m.proj_out.weight), m.bn_out)
    with torch.no_grad():
        close(m(x), t.permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# published sizes
# --------------------------------------------------------------------------------------------
# (params M, GMACs): the authors' README (rounded), and the exact parameter count and
# ``flops()`` of their code (Atten4Vis/DemystifyLocalViT models/dwnet.py, which also counts
# BatchNorm, ReLU and LayerNorm operations; our count, fvcore's, does not)
PUBLISHED = {
    "dwconv_tiny": (24, 3.8, 24.172744, 3.742),
    "dwconv_base": (74, 12.9, 74.347112, 12.845),
    "ddwconv_tiny": (51, 3.8, 51.131752, 3.771),
    "ddwconv_base": (162, 13.0, 161.597928, 12.935),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_size(name):
    readme_p, readme_g, code_p, code_g = PUBLISHED[name]
    prof = profile_model(name)  # meta device, 224x224
    assert abs(prof.mparams / readme_p - 1) < 0.01, prof.mparams
    assert abs(prof.mparams / code_p - 1) < 1e-6, prof.mparams  # the same network, to the parameter
    assert abs(prof.gmacs / readme_g - 1) < 0.05, prof.gmacs
    assert abs(prof.gmacs / code_g - 1) < 0.01, prof.gmacs
    assert mixlab.registry.model_family(name) == "dwnet"


# --------------------------------------------------------------------------------------------
# the model API on a tiny configuration
# --------------------------------------------------------------------------------------------
def tiny(dynamic=False, **kw):
    torch.manual_seed(0)
    return DWNet(**{**dict(embed_dim=16, depths=(1, 2, 1, 1), num_classes=10, dynamic=dynamic), **kw})


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_tiny_model_api(dynamic):
    model = tiny(dynamic)
    assert count_params(model) < 1_000_000
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        torch.testing.assert_close(model(x), logits)
        maps = model.forward_intermediates(x)
    assert feats.shape == (2, 2, 2, 128) and logits.shape == (2, 10)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    fx = FeatureExtractor(tiny(dynamic), out_indices=(1, -1)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in fx(x)] == [32, 128]
    # an odd map (60 px: 15x15 after the stem) is padded by patch merging
    with torch.no_grad():
        assert model(torch.randn(1, 3, 60, 60)).shape == (1, 10)
    # backward: every parameter gets a finite gradient
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.reset_classifier(0)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 128)
    one = tiny(dynamic, in_chans=1).eval()
    with torch.no_grad():
        assert one(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert detect_format(model.state_dict()) == "mixlab"
    assert model.stage_mixers[0].startswith("dynamic depthwise conv 7x7" if dynamic else "depthwise conv 7x7")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_fuse_folds_every_batchnorm_exactly(dynamic):
    model = randomize_(tiny(dynamic), 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert model.fuse() is model
        after = model(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= 1e-4 * scale
    assert before.std() > 1e-2 * scale


# --------------------------------------------------------------------------------------------
# the authors' layout: an NCHW network with their module names, written from their code
# --------------------------------------------------------------------------------------------
class _RefDynamic(nn.Module):
    def __init__(self, dim, k):
        super().__init__()
        self.k = k
        self.conv1 = nn.Conv2d(dim, dim // 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim // 4)
        self.conv2 = nn.Conv2d(dim // 4, dim * k * k, 1)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        c = x.shape[1]
        w = self.conv2(F.relu(self.bn(self.conv1(x.mean((2, 3), keepdim=True)))))
        return torch.cat([F.conv2d(x[i:i + 1], w[i].reshape(c, 1, self.k, self.k), self.bias, padding=self.k // 2,
                                   groups=c) for i in range(x.shape[0])])


class _RefUnit(nn.Module):
    def __init__(self, dim, k, dynamic):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim)
        self.conv = _RefDynamic(dim, k) if dynamic else nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2, self.bn2 = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))


class _RefBlock(nn.Module):
    def __init__(self, dim, k, dynamic):
        super().__init__()
        self.attn2conv = _RefUnit(dim, k, dynamic)
        self.bn = nn.BatchNorm2d(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):  # NCHW
        x = x + self.attn2conv(x)
        h = self.bn(x).permute(0, 2, 3, 1)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(h))).permute(0, 3, 1, 2)


class _RefMerge(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):  # NCHW in and out; the 2x2 neighbourhood in the order (0,0), (1,0), (0,1), (1,1)
        x = x.permute(0, 2, 3, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class _RefDWNet(nn.Module):
    def __init__(self, embed, depths, dynamic, k=7, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed, 4, 4)
        self.patch_embed.norm = nn.LayerNorm(embed)
        self.layers = nn.ModuleList()
        for i, d in enumerate(depths):
            layer = nn.Module()
            layer.blocks = nn.ModuleList([_RefBlock(embed * 2 ** i, k, dynamic) for _ in range(d)])
            layer.downsample = _RefMerge(embed * 2 ** i) if i < len(depths) - 1 else None
            self.layers.append(layer)
        self.norm = nn.LayerNorm(embed * 2 ** (len(depths) - 1))
        self.head = nn.Linear(embed * 2 ** (len(depths) - 1), num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        x = self.patch_embed.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for layer in self.layers:
            for blk in layer.blocks:
                x = blk(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.head(self.norm(x.permute(0, 2, 3, 1)).mean((1, 2)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["dwnet", "dynamic-dwnet"])
def test_authors_checkpoint_converts_and_gives_the_same_logits(dynamic):
    torch.manual_seed(0)
    ref = randomize_(_RefDWNet(16, (1, 2, 1, 1), dynamic), 5).double().eval()
    sd = ref.state_dict()
    assert any(".attn2conv.conv.conv1." in k for k in sd) == dynamic
    assert detect_format(sd) == "authors-dwnet"  # not authors-swin, whose keys look alike
    model = tiny(dynamic).double().eval()
    model.load_state_dict(convert_state_dict(sd, model), strict=True)
    for size in (64, 96):
        x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            a, b = model(x), ref(x)
        close(a, b, atol=1e-9 * b.abs().max().item())
        assert b.std() > 1e-2 * b.abs().max()


def test_authors_checkpoint_is_refused_by_another_family():
    sd = _RefDWNet(16, (1, 1, 1, 1), False).state_dict()
    swin = mixlab.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 1), num_classes=10)
    with pytest.raises(ValueError, match="authors-dwnet dwnet"):
        convert_state_dict(sd, swin)


# --------------------------------------------------------------------------------------------
# specifications
# --------------------------------------------------------------------------------------------
NANO = {
    "nano_dwnet": "patch2 / dwconv_block:2x40 / dwconv_block:3x80:downsample=merge "
                  "/ dwconv_block:3x160:downsample=merge",
    "nano_ddwnet": "patch2 / ddwconv:2x40:reduction=8 / ddwconv:2x80:downsample=merge,reduction=8 "
                   "/ ddwconv:2x160:downsample=merge,reduction=8",
}


@pytest.mark.parametrize("name", list(NANO))
def test_nano_spec_trains_one_step(name):
    spec = "spec:" + NANO[name]
    with torch.device("meta"):
        for size, chans in ((32, 3), (28, 1)):
            n = count_params(mixlab.create_model(spec, img_size=size, in_chans=chans, num_classes=10))
            assert 1.1e6 <= n <= 1.3e6, n
    torch.manual_seed(0)
    model = mixlab.create_model(spec, img_size=32, num_classes=10)
    kind = "dynamic" if "ddw" in name else "static"
    assert all(m.affinity_kind == kind for m in model.modules() if isinstance(m, DWNetMixer))
    assert sum(isinstance(m, DWNetMixer) for m in model.modules()) == (8 if kind == "static" else 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in model.parameters())
    opt.step()
    assert F.cross_entropy(model(x), y).item() != loss.item()
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).isfinite().all()
    gray = mixlab.create_model(spec, img_size=28, in_chans=1, num_classes=10)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_spec_mixer_options():
    from mixlab.models.spec import SpecError
    from mixlab.registry import MIXERS
    assert MIXERS["dwconv_block"].options == {"kernel": 7}
    assert MIXERS["ddwconv"].options == {"kernel": 7, "reduction": 4}
    m = mixlab.create_model("spec:patch2 / ddwconv:1x16:kernel=5,reduction=2", img_size=16, num_classes=3)
    conv = m.stages[0].blocks[0].mixer.conv
    assert conv.kernel_size == 5 and conv.reduce.out_channels == 8
    assert m.stage_mixers[0].endswith("(kernel=5, reduction=2)")
    with pytest.raises(SpecError, match="unknown option"):
        mixlab.create_model("spec:patch2 / dwconv_block:1x16:heads=2")
