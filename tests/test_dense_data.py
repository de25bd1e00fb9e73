"""Dense data (mixlab.data.dense): synthetic scenes, their targets, joint seeded transforms, collation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from mixlab.data import (DataError, DatasetInfo, DenseDatasetInfo, Preprocessing, ResumableSampler, SeededDataset,
                         SyntheticScenes, build_dense_datasets, build_dense_transforms, collate_dense)
from mixlab.data.datasets import FASHION_MNIST_SYSTEM_DIR
from mixlab.data.dense import MIN_AREA, size_counts


@pytest.fixture(scope="module")
def small_data():
    """64 px scenes: quick, and big enough for small and medium objects."""
    return build_dense_datasets(num_train=24, num_val=8, img_size=64, seed=3)


def tight_box(mask: np.ndarray) -> list[float]:
    """The pixel-edge box of a mask, computed here independently of the library."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def check_target(image, target, size: int, min_area: int = MIN_AREA) -> None:
    """Every invariant of a scene's target (also after joint transforms, with ``min_area=1``)."""
    boxes, labels, masks, semantic = target["boxes"], target["labels"], target["masks"], target["semantic"]
    n = len(labels)
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == (size, size) and boxes.dtype == torch.float32 and boxes.shape == (n, 4)
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (n, size, size)
    assert isinstance(semantic, tv_tensors.Mask) and semantic.dtype == torch.int64 and semantic.shape == (size, size)
    assert labels.dtype == torch.int64 and ((labels >= 1) & (labels <= 10)).all()
    assert image.shape[-2:] == (size, size) and isinstance(target["image_id"], int)
    m = masks.numpy().astype(bool)
    assert (m.sum(axis=0) <= 1).all(), "a pixel belongs to two instances"
    expected = (m * labels.numpy()[:, None, None]).sum(axis=0)
    assert np.array_equal(semantic.numpy(), expected), "the semantic map is not the union of the instance masks"
    for k in range(n):
        assert m[k].sum() >= min_area
        assert boxes[k].tolist() == tight_box(m[k])
    b = boxes.as_subclass(torch.Tensor)
    assert (b >= 0).all() and (b[:, 2:] <= size).all() and ((b[:, 2:] - b[:, :2]) > 0).all()


# --------------------------------------------------------------------------- scenes

def test_scenes_are_a_function_of_seed_and_index():
    a, b = SyntheticScenes(10, size=48, seed=1), SyntheticScenes(10, size=48, seed=1)
    a[0]
    torch.rand(5)
    np.random.rand(5)  # global streams do not matter, and are left alone
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    for i in (0, 7):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks", "semantic"))
        assert ta["image_id"] == i
    assert torch.equal(a[3][0], a[3][0])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], SyntheticScenes(10, size=48, seed=2)[0][0])
    assert not torch.equal(a[0][0], SyntheticScenes(10, size=48, seed=1, split="val")[0][0])
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_train_and_val_are_different_streams(small_data):
    train, val, _ = small_data
    assert train.split == "train" and val.split == "val"
    assert all(not torch.equal(train[i][0], val[i][0]) for i in range(len(val)))


def test_scene_targets_are_consistent(small_data):
    train, val, _ = small_data
    for ds in (train, val):
        for i in range(len(ds)):
            image, target = ds[i]
            assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
            assert len(target["labels"]) >= 1
            check_target(image, target, 64)


def test_default_scenes_mix_small_medium_and_large_objects():
    """COCO's size classes (by box area) each hold at least 15% of the objects of 200 default scenes,
    whose targets are consistent too."""
    scenes = SyntheticScenes(200)
    items = [scenes[i] for i in range(200)]
    for image, target in items[:20]:
        check_target(image, target, 128)
    counts = size_counts(t for _, t in items)
    total = sum(counts.values())
    assert total >= 200 * 2  # 3.5 objects a scene on average
    assert all(c >= 0.15 * total for c in counts.values()), counts
    assert max(len(t["labels"]) for _, t in items) <= scenes.max_objects


def test_occlusion_hides_later_drawn_pixels_only():
    """Objects are drawn back to front: with many objects, some are partly hidden, and each object's
    visible mask is its own pixels only (the checks of check_target), also with max_objects=1."""
    one = SyntheticScenes(5, size=64, max_objects=1)
    assert all(len(one[i][1]["labels"]) == 1 for i in range(5))
    crowded = SyntheticScenes(5, size=64, max_objects=12, seed=4)
    for i in range(5):
        check_target(*crowded[i], 64)


def test_info(small_data):
    train, val, info = small_data
    assert isinstance(info, DenseDatasetInfo) and isinstance(info, DatasetInfo)
    assert info.num_classes == 11 and info.num_object_classes == 10 and len(info.classes) == 11
    assert info.classes[0] == "background" and info.classes[1:] == [str(d) for d in range(10)]
    assert (info.in_chans, info.img_size, info.native_size, info.num_train, info.num_val) == (3, 64, 64, 24, 8)
    assert len(info.mean) == len(info.std) == 3 and all(0 < s < 1 for s in info.std)
    assert (info.source, info.max_objects) == ("digits", 6)
    assert Preprocessing.from_data(info).input_size == (3, 64, 64)  # what reads a DatasetInfo reads this one


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_objects():
    train, _, info = build_dense_datasets(num_train=4, num_val=2, img_size=48, source="fashion_mnist")
    assert info.source == "fashion-mnist" and info.classes[1] == "T-shirt/top" and info.num_classes == 11
    for i in range(4):
        check_target(*train[i], 48)


