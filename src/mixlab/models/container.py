"""Container (Gao et al., 2021, "Container: Context Aggregation Network"): the generic block
with the Container mixer, A = α·A_attention + β·A_static, in a four-stage pyramid.

* ``container``: every stage mixes dynamic attention and a static 5x5 depthwise
  convolution (the paper's default block);
* ``container_light``: the static convolution alone in stages 1-3, the mix in stage 4
  (the authors' released ``container_v1_light``);
* ``container_pam``: every stage mixes attention with a *dense* learned static affinity
  (the paper's Container-PAM, MLP-Mixer's A), one N x N matrix per block shared by the
  heads; like MLP-Mixer it fixes the input size.

Blocks follow the authors' code: a 3x3 depthwise conditional position encoding, BatchNorm,
the mixer (1x1 projection to V or to Q, K, V; aggregation; 1x1 output projection), and
BatchNorm + a 1x1-convolution MLP. Stages begin with a patch embedding (convolution with
kernel = stride = 4, 2, 2, 2, then LayerNorm).
"""
from __future__ import annotations

import torch.nn as nn

from ..layers import BatchNormNHWC, ClassifierHead, ConditionalPosEnc, ConvEmbed, PatchEmbed, stochastic_depth_rates
from ..mixers import ContainerMixer
from ..registry import register_layout, register_model
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .blocks import MetaBlock

_STATIC_ONLY, _MIXED, _MIXED_DENSE = "conv", "mixed", "mixed-dense"


class Container(HierarchicalModel):
    """The Container network. ``stage_types`` gives each stage's mixer: 'conv' (static
    depthwise convolution only), 'mixed' (attention + convolution), 'mixed-dense'
    (attention + dense static affinity), 'attention' (attention only)."""

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, depths=(2, 3, 8, 3),
                 dims=(128, 256, 320, 512), patch_sizes=(4, 2, 2, 2), mlp_ratios=(3.5, 3.5, 3.5, 3.5),
                 stage_types=(_MIXED,) * 4, num_heads: int = 16, kernel_size: int = 5, mix: str = "convex",
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info, mixers = [], [], []
        reduction = 1
        for i, (dim, depth, p, r, kind) in enumerate(zip(dims, depths, patch_sizes, mlp_ratios, stage_types)):
            reduction *= p
            grid = (img[0] // reduction, img[1] // reduction)
            if kind == _STATIC_ONLY:
                mk = dict(dynamic=False, static="conv")
                mixers.append(f"static: depthwise conv {kernel_size}x{kernel_size}")
            elif kind == _MIXED:
                mk = dict(dynamic=True, static="conv")
                mixers.append(f"mixed: α·attention + β·dwconv {kernel_size}x{kernel_size}")
            elif kind == _MIXED_DENSE:
                mk = dict(dynamic=True, static="dense", num_tokens=grid[0] * grid[1])
                mixers.append("mixed: α·attention + β·dense N x N static")
            elif kind == "attention":
                mk = dict(dynamic=True, static=None)
                mixers.append("dynamic: attention")
            else:
                raise ValueError(f"unknown Container stage type {kind!r}; use 'conv', 'mixed', 'mixed-dense' or "
                                 f"'attention'")
            blocks = [MetaBlock(dim, ContainerMixer(dim, num_heads, kernel_size=kernel_size, mix=mix, qkv_bias=qkv_bias,
                                                    attn_drop=attn_drop_rate, proj_drop=drop_rate, **mk),
                                mlp_ratio=r, norm_layer=BatchNormNHWC, drop=drop_rate, drop_path=dpr[i][j],
                                pos=ConditionalPosEnc(dim, 3))
                      for j in range(depth)]
            down = None if i == 0 else ConvEmbed(dims[i - 1], dim, p, p, post_norm=nn.LayerNorm)
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        super().__init__(in_chans, num_classes, img_size,
                         stem=PatchEmbed(patch_sizes[0], in_chans, dims[0], norm_layer=nn.LayerNorm),
                         stages=stages, norm=BatchNormNHWC(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        self.min_input_size = reduction
        self.apply(init_weights_vit)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("sa_weight", "alpha", "beta", "static_a"))}


@register_model
def container(**kwargs):
    """Container (paper): mixed affinity in all four stages (22.1M)."""
    return build(Container, dict(depths=(2, 3, 8, 3), dims=(128, 256, 320, 512), stage_types=(_MIXED,) * 4), kwargs)


@register_model
def container_light(**kwargs):
    """Container-Light (authors' ``container_v1_light``): static convolution in stages 1-3,
    mixed in stage 4 (20.6M, 3.85 GMACs with attention matmuls)."""
    return build(Container, dict(depths=(3, 4, 8, 3), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
                                 stage_types=(_STATIC_ONLY,) * 3 + (_MIXED,)), kwargs)


@register_model
def container_pam(**kwargs):
    """Container-PAM: attention mixed with a dense learned static affinity in all stages."""
    return build(Container, dict(depths=(2, 3, 8, 3), dims=(128, 256, 320, 512),
                                 stage_types=(_MIXED_DENSE,) * 4, mix="free"), kwargs)


# -- checkpoints: allenai/container's names ---------------------------------------------------------------
def _cblock(m) -> str:
    """mixlab's name of the authors' block ``blocks{s}.{j}`` (stages counted from 1)."""
    return f"stages.{int(m[1]) - 1}.blocks.{m[2]}"


AUTHORS_RULES = [
    (r"^patch_embed1\.(proj|norm)\.(.+)$", r"stem.\1.\2"),
    (r"^patch_embed([2-4])\.proj\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.downsample.proj.{m[2]}"),
    (r"^patch_embed([2-4])\.norm\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.downsample.post_norm.{m[2]}"),
    (r"^blocks([1-4])\.(\d+)\.pos_embed\.(.+)$", lambda m: f"{_cblock(m)}.pos.proj.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.conv1\.(.+)$", lambda m: f"{_cblock(m)}.mixer.qkv.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.conv2\.(.+)$", lambda m: f"{_cblock(m)}.mixer.proj.{m[3]}"),
    # the depthwise convolution: `attn` in the static-only block, `conv` in the mixed one
    (r"^blocks([1-4])\.(\d+)\.(?:attn|conv)\.(weight|bias)$", lambda m: f"{_cblock(m)}.mixer.conv.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.sa_weight$", lambda m: f"{_cblock(m)}.mixer.sa_weight"),
    (r"^blocks([1-4])\.(\d+)\.(.+)$", lambda m: f"{_cblock(m)}.{m[3]}"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

# container_v1_light -> container_light (the same layout converts into container); container_pam's dense
# static affinity has no released checkpoint
register_layout("authors-container", "container", [r"^patch_embed[1-4]\.", r"^blocks[1-4]\.\d+\."], AUTHORS_RULES,
                model_class=Container, broad=True)
