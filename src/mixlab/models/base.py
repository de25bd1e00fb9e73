"""What every mixlab model shares: the timm-style API, input checks, multi-scale features.

A model is a stem, stages of blocks, a final norm and a head. Between blocks, feature
maps are channels-last (B, H, W, C); isotropic token models (ViT) carry a (B, P+N, C)
sequence whose P prefix tokens (class, distillation) sit beside the H x W grid.

* ``forward_features(x)``: the unpooled final features, (B, H, W, C) or (B, P+N, C);
* ``forward_head(x, pre_logits=False)``: pooling, head norm, classifier;
* ``forward_intermediates(x, indices)``: the stage outputs as NCHW maps (dense prediction);
* ``reset_classifier(num_classes)``; ``feature_info``: channels and stride per stage.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..layers.conv_blocks import init_conv_fan_out
from ..layers.helpers import to_2tuple


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside any wrappers.

    Removes, repeatedly and in any order: ``torch.compile`` (``_orig_mod``),
    :class:`~torch.nn.parallel.DistributedDataParallel` / :class:`~torch.nn.DataParallel`
    (``.module``), and any other holder whose only child is called ``module`` and which has
    no parameters of its own (an EMA's averaged copy).
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif ([name for name, _ in model.named_children()] == ["module"]
              and next(model.parameters(recurse=False), None) is None):
            model = model.module
        else:
            return model


def build(cls, defaults: dict, overrides: dict) -> nn.Module:
    """Instantiate ``cls(**defaults | overrides)``, rejecting unknown arguments clearly."""
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "args", "kwargs")]
    bad = [k for k in overrides if k not in valid]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"{cls.__name__} got unknown argument(s) {', '.join(hints)}; "
                        f"valid arguments: {', '.join(valid)}")
    return cls(**{**defaults, **overrides})


class Stage(nn.Module):
    """A downsampling/embedding module followed by a sequence of blocks (channels-last)."""

    def __init__(self, downsample: nn.Module | None, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def patch_grid(img_size, patch_size) -> tuple[int, int]:
    """The (H, W) token grid of ``img_size`` cut into ``patch_size`` patches (an int or a pair),
    for models whose layers are built for it (position embeddings, token-mixing layers, global
    filters); a ValueError if it does not divide."""
    (h, w), (ph, pw) = to_2tuple(img_size), to_2tuple(patch_size)
    if h % ph or w % pw:
        patch = ph if ph == pw else (ph, pw)
        raise ValueError(f"img_size {(h, w)} is not divisible by the patch size {patch}; use a multiple of {patch}")
    return h // ph, w // pw


def block_token_maps(blocks: Sequence[nn.Module], x: torch.Tensor, indices: list[int], norm: nn.Module,
                     grid: tuple[int, int], num_prefix_tokens: int = 0) -> list[torch.Tensor]:
    """Run a token model's ``blocks`` on the (B, P+N, C) sequence ``x`` up to the last of
    ``indices`` and return the grid tokens after each block in ``indices`` as (B, C, h, w) maps
    (after ``norm`` at the last block, as forward_features gives them), in the order asked for."""
    h, w = grid
    maps = {}
    last = len(blocks) - 1
    for i, blk in enumerate(blocks[: max(indices) + 1]):
        x = blk(x)
        if i in indices:
            y = (norm(x) if i == last else x)[:, num_prefix_tokens:]
            maps[i] = y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2)
    return [maps[i] for i in indices]


def init_weights_mixer(model: nn.Module) -> None:
    """The MLP-Mixer paper's init (also gMLP's): Xavier-uniform linear layers with tiny biases,
    a zero classifier (``head.*``), LeCun-normal patch convolutions."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name.startswith("head"):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            else:
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)


