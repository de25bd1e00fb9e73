"""Global filter (GFNet): a static, dense affinity, one circulant matrix per channel.

Rao et al., 2021, "Global Filter Networks for Image Classification". The layer takes the
2-D real FFT of each channel of a (B, H, W, C) map, multiplies it by a learnable complex
filter of shape (H, W//2+1, C) and transforms back. By the convolution theorem this is a
*circular* convolution of every channel with a real kernel as large as the map, so the
affinity is the block-circulant matrix of that kernel:

    A[c][i, j] = k_c((y_i - y_j) mod H, (x_i - x_j) mod W),   k_c = irfft2(filter_c),

with ``irfft2`` in PyTorch's default ('backward') normalisation: the 'ortho' forward and
inverse transforms of the layer contribute 1/sqrt(HW) each, which is the 1/(HW) of the
backward-normalised inverse. Every position mixes with every other one (a global,
input-independent affinity); ``forward`` costs O(HW log HW) per channel instead of the
O((HW)^2) of ``explicit_forward``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.helpers import to_2tuple
from .base import Mixer, flatten_tokens

__all__ = ["GlobalFilter", "resample_filter"]


def resample_filter(weight: torch.Tensor, size) -> torch.Tensor:
    """A (h, w//2+1, C, 2) filter (real and imaginary parts last) resampled to the grid
    ``size`` = (H, W): bicubic interpolation of the real and imaginary parts over the
    (frequency row, frequency column) plane, corners aligned, to (H, W//2+1, C, 2).

    This is the GFNet authors' rule for fine-tuning at another resolution (their
    ``main_gfnet.py`` resizes ``complex_weight`` this way; we use W//2+1 columns, which
    is their H//2+1 on square grids).
    """
    H, W = to_2tuple(size)
    h, wf, C, two = weight.shape
    target = (H, W // 2 + 1)
    if (h, wf) == target:
        return weight
    planes = weight.permute(2, 3, 0, 1).reshape(1, C * two, h, wf)
    work = planes if planes.dtype in (torch.float32, torch.float64) else planes.float()
    planes = F.interpolate(work, size=target, mode="bicubic", align_corners=True).to(weight.dtype)
    return planes.reshape(C, two, *target).permute(2, 3, 0, 1)


class GlobalFilter(Mixer):
    """GFNet's global filter layer on a (B, H, W, C) map (or a (B, N, C) sequence of the
    grid it was built for).

    ``grid_size``: the (H, W) map the filter is learnt for; its parameter
    ``complex_weight`` is (H, W//2+1, C, 2), the authors' layout. A map of another size
    uses the filter resampled by :func:`resample_filter` (the authors' fine-tuning rule);
    at the built size the parameter is used as it is. The FFTs run in float32 for half
    precision inputs (PyTorch's half FFTs need power-of-two sizes), in the input's
    precision otherwise, and the result is cast back to the input's dtype.

    ``affinity`` is (B, C, N, N): channel c's circulant matrix (see the module docstring),
    expanded over the batch as a view. ``forward == A·V`` exactly (up to float rounding);
    ``values`` and ``project`` are the identity.
    """

    affinity_kind = "static"
    exact_av = True

    def __init__(self, dim: int, grid_size=(14, 14), init_std: float = 0.02):
        super().__init__()
        self.dim = dim
        self.grid_size = to_2tuple(grid_size)
        h, w = self.grid_size
        if h < 1 or w < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * init_std)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid_size={self.grid_size}"

    def frequency_response(self, H: int, W: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The complex (H, W//2+1, C) frequency response used on an H x W map."""
        w = self.complex_weight
        if (H, W) != self.grid_size:
            w = resample_filter(w, (H, W))
        return torch.view_as_complex(w.to(dtype).contiguous())

    def kernel(self, H: int, W: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real spatial kernel (H, W, C) of the circular convolution on an H x W map:
        ``irfft2`` of the filter, backward-normalised (see the module docstring)."""
        return torch.fft.irfft2(self.frequency_response(H, W, dtype), s=(H, W), dim=(0, 1))

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _as_map(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x
        t = flatten_tokens(x)
        H, W = self.grid_size
        if t.shape[1] != H * W:
            raise ValueError(f"a global filter given a token sequence needs the {H}x{W} grid it was built for "
                             f"({H * W} tokens), got {t.shape[1]} tokens; pass a (B, H, W, C) map instead")
        return t.reshape(t.shape[0], H, W, t.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._as_map(x)
        H, W = m.shape[1:3]
        dtype = self._compute_dtype(m)
        spec = torch.fft.rfft2(m.to(dtype), dim=(1, 2), norm="ortho")
        y = torch.fft.irfft2(spec * self.frequency_response(H, W, dtype), s=(H, W), dim=(1, 2), norm="ortho")
        return y.to(x.dtype).reshape(x.shape)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        m = self._as_map(x)
        B, H, W, _ = m.shape
        k = self.kernel(H, W, self._compute_dtype(m)).to(x.dtype)  # (H, W, C)
        dev = k.device
        ys = torch.arange(H, device=dev).repeat_interleave(W)  # row of each flattened position
        xs = torch.arange(W, device=dev).repeat(H)
        dy = (ys[:, None] - ys[None, :]) % H
        dx = (xs[:, None] - xs[None, :]) % W
        A = k[dy, dx].permute(2, 0, 1)  # (C, N, N)
        return A.unsqueeze(0).expand(B, -1, -1, -1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y.reshape(x.shape)
