"""Dense prediction on any mixlab model: a backbone adapter and torchvision's detectors on top of it.

:class:`DenseBackbone` turns a model's ``forward_intermediates`` into what torchvision's detectors
read: an ``OrderedDict`` of NCHW maps named ``"0"``, ``"1"``, ... of one width, ``out_channels``,
with their strides recorded. A model with stages of several strides (ConvNeXt, Swin, ResNet, PVT,
the hierarchical nano models) goes through a feature pyramid network (Lin et al., 2017;
torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`); a model of one stride (a plain ViT,
an isotropic specification such as ``patch4 / attention:6x128``) through ViTDet's simple feature
pyramid (Li et al., 2022, :class:`SimpleFeaturePyramid`), built from its last map only.
:func:`build_detector` puts Faster R-CNN, Mask R-CNN, RetinaNet or FCOS on such a backbone, with
anchors and RoI pooling sized from the strides it gives. ``docs/detection-models.md`` says why.

torchvision is imported inside the functions that need it: importing :mod:`mixlab.models` (which
imports every module of the package) stays free of it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from ..layers import LayerNorm2d
from .base import FeatureExtractor, MixlabModel

__all__ = ["DenseBackbone", "SimpleFeaturePyramid", "build_detector", "PYRAMIDS", "EXTRA_LEVELS", "DETECTORS",
           "DETECTOR_EXTRA_LEVELS", "SIMPLE_STRIDES"]

#: the choices of ``DenseBackbone(pyramid=)``
PYRAMIDS = ("auto", "fpn", "simple", "none")
#: the choices of ``DenseBackbone(extra_levels=)``: a stride-2 subsampling of the coarsest map named ``"pool"``
#: (torchvision's ``LastLevelMaxPool``: the R-CNNs' region proposals), two stride-2 3x3 convolutions named
#: ``"p6"``, ``"p7"`` (``LastLevelP6P7``, from the coarsest output map: RetinaNet's and FCOS's), or none
EXTRA_LEVELS = ("pool", "p6p7", "none")
#: the kinds :func:`build_detector` builds
DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
#: the extra levels torchvision builds each detector with (any of them works with any detector)
DETECTOR_EXTRA_LEVELS = {"faster_rcnn": "pool", "mask_rcnn": "pool", "retinanet": "p6p7", "fcos": "p6p7"}
#: the strides of the simple pyramid's levels by default: ViTDet's (and a ResNet FPN's C2-C5)
SIMPLE_STRIDES = (4, 8, 16, 32)
#: the anchor size of each level as a multiple of its stride, by detector (see :func:`build_detector`)
ANCHOR_SIZE = {"faster_rcnn": 8, "mask_rcnn": 8, "retinanet": 4, "fcos": 1}
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _number(x: float) -> int | float:
    """An int where the stride is whole (the usual case), the float otherwise (a patch of 14)."""
    return int(x) if float(x).is_integer() else float(x)


def default_levels(model: MixlabModel) -> list[int]:
    """The ``feature_info`` indices a pyramid network uses by default: for each stride of at least 4, the
    last stage of that stride (the deepest map at that resolution), the deepest four of them at most."""
    last_of: dict = {}
    for i, f in enumerate(model.feature_info):
        last_of[f["reduction"]] = i
    chosen = sorted(i for r, i in last_of.items() if r >= 4)
    if not chosen:
        strides = sorted(last_of)
        raise ValueError(f"{_model_name(model)} has no stage of stride 4 or more (its strides: {strides}); "
                         f"choose the stages with levels=[...]")
    return chosen[-4:]


def _init_conv(module: nn.Module) -> None:
    # as torchvision's FPN initialises its convolutions, so that both pyramids start alike
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: maps of several strides from one map of stride ``in_stride``.

    Each level resamples the input map by a power of two: up by stride-2 2x2 transposed convolutions
    (each halving the width; LayerNorm over channels and GELU between two of them), down by max pooling
    (kernel = stride = the factor), or not at all; then a 1x1 convolution to ``out_channels`` and a 3x3
    one, each followed by a LayerNorm over channels (convolutions without bias). A level asked for
    stride ``s`` is made by the power of two nearest to ``s / in_stride``: from a 16-pixel patch, strides
    4, 8, 16, 32 are 4x and 2x up, identity and 2x down (the paper's); from a 4-pixel patch they are
    identity and 2x, 4x, 8x down; from a 14-pixel patch they come out as 3.5, 7, 14, 28.
    ``strides`` records what each level has.
    """

    def __init__(self, in_channels: int, in_stride: float, out_channels: int,
                 strides: Sequence[float] = SIMPLE_STRIDES):
        super().__init__()
        if not strides:
            raise ValueError("the simple pyramid needs at least one stride")
        exps = [round(math.log2(s / in_stride)) for s in strides]
        if len(set(exps)) != len(exps):
            raise ValueError(f"simple pyramid strides {tuple(strides)} from a map of stride {in_stride}: two of them "
                             f"come out the same (each level is the map resampled by a power of two)")
        self.strides = [_number(in_stride * 2.0 ** e) for e in exps]
        self.levels = nn.ModuleList()
        for e in exps:
            layers: list[nn.Module] = []
            dim = in_channels
            for j in range(-e):  # up by 2 ** -e
                if j:
                    layers += [LayerNorm2d(dim), nn.GELU()]
                layers.append(nn.ConvTranspose2d(dim, max(dim // 2, 1), kernel_size=2, stride=2))
                dim = max(dim // 2, 1)
            if e > 0:
                layers.append(nn.MaxPool2d(kernel_size=2 ** e, stride=2 ** e))
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.levels.append(nn.Sequential(*layers))
        _init_conv(self)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))


class DenseBackbone(nn.Module):
    """A mixlab model as the backbone of a detector: ``forward(x)`` returns an ``OrderedDict`` of NCHW maps
    named ``"0"``, ``"1"``, ... (finest first), then the extra levels (``"pool"``, or ``"p6"``, ``"p7"``).

    ``model``: a :class:`~mixlab.models.base.MixlabModel` (its classifier is removed, as a feature extractor
    does) or a :class:`~mixlab.models.base.FeatureExtractor` (its ``out_indices`` are the default ``levels``).

    ``pyramid``:

    * ``"fpn"``: the maps of the stages in ``levels`` (``feature_info`` indices; default
      :func:`default_levels`: the stages of stride 4 or more, the deepest four at most) through torchvision's
      feature pyramid network. A model of one stride (a plain ViT) is refused: there is no pyramid to fuse;
    * ``"simple"``: ViTDet's :class:`SimpleFeaturePyramid` from one map (``levels``: one index, default the
      last, the model's final features), at ``simple_strides`` (default 4, 8, 16, 32, whatever the patch);
    * ``"auto"``: ``"fpn"`` for a model whose ``feature_info`` has several strides, ``"simple"`` for one;
    * ``"none"``: the maps of ``levels`` as the model gives them (``out_channels`` is not used; the attribute
      is their width where they share one, None otherwise).

    ``extra_levels`` (:data:`EXTRA_LEVELS`): coarser maps after the pyramid's, ``"pool"`` (default, what the
    R-CNNs use) or ``"p6p7"`` (RetinaNet's and FCOS's) or ``"none"``; :data:`DETECTOR_EXTRA_LEVELS` says which
    torchvision uses for each detector.

    Attributes: ``out_channels`` (what torchvision's detectors read), ``names``, ``strides`` and ``channels``
    of the output maps in order, ``level_names`` (the pyramid's own levels, without the extra ones: what RoI
    pooling reads), ``pyramid`` (the one chosen), ``indices`` (the model's maps used), ``size_divisible`` (a
    side every map's stride divides: batches padded to it give maps of exactly these strides), ``in_chans``.
    """

    def __init__(self, model: MixlabModel | FeatureExtractor, levels: Sequence[int] | None = None,
                 out_channels: int = 256, pyramid: str = "auto", extra_levels: str = "pool", *,
                 simple_strides: Sequence[float] = SIMPLE_STRIDES):
        super().__init__()
        if isinstance(model, FeatureExtractor):
            levels = model.out_indices if levels is None else levels
            model = model.model
        if not isinstance(model, MixlabModel):
            raise TypeError(f"DenseBackbone needs a mixlab model (feature_info, forward_intermediates), "
                            f"got {type(model).__name__}")
        if pyramid not in PYRAMIDS:
            raise ValueError(f"pyramid must be one of {', '.join(PYRAMIDS)}, got {pyramid!r}")
        if extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"extra_levels must be one of {', '.join(EXTRA_LEVELS)}, got {extra_levels!r}")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}")
        name = _model_name(model)
        info = model.feature_info
        one_stride = len({f["reduction"] for f in info}) == 1
        if pyramid == "auto":
            pyramid = "simple" if one_stride else "fpn"
        if pyramid == "fpn" and one_stride:
            raise ValueError(f"{name} has one stride: its {len(info)} feature maps are all at stride "
                             f"{info[0]['reduction']}, so a feature pyramid network has no pyramid to fuse; use "
                             f"pyramid='simple' (ViTDet's simple feature pyramid, built from the last map), or "
                             f"pyramid='auto', which picks it")
        if levels is None:
            indices = [len(info) - 1] if pyramid == "simple" or one_stride else default_levels(model)
        else:
            indices = model._normalize_indices(list(levels))
        if pyramid == "simple" and len(indices) != 1:
            raise ValueError(f"the simple pyramid is built from one map, got levels={list(levels)}; pass one index "
                             f"(default: the last, {len(info) - 1}) and choose its strides with simple_strides=")
        reductions = [info[i]["reduction"] for i in indices]
        if pyramid == "fpn" and any(b <= a for a, b in zip(reductions, reductions[1:])):
            raise ValueError(f"a feature pyramid network needs levels of increasing stride, finest first; "
                             f"{name}'s levels {indices} have strides {reductions}")

        model.reset_classifier(0)  # the classifier is not used: drop its parameters
        self.model = model
        self.indices = indices
        self.pyramid = pyramid
        self.in_chans = model.in_chans
        widths = [info[i]["num_chs"] for i in indices]
        if pyramid == "fpn":
            from torchvision.ops import FeaturePyramidNetwork
            self.fpn = FeaturePyramidNetwork(widths, out_channels)
            strides = list(reductions)
            channels = [out_channels] * len(indices)
        elif pyramid == "simple":
            self.simple = SimpleFeaturePyramid(widths[0], reductions[0], out_channels, simple_strides)
            strides = list(self.simple.strides)
            channels = [out_channels] * len(strides)
        else:
            strides, channels = list(reductions), widths
        self.level_names = [str(i) for i in range(len(strides))]
        # every map's stride divides the padded side, and so does the stride of the model's maps used
        whole = [int(s) for s in strides + reductions if float(s).is_integer()]
        self.size_divisible = math.lcm(*whole)

        self.extra = None
        names = list(self.level_names)
        if extra_levels == "pool":
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
            self.extra = LastLevelMaxPool()
            names.append("pool")
            strides.append(_number(2 * strides[-1]))
            channels.append(channels[-1])
        elif extra_levels == "p6p7":
            from torchvision.ops.feature_pyramid_network import LastLevelP6P7
            self.extra = LastLevelP6P7(channels[-1], channels[-1])  # from the coarsest output map (P5)
            names += ["p6", "p7"]
            strides += [_number(2 * strides[-1]), _number(4 * strides[-1])]
            channels += [channels[-1]] * 2
        self.names, self.strides, self.channels = names, strides, channels
        self.out_channels = channels[0] if len(set(channels)) == 1 else None

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.model.forward_intermediates(x, self.indices)
        if self.pyramid == "fpn":
            out = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        elif self.pyramid == "simple":
            out = self.simple(maps[0])
        else:
            out = OrderedDict((str(i), m) for i, m in enumerate(maps))
        if self.extra is not None:
            feats, names = list(out.values()), list(out)
            feats, names = self.extra(feats, feats, names)
            out = OrderedDict(zip(names, feats))
        return out

    def extra_repr(self) -> str:
        return f"pyramid={self.pyramid}, indices={self.indices}, names={self.names}, strides={self.strides}"


