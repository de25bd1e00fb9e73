"""Dense targets: synthetic scenes with boxes, instance masks and per-pixel classes, and joint transforms.

:class:`SyntheticScenes` needs no download: each scene is a textured canvas with a few glyphs pasted
on it (scikit-learn's 8x8 digits, or Fashion-MNIST's 28x28 garments where installed), each glyph an
object of its class. Scene ``i`` is a pure function of ``(seed, split, i)``. Items are ``(image,
target)``::

    image   tv_tensors.Image, uint8 (3, H, W)
    target  {"boxes":    tv_tensors.BoundingBoxes (N, 4), XYXY, float32, canvas_size (H, W),
             "labels":   int64 (N,), category ids 1..10 (the glyph's class + 1),
             "masks":    tv_tensors.Mask (N, H, W), uint8 0/1, the visible pixels of each object,
             "semantic": tv_tensors.Mask (H, W), int64, the category id of each pixel, 0 = background,
             "image_id": int, the scene's index}

which is what torchvision's detectors (Faster/Mask R-CNN, RetinaNet, FCOS) take as targets, plus a
semantic map for segmentation heads. Boxes are the tight boxes of the masks in pixel-edge coordinates:
a mask whose pixels span columns ``a..b`` has ``x1 = a`` and ``x2 = b + 1`` (so a one-pixel object has a
box of area 1, and a horizontal flip ``x -> W - x`` of the box is again the tight box of the flipped
mask). Later objects occlude earlier ones, so each pixel belongs to at most one instance, and the
semantic map is exactly the union of the instance masks, each painted with its label.

Size mix: an object's box area is drawn log-uniformly within one of COCO's three size classes, picked
with equal probability: small (box side about 10..30 px), medium (34..92 px) and large (100 px up to 95%
of the canvas), a class being left out where the canvas cannot hold it (large needs a canvas of about
106 px or more). Glyphs are stretched (aspect ratio jittered, and clamped so that large objects fit)
and drawn back to front, larger ones mostly behind smaller ones. At the default 128 px canvas,
measured over 200 training scenes of digits (``docs/dense-data.md``), the objects' final boxes are
about one third each small, medium and large by box area.

:class:`DenseDatasetInfo` subclasses :class:`~mixlab.data.DatasetInfo` rather than adding fields to it:
whatever reads a DatasetInfo (:class:`~mixlab.data.Preprocessing`, checkpoint metadata, a task's
``info``) keeps working on a dense one, while the fields only dense data has (the glyph source, the
number of objects) do not appear on every classification dataset. Its ``num_classes`` counts the
background (11 = torchvision's detectors' ``num_classes`` and a segmentation head's output channels),
and ``classes[0]`` is ``"background"``, so ``classes[label]`` names a label.

Transforms run jointly on the image and its target (:func:`build_dense_transforms`); wrapped in
:class:`~mixlab.data.SeededDataset`, each draw's augmentation is seeded as for classification::

    train_base, val_base, info = build_dense_datasets(num_train=2000, num_val=500)
    train = SeededDataset(train_base, build_dense_transforms(info, train=True), seed=0)
    loader = DataLoader(train, batch_size=16, sampler=ResumableSampler(len(train)), collate_fn=collate_dense)
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from .datasets import (FASHION_MNIST_SYSTEM_DIR, DataError, DatasetInfo, _channel_stats, _load_digits,
                       _fashion_mnist_dirs, _load_fashion_mnist, _locate_fashion_mnist)
from .samplers import _check_int, mix_seed

__all__ = ["DENSE_DATASET_NAMES", "SOURCES", "DenseDatasetInfo", "SyntheticScenes", "SanitizeInstances",
           "build_dense_datasets", "build_dense_transforms", "collate_dense", "size_class", "size_counts"]

#: The names :func:`build_dense_datasets` accepts.
DENSE_DATASET_NAMES: tuple[str, ...] = ("synthetic",)
#: Where the objects of :class:`SyntheticScenes` come from.
SOURCES: tuple[str, ...] = ("digits", "fashion-mnist")
#: The smallest canvas side :class:`SyntheticScenes` draws.
MIN_IMG_SIZE = 32
#: An object with fewer visible pixels than this, once the later ones are drawn, is left out.
MIN_AREA = 20
#: COCO's size classes by area in px: small below ``SMALL_AREA``, large above ``LARGE_AREA``.
SMALL_AREA, LARGE_AREA = 32 ** 2, 96 ** 2

#: The box areas (px) an object is drawn at, per size class; ``None``: up to (95% of the canvas side)^2.
_AREA_RANGES: tuple[tuple[str, float, float | None], ...] = (
    ("small", 10 ** 2, 30 ** 2), ("medium", 34 ** 2, 92 ** 2), ("large", 100 ** 2, None))
#: The largest object side, as a fraction of the canvas.
_MAX_SIDE = 0.95
#: The spread of the log box area by which objects are drawn back to front (larger ones mostly behind)
_DEPTH_NOISE = 1.5
#: A glyph's foreground: intensity (0..1) above this.
_THRESHOLD = {"digits": 0.25, "fashion-mnist": 0.15}
#: Each split draws from its own stream, and from its own glyphs (the source's train or validation split).
_SPLITS = {"train": 0, "val": 1}
#: Scenes whose colours give the mean and std of :func:`build_dense_datasets`.
_STATS_SCENES = 32


class _Glyphs:
    """A source's glyphs for one split: intensities cropped to their foreground, and their classes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], threshold: float):
        images = images[:, 0].numpy()  # (N, h, w) uint8: Fashion-MNIST's 60,000 would take 188 MB as floats
        fg = images > threshold * 255
        rows, cols = fg.any(axis=2), fg.any(axis=1)
        keep = rows.any(axis=1)  # glyphs with some foreground
        self.images, self.labels = images[keep], labels.numpy()[keep]
        rows, cols = rows[keep], cols[keep]
        h, w = images.shape[1:]
        # first and one-past-last foreground row and column of each glyph
        self.y0, self.y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
        self.x0, self.x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
        self.classes = list(classes)
        self.threshold = threshold

    def __len__(self) -> int:
        return len(self.labels)

    def crop(self, j: int) -> np.ndarray:
        """Glyph ``j`` cropped to its foreground, float32 intensities in 0..1."""
        return self.images[j, self.y0[j]:self.y1[j], self.x0[j]:self.x1[j]].astype(np.float32) / 255.0


