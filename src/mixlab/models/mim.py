"""Masked image modeling around a mixlab backbone: SimMIM and MAE.

* :class:`SimMIM` ("SimMIM: A Simple Framework for Masked Image Modeling", Xie et al. 2022) works with every
  model that has a patch stem (``mask_stem``) and multi-scale features: random masking on a grid of mask
  patches, the masked positions of the stem's output replaced by one learnable mask token (a forward hook on
  the stem: windows, merging and convolutions then run unchanged on the dense grid, no family rewrites its
  ``forward_features``), a one-layer prediction head on the last feature map (a 1x1 convolution to
  stride² · channels and a pixel shuffle back to the image) and an L1 loss on the masked pixels only.
* :class:`MAE` ("Masked Autoencoders Are Scalable Vision Learners", He et al. 2022) works with plain
  vision transformers (``token_encoder()``): per-sample random masking by sorted noise, an encoder that sees
  only the visible tokens (its cost falls with the mask ratio), fixed 2-D sine-cosine position tables, a
  light transformer decoder that puts mask tokens back in order, and a mean squared error on the masked
  patches, optionally against per-patch normalised pixels.

Both hold the backbone as ``encoder`` (``backbone_prefix = "encoder."``): its weights are those of the model
``create_model`` builds, so fine-tuning reads them back from a run's checkpoint. docs/mim.md says where
mixlab departs from the papers.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from ..layers import sincos_pos_embed_2d
from ..mixers import Attention
from .blocks import MetaBlock

__all__ = ["SimMIM", "MAE", "random_mask", "mask_patch_choices", "stem_stride"]


def random_mask(batch: int, num: int, ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """A (batch, num) float mask, 1 where hidden, with exactly ``round(num * ratio)`` ones per row at random
    places (each row its own draw, from uniform noise sorted: MAE's per-sample shuffle, SimMIM's count),
    drawn from ``generator`` (the global generator when None) on the CPU."""
    if num < 2:
        raise ValueError(f"a mask needs at least two patches (one hidden, one visible), got {num}")
    hidden = min(max(int(round(num * ratio)), 1), num - 1)
    order = torch.rand(batch, num, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num)
    mask.scatter_(1, order[:, :hidden], 1.0)
    return mask.to(device) if device is not None else mask


def mask_patch_choices(img_size: int, stem_stride: int) -> list[int]:
    """The mask patch sizes SimMIM can use on ``img_size`` images with a stem of ``stem_stride``: multiples of
    the stride that divide the image side."""
    return [p for p in range(stem_stride, img_size + 1, stem_stride) if img_size % p == 0]


def stem_stride(encoder: nn.Module) -> int:
    """The stride of ``encoder``'s patch stem (its ``mask_stem``); a ValueError when it has none."""
    name = getattr(encoder, "mask_stem", None)
    if not name:
        raise ValueError(f"{type(encoder).__name__} has no patch stem that gives a grid of tokens (mask_stem): "
                         f"SimMIM cannot put a mask token into it")
    return _stem_grid(encoder, name)[0]