def _fcos_head(width: int, num_classes: int) -> nn.Module:
    """torchvision's FCOS head (four 3x3 convolutions, GroupNorm, ReLU per branch) with GroupNorm of
    gcd(32, width) groups: torchvision's 32 at a width of 256, and a narrower backbone's maps divide too."""
    from functools import partial

    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
    norm = partial(nn.GroupNorm, math.gcd(32, width))
    head = FCOSHead(width, 1, num_classes, num_convs=0)  # its branches, without the convolutions, replaced here
    head.classification_head = FCOSClassificationHead(width, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(width, 1, norm_layer=norm)
    return head


def build_detector(kind: str, backbone: DenseBackbone, num_classes: int, min_size: int = 800, max_size: int = 1333,
                   *, anchor_size: float | None = None, aspect_ratios: Sequence[float] | None = None,
                   **kw) -> nn.Module:
    """torchvision's ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` (``kind``: :data:`DETECTORS`) on
    ``backbone``; in training mode ``model(images, targets)`` returns the losses, in eval mode ``model(images)``
    the detections (torchvision's formats).

    ``num_classes`` counts the background, class 0, for every kind: labels are 1..num_classes-1. The
    R-CNNs' softmax has a background output, as torchvision expects. RetinaNet and FCOS have one sigmoid per
    class and no background output (a location matched to no box has every sigmoid's target 0); torchvision
    reads a label as the index of its output, so with the same labels their output 0 is never a target and
    learns never to fire. The same targets and ``num_classes`` thus serve all four.

    Anchors: one size per level, ``anchor_size`` times the level's stride (default :data:`ANCHOR_SIZE`: 8 for
    the R-CNNs, torchvision's 32 at stride 4 to 512 at 64; 4 for RetinaNet, torchvision's smallest octave,
    32 at stride 8), with ``aspect_ratios`` (default 0.5, 1, 2), over exactly the levels the backbone gives,
    extra ones included. FCOS takes neither: its "anchor" is the level's stride with ratio 1, one per location,
    because torchvision's FCOS reads the anchor's width as the stride (its centre-sampling radius and the size
    range each level is matched to). The R-CNNs pool RoIs (7x7 boxes, 14x14 masks, sampling ratio 2) from the
    backbone's ``level_names``, not the extra levels; Mask R-CNN's mask head is ``out_channels`` wide
    (torchvision's 256 at the default width).

    Normalisation: the detector does none (``image_mean`` 0, ``image_std`` 1): mixlab's data pipeline
    normalises, with the mean and std its datasets and checkpoints record, as for classification; so the
    detector takes the tensors the pipeline gives, and pads batches with 0, the mean. Images are resized so
    that the shorter side is ``min_size`` (the longer at most ``max_size``) and padded to a multiple of
    ``backbone.size_divisible``. Any other keyword argument goes to the torchvision class (an
    ``anchor_generator``, ``rpn_anchor_generator``, ``box_roi_pool``, ``image_mean`` there replaces the above).
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
    if not isinstance(backbone, DenseBackbone):
        raise TypeError(f"build_detector needs a DenseBackbone, got {type(backbone).__name__}")
    if backbone.out_channels is None:
        raise ValueError(f"the backbone's maps have several widths {backbone.channels} (pyramid='none'); a "
                         f"detector's heads are shared across levels: use pyramid='fpn' or 'simple'")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background: at least 2, got {num_classes!r}")
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    n = len(backbone.strides)
    if kind == "fcos":
        if anchor_size is not None or aspect_ratios is not None:
            raise ValueError("FCOS takes no anchor_size or aspect_ratios: its one point per location has the "
                             "level's stride as its size (torchvision's FCOS reads it as the stride)")
        sizes, ratios = [(s,) for s in backbone.strides], ((1.0,),) * n
    else:
        mult = ANCHOR_SIZE[kind] if anchor_size is None else anchor_size
        if mult <= 0:
            raise ValueError(f"anchor_size is a multiple of each level's stride, > 0; got {anchor_size!r}")
        sizes = [(_number(mult * s),) for s in backbone.strides]
        ratios = (tuple(float(r) for r in (aspect_ratios or ASPECT_RATIOS)),) * n
    anchors = AnchorGenerator(tuple(sizes), ratios)
    kw.setdefault("image_mean", [0.0] * backbone.in_chans)
    kw.setdefault("image_std", [1.0] * backbone.in_chans)
    kw.setdefault("size_divisible", backbone.size_divisible)
    if kind == "retinanet":
        kw.setdefault("anchor_generator", anchors)
        return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, **kw)
    if kind == "fcos":
        kw.setdefault("anchor_generator", anchors)
        if "head" not in kw:
            kw["head"] = _fcos_head(backbone.out_channels, num_classes)
        return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, **kw)

    kw.setdefault("rpn_anchor_generator", anchors)
    kw.setdefault("box_roi_pool", MultiScaleRoIAlign(backbone.level_names, output_size=7, sampling_ratio=2))
    if kind == "faster_rcnn":
        return FasterRCNN(backbone, num_classes, min_size=min_size, max_size=max_size, **kw)
    kw.setdefault("mask_roi_pool", MultiScaleRoIAlign(backbone.level_names, output_size=14, sampling_ratio=2))
    own_mask_head = "mask_head" not in kw and "mask_predictor" not in kw
    model = MaskRCNN(backbone, num_classes, min_size=min_size, max_size=max_size, **kw)
    if own_mask_head:  # torchvision's is 256 wide whatever the backbone; this one is as wide as its maps
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        width = backbone.out_channels
        model.roi_heads.mask_head = MaskRCNNHeads(width, (width,) * 4, 1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(width, width, num_classes)
    return model
