"""ConvNeXt (Liu et al., 2022): a ResNet modernised towards Swin. Its spatial mixer is a
7x7 depthwise convolution — a static, banded affinity per channel."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import ClassifierHead, ConvEmbed, DropPath, LayerScale, Mlp, PatchEmbed, stochastic_depth_rates
from ..mixers import DepthwiseConv
from ..registry import IMAGENET_MEAN_STD, register_default_weights, register_layout, register_model
from .base import HierarchicalModel, Stage, build, init_weights_vit


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma · mlp(LN(dwconv7x7(x))))``: one residual, the mixer un-normed
    (this is where ConvNeXt's block truly differs from the generic pre-norm block)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, layer_scale: float | None = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        self.mixer = DepthwiseConv(dim, kernel_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.ls = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mlp(self.norm(self.mixer(x)))))


class ConvNeXt(HierarchicalModel):
    """ConvNeXt: patchify stem (4x4; ``patch_size`` for small images) + LN, stages of ConvNeXt
    blocks joined by LN + 2x2/2 convolutions, global average pooling, LN, classifier."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(3, 3, 9, 3),
                 dims=(96, 192, 384, 768), kernel_size: int = 7, layer_scale: float | None = 1e-6,
                 patch_size: int = 4, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = ConvEmbed(dims[i - 1], dim, 2, 2, pre_norm=norm) if i else None
            stages.append(Stage(down, [ConvNeXtBlock(dim, kernel_size, layer_scale=layer_scale, drop_path=dpr[i][j])
                                       for j in range(depth)]))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size,
                         stem=PatchEmbed(patch_size, in_chans, dims[0], norm_layer=norm),
                         stages=stages, norm=nn.Identity(),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", norm_layer=norm, drop_rate=drop_rate),
                         feature_info=info, stage_mixers=[f"depthwise conv {kernel_size}x{kernel_size}"] * len(depths))
        self.apply(init_weights_vit)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


@register_model
def convnext_tiny(**kwargs):
    """ConvNeXt-T (28.6M, 4.5 GMACs)."""
    return build(ConvNeXt, dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), kwargs)


@register_model
def convnext_small(**kwargs):
    """ConvNeXt-S (50.2M, 8.7 GMACs)."""
    return build(ConvNeXt, dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), kwargs)


@register_model
def convnext_base(**kwargs):
    """ConvNeXt-B (88.6M, 15.4 GMACs)."""
    return build(ConvNeXt, dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), kwargs)


# -- checkpoints: timm's and facebookresearch/ConvNeXt's names, default weights --------------------------------
TIMM_RULES = [
    (r"^stem\.0\.(.+)$", r"stem.proj.\1"),
    (r"^stem\.1\.(.+)$", r"stem.norm.\1"),
    (r"^stages\.(\d+)\.downsample\.0\.(.+)$", r"stages.\1.downsample.pre_norm.\2"),
    (r"^stages\.(\d+)\.downsample\.1\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(.+)$", r"stages.\1.blocks.\2.mixer.conv.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"stages.\1.blocks.\2.ls.gamma"),
]

AUTHORS_RULES = [
    (r"^downsample_layers\.0\.0\.(.+)$", r"stem.proj.\1"),
    (r"^downsample_layers\.0\.1\.(.+)$", r"stem.norm.\1"),
    (r"^downsample_layers\.(\d+)\.0\.(.+)$", r"stages.\1.downsample.pre_norm.\2"),
    (r"^downsample_layers\.(\d+)\.1\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.(.+)$", r"stages.\1.blocks.\2.mixer.conv.\3"),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.(.+)$", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.(.+)$", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (r"^stages\.(\d+)\.(\d+)\.gamma$", r"stages.\1.blocks.\2.ls.gamma"),
    (r"^stages\.(\d+)\.(\d+)\.norm\.(.+)$", r"stages.\1.blocks.\2.norm.\3"),
    (r"^norm\.(.+)$", r"head.norm.\1"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

register_layout("authors-convnext", "convnext",
                [r"^downsample_layers\.\d+\.", r"^stages\.\d+\.\d+\.(dwconv|pwconv1|pwconv2)\."], AUTHORS_RULES,
                model_class=ConvNeXt, broad=True)
register_layout("timm", "convnext", [r"^stages\.\d+\.blocks\.\d+\.conv_dw\.", r"^stem\.0\.weight$"], TIMM_RULES,
                model_class=ConvNeXt, broad=True)
for _size in ("tiny", "small", "base"):
    register_default_weights(f"convnext_{_size}", f"hf-hub:timm/convnext_{_size}.fb_in1k", **IMAGENET_MEAN_STD)