@functools.lru_cache(maxsize=2)
def _glyph_splits(source: str, root: str | None) -> dict[str, _Glyphs]:
    if source == "digits":
        train, val, classes = _load_digits()
    else:
        try:
            _locate_fashion_mnist(root, download=False)
        except DataError:
            searched = ", ".join(str(d) for d in _fashion_mnist_dirs(root))
            raise DataError(f"source='fashion-mnist' needs Fashion-MNIST's four IDX files, not found in {searched}: "
                            f"install them with `apt-get install -y dataset-fashion-mnist` (into "
                            f"{FASHION_MNIST_SYSTEM_DIR}), pass root= a folder holding them, or use "
                            f"source='digits'") from None
        train, val, classes = _load_fashion_mnist(root, download=False)
    return {split: _Glyphs(images, labels, classes, _THRESHOLD[source])
            for split, (images, labels) in zip(("train", "val"), (train, val))}


def _check_source(source: Any) -> str:
    key = str(source).strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "mnist-fashion": "fashion-mnist"}.get(key, key)
    if key not in SOURCES:
        raise DataError(f"unknown source {source!r}; the objects of synthetic scenes come from one of: "
                        f"{', '.join(SOURCES)}")
    return key


def size_class(area: float) -> str:
    """COCO's size class of an object of ``area`` px: ``small`` (< 32^2), ``medium`` or ``large`` (> 96^2)."""
    return "small" if area < SMALL_AREA else "large" if area > LARGE_AREA else "medium"


