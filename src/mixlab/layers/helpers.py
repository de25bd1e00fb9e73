"""Small helpers shared by layers, mixers and models.

mixlab's canonical layout between blocks is channels-last: feature maps are
(B, H, W, C). Linear layers and LayerNorm act on the last dimension directly; a
convolution sees ``x.permute(0, 3, 1, 2)``, a zero-copy NCHW view that PyTorch's
convolutions run in their fast channels_last path.
"""
from __future__ import annotations

import collections.abc
from typing import Tuple


def to_2tuple(x) -> Tuple[int, int]:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        t = tuple(x)
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {x!r}")
        return t  # type: ignore[return-value]
    return (x, x)
