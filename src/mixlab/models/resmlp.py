"""ResMLP (Touvron et al., 2021, "ResMLP: Feedforward networks for image classification with
data-efficient training"): the generic block with a single linear layer across patches as
its mixer — a static, dense affinity A = W_tokens — an affine "norm" and LayerScale."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import Affine, ClassifierHead, Mlp, PatchEmbed
from ..mixers.token_mlp import TokenLinear, TokenProjection
from ..registry import (IMAGENET_MEAN_STD, register_default_weights, register_layout, register_model,
                        register_spec_mixer)
from .base import HierarchicalModel, Stage, build, patch_grid
from .nano import register_nano
from .blocks import MetaBlock


class ResMLPAffine(Affine):
    """ResMLP's normalisation ``alpha * x + beta`` with its parameters stored as (1, 1, C),
    the shape of timm's checkpoints (the authors' are (C,)), so that those load unchanged.
    The result is the same as :class:`mixlab.layers.Affine`'s on a (..., C) input."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))


class ResMLP(HierarchicalModel):
    """ResMLP: patchify stem, ``depth`` blocks of (Affine, linear token mixing, LayerScale)
    and (Affine, channel MLP, LayerScale), a final Affine, average pooling, classifier.

    The token layer fixes the input size to ``img_size``. ``layer_scale``: the LayerScale
    initial value (the authors: 0.1 for 12 blocks, 1e-5 for 24, 1e-6 for 36). Stochastic
    depth uses the same rate in every block, as the authors' code does. Initialisation as
    the authors': truncated normal (std 0.02) linear and token weights, zero biases.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, mlp_ratio: float = 4.0, layer_scale: float = 0.1,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        grid = patch_grid(img_size, patch_size)
        n = grid[0] * grid[1]
        blocks = [MetaBlock(embed_dim, TokenLinear(n, grid), norm_layer=ResMLPAffine,
                            mlp=Mlp(embed_dim, int(mlp_ratio * embed_dim), drop=drop_rate),
                            drop_path=drop_path_rate, layer_scale=layer_scale) for _ in range(depth)]
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, embed_dim),
                         stages=[Stage(None, blocks)], norm=ResMLPAffine(embed_dim),
                         head=ClassifierHead(embed_dim, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=[dict(num_chs=embed_dim, reduction=patch_size, module="stages.0")],
                         stage_mixers=[f"linear token mixing ({n} tokens)"])
        self.min_input_size = patch_size
        for m in self.modules():
            if isinstance(m, (nn.Linear, TokenProjection)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        # the affine "norms" are stored (1, 1, C): the optimiser's rule for 1-D tensors misses them
        return {n for n, _ in self.named_parameters() if n.endswith((".alpha", ".beta"))}


@register_model
def resmlp_12_224(**kwargs):
    """ResMLP-12 (15.35M, 3.01 GMACs; timm ``resmlp_12_224``, paper Table: 15M / 3.0 GFLOPs)."""
    return build(ResMLP, dict(patch_size=16, embed_dim=384, depth=12, layer_scale=0.1), kwargs)


@register_model
def resmlp_24_224(**kwargs):
    """ResMLP-24 (30.02M, 5.96 GMACs; timm ``resmlp_24_224``, paper Table: 30M / 6.0 GFLOPs)."""
    return build(ResMLP, dict(patch_size=16, embed_dim=384, depth=24, layer_scale=1e-5), kwargs)


# -- timm's names -------------------------------------------------------------------------------
register_layout("timm", "resmlp", [r"^blocks\.\d+\.linear_tokens\."], [
    (r"^blocks\.(\d+)\.linear_tokens\.(weight|bias)$", r"stages.0.blocks.\1.mixer.proj.\2"),
    (r"^blocks\.(\d+)\.mlp_channels\.(.+)$", r"stages.0.blocks.\1.mlp.\2"),
    (r"^blocks\.(\d+)\.ls([12])$", r"stages.0.blocks.\1.ls\2.gamma"),
    (r"^blocks\.(\d+)\.(norm[12]\..+)$", r"stages.0.blocks.\1.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
], model_class=ResMLP)


# -- specifications -------------------------------------------------------------------------------
def _spec_block(st, width, grid, ratio, drop_path, index, drop):
    return MetaBlock(width, TokenLinear(grid[0] * grid[1], grid), norm_layer=Affine,
                     mlp=Mlp(width, int(ratio * width), drop=drop), drop_path=drop_path,
                     layer_scale=float(st["layer_scale"]))


register_spec_mixer("resmlp", {"layer_scale": 0.1}, "ResMLP linear token mixing", _spec_block)
for _name in ("resmlp_12_224", "resmlp_24_224"):
    register_default_weights(_name, f"hf-hub:timm/{_name}.fb_in1k", **IMAGENET_MEAN_STD)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# ResMLP: one linear token layer (shared by the channels), Affine norms, LayerScale 0.1
register_nano("nano_resmlp", "patch4 / resmlp:8x128")