def size_counts(targets: Iterable[dict]) -> dict[str, int]:
    """How many objects of the targets are small, medium and large by box area (:func:`size_class`)."""
    counts = {"small": 0, "medium": 0, "large": 0}
    for target in targets:
        boxes = torch.as_tensor(target["boxes"])
        for area in ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist():
            counts[size_class(area)] += 1
    return counts


# --------------------------------------------------------------------------- scenes

def _resize(plane: np.ndarray, h: int, w: int) -> np.ndarray:
    """A float32 plane resized to ``(h, w)`` by PIL's bilinear filter (antialiased when shrinking).

    PIL rather than torch: per scene, a few dozen resizes of tiny planes, where torch's per-call
    overhead (and its thread pool on a busy machine) would cost more than the work."""
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value))
    return np.asarray(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured canvas ``(size, size, 3)`` in 0..1: smooth colour noise, a gradient or stripes, plus grain."""
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse grid of random colours, upsampled
        grid = int(rng.integers(2, 9))
        coarse = rng.uniform(0.1, 0.9, size=(3, grid, grid)).astype(np.float32)
        canvas = np.stack([_resize(c, size, size) for c in coarse], axis=-1)
    else:
        low, high = (_colour(rng, (0.0, 0.6), (0.15, 0.85)) for _ in range(2))
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        if kind == 1:  # a linear gradient between two colours
            t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        else:  # soft stripes of a random period and direction
            period = rng.uniform(6, 32)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
        canvas = low + t[..., None] * (high - low)
    canvas = canvas + rng.normal(0.0, 0.03, size=(size, size, 3)).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0)


@dataclass
class _Object:
    label: int  # category id, 1..10
    x: int
    y: int
    mask: np.ndarray  # (h, w) bool, the glyph's foreground at its size
    pixels: np.ndarray  # (h, w, 3) its colours
    depth: float  # drawn in decreasing order of depth (back to front)

    def region(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y, self.y + h), slice(self.x, self.x + w)


def _owners(objects: list[_Object], size: int) -> np.ndarray:
    """Which object each pixel shows (-1: background), the objects drawn in list order."""
    owner = np.full((size, size), -1, dtype=np.int64)
    for k, obj in enumerate(objects):
        owner[obj.region()][obj.mask] = k
    return owner


class SyntheticScenes(Dataset):
    """Synthetic scenes of glyphs on textured canvases: a dense dataset that needs no download.

    Scene ``i`` is a pure function of ``(seed, split, i)`` (its own ``numpy`` generator seeded with
    ``mix_seed(seed, split, i)``; no global random state is read or changed). Each scene holds 1 to
    ``max_objects`` objects drawn (before occlusion), each a glyph of ``source`` with a random colour,
    shaded by the glyph's intensity; see the module docstring for the target format and the sizes.
    An object whose visible part falls below ``MIN_AREA`` (20) pixels is left out of the image and the
    target, and a scene always keeps at least one object.

    Args:
        num_scenes: the dataset's length.
        size: the canvas side in px (>= 32).
        max_objects: the most objects a scene is drawn with (>= 1).
        source: ``digits`` (scikit-learn's 8x8 digits) or ``fashion-mnist`` (28x28, from the Debian
            package ``dataset-fashion-mnist`` or the IDX files in ``root``).
        seed: the stream's seed.
        split: ``train`` or ``val``: the stream (train and val scenes differ for the same seed) and the
            split of the source whose glyphs are pasted.
        root: a folder holding Fashion-MNIST's IDX files (default: where the Debian package puts them).

    Raises:
        DataError: a bad argument, or Fashion-MNIST asked for and not installed.
    """

    def __init__(self, num_scenes: int, size: int = 128, max_objects: int = 6, source: str = "digits",
                 seed: int = 0, split: str = "train", root: str | None = None) -> None:
        self.num_scenes = _check_int(num_scenes, "num_scenes", 1)
        self.size = _check_int(size, "img_size", MIN_IMG_SIZE, " (the canvas side in px)")
        self.max_objects = _check_int(max_objects, "max_objects", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.source = _check_source(source)
        if split not in _SPLITS:
            raise DataError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        self.split = split
        self.glyphs = _glyph_splits(self.source, None if root is None else str(root))[split]
        #: category names, indexed by category id: ``categories[0] == "background"``
        self.categories = ["background", *self.glyphs.classes]
        cap = (_MAX_SIDE * self.size) ** 2
        ranges = [(name, lo, min(hi or cap, cap)) for name, lo, hi in _AREA_RANGES]
        #: the (size class, smallest, largest box area) objects are drawn at: the classes this canvas holds
        self.area_ranges = [(name, lo, hi) for name, lo, hi in ranges if lo < hi]

    def __len__(self) -> int:
        return self.num_scenes

    def _draw_object(self, rng: np.random.Generator) -> _Object | None:
        """One object at a random place, size and colour; None if its glyph came out under MIN_AREA px."""
        size = self.size
        j = int(rng.integers(len(self.glyphs)))
        crop = self.glyphs.crop(j)
        _, lo, hi = self.area_ranges[int(rng.integers(len(self.area_ranges)))]
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        # the glyph's aspect ratio (width / height), jittered, within what lets both sides fit the canvas
        longest = _MAX_SIDE * size
        aspect = crop.shape[1] / crop.shape[0] * math.exp(rng.uniform(-0.3, 0.3))
        aspect = min(max(aspect, area / longest ** 2), longest ** 2 / area)
        w = int(min(max(round(math.sqrt(area * aspect)), 1), longest))
        h = int(min(max(round(math.sqrt(area / aspect)), 1), longest))
        intensity = _resize(crop, h, w)
        mask = intensity > self.glyphs.threshold
        if mask.sum() < MIN_AREA:
            return None
        colour = _colour(rng, (0.45, 1.0), (0.55, 1.0))
        pixels = colour * (0.45 + 0.55 * np.clip(intensity, 0.0, 1.0))[..., None]
        x, y = int(rng.integers(size - w + 1)), int(rng.integers(size - h + 1))
        # larger objects mostly behind smaller ones; the noise lets some small ones be hidden
        depth = math.log(area) + rng.normal(0.0, _DEPTH_NOISE)
        return _Object(int(self.glyphs.labels[j]) + 1, x, y, mask, pixels.astype(np.float32), depth)

    def _draw_objects(self, rng: np.random.Generator) -> tuple[list[_Object], np.ndarray]:
        """The visible objects, back to front, and the owner map; at least one object."""
        while True:
            wanted = int(rng.integers(1, self.max_objects + 1))
            objects = []
            for _ in range(wanted):
                for _attempt in range(20):  # a thin glyph drawn small can fall under MIN_AREA: draw again
                    obj = self._draw_object(rng)
                    if obj is not None:
                        objects.append(obj)
                        break
            objects.sort(key=lambda o: -o.depth)
            owner = _owners(objects, self.size)
            areas = np.bincount(owner[owner >= 0], minlength=len(objects))
            if not (areas >= MIN_AREA).all():
                # leaving objects out only uncovers pixels of the others, so no other falls under MIN_AREA
                objects = [o for o, a in zip(objects, areas) if a >= MIN_AREA]
                owner = _owners(objects, self.size)
            if objects:
                return objects, owner

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if not isinstance(index, (int, np.integer)) or not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"scene index {index!r} out of range for {self.num_scenes} scenes")
        index = int(index) % self.num_scenes
        rng = np.random.default_rng(mix_seed(self.seed, _SPLITS[self.split], index))
        canvas = _background(rng, self.size)
        objects, owner = self._draw_objects(rng)
        for k, obj in enumerate(objects):
            region = obj.region()
            shown = owner[region] == k
            canvas[region][shown] = obj.pixels[shown]
        image = np.ascontiguousarray(np.rint(canvas * 255.0).astype(np.uint8).transpose(2, 0, 1))

        # numpy throughout: torch's per-call overhead on (3, H, W) tensors would double a scene's time
        masks = (owner[None] == np.arange(len(objects))[:, None, None]).astype(np.uint8)
        labels = np.array([o.label for o in objects], dtype=np.int64)
        semantic = np.concatenate([[0], labels])[owner + 1]
        canvas_size = (self.size, self.size)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(_tight_boxes_np(masks)), format="XYXY",
                                              canvas_size=canvas_size),
            "labels": torch.from_numpy(labels),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "semantic": tv_tensors.Mask(torch.from_numpy(semantic)),
            "image_id": index,
        }
        return tv_tensors.Image(torch.from_numpy(image)), target


def _tight_boxes_np(masks: np.ndarray) -> np.ndarray:
    """:func:`_tight_boxes` of non-empty masks, in numpy."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    boxes = np.stack([cols.argmax(axis=1), rows.argmax(axis=1),
                      w - cols[:, ::-1].argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)], axis=1)
    return boxes.astype(np.float32).reshape(-1, 4)


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY float32 boxes ``(N, 4)`` in pixel-edge coordinates: the tight box of each mask ``(N, H, W)``
    (``x2``, ``y2`` one past the last pixel); an empty mask gets the empty box ``(0, 0, 0, 0)``."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    masks = masks.bool()
    boxes = masks_to_boxes(masks).to(torch.float32)
    boxes[:, 2:] += 1
    empty = ~masks.flatten(1).any(dim=1)
    boxes[empty] = 0
    return boxes