# --------------------------------------------------------------------------- joint transforms

def test_flip_moves_boxes_masks_and_semantic_with_the_image(small_data):
    train, _, info = small_data
    ds = SeededDataset(train, build_dense_transforms(info, train=True, hflip=1.0), seed=0)
    norm = build_dense_transforms(info, train=False)
    for draw in (0, 5, 24 + 5):
        image, target = train[draw % len(train)]
        flipped, out = ds[draw]
        ref, _ = norm(tv_tensors.Image(image.flip(-1)), {})
        assert torch.equal(flipped, ref) and flipped.dtype == torch.float32
        assert torch.equal(out["masks"], target["masks"].flip(-1))
        assert torch.equal(out["semantic"], target["semantic"].flip(-1))
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        assert torch.equal(out["boxes"].as_subclass(torch.Tensor), torch.stack([64 - x2, y1, 64 - x1, y2], dim=1))
        assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == draw % len(train)
        check_target(flipped, out, 64)


def test_joint_transforms_are_seeded_per_draw(small_data):
    train, _, info = small_data
    ds = SeededDataset(train, build_dense_transforms(info, train=True, hflip=0.5, crop_scale=(0.3, 1.0)), seed=7)
    n = len(train)
    a = ds[3]
    torch.rand(3)
    b = ds[3]
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in ("boxes", "masks", "semantic"))
    others = [ds[e * n + 3][0] for e in range(1, 4)]  # the same scene, drawn in later epochs
    assert all(not torch.equal(a[0], o) for o in others)


def test_crops_keep_targets_consistent(small_data):
    """After random resized crops (nearest for masks) every box is again the tight box of its mask,
    instances cropped away are gone with their labels and masks, and the semantic map is still the
    union of the instance masks."""
    train, _, info = small_data
    ds = SeededDataset(train, build_dense_transforms(info, train=True, crop_scale=(0.1, 0.5)), seed=1)
    fewer = 0
    for draw in range(40):
        image, target = ds[draw]
        check_target(image, target, 64, min_area=1)
        assert set(target["semantic"].unique().tolist()) <= {0, *target["labels"].tolist()}
        fewer += len(target["labels"]) < len(train[draw % len(train)][1]["labels"])
    assert fewer > 0  # small crops do cut objects away


def test_eval_transform_normalises_the_image_only(small_data):
    _, val, info = small_data
    image, target = val[0]
    out, out_target = SeededDataset(val, build_dense_transforms(info, train=False))[0]
    mean, std = torch.tensor(info.mean)[:, None, None], torch.tensor(info.std)[:, None, None]
    assert torch.allclose(out, (image.float() / 255 - mean) / std, atol=1e-5)
    assert all(torch.equal(out_target[k], target[k]) for k in ("boxes", "labels", "masks", "semantic"))


# --------------------------------------------------------------------------- collation and loading

def test_collate_dense_in_a_dataloader(small_data):
    train, _, info = small_data
    ds = SeededDataset(train, build_dense_transforms(info, train=True), seed=2)
    loader = DataLoader(ds, batch_size=5, sampler=ResumableSampler(len(ds), seed=2), collate_fn=collate_dense)
    images, targets = next(iter(loader))
    assert type(images) is torch.Tensor and images.shape == (5, 3, 64, 64) and images.dtype == torch.float32
    assert len(targets) == 5 and all(t["masks"].shape[0] == len(t["labels"]) for t in targets)
    indexed = SeededDataset(train, None, with_index=True)
    images, targets, indices = collate_dense([indexed[1], indexed[2]])
    assert images.dtype == torch.uint8 and indices == [1, 2] and targets[0]["image_id"] == 1


def test_collate_dense_keeps_images_of_different_sizes_apart():
    a, b = SyntheticScenes(1, size=32)[0], SyntheticScenes(1, size=40)[0]
    images, targets = collate_dense([a, b])
    assert isinstance(images, list) and [tuple(im.shape) for im in images] == [(3, 32, 32), (3, 40, 40)]
    assert targets[1]["semantic"].shape == (40, 40)
    with pytest.raises(DataError, match="empty batch"):
        collate_dense([])


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(max_objects=0), r"max_objects must be an integer >= 1, got 0"),
    (dict(img_size=16), r"img_size must be an integer >= 32 \(the canvas side in px\), got 16"),
    (dict(img_size=64.0), r"img_size must be an integer >= 32"),
    (dict(source="cifar10"), r"unknown source 'cifar10'.*digits, fashion-mnist"),
    (dict(num_train=0), r"num_train must be an integer >= 1, got 0"),
    (dict(name="coco"), r"unknown dense dataset 'coco'; valid names: synthetic"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        build_dense_datasets(**{"num_train": 2, "num_val": 2, **kwargs})


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist"):
        SyntheticScenes(2, source="fashion-mnist", root=str(tmp_path))


def test_bad_transform_options(small_data):
    info = small_data[2]
    with pytest.raises(DataError, match=r"hflip is a probability.*got 1.5"):
        build_dense_transforms(info, train=True, hflip=1.5)
    with pytest.raises(DataError, match=r"crop_scale must be \(min, max\)"):
        build_dense_transforms(info, train=True, crop_scale=(0.5, 0.2))
    with pytest.raises(DataError, match=r"crop_scale must be \(min, max\).*got 0.5"):
        build_dense_transforms(info, train=True, crop_scale=0.5)
    with pytest.raises(DataError, match="split must be one of train, val"):
        SyntheticScenes(2, split="test")
    with pytest.raises(IndexError):
        SyntheticScenes(2, size=32)[2]
