"""Evaluation metrics of the dense tasks: COCO average precision for detection and instance
segmentation (computed by pycocotools' ``COCOeval``), and the confusion-matrix metrics of semantic
segmentation (mIoU, pixel and class accuracy). See docs/dense-metrics.md.

Conventions, the same for every number here:

* every metric is in **percent** (0 to 100), as COCO's AP and mIoU are reported in papers and as
  the classification task reports top-1;
* a metric that is undefined (a COCO size bucket without ground truth, a class that neither the
  target nor the prediction contains, no pixels at all) is ``None``, JSON's ``null``, never NaN nor
  COCO's -1, so that metrics rows stay valid JSON and an average never mixes it in.

Both classes accumulate per process and merge through a function that the task passes in (an
all-gather of Python objects for COCO, an all-reduce sum of the confusion matrix for segmentation),
so that they hold no process group of their own and run the same in one process.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

#: COCOeval's six AP numbers, in the order of ``COCOeval.stats[:6]``
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
#: a predicted mask probability above this is foreground (torchvision's Mask R-CNN convention)
MASK_THRESHOLD = 0.5


def _percent(value: float) -> float | None:
    """COCOeval's number as percent; its -1 (nothing to average: no ground truth in the bucket) as None."""
    value = float(value)
    return None if value < 0 else 100.0 * value


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """Run-length encodings of (N, H, W) binary masks, pycocotools' compressed RLE (``counts`` as bytes)."""
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.permute(1, 2, 0).to(torch.uint8).numpy())  # H, W, N in Fortran order
    return mask_utils.encode(array)


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    """XYXY corner boxes as COCO's [x, y, width, height]."""
    b = boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()