# --------------------------------------------------------------------------- info and entry point

@dataclass
class DenseDatasetInfo(DatasetInfo):
    """A :class:`~mixlab.data.DatasetInfo` for dense targets (see the module docstring for why a subclass).

    ``num_classes`` counts the background (category 0): 11 for the synthetic scenes, whose
    ``classes`` are ``["background", <the source's 10 classes>]``. ``source`` is where the objects
    come from, ``max_objects`` the most objects a scene is drawn with. ``mean``/``std`` are measured
    on the first 32 training scenes (fewer if there are fewer).
    """

    source: str = "digits"
    max_objects: int = 6

    @property
    def num_object_classes(self) -> int:
        """The classes an object can have: ``num_classes`` less the background."""
        return self.num_classes - 1


def build_dense_datasets(name: str = "synthetic", *, num_train: int = 2000, num_val: int = 500,
                         img_size: int = 128, max_objects: int = 6, source: str = "digits", seed: int = 0,
                         root: str | None = None) -> tuple[SyntheticScenes, SyntheticScenes, DenseDatasetInfo]:
    """The train and validation datasets of dense data ``name`` (only ``synthetic`` for now) and their info.

    Train and val scenes come from different streams of ``seed`` and paste glyphs of the source's
    train and validation splits respectively (:class:`SyntheticScenes`). Items are untransformed
    ``(uint8 image, target)``; wrap the datasets in :class:`~mixlab.data.SeededDataset` with
    :func:`build_dense_transforms` to train.

    Raises:
        DataError: an unknown name or source, a bad count or size, Fashion-MNIST not installed.
    """
    key = str(name).strip().lower()
    if key not in DENSE_DATASET_NAMES:
        raise DataError(f"unknown dense dataset {name!r}; valid names: {', '.join(DENSE_DATASET_NAMES)}")
    _check_int(num_train, "num_train", 1)
    _check_int(num_val, "num_val", 1)
    common = dict(size=img_size, max_objects=max_objects, source=source, seed=seed, root=root)
    train = SyntheticScenes(num_train, split="train", **common)
    val = SyntheticScenes(num_val, split="val", **common)
    sample = torch.stack([train[i][0] for i in range(min(_STATS_SCENES, num_train))])
    mean, std = _channel_stats(sample)
    info = DenseDatasetInfo(name=key, num_classes=len(train.categories), in_chans=3, img_size=train.size,
                            mean=mean, std=std, classes=list(train.categories), num_train=num_train,
                            num_val=num_val, native_size=train.size, source=train.source,
                            max_objects=train.max_objects)
    return train, val, info


