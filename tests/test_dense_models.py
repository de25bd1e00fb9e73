"""DenseBackbone (a feature pyramid network or ViTDet's simple pyramid on a mixlab model) and torchvision's
detectors built on it: names, widths and strides of the maps, the choice of pyramid, one training step of
each detector, and every nano model of the arena's line-up as a backbone."""
from __future__ import annotations

import math

import pytest
import torch

from mixlab.factory import create_model
from mixlab.models.base import FeatureExtractor
from mixlab.models.dense import DETECTOR_EXTRA_LEVELS, DETECTORS, DenseBackbone, SimpleFeaturePyramid, build_detector
from mixlab.models.nano import LINE_UPS

#: one intra-op thread: the file takes 12 s instead of 30 on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")

#: few proposals, sampled RoIs and candidates: a step costs a second, not several, on a busy CPU
SMALL = {"faster_rcnn": dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=40, rpn_pre_nms_top_n_test=100,
                             rpn_post_nms_top_n_test=40, rpn_batch_size_per_image=64, box_batch_size_per_image=64),
         "retinanet": dict(topk_candidates=100), "fcos": dict(topk_candidates=100)}
SMALL["mask_rcnn"] = SMALL["faster_rcnn"]


def shapes_match_strides(out, backbone, side: int) -> bool:
    return all(v.shape[-2:] == (math.ceil(side / s),) * 2 for v, s in zip(out.values(), backbone.strides))


def images_and_targets():
    """Two images of different sizes (the detector resizes and pads them), hand-made boxes (XYXY, float),
    labels (int64, 1-based: 0 is the background) and the boxes' masks."""
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 62.0, 52.0]]), torch.tensor([[10.0, 12.0, 44.0, 60.0]])]
    targets = []
    for img, b, labels in zip(images, boxes, ([1, 3], [2])):
        masks = torch.zeros(len(b), *img.shape[-2:], dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, b.long().tolist()):
            m[y0:y1, x0 + 2:x1 - 2] = 1  # not quite the box
        targets.append({"boxes": b, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks})
    return images, targets


# -- the adapter -------------------------------------------------------------------------------------------------
def test_a_hierarchical_model_goes_through_the_fpn():
    torch.manual_seed(0)
    model = create_model("nano_convnext", img_size=64)  # stages at strides 2, 4, 8
    bb = DenseBackbone(model, out_channels=32)
    assert bb.pyramid == "fpn" and bb.indices == [1, 2]  # the stages of stride >= 4
    assert bb.names == ["0", "1", "pool"] and bb.level_names == ["0", "1"]
    assert bb.strides == [4, 8, 16] and bb.out_channels == 32 and bb.channels == [32] * 3
    assert model.num_classes == 0  # the classifier went
    out = bb(torch.randn(2, 3, 64, 64))
    assert list(out) == bb.names and all(v.shape[:2] == (2, 32) for v in out.values())
    assert shapes_match_strides(out, bb, 64)

    # what torchvision's RetinaNet and FCOS use; a feature extractor's out_indices are the levels
    bb = DenseBackbone(FeatureExtractor(create_model("nano_convnext", img_size=64), [2]), out_channels=8,
                       extra_levels="p6p7")
    assert bb.indices == [2] and bb.names == ["0", "p6", "p7"] and bb.strides == [8, 16, 32]
    assert shapes_match_strides(bb(torch.randn(1, 3, 64, 64)), bb, 64)


def test_a_plain_vit_goes_through_the_simple_pyramid():
    torch.manual_seed(0)
    bb = DenseBackbone(create_model("nano_vit", img_size=64), out_channels=32)  # 4x4 patches
    assert bb.pyramid == "simple" and bb.indices == [0]  # the last (and only) stage
    assert bb.names == ["0", "1", "2", "3", "pool"] and bb.level_names == ["0", "1", "2", "3"]
    assert bb.strides == [4, 8, 16, 32, 64] and bb.out_channels == 32
    out = bb(torch.randn(2, 3, 64, 64))
    assert list(out) == bb.names and all(v.shape[:2] == (2, 32) for v in out.values())
    assert shapes_match_strides(out, bb, 64)


def test_the_simple_pyramid_scales_from_the_models_own_patch():
    # ViTDet's case, 16x16 patches: strides 4 and 8 by transposed convolutions (4x and 2x up), 16 as it is, 32
    # by max pooling
    torch.manual_seed(0)
    bb = DenseBackbone(create_model("spec:patch16 / attention:1x32:heads=2,pos=abs", img_size=64), out_channels=16,
                       extra_levels="none")
    assert bb.strides == [4, 8, 16, 32] and bb.names == ["0", "1", "2", "3"]
    ups = [sum(isinstance(m, torch.nn.ConvTranspose2d) for m in level.modules()) for level in bb.simple.levels]
    pools = [sum(isinstance(m, torch.nn.MaxPool2d) for m in level.modules()) for level in bb.simple.levels]
    assert ups == [2, 1, 0, 0] and pools == [0, 0, 0, 1]
    assert shapes_match_strides(bb(torch.randn(1, 3, 64, 64)), bb, 64)
    # a 14-pixel patch: the nearest powers of two of the asked strides
    assert SimpleFeaturePyramid(32, 14, 8).strides == [3.5, 7, 14, 28]
    assert SimpleFeaturePyramid(32, 4, 8, strides=(2, 4)).strides == [2, 4]