class CocoEvaluator:
    """COCO AP of detections (``bbox``) and instance masks (``segm``) over a set of images.

    ``add`` one image at a time with its ground truth and what the detector predicted for it (torchvision's
    format: XYXY boxes in pixels); ``gather`` the records of all processes under DDP; ``compute`` builds the
    ground truth and the detections as in-memory COCO objects and runs ``COCOeval`` quietly.

    ``categories`` are the label values that count (for torchvision's detectors, 1..K; 0 is background), as
    ints or as COCO category dicts (``{"id": 1, "name": "cat"}``). A predicted label that is not one of them is
    not evaluated; a category without ground truth anywhere is left out of the averages (COCO's rule: its false
    positives cost nothing).
    """

    def __init__(self, iou_types: Sequence[str] = ("bbox",), categories: Sequence[int | dict] = ()):
        iou_types = tuple(iou_types)
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if not iou_types or bad:
            raise ValueError(f"iou_types must be some of {IOU_TYPES}, got {iou_types}")
        if not categories:
            raise ValueError("categories: the label values to evaluate are needed (1..K for torchvision's detectors)")
        self.iou_types = iou_types
        self.categories = [dict(c) if isinstance(c, dict) else {"id": int(c), "name": str(int(c))}
                           for c in categories]
        #: image id -> record (plain Python: ints, floats, lists, RLE dicts), what ``gather`` moves
        self._images: dict[int, dict] = {}
        #: the text COCOeval printed for each iou type at the last ``compute`` (its 12-line summary)
        self.summary_text: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._images)

    # -- accumulating --------------------------------------------------------------------------
    def add(self, image_id: int, target: dict, prediction: dict) -> None:
        """One image: ``target`` holds ``boxes`` (N, 4) XYXY, ``labels`` (N,), and ``masks`` (N, H, W) for
        ``segm`` (optional ``iscrowd`` (N,)); ``prediction`` holds ``boxes``, ``scores``, ``labels`` and, for
        ``segm``, ``masks`` (N, 1, H, W) probabilities (foreground above 0.5) or (N, H, W) binary masks.

        An image id that was already added is ignored: DistributedSampler pads the last batches by repeating
        images, and the first record of an image is kept (``gather`` does the same across processes)."""
        image_id = int(image_id)
        if image_id in self._images:
            return
        segm = "segm" in self.iou_types
        boxes = target["boxes"].reshape(-1, 4)
        labels = target["labels"].reshape(-1).tolist()
        crowd = target["iscrowd"].reshape(-1).tolist() if "iscrowd" in target else [0] * len(labels)
        record: dict = {"id": image_id}
        gt = [{"category_id": int(c), "bbox": b, "area_bbox": b[2] * b[3], "iscrowd": int(k)}
              for c, b, k in zip(labels, _xywh(boxes), crowd)]
        if segm:
            if "masks" not in target:
                raise ValueError(f"image {image_id}: 'segm' needs the target's 'masks' (N, H, W)")
            masks = target["masks"].detach().cpu().bool()
            if masks.shape[0] != len(gt):
                raise ValueError(f"image {image_id}: {masks.shape[0]} target masks for {len(gt)} boxes")
            record["height"], record["width"] = int(masks.shape[-2]), int(masks.shape[-1])
            for g, rle, area in zip(gt, _encode_masks(masks), masks.flatten(1).sum(1).tolist()):
                g["segmentation"], g["area_segm"] = rle, float(area)
        record["gt"] = gt

        scores = prediction["scores"].reshape(-1).tolist()
        dt = [{"category_id": int(c), "bbox": b, "score": float(s)}
              for c, b, s in zip(prediction["labels"].reshape(-1).tolist(), _xywh(prediction["boxes"]), scores)]
        if segm:
            if "masks" not in prediction:
                raise ValueError(f"image {image_id}: 'segm' needs the prediction's 'masks' (N, 1, H, W)")
            pm = prediction["masks"].detach().cpu()
            pm = pm.reshape(pm.shape[0], *pm.shape[-2:])
            pm = pm if pm.dtype == torch.bool else pm > MASK_THRESHOLD
            if pm.shape[0] != len(dt):
                raise ValueError(f"image {image_id}: {pm.shape[0]} predicted masks for {len(dt)} boxes")
            for d, rle in zip(dt, _encode_masks(pm)):
                d["segmentation"] = rle
        record["dt"] = dt
        self._images[image_id] = record

    # -- across processes ----------------------------------------------------------------------
    def records(self) -> list[dict]:
        """This evaluator's per-image records, picklable, as ``gather`` sends them."""
        return list(self._images.values())

    def gather(self, fn: Callable[[list[dict]], list[list[dict]]]) -> None:
        """Merge the records of all processes: ``fn`` takes this process's ``records()`` and returns every
        process's list (``lambda r: all_gather_object(r, dinfo)`` under DDP, from ``engine.distributed``).
        Afterwards each process holds every image once (an image seen by two processes, as the sampler's
        padding repeats some, is kept once) and ``compute`` gives the same numbers on all of them."""
        merged: dict[int, dict] = {}
        for part in fn(self.records()):
            for record in part:
                merged.setdefault(int(record["id"]), record)
        self._images = merged

    # -- the numbers ---------------------------------------------------------------------------
    def _coco_pair(self, iou_type: str) -> tuple[COCO, COCO]:
        """In-memory ground truth and detections for one iou type."""
        images, gts, dts = [], [], []
        for rec in self._images.values():
            images.append({k: rec[k] for k in ("id", "height", "width") if k in rec})
            for g in rec["gt"]:
                ann = {"id": len(gts) + 1, "image_id": rec["id"], "category_id": g["category_id"],
                       "bbox": list(g["bbox"]), "iscrowd": g["iscrowd"],
                       "area": g["area_segm"] if iou_type == "segm" else g["area_bbox"]}
                if iou_type == "segm":
                    ann["segmentation"] = g["segmentation"]
                gts.append(ann)
            for d in rec["dt"]:
                ann = {"image_id": rec["id"], "category_id": d["category_id"], "score": d["score"]}
                # a segm result carries its mask alone: COCO.loadRes then takes its area and box from the mask
                ann.update({"segmentation": d["segmentation"]} if iou_type == "segm" else {"bbox": list(d["bbox"])})
                dts.append(ann)
        gt = COCO()
        gt.dataset = {"images": images, "categories": copy.deepcopy(self.categories), "annotations": gts}
        gt.createIndex()
        if dts:
            dt = gt.loadRes(copy.deepcopy(dts))
        else:  # loadRes cannot take an empty list; no detections at all is a result of AP 0
            dt = COCO()
            dt.dataset = {"images": list(images), "categories": copy.deepcopy(self.categories), "annotations": []}
            dt.createIndex()
        return gt, dt

    def compute(self) -> dict[str, float | None]:
        """``{iou_type}_{AP, AP50, AP75, APs, APm, APl}`` in percent for each iou type: AP averaged over the
        IoU thresholds 0.50:0.05:0.95, at 0.50 and at 0.75, and over small (area < 32²), medium and large
        (area > 96²) objects, up to 100 detections per image. ``None`` where COCOeval has nothing to average
        (a size bucket, or everything, without ground truth). COCOeval's printing is kept in ``summary_text``."""
        out: dict[str, float | None] = {}
        for iou_type in self.iou_types:
            if not self._images:
                out.update({f"{iou_type}_{n}": None for n in AP_NAMES})
                continue
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                gt, dt = self._coco_pair(iou_type)
                ev = COCOeval(gt, dt, iouType=iou_type)
                ev.params.imgIds = sorted(self._images)
                ev.params.catIds = [c["id"] for c in self.categories]
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            self.summary_text[iou_type] = buffer.getvalue()
            out.update({f"{iou_type}_{n}": _percent(v) for n, v in zip(AP_NAMES, ev.stats[:6])})
        return out