# --------------------------------------------------------------------------- transforms and collation

class SanitizeInstances:
    """A joint transform step on ``(image, target)``: make each box the tight box of its mask again,
    then drop the instances whose mask is empty (with :class:`v2.SanitizeBoundingBoxes`: box, label and
    mask together).

    After a crop, torchvision moves and clips boxes, but an object cut by the crop usually no longer
    fills its clipped box, and one cropped away entirely keeps a box on the border. The semantic map
    is left as it is; since only empty instances are dropped, it stays the union of the instance masks.
    """

    def __init__(self) -> None:
        self._sanitize = v2.SanitizeBoundingBoxes(min_size=1, min_area=1, labels_getter=lambda t: t["labels"])

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        masks = target["masks"]
        boxes = tv_tensors.BoundingBoxes(_tight_boxes(masks), format="XYXY", canvas_size=tuple(masks.shape[-2:]))
        instances = self._sanitize({"boxes": boxes, "labels": target["labels"], "masks": masks})
        return image, {**target, **instances}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_dense_transforms(info: DatasetInfo, train: bool, *, hflip: float = 0.5,
                           crop_scale: Sequence[float] | None = None) -> Callable:
    """The joint transform of one split: ``(uint8 image, target) -> (normalised float32 image, target)``.

    Eval (``train=False``; the augmentation options are then ignored): ``ToDtype(float32, scale=True)``
    and ``Normalize(info.mean, info.std)`` only. Train, in this order:

    1. ``crop_scale=(min, max)``: ``RandomResizedCrop(info.img_size, scale=crop_scale)`` (bilinear for
       the image; masks and the semantic map always resize by nearest neighbour in torchvision), which
       jitters the scale and keeps the image size; off by default.
    2. ``RandomHorizontalFlip(hflip)``; boxes, masks and the semantic map flip with the image.
    3. after a crop, :class:`SanitizeInstances`: tight boxes again, empty instances dropped (a crop
       can leave a scene with no instance: empty ``boxes``/``labels``/``masks``, which torchvision's
       detectors accept).
    4. ``ToDtype(float32, scale=True)`` and ``Normalize`` (the image only; targets keep their types).

    Randomness comes from torch's global RNG, which :class:`~mixlab.data.SeededDataset` seeds per draw.

    Raises:
        DataError: ``hflip`` outside [0, 1] or a bad ``crop_scale``.
    """
    steps: list[Callable] = []
    if train:
        if not 0.0 <= hflip <= 1.0:
            raise DataError(f"hflip is a probability and must lie in [0, 1], got {hflip!r}")
        if crop_scale is not None:
            try:
                lo, hi = (float(v) for v in crop_scale)
            except (TypeError, ValueError):
                lo = hi = math.nan
            if not 0.0 < lo <= hi <= 1.0:
                raise DataError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale!r}")
            steps.append(v2.RandomResizedCrop(info.img_size, scale=(lo, hi), antialias=True))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if crop_scale is not None:
            steps.append(SanitizeInstances())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std))]
    return v2.Compose(steps)


def collate_dense(batch: Sequence[tuple]) -> tuple:
    """Collate ``(image, target)`` items (``(image, target, index)`` from a ``with_index`` SeededDataset):
    ``(images, targets)``, ``images`` one stacked tensor ``(B, C, H, W)`` when every image has the same
    shape, else a list of the images (what torchvision's detectors take either way), and ``targets``
    the list of the target dicts as they are. With indices, a third element: the list of indices."""
    if len(batch) == 0:
        raise DataError("collate_dense got an empty batch")
    columns = list(zip(*batch))
    images = list(columns[0])
    if all(im.shape == images[0].shape for im in images):
        images = torch.stack([torch.as_tensor(im) for im in images]).as_subclass(torch.Tensor)
    return (images, list(columns[1]), *(list(c) for c in columns[2:]))
