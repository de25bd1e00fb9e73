"""Window attention with shifted windows (Swin): dynamic affinity, block-sparse in space."""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import biased_attention
from .base import Mixer
from ..layers.helpers import to_2tuple


def relative_position_index(win_h: int, win_w: int, table_h: int, table_w: int) -> torch.Tensor:
    """Index (n, n), n = win_h*win_w, into a (2*table_h-1) x (2*table_w-1) bias table.

    A window smaller than the table's (a feature map smaller than the window) uses the
    central part of the same table.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + table_h - 1) * (2 * table_w - 1) + (rel[1] + table_w - 1)


@lru_cache(maxsize=64)
def _window_layout(H: int, W: int, wh: int, ww: int, sh: int, sw: int):
    """Token ids and the additive attention mask for windows over an H x W map.

    Returns ``ids`` (nW, n): the flat index of each window slot in the unpadded map (-1
    for padding) after the cyclic shift, and ``mask`` (nW, n, n) with -inf where a query
    may not see a key: keys from another region of the shifted map (Swin's mask) and keys
    that are padding. Padded queries see everything (their output is cropped away) so no
    softmax row is empty.
    """
    # built on the CPU whatever the default device (a meta-device context for counting MACs
    # must not leave data-less tensors in the cache); callers move them to the input's device
    with torch.device("cpu"):
        return _layout(H, W, wh, ww, sh, sw)


def _layout(H: int, W: int, wh: int, ww: int, sh: int, sw: int):
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    ids = torch.full((Hp, Wp), -1, dtype=torch.long)
    ids[:H, :W] = torch.arange(H * W).view(H, W)
    region = torch.zeros(Hp, Wp, dtype=torch.long)
    if sh or sw:
        cnt = 0
        for hs in ((0, Hp - wh), (Hp - wh, Hp - sh), (Hp - sh, Hp)) if sh else ((0, Hp),):
            for ws in ((0, Wp - ww), (Wp - ww, Wp - sw), (Wp - sw, Wp)) if sw else ((0, Wp),):
                region[hs[0]:hs[1], ws[0]:ws[1]] = cnt
                cnt += 1
        ids = torch.roll(ids, shifts=(-sh, -sw), dims=(0, 1))

    def windows(t):
        return t.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

    ids_w, region_w = windows(ids), windows(region)
    blocked = (region_w[:, :, None] != region_w[:, None, :]) | (ids_w[:, None, :] < 0)
    blocked &= (ids_w[:, :, None] >= 0)
    mask = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))
    return ids_w, mask


class WindowLayout(NamedTuple):
    """How a map is cut into windows (see ``_window_layout``)."""

    window: tuple[int, int]     # the effective window (smaller than the configured one on a small map)
    shift: tuple[int, int]      # the cyclic shift (0 along a side no larger than the window)
    padded: tuple[int, int]     # (Hp, Wp): the map padded to window multiples
    ids: torch.Tensor           # (nW, n): each window slot's flat index in the unpadded map, -1 for padding
    mask: torch.Tensor          # (nW, n, n): 0 or -inf, the shift and padding mask (on the CPU)


class AttentionInputs(NamedTuple):
    """Queries, keys and values per window, (B, nW, heads, n, d), the window layout they were cut
    with, and the additive bias of the logits ((1 or nW), heads, n, n; None where not made yet)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: WindowLayout
    bias: torch.Tensor | None = None


class WindowAttention(Mixer):
    """Multi-head self-attention inside non-overlapping windows, with a learned relative
    position bias, optional cyclic shift (shifted-window blocks) and any input size:
    the map is zero-padded to window multiples and padded keys are masked out. Where the
    map is no larger than the window along a side, the window shrinks to the map and that
    side is not shifted (Swin's rule).

    ``affinity`` is (B, heads, N, N): each row is non-zero only inside its (shifted) window.
    """

    affinity_kind = "dynamic"

    def __init__(self, dim: int, num_heads: int, window_size=7, shift_size=0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = to_2tuple(window_size)
        self.shift_size = to_2tuple(shift_size)
        if any(s >= w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size {shift_size} must be smaller than window_size {window_size}")
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(wh, ww, wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def window_and_shift(self, H: int, W: int):
        """Effective (window, shift) for an H x W map."""
        win = tuple(min(r, w) for r, w in zip((H, W), self.window_size))
        shift = tuple(0 if r <= w else s for r, w, s in zip((H, W), self.window_size, self.shift_size))
        return win, shift

    def _bias(self, win) -> torch.Tensor:
        if win == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(*win, *self.window_size).to(self.relative_position_bias_table.device)
        n = win[0] * win[1]
        return self.relative_position_bias_table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    def _windows(self, x: torch.Tensor) -> tuple[torch.Tensor, WindowLayout]:
        """Pad, shift and partition: returns windows (B, nW, n, C) and the layout."""
        B, H, W, C = x.shape
        win, shift = self.window_and_shift(H, W)
        ids, mask = _window_layout(H, W, *win, *shift)
        Hp, Wp = -(-H // win[0]) * win[0], -(-W // win[1]) * win[1]
        if Hp != H or Wp != W:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = x.view(B, Hp // win[0], win[0], Wp // win[1], win[1], C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, -1, win[0] * win[1], C), WindowLayout(win, shift, (Hp, Wp), ids, mask)

    def _attention_inputs(self, x: torch.Tensor) -> AttentionInputs:
        xw, layout = self._windows(x)
        B, nW, n, C = xw.shape
        qkv = self.qkv(xw).view(B, nW, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # (B, nW, heads, n, d)
        return AttentionInputs(q, k, v, layout, self._window_bias(x, layout).to(q.dtype))

    def _window_bias(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """The relative position bias, (1, heads, n, n), plus the shift/padding mask where windows
        are shifted or padded, (nW, heads, n, n)."""
        bias = self._bias(layout.window).unsqueeze(0)
        if any(layout.shift) or layout.padded != tuple(x.shape[1:3]):
            bias = bias + layout.mask.to(device=x.device, dtype=bias.dtype).unsqueeze(1)
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        inputs = self._attention_inputs(x)
        q, k, v, bias = inputs.q, inputs.k, inputs.v, inputs.bias
        win, shift, (Hp, Wp) = inputs.layout.window, inputs.layout.shift, inputs.layout.padded
        nW, heads, n, d = q.shape[1:]
        # 4-D inputs, the layout PyTorch's fused attention kernels take. With one mask per
        # window (shifted or padded maps), windows x heads form the head axis, so that the
        # (windows x heads, n, n) bias broadcasts over the batch instead of being copied per
        # image; otherwise windows join the batch and the (heads, n, n) bias broadcasts.
        if bias.shape[0] > 1:
            q, k, v = (t.reshape(B, nW * heads, n, d) for t in (q, k, v))
            bias = bias.reshape(1, nW * heads, n, n)
        else:
            q, k, v = (t.reshape(B * nW, heads, n, d) for t in (q, k, v))
        # each window holds at least one real position: no fully masked row
        o = biased_attention(q, k, v, bias, self.scale, self.attn_drop, self.training)
        o = o.view(B, nW, heads, n, d).transpose(2, 3).reshape(B, Hp // win[0], Wp // win[1], win[0], win[1], C)
        o = o.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if any(shift):
            o = torch.roll(o, shifts=shift, dims=(1, 2))
        o = o[:, :H, :W]
        return self.proj_drop(self.proj(o))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        inputs = self._attention_inputs(x)
        attn = ((inputs.q * self.scale) @ inputs.k.transpose(-2, -1) + inputs.bias).softmax(dim=-1)  # (B, nW, h, n, n)
        ids = inputs.layout.ids.to(x.device)
        N = H * W
        A = attn.new_zeros(B, self.num_heads, N, N)
        for w in range(ids.shape[0]):  # analysis path: one scatter per window
            keep = ids[w] >= 0
            idx = ids[w][keep]
            sub = attn[:, w][:, :, keep][:, :, :, keep]
            A[:, :, idx.unsqueeze(1), idx.unsqueeze(0)] = sub
        return A

    def values(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        v = F.linear(x, self.qkv.weight[2 * C:], None if self.qkv.bias is None else self.qkv.bias[2 * C:])
        return v.reshape(x.shape[0], -1, C)

    def project(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(y)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"
