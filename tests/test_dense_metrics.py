"""The dense tasks' metrics on literal cases worked out by hand: COCO AP (through pycocotools' COCOeval) for
boxes and masks, the segmentation confusion matrix's mIoU and accuracies, and merging both across processes.
Every number is in percent; an undefined one is None (docs/dense-metrics.md)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mixlab.engine.dense_metrics import CocoEvaluator, SegmentationMeter
from mixlab.engine.distributed import DistInfo, all_gather_object

SIZE = 200  # the images' side, for masks


def box_mask(box, size=SIZE) -> torch.Tensor:
    """The (size, size) bool mask that fills an XYXY box with integer corners."""
    m = torch.zeros(size, size, dtype=torch.bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return m


def target(boxes, labels, masks=False):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if masks:
        empty = torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)
        t["masks"] = torch.stack([box_mask(b) for b in boxes]) if boxes else empty
    return t


def prediction(boxes, scores, labels, masks=False):
    p = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}
    if masks:  # Mask R-CNN's soft masks, (N, 1, H, W): 0.9 inside the box, 0.2 outside, so 0.5 cuts the box out
        soft = [box_mask(b).float() * 0.7 + 0.2 for b in boxes]
        p["masks"] = torch.stack(soft)[:, None] if boxes else torch.zeros(0, 1, SIZE, SIZE)
    return p


BOX = [50, 50, 150, 150]  # 100 x 100: area 10000 > 96², a large object


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_are_100(iou_type):
    segm = iou_type == "segm"
    ev = CocoEvaluator((iou_type,), categories=[1, 2])
    ev.add(1, target([BOX, [0, 0, 30, 30]], [1, 2], segm), prediction([BOX, [0, 0, 30, 30]], [1.0, 1.0], [1, 2], segm))
    ev.add(2, target([[10, 10, 60, 60]], [1], segm), prediction([[10, 10, 60, 60]], [1.0], [1], segm))
    r = ev.compute()
    assert r[f"{iou_type}_AP"] == pytest.approx(100) and r[f"{iou_type}_AP50"] == pytest.approx(100)
    assert r[f"{iou_type}_AP75"] == pytest.approx(100)
    assert set(r) == {f"{iou_type}_{n}" for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert "Average Precision" in ev.summary_text[iou_type]  # COCOeval's print, kept rather than shown


def test_both_iou_types_at_once():
    ev = CocoEvaluator(("bbox", "segm"), categories=[1])
    ev.add(7, target([BOX], [1], True), prediction([BOX], [0.8], [1], True))
    r = ev.compute()
    assert r["bbox_AP"] == pytest.approx(100) and r["segm_AP"] == pytest.approx(100)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_a_known_shift(iou_type):
    # the 100x100 box predicted 20 px to the right: intersection 80*100 = 8000, union 2*10000 - 8000 = 12000,
    # IoU = 2/3. COCO matches at a threshold t when IoU >= t: 0.50, 0.55, 0.60 and 0.65 pass, 0.70..0.95 fail.
    # One object, one detection: AP is 1 at a passed threshold and 0 at a failed one, so
    # AP = 4/10 = 40 %, AP50 = 100 %, AP75 = 0 %. The masks are the boxes filled, the same IoU.
    segm = iou_type == "segm"
    shifted = [70, 50, 170, 150]
    ev = CocoEvaluator((iou_type,), categories=[1])
    ev.add(1, target([BOX], [1], segm), prediction([shifted], [0.9], [1], segm))
    r = ev.compute()
    assert r[f"{iou_type}_AP"] == pytest.approx(40)
    assert r[f"{iou_type}_AP50"] == pytest.approx(100) and r[f"{iou_type}_AP75"] == pytest.approx(0)
    assert r[f"{iou_type}_APl"] == pytest.approx(40)  # area 10000 > 96²: large
    assert r[f"{iou_type}_APs"] is None and r[f"{iou_type}_APm"] is None  # no small or medium object


def test_a_wrong_class_is_0():
    # the right box with class 2: class 1 has one object and no detection (AP 0); class 2 has no object, so
    # COCO leaves it out of the mean rather than charging its false positive
    ev = CocoEvaluator(categories=[1, 2])
    ev.add(1, target([BOX], [1]), prediction([BOX], [1.0], [2]))
    assert ev.compute()["bbox_AP"] == pytest.approx(0)


def test_false_positives_rank_by_score():
    # one object; a true positive and a false positive elsewhere (in the same image, or in an image without
    # ground truth). COCO sorts the detections by score. TP first: precision 1 at recall 1, AP 100. FP first:
    # precision 0 at recall 0, then 1/2 at recall 1; the precision envelope (the maximum at any higher recall)
    # is 1/2 at all 101 recall points, AP 50.
    far = [0, 0, 20, 20]
    for fp_score, expected in ((0.5, 100), (0.95, 50)):
        same = CocoEvaluator(categories=[1])
        same.add(1, target([BOX], [1]), prediction([BOX, far], [0.9, fp_score], [1, 1]))
        other = CocoEvaluator(categories=[1])
        other.add(1, target([BOX], [1]), prediction([BOX], [0.9], [1]))
        other.add(2, target([], []), prediction([far], [fp_score], [1]))  # an image with no ground truth
        assert same.compute()["bbox_AP"] == pytest.approx(expected)
        assert other.compute()["bbox_AP"] == pytest.approx(expected)


def test_a_crowd_region_is_neither_found_nor_missed():
    # a detection on a crowd region (iscrowd=1) is ignored, even scored above the true positive; the crowd
    # region is no object to find
    ev = CocoEvaluator(categories=[1])
    t = target([BOX, [0, 0, 40, 40]], [1, 1])
    t["iscrowd"] = torch.tensor([0, 1])
    ev.add(1, t, prediction([[0, 0, 40, 40], BOX], [0.99, 0.5], [1, 1]))
    assert ev.compute()["bbox_AP"] == pytest.approx(100)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_predictions(iou_type):
    segm = iou_type == "segm"
    ev = CocoEvaluator((iou_type,), categories=[1])
    ev.add(1, target([BOX], [1], segm), prediction([], [], [], segm))
    ev.add(2, target([], [], segm), prediction([], [], [], segm))
    r = ev.compute()
    assert r[f"{iou_type}_AP"] == 0 and r[f"{iou_type}_AP50"] == 0 and r[f"{iou_type}_APl"] == 0
    assert r[f"{iou_type}_APs"] is None


def test_nothing_to_average_is_none():
    no_truth = CocoEvaluator(categories=[1])
    no_truth.add(1, target([], []), prediction([BOX], [0.9], [1]))
    assert set(no_truth.compute().values()) == {None}
    assert set(CocoEvaluator(categories=[1]).compute().values()) == {None}  # no image at all


def test_size_buckets():
    # areas: 20x20 = 400 < 32² (small), 50x50 = 2500 between 32² and 96² (medium), 100x100 = 10000 > 96² (large)
    small, medium, large = [0, 0, 20, 20], [30, 0, 80, 50], [0, 60, 100, 160]
    found = CocoEvaluator(categories=[1])
    found.add(1, target([small, medium, large], [1, 1, 1]), prediction([small, large], [1.0, 0.9], [1, 1]))
    r = found.compute()
    assert r["bbox_APs"] == pytest.approx(100) and r["bbox_APl"] == pytest.approx(100)
    assert r["bbox_APm"] == pytest.approx(0)  # the medium object was missed
    # over all sizes: recall 1/3 then 2/3 at precision 1, nothing beyond; of the 101 recall points 0, 0.01, ..., 1
    # the 67 up to 0.66 reach precision 1 and the 34 from 0.67 get 0, so AP = 67/101
    assert r["bbox_AP"] == pytest.approx(100 * 67 / 101)

    absent = CocoEvaluator(categories=[1])
    absent.add(1, target([small, large], [1, 1]), prediction([small, large], [1.0, 0.9], [1, 1]))
    r = absent.compute()
    assert r["bbox_APm"] is None  # no medium object anywhere: nothing to average
    assert r["bbox_APs"] == pytest.approx(100) and r["bbox_APl"] == pytest.approx(100)


def test_gather_merges_processes_and_keeps_a_repeated_image_once():
    shifted = [70, 50, 170, 150]
    images = [(1, target([BOX], [1]), prediction([BOX], [0.9], [1])),
              (2, target([BOX], [1]), prediction([shifted], [0.8], [1])),
              (3, target([[0, 0, 20, 20]], [1]), prediction([], [], []))]
    whole = CocoEvaluator(categories=[1])
    for args in images:
        whole.add(*args)
    rank0, rank1 = CocoEvaluator(categories=[1]), CocoEvaluator(categories=[1])
    rank0.add(*images[0])
    rank0.add(*images[1])
    rank1.add(*images[2])
    rank1.add(*images[0])  # DistributedSampler's padding: image 1 seen by both processes
    sent = []

    def fake_all_gather(records):  # what all_gather_object returns on rank 0 of two
        sent.append(records)
        return [records, rank1.records()]

    rank0.gather(fake_all_gather)
    assert len(sent) == 1 and len(rank0) == 3
    assert rank0.compute() == pytest.approx(whole.compute())


def test_a_repeated_image_id_is_ignored():
    ev = CocoEvaluator(categories=[1])
    ev.add(1, target([BOX], [1]), prediction([BOX], [0.9], [1]))
    ev.add(1, target([BOX], [1]), prediction([], [], []))
    assert len(ev) == 1 and ev.compute()["bbox_AP"] == pytest.approx(100)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="iou_types"):
        CocoEvaluator(("keypoints",), categories=[1])
    with pytest.raises(ValueError, match="categories"):
        CocoEvaluator()
    with pytest.raises(ValueError, match="masks"):
        CocoEvaluator(("segm",), categories=[1]).add(1, target([BOX], [1]), prediction([BOX], [0.9], [1], True))


class _EnabledWorld(DistInfo):
    """A world of one that takes the DDP path, to run torch.distributed.all_gather_object in one process."""

    @property
    def enabled(self) -> bool:
        return True


def test_all_gather_object(tmp_path):
    obj = [{"id": 3, "dt": [{"score": 0.5}]}]
    assert all_gather_object(obj, DistInfo()) == [obj]  # a plain launch: no process group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert all_gather_object(obj, _EnabledWorld(world_size=1)) == [obj]
    finally:
        dist.destroy_process_group()


# -- semantic segmentation ------------------------------------------------------------------------------------
# four classes; class 3 is in neither map; one pixel (row 2, column 3) is ignored (255)
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 2, 255],
                       [2, 2, 2, 2]])
PRED = torch.tensor([[0, 0, 1, 1],
                     [0, 1, 1, 1],
                     [2, 2, 0, 0],  # the last pixel is ignored, whatever it predicts
                     [2, 2, 2, 2]])
# 15 counted pixels. Confusion (target -> predicted): 0 -> 0: 3, 0 -> 1: 1; 1 -> 1: 4; 2 -> 2: 6, 2 -> 0: 1.
# IoU = TP / (target + predicted - TP): class 0: 3 / (4 + 4 - 3) = 3/5; class 1: 4 / (4 + 5 - 4) = 4/5;
# class 2: 6 / (7 + 6 - 6) = 6/7; class 3: union 0, undefined. mIoU = (3/5 + 4/5 + 6/7) / 3.
# pixel accuracy 13/15; class accuracy 3/4, 4/4, 6/7, undefined; mean (3/4 + 1 + 6/7) / 3.
IOU = [60.0, 80.0, 600 / 7, None]


def test_miou_by_hand():
    meter = SegmentationMeter(4)
    meter.update(PRED, TARGET)
    r = meter.compute()
    assert r["class_iou"][:3] == pytest.approx(IOU[:3]) and r["class_iou"][3] is None
    assert r["mIoU"] == pytest.approx(100 * (3 / 5 + 4 / 5 + 6 / 7) / 3)
    assert r["pixel_acc"] == pytest.approx(100 * 13 / 15) and r["pixels"] == 15
    assert r["class_acc"][:3] == pytest.approx([75.0, 100.0, 600 / 7]) and r["class_acc"][3] is None
    assert r["mean_acc"] == pytest.approx(100 * (3 / 4 + 1 + 6 / 7) / 3)


def test_logits_and_label_maps_agree():
    logits = torch.nn.functional.one_hot(PRED, 4).permute(2, 0, 1).float()[None] * 3.0  # (1, 4, 4, 4)
    a, b = SegmentationMeter(4), SegmentationMeter(4)
    a.update(logits, TARGET[None])
    b.update(PRED, TARGET)
    assert torch.equal(a.matrix, b.matrix)


def test_a_class_only_predicted_counts_as_0():
    # predict class 3 on a pixel of class 2: class 3 now has a union (1 pixel) and IoU 0, which joins the mean
    pred = PRED.clone()
    pred[3, 3] = 3
    meter = SegmentationMeter(4)
    meter.update(pred, TARGET)
    r = meter.compute()
    assert r["class_iou"][3] == 0 and r["class_iou"][2] == pytest.approx(100 * 5 / 7)
    assert r["mIoU"] == pytest.approx(100 * (3 / 5 + 4 / 5 + 5 / 7 + 0) / 4)
    assert r["class_acc"][3] is None  # no target pixel of class 3: no accuracy


def test_reduce_sums_meters():
    whole, top, bottom = SegmentationMeter(4), SegmentationMeter(4), SegmentationMeter(4)
    whole.update(PRED, TARGET)
    top.update(PRED[:2], TARGET[:2])
    bottom.update(PRED[2:], TARGET[2:])
    top.reduce(lambda m: m + bottom.matrix)  # what an all-reduce sum over two processes returns
    assert torch.equal(top.matrix, whole.matrix) and top.compute() == whole.compute()
    with pytest.raises(ValueError, match="shape"):
        top.reduce(lambda m: m.flatten())


def test_empty_and_bad_segmentation_inputs():
    meter = SegmentationMeter(3)
    r = meter.compute()
    assert r["mIoU"] is None and r["pixel_acc"] is None and r["class_iou"] == [None] * 3
    meter.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))  # every pixel ignored
    assert meter.compute()["pixels"] == 0
    with pytest.raises(ValueError, match="target values"):
        meter.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 3))
    with pytest.raises(ValueError, match="do not match"):
        meter.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