def init_weights_vit(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights with zero bias, the ViT/Swin/ConvNeXt rule."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_weights_cetnet(module: nn.Module) -> None:
    """CETNet's rule (also for its convolutional embeddings in Swin and PVT): linear layers as ViT/Swin
    (truncated normal 0.02), convolutions as EfficientNet (He normal, fan-out)."""
    init_weights_vit(module)
    init_conv_fan_out(module)


@dataclass
class TokenEncoder:
    """The parts of an isotropic attention model (a plain ViT, a specification of one attention stage) that
    a masked autoencoder (MAE, :mod:`mixlab.models.mim`) runs on the visible tokens only: the patch stem
    (NCHW image -> (B, h, w, C)), the learned position table (an :class:`~mixlab.layers.AbsolutePosEmbed`
    whose prefix rows belong to ``prefix``), the prefix tokens (class, distillation; maybe none), the blocks
    (on a (B, P + n, C) sequence of any length n) and the final norm."""

    patchify: nn.Module
    pos: nn.Module
    prefix: list
    blocks: nn.Module
    norm: nn.Module
    patch_size: int


class MixlabModel(nn.Module):
    """Base class of every mixlab architecture."""

    #: the summary of the spatial mixer per stage, for ``mixlab info``
    stage_mixers: list[str]
    #: the module whose output is the (B, h, w, C) grid of the first tokens (the patch stem): masked image
    #: modeling (SimMIM, :mod:`mixlab.models.mim`) puts its mask token into that output; None: the family
    #: has no such grid
    mask_stem: str | None = None

    def __init__(self, in_chans: int, num_classes: int, img_size):
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 removes the classifier), got {num_classes}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.feature_info: list[dict] = []
        self.stage_mixers = []
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": (0.485, 0.456, 0.406)[:in_chans]
                               if in_chans == 3 else (0.5,) * in_chans,
                               "std": (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,) * in_chans}

    # -- input checks ----------------------------------------------------------------------
    #: the total stride of the network; inputs smaller than this are rejected
    min_input_size: int = 32

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model was built for {self.in_chans} input channels, got {x.shape[1]}; "
                             f"create it with in_chans={x.shape[1]}")
        H, W = x.shape[-2:]
        if H < self.min_input_size or W < self.min_input_size:
            raise ValueError(f"input size {H}x{W} is smaller than this model's minimum "
                             f"{self.min_input_size}x{self.min_input_size} (its total stride)")

    # -- the timm-style API ------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Feature maps (B, C_i, H_i, W_i) after the stages in ``indices`` (default: all)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _normalize_indices(self, indices) -> list[int]:
        n = len(self.feature_info)
        if indices is None:
            return list(range(n))
        if len(indices) == 0:
            raise ValueError(f"no feature indices given; choose among 0..{n - 1}")
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"feature index {i} is out of range: this model has {n} feature levels (0..{n - 1})")
            out.append(j)
        return out

    def fuse(self) -> "MixlabModel":
        """Fold BatchNorms into the convolutions before them (exact; eval mode only) for
        faster inference. Returns the model, which can no longer be trained as before."""
        from ..layers.fuse import fuse_batchnorm
        fuse_batchnorm(self)
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed beyond norms and biases."""
        return set()

    def token_encoder(self) -> TokenEncoder:
        """The parts a masked autoencoder runs on visible tokens only; a ValueError saying why for a model
        that is not one isotropic stage of global attention with a learned absolute position table."""
        raise ValueError(f"{type(self).__name__} is not a plain vision transformer: MAE's encoder drops the masked "
                         f"tokens, which needs one isotropic stage of global attention over a patch stem with an "
                         f"absolute position embedding (ViT/DeiT, or a specification 'patchP / attention:DxW:"
                         f"pos=abs'); pretrain this model with mim.method=simmim")


class HierarchicalModel(MixlabModel):
    """stem -> stages -> norm -> head on channels-last maps (Swin, ConvNeXt, PoolFormer,
    Container, ResNet, and the isotropic MLP-Mixer as a single stage)."""

    mask_stem = "stem"

    def __init__(self, in_chans: int, num_classes: int, img_size, stem: nn.Module, stages: Sequence[Stage],
                 norm: nn.Module, head: nn.Module, feature_info: list[dict], stage_mixers: list[str]):
        super().__init__(in_chans, num_classes, img_size)
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.norm = norm
        self.head = head
        self.feature_info = feature_info
        self.stage_mixers = stage_mixers
        self.num_features = feature_info[-1]["num_chs"]
        self.min_input_size = feature_info[-1]["reduction"]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # a stem's convolution writes NCHW; its channels-last view is made contiguous once here,
        # so that every block after it works on contiguous memory (linear layers on a strided
        # view fall back to a copy and a separate bias add: PoolFormer ran 15% slower)
        self.check_input(x)
        return self.stem(x).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        idx = self._normalize_indices(indices)
        x = self._embed(x)
        maps = {}
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages[: max(idx) + 1]):
            x = stage(x)
            if i in idx:
                maps[i] = (self.norm(x) if i == last else x).permute(0, 3, 1, 2)
        return [maps[i] for i in idx]  # in the order asked for


class FeatureExtractor(nn.Module):
    """Wraps a model to return its multi-scale NCHW feature maps (``features_only=True``)."""

    def __init__(self, model: MixlabModel, out_indices=None):
        super().__init__()
        self.model = model
        model.reset_classifier(0)  # the classifier is not used: drop its parameters
        self.out_indices = model._normalize_indices(out_indices)
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    def reductions(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices)
