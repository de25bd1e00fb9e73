"""The nano family: one small model per spatial mixer, for small images (28 to 64 px), the
default line-up of ``mixlab arena``.

Each is written in the specification language (:mod:`mixlab.models.spec`) and has about
1.1 to 1.3M parameters. The hierarchical ones share one skeleton — a stride-2 stem, then
three stages of width 40, 80, 160 at strides 2, 4, 8 — so that they differ where the seeds
say architectures differ: in the spatial mixer (and in the block that the mixer's paper
wraps around it). Depths are set so that parameter counts stay comparable: a stage of a
cheap mixer (pooling) gets more blocks than a stage of an expensive one (attention). The
isotropic ones (ViT, MLP-Mixer) use 4x4 patches and width 128, as their papers' small
models do at 16x16 on 224 px.

Defaults: 32x32 RGB input, 10 classes (CIFAR-10); pass ``img_size``, ``in_chans`` and
``num_classes`` for other data (the MLP-Mixer and the ViT's position embedding are built for
their input size).
"""
from __future__ import annotations

from ..registry import register_model
from .spec import create_from_spec

#: the specification of every nano model, by name (the arena's default line-up, in order)
NANO_SPECS: dict[str, str] = {
    # ResNet-18's basic blocks: dense 3x3 convolutions, BatchNorm, strided first blocks
    "nano_resnet": "conv2 / basic:2x40 / basic:2x80 / basic:2x160",
    # ConvNeXt: patchify stem, 7x7 depthwise convolution, LN, inverted MLP, 2x2 conv downsampling
    "nano_convnext": "patch2 / convnext:2x40 / convnext:2x80 / convnext:4x160",
    # ViT: 4x4 patches, learned absolute position embedding, global attention, average pooling
    "nano_vit": "patch4 / attention:6x128:heads=4,pos=abs",
    # Swin: shifted 4x4 windows (7x7 on 56x56 maps, scaled to these maps), patch merging
    "nano_swin": ("patch2 / window:2x40:heads=2,window=4 / window:2x80:heads=4,window=4,downsample=merge"
                  " / window:3x160:heads=8,window=4,downsample=merge"),
    # MLP-Mixer: 4x4 patches, token-mixing MLP (hidden = width / 2) and channel MLP
    "nano_mixer": "patch4 / mlp:8x128",
    # PoolFormer: 3x3 average pooling (minus identity) with GroupNorm(1), LayerScale
    "nano_poolformer": "patch2 / pool:2x40 / pool:2x80 / pool:5x160",
    # Container-Light: static depthwise-conv affinity early, α·attention + β·conv in the last stage
    "nano_container": "patch2 / conv_static:2x40 / conv_static:2x80 / container:3x160:heads=4",
    # a conv-then-attention hybrid: convolutional stem and ConvNeXt stages, then global attention
    # with a conditional position encoding
    "nano_hybrid": "conv2 / convnext:2x40 / convnext:2x80 / attention:3x160:heads=4,pos=cpe",
}

_DEFAULTS = dict(img_size=32, in_chans=3, num_classes=10)


def _nano(name: str, kwargs: dict):
    model = create_from_spec("spec:" + NANO_SPECS[name], **{**_DEFAULTS, **kwargs})
    model.spec["name"] = name
    return model


@register_model
def nano_resnet(**kwargs):
    """ResNet-style nano CNN (basic blocks), ~1.1M parameters."""
    return _nano("nano_resnet", kwargs)


@register_model
def nano_convnext(**kwargs):
    """ConvNeXt-style nano CNN (7x7 depthwise), ~1.1M parameters."""
    return _nano("nano_convnext", kwargs)


@register_model
def nano_vit(**kwargs):
    """Isotropic nano ViT (4x4 patches, width 128, depth 6), ~1.2M parameters."""
    return _nano("nano_vit", kwargs)


@register_model
def nano_swin(**kwargs):
    """Nano Swin (shifted 4x4 windows), ~1.2M parameters."""
    return _nano("nano_swin", kwargs)


@register_model
def nano_mixer(**kwargs):
    """Nano MLP-Mixer (4x4 patches, width 128, depth 8), ~1.1M parameters."""
    return _nano("nano_mixer", kwargs)


@register_model
def nano_poolformer(**kwargs):
    """Nano PoolFormer (pooling mixer), ~1.2M parameters."""
    return _nano("nano_poolformer", kwargs)


@register_model
def nano_container(**kwargs):
    """Nano Container-Light (static conv early, mixed affinity late), ~1.2M parameters."""
    return _nano("nano_container", kwargs)


@register_model
def nano_hybrid(**kwargs):
    """Nano conv-then-attention hybrid, ~1.2M parameters."""
    return _nano("nano_hybrid", kwargs)
