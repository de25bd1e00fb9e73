"""BatchNorm folding for inference: exact, and only where it is exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mixlab
from mixlab.layers.fuse import fuse_batchnorm, fuse_conv_bn


def _random_statistics(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("name, size", [("resnet50", 64), ("nano_resnet", 32), ("nano_hybrid", 32)])
def test_fused_model_gives_the_same_outputs(name, size):
    torch.manual_seed(0)
    model = mixlab.create_model(name, img_size=size, num_classes=10).eval()
    with torch.no_grad():
        _random_statistics(model)
        x = torch.randn(2, 3, size, size)
        before = model(x)
        assert model.fuse() is model
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5 * before.abs().max().item())


def test_fuse_conv_bn_with_and_without_conv_bias():
    torch.manual_seed(0)
    for bias in (False, True):
        conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6).eval()
        _random_statistics(bn)
        x = torch.randn(1, 4, 5, 5)
        with torch.no_grad():
            assert torch.allclose(fuse_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)


def test_only_exact_folds_happen():
    # a BatchNorm after a ReLU is not folded into the convolution before the ReLU
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    assert fuse_batchnorm(seq) == 1
    assert isinstance(seq[2], nn.BatchNorm2d) and isinstance(seq[4], nn.Identity)


def test_fusing_a_training_model_is_refused():
    model = mixlab.create_model("nano_resnet")
    with pytest.raises(RuntimeError, match="model.eval"):
        model.fuse()
