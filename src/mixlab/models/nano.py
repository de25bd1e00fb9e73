"""The nano family: one small model per spatial mixer, for small images (28 to 64 px), the
line-ups of ``mixlab arena``.

Each is written in the specification language (:mod:`mixlab.models.spec`) and has about
1.1 to 1.3M parameters. The hierarchical ones share one skeleton — a stride-2 stem, then
three stages of width 40, 80, 160 at strides 2, 4, 8 — so that they differ where the seeds
say architectures differ: in the spatial mixer (and in the block that the mixer's paper
wraps around it). Depths are set so that parameter counts stay comparable: a stage of a
cheap mixer (pooling) gets more blocks than a stage of an expensive one (attention). The
isotropic ones (ViT, MLP-Mixer) use 4x4 patches and width 128, as their papers' small
models do at 16x16 on 224 px.

Two line-ups: :data:`NANO_SPECS`, the eight families of the seeds' main argument (the arena's
default, ``nano``), and :data:`NANO_ZOO_SPECS`, one model for each further family of the
zoo (``nano-zoo``; ``nano-all`` is both), written on the same skeleton.

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

#: one nano model for each further family (``mixlab arena nano-zoo``), on the same skeleton
NANO_ZOO_SPECS: dict[str, str] = {
    # ResMLP: one linear token layer (shared by the channels), Affine norms, LayerScale 0.1
    "nano_resmlp": "patch4 / resmlp:8x128",
    # gMLP: spatial gating unit (a linear token layer on half of the expanded channels gates the other half)
    "nano_gmlp": "patch4 / gmlp:8x128:mlp_ratio=6",
    # Vision Permutator: linear layers along height, width and channels, split-attention fusion
    "nano_vip": "patch2 / permute:2x40:mlp_ratio=3 / permute:2x80:mlp_ratio=3 / permute:4x160:mlp_ratio=3",
    # ShiftViT: a third of the channels shifted one pixel in four directions, no parameters, BN-MLP
    "nano_shiftvit": "patch2 / shift:2x40:mlp_ratio=2 / shift:4x80:mlp_ratio=2 / shift:9x160:mlp_ratio=2",
    # S2-MLPv2: channel expansion, two four-way spatial shifts and an identity, split attention
    "nano_s2mlp": "patch2 / s2mlp:2x40:mlp_ratio=3 / s2mlp:3x80:mlp_ratio=3 / s2mlp:3x160:mlp_ratio=3",
    # CycleMLP: cycle fully-connected layers along H and W and a channel FC, split attention
    "nano_cyclemlp": "patch2 / cycle:2x40 / cycle:4x80 / cycle:2x160",
    # GFNet: a learned global filter in the Fourier domain (a circulant affinity), abs. position embedding
    "nano_gfnet": "patch2 / gfilter:2x40:pos=abs / gfilter:3x80 / gfilter:4x160",
    # DWNet: Swin's skeleton with a 7x7 depthwise convolution (BatchNorm, ReLU) in place of windows
    "nano_dwnet": ("patch2 / dwconv_block:2x40 / dwconv_block:3x80:downsample=merge"
                   " / dwconv_block:3x160:downsample=merge"),
    # dynamic DWNet: the depthwise kernel is predicted from the pooled input, per image
    "nano_ddwnet": ("patch2 / ddwconv:2x40:reduction=8 / ddwconv:2x80:downsample=merge,reduction=8"
                    " / ddwconv:2x160:downsample=merge,reduction=8"),
    # RepLKNet: large depthwise kernels (13x13 on 16x16 and 8x8 maps) with a parallel 5x5 branch
    "nano_replknet": "conv2 / largekernel:2x40:kernel=13 / largekernel:3x80:kernel=13 / largekernel:3x160:kernel=7",
    # EfficientFormer: pooling 4D blocks, then one attention (3D) block with a learned offset bias
    "nano_efficientformer": ("conv2 / meta4d:2x40 / meta4d:2x80 / meta4d:3x160"
                             " / meta3d:1x160:downsample=none,heads=4,key_dim=32"),
    # Learnable Tree Filter v2: filtering along a minimum spanning tree of the feature grid
    "nano_treefilter": "patch2 / treefilter:2x40 / treefilter:2x80 / treefilter:4x160",
}

#: nano models of families whose blocks are not spec mixers, registered in their own modules
#: (CaiT's class-attention stage, ConViT's locally initialised GPSA, ViT_C's convolutional stem, the
#: class token of PVT's and CvT's last stage, CETNet's convolutional embeddings, CoAtNet's MBConv
#: stages, BoTNet's and LR-Net's ResNet skeleton)
NANO_ZOO_CLASSES: tuple[str, ...] = ("nano_cait", "nano_convit", "nano_vit_c", "nano_pvt", "nano_cvt", "nano_cetnet",
                                      "nano_coatnet", "nano_botnet", "nano_lrnet")

#: the arena's names for line-ups
LINE_UPS: dict[str, tuple[str, ...]] = {
    "nano": tuple(NANO_SPECS),
    "nano-zoo": tuple(NANO_ZOO_SPECS) + NANO_ZOO_CLASSES,
    "nano-all": tuple(NANO_SPECS) + tuple(NANO_ZOO_SPECS) + NANO_ZOO_CLASSES,
}

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


for _name, _spec in {**NANO_SPECS, **NANO_ZOO_SPECS}.items():
    _register(_name, _spec)
