"""The nano family: one small model per spatial mixer, for small images (28 to 64 px), the
line-ups of ``mixlab arena``.

Each is written in the specification language (:mod:`mixlab.models.spec`) and has about
1.1 to 1.3M parameters. The hierarchical ones share one skeleton — a stride-2 stem, then
three stages of width 40, 80, 160 at strides 2, 4, 8 — so that they differ where the papers
say architectures differ: in the spatial mixer (and in the block that the mixer's paper
wraps around it). Depths are set so that parameter counts stay comparable: a stage of a
cheap mixer (pooling) gets more blocks than a stage of an expensive one (attention). The
isotropic ones (ViT, MLP-Mixer) use 4x4 patches and width 128, as their papers' small
models do at 16x16 on 224 px.

Two line-ups: :data:`NANO_SPECS`, the eight families of mixlab's main argument (the arena's
default, ``nano``), and one model for each further family of the zoo (``nano-zoo``; ``nano-all``
is both), written on the same skeleton and registered from the family's own module with
:func:`register_nano` (:data:`NANO_ZOO_SPECS`, :data:`NANO_ZOO_CLASSES`).

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

#: one nano model for each further family (``mixlab arena nano-zoo``), on the same skeleton, each
#: registered by its family's module with :func:`register_nano`: written as a specification ...
NANO_ZOO_SPECS: dict[str, str] = {}
#: ... or, for families whose blocks are not spec mixers, a model the family registers itself (CaiT's
#: class-attention stage, ConViT's locally initialised GPSA, ViT_C's convolutional stem, the class
#: token of PVT's and CvT's last stage, CETNet's convolutional embeddings, CoAtNet's MBConv stages,
#: BoTNet's and LR-Net's ResNet skeleton)
NANO_ZOO_CLASSES: list[str] = []

#: the arena's names for line-ups (``nano-zoo`` in the order the families register, alphabetical)
LINE_UPS: dict[str, list[str]] = {"nano": list(NANO_SPECS), "nano-zoo": [], "nano-all": list(NANO_SPECS)}

_DEFAULTS = dict(img_size=32, in_chans=3, num_classes=10)


def _register(name: str, spec: str) -> None:
    """Register ``name`` as the model its specification describes (with the nano defaults)."""
    def entry(**kwargs):
        model = create_from_spec("spec:" + spec, **{**_DEFAULTS, **kwargs})
        model.spec["name"] = name
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Nano model ``{spec}`` (32x32 RGB, 10 classes by default)."
    register_model(entry)


def register_nano(name: str, spec: str | None = None) -> None:
    """Add a family's nano model to the ``nano-zoo`` line-up (and ``nano-all``): with ``spec``, register
    ``name`` as the model that specification describes; without, ``name`` is a model the family has
    registered itself (32x32 RGB and 10 classes by default, as every nano model)."""
    if name in LINE_UPS["nano-all"]:
        raise ValueError(f"nano model {name!r} is registered twice")
    if spec is None:
        NANO_ZOO_CLASSES.append(name)
    else:
        NANO_ZOO_SPECS[name] = spec
        _register(name, spec)
    LINE_UPS["nano-zoo"].append(name)
    LINE_UPS["nano-all"].append(name)


for _name, _spec in NANO_SPECS.items():
    _register(_name, _spec)
