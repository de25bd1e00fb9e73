"""Small helpers shared by layers, mixers and models.

mixlab's canonical layout between blocks is channels-last: feature maps are
(B, H, W, C). Linear layers and LayerNorm act on the last dimension directly; a
convolution sees ``x.permute(0, 3, 1, 2)``, a zero-copy NCHW view that PyTorch's
convolutions run in their fast channels_last path.
"""
from __future__ import annotations

import collections.abc
from typing import Tuple

import torch


def to_2tuple(x) -> Tuple[int, int]:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        t = tuple(x)
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {x!r}")
        return t  # type: ignore[return-value]
    return (x, x)


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) as a view (channels_last memory when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) as a view."""
    return x.permute(0, 2, 3, 1)


def conv_nhwc(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an NCHW convolution module on a channels-last (B, H, W, C) tensor."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v
