"""Inference-time fusion that is exact: a BatchNorm in eval mode is an affine map per
channel, so it folds into the convolution before it,

    BN(conv(x)) = γ·(W*x + b − μ)/√(σ² + ε) + β = (s·W)*x + (s·(b − μ) + β),   s = γ/√(σ² + ε).

``fuse_batchnorm(model)`` does this wherever a convolution is immediately followed by a
BatchNorm: inside ``nn.Sequential`` containers (execution order is registration order) and
in modules that name their pairs in a ``fuse_pairs`` attribute (ResNet's blocks and stem).
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` for a BatchNorm in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + shift)
    return fused


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with ``bn(y) == s·y + t`` per channel in eval mode."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


def _foldable(conv, bn) -> bool:
    return isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and conv.out_channels == bn.num_features


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place (the
    BatchNorm becomes ``nn.Identity``). The model must be in eval mode. Returns the number
    of BatchNorms folded."""
    if model.training:
        raise RuntimeError("fuse() folds BatchNorm running statistics and is for inference: call model.eval() first")
    count = 0
    for module in list(model.modules()):
        pairs = list(getattr(module, "fuse_pairs", ()))
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs += [(a, b) for a, b in zip(names, names[1:])]
        for conv_name, bn_name in pairs:
            conv, bn = module._modules.get(conv_name), module._modules.get(bn_name)
            if _foldable(conv, bn):
                module._modules[conv_name] = fuse_conv_bn(conv, bn)
                module._modules[bn_name] = nn.Identity()
                count += 1
    return count
