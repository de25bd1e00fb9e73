"""MLP-Mixer (Tolstikhin et al., 2021): the generic block with a token-mixing MLP as its
mixer — a static, dense affinity — on an isotropic grid of patch tokens."""
from __future__ import annotations

import math
from functools import partial

import torch.nn as nn

from ..layers import ClassifierHead, Mlp, PatchEmbed, stochastic_depth_rates
from ..mixers import TokenMixingMLP
from ..registry import (INCEPTION_MEAN_STD, register_architecture_kwargs, register_default_weights, register_layout,
                        register_model)
from .base import HierarchicalModel, Stage, build, init_weights_mixer, patch_grid
from .blocks import MetaBlock


class MlpMixer(HierarchicalModel):
    """MLP-Mixer: patchify stem, ``depth`` blocks of (LN, token-mixing MLP) and (LN, channel
    MLP), LN, global average pooling, classifier. The token MLP fixes the input size to
    ``img_size``."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 512, depth: int = 8, mlp_ratio=(0.5, 4.0), drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        grid = patch_grid(img_size, patch_size)
        n = grid[0] * grid[1]
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = stochastic_depth_rates(drop_path_rate, [depth])[0]
        tok_hidden, ch_hidden = int(mlp_ratio[0] * embed_dim), int(mlp_ratio[1] * embed_dim)
        blocks = [MetaBlock(embed_dim, TokenMixingMLP(n, tok_hidden, grid, drop=drop_rate),
                             mlp=Mlp(embed_dim, ch_hidden, drop=drop_rate), norm_layer=norm, drop_path=dpr[i])
                  for i in range(depth)]
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, embed_dim),
                         stages=[Stage(None, blocks)], norm=norm(embed_dim),
                         head=ClassifierHead(embed_dim, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=[dict(num_chs=embed_dim, reduction=patch_size, module="stages.0")],
                         stage_mixers=[f"token-mixing MLP ({n} tokens)"])
        self.min_input_size = patch_size
        init_weights_mixer(self)


@register_model
def mixer_s16_224(**kwargs):
    """Mixer-S/16 (18.5M, 3.8 GMACs)."""
    return build(MlpMixer, dict(patch_size=16, embed_dim=512, depth=8), kwargs)


@register_model
def mixer_b16_224(**kwargs):
    """Mixer-B/16 (59.9M, 12.6 GMACs)."""
    return build(MlpMixer, dict(patch_size=16, embed_dim=768, depth=12), kwargs)


# -- checkpoints: timm's names, the input size they were made for, default weights ------------------------------
TIMM_RULES = [
    (r"^blocks\.(\d+)\.mlp_tokens\.(.+)$", r"stages.0.blocks.\1.mixer.\2"),
    (r"^blocks\.(\d+)\.mlp_channels\.(.+)$", r"stages.0.blocks.\1.mlp.\2"),
    (r"^blocks\.(\d+)\.(.+)$", r"stages.0.blocks.\1.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


def _architecture_kwargs(sd: dict, fmt: str, model: MlpMixer) -> dict:
    """``img_size`` of a checkpoint whose token MLP is for another grid (it cannot be resampled)."""
    fc1 = next((sd[k] for k in ("stages.0.blocks.0.mixer.fc1.weight", "blocks.0.mlp_tokens.fc1.weight") if k in sd),
               None)
    proj = sd.get("stem.proj.weight")
    if fc1 is not None and proj is not None:
        side = math.isqrt(fc1.shape[1])
        if side * side == fc1.shape[1]:
            img = side * proj.shape[-1]
            if (img, img) != tuple(model.img_size):
                return {"img_size": img}
    return {}


register_layout("timm", "mlp_mixer", [r"^blocks\.\d+\.mlp_tokens\."], TIMM_RULES, model_class=MlpMixer, broad=True)
register_architecture_kwargs("mlp_mixer", _architecture_kwargs)
register_default_weights("mixer_b16_224", "hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k", **INCEPTION_MEAN_STD)