def test_a_plain_vit_is_refused_an_fpn():
    model = create_model("nano_vit", img_size=64)
    with pytest.raises(ValueError, match=r"nano_vit has one stride.*pyramid='simple'"):
        DenseBackbone(model, pyramid="fpn")
    with pytest.raises(ValueError, match="one map"):
        DenseBackbone(model, levels=[0, -1], pyramid="simple")
    with pytest.raises(ValueError, match="pyramid must be one of"):
        DenseBackbone(model, pyramid="bifpn")


def test_no_pyramid_gives_the_models_maps():
    bb = DenseBackbone(create_model("nano_convnext", img_size=64), pyramid="none", extra_levels="none")
    assert bb.channels == [80, 160] and bb.out_channels is None and bb.strides == [4, 8]
    assert [tuple(v.shape) for v in bb(torch.randn(1, 3, 64, 64)).values()] == [(1, 80, 16, 16), (1, 160, 8, 8)]
    with pytest.raises(ValueError, match="several widths"):
        build_detector("faster_rcnn", bb, num_classes=3, min_size=64, max_size=96)


def test_anchors_and_roi_pooling_follow_the_backbone():
    bb = DenseBackbone(create_model("nano_convnext", img_size=64), out_channels=8)  # strides 4, 8, 16 ("pool")
    det = build_detector("faster_rcnn", bb, num_classes=3, min_size=64, max_size=96)
    assert det.rpn.anchor_generator.sizes == ((32,), (64,), (128,))  # 8 x stride, one size per level
    assert det.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 3
    assert det.roi_heads.box_roi_pool.featmap_names == ["0", "1"]  # not the extra level
    assert det.transform.image_mean == [0.0] * 3 and det.transform.image_std == [1.0] * 3  # the data normalises
    assert det.transform.size_divisible == 8 and det.transform.min_size == (64,) and det.transform.max_size == 96
    det = build_detector("retinanet", bb, num_classes=3, min_size=64, max_size=96, anchor_size=2)
    assert det.anchor_generator.sizes == ((8,), (16,), (32,))
    det = build_detector("fcos", bb, num_classes=3, min_size=64, max_size=96)
    assert det.anchor_generator.sizes == ((4,), (8,), (16,)) and det.anchor_generator.aspect_ratios == ((1.0,),) * 3
    assert det.head.classification_head.conv[1].num_groups == 8  # GroupNorm: gcd(32, 8) groups of the 8 channels
    with pytest.raises(ValueError, match="FCOS takes no anchor_size"):
        build_detector("fcos", bb, num_classes=3, anchor_size=4)
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo", bb, num_classes=3)
    with pytest.raises(ValueError, match="counts the background"):
        build_detector("retinanet", bb, num_classes=1)


# -- one training step of each detector ---------------------------------------------------------------------------
def training_step_and_predictions(kind: str, model_name: str):
    torch.manual_seed(0)
    bb = DenseBackbone(create_model(model_name, img_size=64), out_channels=32, extra_levels=DETECTOR_EXTRA_LEVELS[kind])
    det = build_detector(kind, bb, num_classes=4, min_size=64, max_size=96, **SMALL[kind])
    images, targets = images_and_targets()
    if kind != "mask_rcnn":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    det.train()
    losses = det(images, targets)
    assert isinstance(losses, dict) and losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in det.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    stem = [p.grad for p in bb.model.stem.parameters()]  # the first layer of the backbone learns
    assert stem and all(g is not None and g.abs().sum() > 0 for g in stem)

    det.eval()
    with torch.no_grad():
        predictions = det(images)
    assert len(predictions) == 2
    for p, img in zip(predictions, images):
        n = len(p["boxes"])
        assert p["boxes"].shape == (n, 4) and p["scores"].shape == (n,) and p["labels"].dtype == torch.int64
        if kind == "mask_rcnn":
            assert p["masks"].shape == (n, 1, *img.shape[-2:])  # in the image's own size
    return losses


@pytest.mark.parametrize("kind", DETECTORS)
def test_a_training_step_of_each_detector(kind):
    losses = training_step_and_predictions(kind, "nano_convnext")
    expected = {"faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
                "retinanet": {"classification", "bbox_regression"},
                "fcos": {"classification", "bbox_regression", "bbox_ctrness"}}
    expected["mask_rcnn"] = expected["faster_rcnn"] | {"loss_mask"}
    assert set(losses) == expected[kind]


def test_faster_rcnn_on_a_plain_vit():
    training_step_and_predictions("faster_rcnn", "nano_vit")


# -- the arena's line-up ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LINE_UPS["nano"])
def test_every_nano_model_is_a_backbone(name):
    """Cheap: one forward of one 64 px image without gradients, 8 channels wide."""
    torch.manual_seed(0)
    bb = DenseBackbone(create_model(name, img_size=64), out_channels=8).eval()
    with torch.inference_mode():
        out = bb(torch.randn(1, 3, 64, 64))
    assert list(out) == bb.names and all(v.shape[1] == 8 for v in out.values())
    assert shapes_match_strides(out, bb, 64) and bb.strides[0] == 4