class SegmentationMeter:
    """The confusion matrix of semantic segmentation and its metrics.

    ``update(prediction, target)``: ``target`` is a label map (..., H, W) with values in 0..num_classes-1 or
    ``ignore_index``; ``prediction`` a label map of the same shape or logits with the classes in the dimension
    before H, W ((B, C, H, W) or (C, H, W)), reduced by argmax. Ignored pixels count nowhere. The matrix
    (rows: target class, columns: predicted class, int64) stays on the device of the first update.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes
        if prediction.dim() == target.dim() + 1:
            if prediction.shape[-3] != k:
                raise ValueError(f"logits have {prediction.shape[-3]} classes in dim -3, the meter {k}")
            prediction = prediction.argmax(dim=-3)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} do not match")
        target = target.long()
        prediction = prediction.to(target.device).long()
        valid = target != self.ignore_index
        t, p = target[valid], prediction[valid]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ValueError(f"target values must be 0..{k - 1} or ignore_index {self.ignore_index}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
            raise ValueError(f"predicted labels must be 0..{k - 1}")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the matrix over processes: ``fn`` takes this process's matrix and returns the sum of all
        (``lambda m: all_reduce_sum(m.to(device), dinfo)`` under DDP, from ``engine.distributed``)."""
        total = fn(self.matrix)
        if tuple(total.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"reduce returned shape {tuple(total.shape)}, not the matrix's")
        self.matrix = total.to(torch.int64)

    def compute(self) -> dict:
        """In percent: ``mIoU``, the mean of ``class_iou`` over the classes with a non-zero union (present in
        the target or the prediction; mmseg's convention, where the others are NaN and skipped); ``pixel_acc``,
        correct pixels over counted pixels; ``mean_acc``, the mean of ``class_acc`` (correct over target pixels
        of each class) over the classes present in the target. ``class_iou`` and ``class_acc`` are lists with
        ``None`` for a class whose value is undefined; ``pixels`` is the number of counted pixels."""
        m = self.matrix.detach().cpu().to(torch.float64)
        tp = m.diagonal()
        in_target, in_prediction = m.sum(1), m.sum(0)
        union = in_target + in_prediction - tp
        class_iou = [100.0 * float(a / u) if u > 0 else None for a, u in zip(tp, union)]
        class_acc = [100.0 * float(a / n) if n > 0 else None for a, n in zip(tp, in_target)]
        total = float(m.sum())

        def mean(values):
            kept = [v for v in values if v is not None]
            return sum(kept) / len(kept) if kept else None

        return {"mIoU": mean(class_iou), "pixel_acc": 100.0 * float(tp.sum()) / total if total else None,
                "mean_acc": mean(class_acc), "class_iou": class_iou, "class_acc": class_acc, "pixels": int(total)}