def _stem_grid(encoder: nn.Module, name: str) -> tuple[int, int]:
    """(stride, channels) of the mask stem's (B, h, w, C) output, from one pass of a blank image."""
    stem = encoder.get_submodule(name)
    H, W = encoder.img_size
    p = next(encoder.parameters())
    with torch.no_grad():
        out = stem(torch.zeros(1, encoder.in_chans, H, W, device=p.device, dtype=p.dtype))
    if not (torch.is_tensor(out) and out.ndim == 4 and out.shape[1] and H % out.shape[1] == 0
            and W % out.shape[2] == 0 and H // out.shape[1] == W // out.shape[2]):
        raise ValueError(f"{type(encoder).__name__}.{name} does not give a (B, h, w, C) grid of patches "
                         f"(output {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} for a "
                         f"{H}x{W} image): SimMIM cannot put its mask token there")
    return H // out.shape[1], out.shape[-1]


class SimMIM(nn.Module):
    """SimMIM around ``encoder`` (a mixlab model with a ``mask_stem``), for ``encoder.img_size`` images.

    ``forward(x, mask)`` returns the reconstruction (B, C, H, W) of the normalised image ``x`` from which the
    patches of ``mask`` (B, H / mask_patch, W / mask_patch; 1 = hidden) were hidden; :meth:`loss` scores it.
    The hidden pixels are also zeroed before the stem: for a patch stem (kernel = stride) this changes
    nothing, since the mask token replaces every output they reach; for an overlapping stem (ResNet's 7x7,
    PoolFormer's) it keeps them from leaking into the visible positions next to them.
    """

    backbone_prefix = "encoder."

    def __init__(self, encoder: nn.Module, mask_patch: int = 32):
        super().__init__()
        stem_stride(encoder)  # a ValueError for a model without a patch stem
        name = encoder.mask_stem
        H, W = encoder.img_size
        stride_, dim = _stem_grid(encoder, name)
        info = encoder.feature_info[-1]
        stride, channels = info["reduction"], info["num_chs"]
        if H % stride or W % stride:
            side = math.ceil(max(H, W) / stride) * stride
            raise ValueError(f"SimMIM reconstructs the image from the last feature map, of stride {stride}: the image "
                             f"size {H}x{W} is not a multiple of {stride}; use an image size that is (e.g. {side}: "
                             f"--img-size {side})")
        if mask_patch % stride_ or H % mask_patch or W % mask_patch:
            raise ValueError(f"mim.mask_patch {mask_patch} must be a multiple of the model's patch ({stride_} px) "
                             f"that divides the image size {H}x{W}; valid here: "
                             f"{', '.join(map(str, mask_patch_choices(math.gcd(H, W), stride_)))}")
        if (H // mask_patch) * (W // mask_patch) < 2:
            raise ValueError(f"mim.mask_patch {mask_patch} makes one mask patch of the whole {H}x{W} image: nothing "
                             f"would stay visible; use a smaller one: "
                             f"{', '.join(map(str, mask_patch_choices(math.gcd(H, W), stride_)[:-1]))}")
        self.encoder = encoder
        self.mask_patch, self.stem_stride, self.stride = mask_patch, stride_, stride
        self.grid = (H // mask_patch, W // mask_patch)
        self.in_chans = encoder.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(channels, stride ** 2 * self.in_chans, kernel_size=1),
                                     nn.PixelShuffle(stride))
        self._stem_mask: torch.Tensor | None = None  # set during forward only
        encoder.get_submodule(name).register_forward_hook(self._mask_stem_output)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _mask_stem_output(self, module, args, out):
        m = self._stem_mask
        if m is None:  # the encoder used on its own: unchanged
            return None
        return out * (1 - m) + self.mask_token.to(out.dtype) * m

    def upsample(self, mask: torch.Tensor, factor: int) -> torch.Tensor:
        """The (B, gh, gw) mask repeated ``factor`` times along each side."""
        return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tuple(mask.shape[1:]) != self.grid:
            raise ValueError(f"SimMIM: the mask must be (B, {self.grid[0]}, {self.grid[1]}) for mask patches of "
                             f"{self.mask_patch} px, got {tuple(mask.shape)}")
        m = mask.to(x.dtype)
        hidden_pixels = self.upsample(m, self.mask_patch).unsqueeze(1)
        self._stem_mask = self.upsample(m, self.mask_patch // self.stem_stride).unsqueeze(-1)
        try:
            z = self.encoder.forward_intermediates(x * (1 - hidden_pixels), [-1])[0]
        finally:
            self._stem_mask = None
        return self.decoder(z)

    def loss(self, x: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM's loss: the mean absolute error over the hidden pixels (and channels) only."""
        m = self.upsample(mask.to(torch.float32), self.mask_patch).unsqueeze(1)
        err = (rec.float() - x.float()).abs() * m
        return err.sum() / (m.sum() + 1e-5) / self.in_chans

    def hidden_pixels(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): 1 on the pixels ``mask`` hides."""
        return self.upsample(mask, self.mask_patch).unsqueeze(1)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the masked input as the model sees it, the reconstruction with the visible pixels pasted back) for
        pictures."""
        m = self.hidden_pixels(mask.to(x.dtype))
        rec = self(x, mask).to(x.dtype)
        return x * (1 - m), x * (1 - m) + rec * m


class MAE(nn.Module):
    """MAE around ``encoder`` (a model with ``token_encoder()``: a plain ViT, a specification of one attention
    stage with ``pos=abs``).

    The encoder's position table becomes MAE's fixed 2-D sine-cosine table and stops learning (it is kept in
    the weights: fine-tuning starts from it and learns it, as MAE's fine-tuning does). ``forward(x, ratio)``
    returns the predicted pixels of every patch (B, N, patch² · C) and the mask (B, N; 1 = hidden);
    :meth:`loss` scores the hidden patches. ``norm_pix_loss``: targets normalised per patch (MAE's best
    setting)."""

    backbone_prefix = "encoder."

    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = False):
        super().__init__()
        parts = encoder.token_encoder()  # a ValueError saying why for other models
        grid, prefix = parts.pos.grid_size, len(parts.prefix)
        dim = parts.pos.pos_embed.shape[-1]
        if parts.pos.num_prefix_tokens != prefix:
            raise ValueError(f"{type(encoder).__name__}: the position table has {parts.pos.num_prefix_tokens} prefix "
                             f"rows for {prefix} prefix tokens")
        if decoder_dim % decoder_heads:
            raise ValueError(f"mim.decoder_dim {decoder_dim} must be divisible by mim.decoder_heads {decoder_heads}")
        with torch.no_grad():
            parts.pos.pos_embed.copy_(sincos_pos_embed_2d(dim, grid, prefix))
        parts.pos.pos_embed.requires_grad_(False)
        self.encoder = encoder
        self.grid, self.num_prefix, self.patch_size = tuple(grid), prefix, parts.patch_size
        self.in_chans, self.norm_pix_loss = encoder.in_chans, norm_pix_loss
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_pos_embed_2d(decoder_dim, grid, prefix), persistent=False)
        ln = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(*[
            MetaBlock(decoder_dim, Attention(decoder_dim, decoder_heads, qkv_bias=True), mlp_ratio=mlp_ratio,
                      norm_layer=ln) for _ in range(decoder_depth)])
        self.decoder_norm = ln(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * self.in_chans)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MAE's init of its decoder: Xavier-uniform, zero biases
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p² · C), patches in row-major order, pixels (row, column, channel) within."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`patchify`."""
        B, h, w, p, C = x.shape[0], *self.grid, self.patch_size, self.in_chans
        return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's normalised (B, P + n_visible, C) output for the patches that ``mask`` (B, N) keeps
        (the same number of hidden patches in every row)."""
        parts = self.encoder.token_encoder()
        self.encoder.check_input(x)
        t = parts.patchify(x)
        B, h, w, C = t.shape
        if (h, w) != self.grid:
            raise ValueError(f"MAE: a {x.shape[-2]}x{x.shape[-1]} image gives a {h}x{w} grid, the model was built "
                             f"for {self.grid[0]}x{self.grid[1]}")
        pos = parts.pos.pos_embed
        t = t.reshape(B, h * w, C) + pos[:, self.num_prefix:]
        keep = (mask == 0).sum(1)
        if (keep != keep[0]).any():
            raise ValueError("MAE: every image of a batch must hide the same number of patches")
        visible_idx = (mask == 0).nonzero()[:, 1].reshape(B, -1)  # ascending: visible patches in order
        t = torch.gather(t, 1, visible_idx.unsqueeze(-1).expand(-1, -1, C))
        prefix = [tok.expand(B, -1, -1) + pos[:, i:i + 1] for i, tok in enumerate(parts.prefix)]
        return parts.norm(parts.blocks(torch.cat(prefix + [t], dim=1)))

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, N, p² · C) of every patch from the encoder's output on the visible ones."""
        y = self.decoder_embed(latent)
        B, N, D = y.shape[0], mask.shape[1], y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(B, N, D).clone()
        visible_idx = (mask == 0).nonzero()[:, 1].reshape(B, -1)
        full = full.scatter(1, visible_idx.unsqueeze(-1).expand(-1, -1, D), y[:, self.num_prefix:])
        y = torch.cat([y[:, :self.num_prefix], full], dim=1) + self.decoder_pos.to(y.dtype)
        y = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))
        return y[:, self.num_prefix:]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_decoder(self.forward_encoder(x, mask), mask)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to predict: the patches' pixels, normalised per patch with ``norm_pix_loss``."""
        t = self.patchify(x.float())
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MAE's loss: the mean squared error per patch, averaged over the hidden patches only."""
        per_patch = ((pred.float() - self.target(x)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def hidden_pixels(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W): 1 on the pixels of the patches ``mask`` (B, N) hides."""
        return self.unpatchify(mask.unsqueeze(-1).expand(-1, -1, self.patch_size ** 2 * self.in_chans))

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the masked input, the reconstruction with the visible patches pasted back) for pictures; a
        per-patch-normalised prediction is brought back to pixels with each patch's own mean and spread."""
        pred = self(x, mask).float()
        if self.norm_pix_loss:
            t = self.patchify(x.float())
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)
        m = self.hidden_pixels(mask.to(x.dtype))
        rec = self.unpatchify(pred).to(x.dtype)
        return x * (1 - m), x * (1 - m) + rec * m
