"""LEWin: locally-enhanced (shifted) window self-attention, CETNet's mixer.

Source: Wang et al., "Convolutional Embedding Makes Hierarchical Vision Transformer
Stronger", ECCV 2022 (arXiv 2207.13317), section "Micro design". The paper describes LEWin
as Swin's (shifted) window attention in which, following CvT (Wu et al., 2021,
microsoft/CvT ``ConvEmbed``/``Attention``), the tokens of each local shifted window are
projected to queries, keys and values by *depthwise-separable convolutions*: a 3x3
depthwise convolution (stride 1, padding 1), then the pointwise (linear) projection.
The authors released no code; mixlab's reading (the formula did not survive in the seed
text ``shared/seeds/003_*.txt``) is CvT's convolutional projection inside Swin's windows:

    for t in (q, k, v):   t = Linear_t(BN_t(DWConv3x3_t(window tokens)))
    A = softmax(q kᵀ / √d + B_rel + M_shift)       (per window and head)
    y = Linear_o(A v)

with B_rel Swin's learned relative position bias (``rel_pos_bias=False`` drops it) and
M_shift Swin's shifted-window mask. ``conv_scope='window'`` (the default, the paper's
"convolutional projection on the tokens in a local shifted window") convolves each
(shifted, zero-padded) window on its own, zero-padding at the window's border;
``conv_scope='map'`` convolves the whole map once before the windows are cut.

The window partition, cyclic shift, padding and mask are those of
:class:`mixlab.mixers.window.WindowAttention` (inherited, not copied). Contract:
``affinity`` is (B, heads, N, N) and block-structured by window; ``values(x)`` is V after
its convolutional projection, one row per position of the map; ``explicit_forward ==
forward`` exactly (in either scope each position belongs to exactly one window, and padded
keys get zero weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .window import AttentionInputs, WindowAttention

CONV_SCOPES = ("window", "map")


def conv_projection(dim: int, kernel_size: int = 3) -> nn.Sequential:
    """CvT's depthwise part of a convolutional projection: kxk depthwise conv (stride 1,
    'same' padding, no bias) + BatchNorm, on NCHW maps (``fuse()`` folds the BatchNorm)."""
    return nn.Sequential(nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=False),
                         nn.BatchNorm2d(dim))


class LEWinAttention(WindowAttention):
    """Locally-enhanced window attention (CETNet): Swin's (shifted) window attention with
    convolutional q/k/v projections (3x3 depthwise conv + BN, then a linear layer each).

    Arguments as :class:`WindowAttention`, plus ``kernel_size`` of the depthwise
    convolutions (3 in the paper), ``conv_scope`` ('window' or 'map', see the module
    docstring) and ``rel_pos_bias`` (keep Swin's relative position bias).
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, num_heads: int, window_size=7, shift_size=0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, kernel_size: int = 3, conv_scope: str = "window",
                 rel_pos_bias: bool = True):
        super().__init__(dim, num_heads, window_size, shift_size, qkv_bias, attn_drop, proj_drop)
        if conv_scope not in CONV_SCOPES:
            raise ValueError(f"conv_scope must be one of {CONV_SCOPES}, got {conv_scope!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv_scope = conv_scope
        self.kernel_size = kernel_size
        del self.qkv  # replaced by the convolutional projections
        self.conv_q, self.conv_k, self.conv_v = (conv_projection(dim, kernel_size) for _ in range(3))
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        if not rel_pos_bias:
            del self.relative_position_bias_table
            self.register_parameter("relative_position_bias_table", None)

    def _bias(self, win) -> torch.Tensor:
        if self.relative_position_bias_table is None:
            n = win[0] * win[1]
            return self.proj_q.weight.new_zeros(self.num_heads, n, n)
        return super()._bias(win)

    def _project(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """Depthwise conv + BN of an NCHW map, then the linear layer: (..., C) channels-last out."""
        t = getattr(self, f"conv_{which}")(t).permute(0, 2, 3, 1)
        return getattr(self, f"proj_{which}")(t)

    def _qkv_windows(self, x: torch.Tensor) -> AttentionInputs:
        """q, k, v as windows (B, nW, n, C), before the split into heads, and the layout (no bias yet)."""
        B, C = x.shape[0], x.shape[-1]
        if self.conv_scope == "map":
            xm = x.permute(0, 3, 1, 2)
            qkv = torch.cat([self._project(xm, w) for w in "qkv"], dim=-1)  # (B, H, W, 3C)
            qkvw, layout = self._windows(qkv)
            q, k, v = qkvw.split(C, dim=-1)
            return AttentionInputs(q, k, v, layout)
        xw, layout = self._windows(x)
        nW, n = xw.shape[1:3]
        win = layout.window
        xw_map = xw.reshape(B * nW, win[0], win[1], C).permute(0, 3, 1, 2)
        q, k, v = (self._project(xw_map, w).reshape(B, nW, n, C) for w in "qkv")
        return AttentionInputs(q, k, v, layout)

    def _attention_inputs(self, x: torch.Tensor) -> AttentionInputs:
        windows = self._qkv_windows(x)
        B, nW, n, _ = windows.q.shape
        q, k, v = (t.view(B, nW, n, self.num_heads, self.head_dim).transpose(2, 3)
                   for t in (windows.q, windows.k, windows.v))
        return AttentionInputs(q, k, v, windows.layout, self._window_bias(x, windows.layout).to(q.dtype))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """V after its convolutional projection, (B, N, C) in the map's row-major order."""
        B, H, W, C = x.shape
        windows = self._qkv_windows(x)
        v = windows.v
        ids = windows.layout.ids.to(x.device).reshape(-1)
        keep = ids >= 0
        V = v.new_zeros(B, H * W, C)
        V[:, ids[keep]] = v.reshape(B, -1, C)[:, keep]
        return V

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, conv={self.kernel_size}x{self.kernel_size} depthwise ({self.conv_scope})"
