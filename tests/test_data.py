"""Tests of mixlab.data: datasets, transforms, Mixup/CutMix, samplers and seeded augmentation."""
from __future__ import annotations

import gzip
import os
import pickle
import random
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, SequentialSampler

from mixlab.data import (DataError, DatasetInfo, MixupCutmix, ResumableSampler, SeededDataset, build_datasets,
                         build_transforms, mix_seed)
from mixlab.data.transforms import is_deterministic
from mixlab.data import datasets as datasets_module

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers

def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write a uint8 array in the IDX format (optionally gzip-compressed)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_fake_fashion(folder: Path, compress: bool, n_train: int = 40, n_val: int = 20) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        paths[f"{prefix}-images"] = write_idx(folder / f"{prefix}-images-idx3-ubyte",
                                              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        paths[f"{prefix}-labels"] = write_idx(folder / f"{prefix}-labels-idx1-ubyte",
                                              np.arange(n, dtype=np.uint8) % 10, compress)
    return paths


def make_fake_cifar(root: Path, which: str, per_batch: int = 12) -> Path:
    """Fake CIFAR pickles laid out as the real archives (pickle protocol 2, like the originals)."""
    rng = np.random.default_rng(1)

    def dump(path: Path, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            dump(folder / name, {"batch_label": name, "labels": [i % 10 for i in range(per_batch)],
                                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                                 "filenames": [f"{i}.png" for i in range(per_batch)]})
        dump(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                       "frog", "horse", "ship", "truck"],
                                       "num_cases_per_batch": per_batch, "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, n in (("train", 5 * per_batch), ("test", per_batch)):
            dump(folder / name, {"batch_label": name, "fine_labels": [i % 100 for i in range(n)],
                                 "coarse_labels": [i % 20 for i in range(n)],
                                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 "filenames": [f"{i}.png" for i in range(n)]})
        dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                               "coarse_label_names": [f"super{i}" for i in range(20)]})
    return folder


def save_image(path: Path, mode: str, size: tuple[int, int], fmt: str) -> None:
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(path, fmt)


def make_image_folder(root: Path, classes=("cat", "dog"), corrupt: bool = True) -> Path:
    """train/ and val/ with RGB and grayscale PNGs, an RGBA PNG, a JPEG, and a corrupt '.jpg'."""
    for split in ("train", "val"):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            save_image(folder / "rgb.png", "RGB", (20, 14), "PNG")
            save_image(folder / "gray.png", "L", (12, 18), "PNG")
            save_image(folder / "rgba.png", "RGBA", (16, 16), "PNG")
            save_image(folder / "photo.jpg", "RGB", (24, 20), "JPEG")
        if corrupt:
            (root / split / classes[0] / "broken.jpg").write_bytes(os.urandom(300))
    return root


def fake_info(in_chans: int, native: int | None = 16, img_size: int = 16) -> DatasetInfo:
    return DatasetInfo(name="fake", num_classes=10, in_chans=in_chans, img_size=img_size,
                       mean=(0.5,) * in_chans, std=(0.25,) * in_chans, classes=[str(i) for i in range(10)],
                       num_train=1, num_val=1, skipped={"train": 0, "val": 0}, native_size=native)


def uint8_image(channels: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- digits

def test_digits_split_shapes_and_info():
    train, val, info = build_datasets("digits")
    assert len(train) + len(val) == 1797
    assert len(val) == 360 and len(train) == 1437  # 20 % stratified
    train_counts, val_counts = Counter(train.targets.tolist()), Counter(val.targets.tolist())
    assert set(train_counts) == set(val_counts) == set(range(10))
    for c in range(10):  # stratified: each class split about 80/20
        assert abs(val_counts[c] / (train_counts[c] + val_counts[c]) - 0.2) < 0.02
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and isinstance(label, int)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert (info.name, info.num_classes, info.in_chans, info.img_size, info.native_size) == ("digits", 10, 1, 8, 8)
    assert info.classes == [str(i) for i in range(10)]
    assert (info.num_train, info.num_val) == (1437, 360) and info.skipped == {"train": 0, "val": 0}
    expected_mean = train.images.double().mean().item() / 255
    assert info.mean[0] == pytest.approx(expected_mean) and info.std[0] == pytest.approx(
        (train.images.double() / 255).std(unbiased=False).item())


def test_digits_split_is_deterministic_and_independent_of_seed():
    a_train, a_val, _ = build_datasets("digits", seed=0)
    b_train, b_val, _ = build_datasets("digits", seed=123)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_val.targets, b_val.targets)


def test_limits_are_seeded_and_img_size_is_reported():
    a, av, info = build_datasets("digits", limit_train=50, limit_val=20, seed=1, img_size=32)
    b, _, _ = build_datasets("digits", limit_train=50, limit_val=20, seed=1)
    c, _, _ = build_datasets("digits", limit_train=50, seed=2)
    assert (len(a), len(av), info.num_train, info.num_val) == (50, 20, 50, 20)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert info.img_size == 32 and info.native_size == 8
    full_info = build_datasets("digits")[2]
    assert info.mean == full_info.mean  # statistics of the full train split, whatever the limit


@pytest.mark.parametrize("bad", [dict(limit_train=0), dict(limit_val=-3), dict(img_size=0), dict(img_size=7.5)])
def test_bad_arguments(bad):
    with pytest.raises(DataError):
        build_datasets("digits", **bad)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match=r"closest: 'cifar10'.*valid names: digits, fashion-mnist"):
        build_datasets("cifar")
    assert build_datasets("DIGITS", limit_train=3)[2].name == "digits"  # case and _/- are forgiven


def test_transform_is_applied_when_given():
    tf = build_transforms(build_datasets("digits")[2], train=False)
    train, _, _ = build_datasets("digits", train_transform=tf, val_transform=tf)
    assert train[0][0].dtype == torch.float32


# --------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} is absent: the Debian package "
                    f"dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_location():
    train, val, info = build_datasets("fashion-mnist")
    assert (len(train), len(val)) == (60000, 10000)
    assert info.classes[:2] == ["T-shirt/top", "Trouser"] and info.num_classes == 10
    assert (info.in_chans, info.img_size) == (1, 28)
    assert info.mean[0] == pytest.approx(0.2860, abs=1e-3) and info.std[0] == pytest.approx(0.3530, abs=1e-3)
    image, label = val[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and 0 <= label < 10


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_fake_idx(tmp_path, compress):
    make_fake_fashion(tmp_path, compress)
    train, val, info = build_datasets("fashion-mnist", root=str(tmp_path))
    assert (len(train), len(val)) == (40, 20)
    assert train[0][0].shape == (1, 28, 28) and train.targets.tolist()[:3] == [0, 1, 2]
    assert info.classes[-1] == "Ankle boot"


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_truncated_file_is_named(tmp_path, compress):
    paths = make_fake_fashion(tmp_path, compress)
    bad = paths["train-images"]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(DataError, match=bad.name):
        build_datasets("fashion-mnist", root=str(tmp_path))


def test_fashion_mnist_bad_magic_is_named(tmp_path):
    paths = make_fake_fashion(tmp_path, compress=False)
    bad = paths["t10k-labels"]
    bad.write_bytes(b"\x00\x00\x0d\x01" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match=f"{bad.name}.*magic"):
        build_datasets("fashion-mnist", root=str(tmp_path))


def test_fashion_mnist_missing_gives_instructions(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*--data-root.*download: true"):
        build_datasets("fashion-mnist", root=str(tmp_path / "nowhere"))
    # no root: the system folder, then the cache
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no-system-dir"):
        build_datasets("fashion-mnist")


# --------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar_from_fake_pickles(tmp_path, which, point_at):
    folder = make_fake_cifar(tmp_path, which)
    root = tmp_path if point_at == "parent" else folder
    train, val, info = build_datasets(which, root=str(root))
    assert (len(train), len(val)) == (60, 12)
    assert info.num_classes == (10 if which == "cifar10" else 100) == len(info.classes)
    assert (info.in_chans, info.img_size, len(info.mean)) == (3, 32, 3)
    image, label = train[13]  # CIFAR-10: row 1 of data_batch_2; CIFAR-100: row 13 of train
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == (1 if which == "cifar10" else 13)
    with open(folder / ("data_batch_2" if which == "cifar10" else "train"), "rb") as f:
        raw = pickle.load(f)["data"]
    row = 1 if which == "cifar10" else 13
    assert torch.equal(image.flatten(), torch.from_numpy(raw[row]))  # R, G, B planes in order
    if which == "cifar10":
        assert info.classes[0] == "airplane"


def test_cifar_missing_gives_instructions(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*--data-root.*download: true"):
        build_datasets("cifar10", root=str(tmp_path))


def test_cifar_corrupt_and_malicious_pickles_are_refused(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        build_datasets("cifar10", root=str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    make_fake_cifar(tmp_path / "b", "cifar10")
    (tmp_path / "b" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load"):
        build_datasets("cifar10", root=str(tmp_path / "b"))


# --------------------------------------------------------------------------- image folders

def test_imagefolder_skips_corrupt_images(tmp_path):
    make_image_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.jpg"):
        train, val, info = build_datasets("imagefolder", root=str(tmp_path))
    assert info.skipped == {"train": 1, "val": 1}
    assert (len(train), len(val), info.num_train, info.num_val) == (8, 8, 8, 8)
    assert info.classes == ["cat", "dog"] and info.num_classes == 2 and info.in_chans == 3
    assert info.img_size == 224 and info.native_size is None
    for i in range(len(train)):  # RGB, grayscale and RGBA all come out as RGB uint8
        image, label = train[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and label in (0, 1)
    tf = build_transforms(info, train=True, img_size=32, random_resized_crop=True, hflip=0.5)
    assert tf(train[0][0]).shape == (3, 32, 32)
    assert build_transforms(info, train=False, img_size=32)(val[1][0]).shape == (3, 32, 32)


def test_imagefolder_strict_names_the_bad_file(tmp_path):
    make_image_folder(tmp_path)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        build_datasets("imagefolder", root=str(tmp_path), strict=True)


def test_imagefolder_limit_and_img_size(tmp_path):
    make_image_folder(tmp_path, corrupt=False)
    train, val, info = build_datasets("imagefolder", root=str(tmp_path), limit_train=3, img_size=64)
    assert (len(train), len(val), info.img_size) == (3, 8, 64)


def test_imagefolder_empty_class_folder(tmp_path):
    make_image_folder(tmp_path, corrupt=False)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "val" / "bird").mkdir()
    (tmp_path / "val" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty class folder.*train/bird"):
        build_datasets("imagefolder", root=str(tmp_path))


def test_imagefolder_missing_val_and_root(tmp_path):
    make_image_folder(tmp_path, corrupt=False)
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(DataError, match=r"val is missing"):
        build_datasets("imagefolder", root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("imagefolder", root=str(tmp_path / "absent"))
    with pytest.raises(DataError, match="needs root"):
        build_datasets("imagefolder")


def test_imagefolder_mismatched_classes(tmp_path):
    make_image_folder(tmp_path, corrupt=False)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(DataError, match=r"missing from val/: \['dog'\]; only in val/: \['wolf'\]"):
        build_datasets("imagefolder", root=str(tmp_path))


# --------------------------------------------------------------------------- transforms

TRAIN_OPTIONS = {
    "plain": {},
    "hflip": dict(hflip=1.0),
    "random_resized_crop": dict(random_resized_crop=True, rrc_scale=(0.2, 1.0)),
    "simple_random_crop": dict(simple_random_crop=True, crop_padding=4),
    "rand_augment": dict(rand_augment=dict(num_ops=2, magnitude=9)),
    "three_augment": dict(three_augment=True),
    "color_jitter": dict(color_jitter=0.4),
    "random_erasing": dict(random_erasing=1.0),
    "everything": dict(hflip=0.5, simple_random_crop=True, rand_augment=dict(num_ops=2, magnitude=9),
                       three_augment=True, color_jitter=0.3, random_erasing=0.25),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("option", sorted(TRAIN_OPTIONS))
@pytest.mark.parametrize("img_size", [16, 24])
def test_train_transforms_shapes_and_normalisation(channels, option, img_size):
    info = fake_info(channels, native=16)
    tf = build_transforms(info, train=True, img_size=img_size, **TRAIN_OPTIONS[option])
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    torch.manual_seed(0)
    for seed in range(8):  # several draws, so every branch of the random choices is met
        out = tf(uint8_image(channels, seed=seed))
        assert type(out) is torch.Tensor and out.dtype == torch.float32
        assert out.shape == (channels, img_size, img_size)
        if option not in ("random_erasing", "everything"):  # erasing fills with N(0, 1) noise
            assert low - 1e-5 <= float(out.min()) and float(out.max()) <= high + 1e-5


@pytest.mark.parametrize("option", sorted(TRAIN_OPTIONS))
def test_train_transforms_on_images_of_any_shape(option):
    info = fake_info(3, native=None, img_size=24)  # an image folder: sizes and shapes vary
    tf = build_transforms(info, train=True, **TRAIN_OPTIONS[option])
    for h, w in ((30, 50), (17, 13), (24, 24)):
        out = tf(uint8_image(3, h=h, w=w))
        assert out.dtype == torch.float32 and out.shape == (3, 24, 24)


@pytest.mark.parametrize("channels", [1, 3])
def test_three_augment_on_grayscale_and_rgb(channels):
    tf = build_transforms(fake_info(channels), train=True, three_augment=True)
    x = uint8_image(channels)
    outs = {tuple(tf(x).flatten()[:20].tolist()) for _ in range(30)}
    assert len(outs) >= 2  # several ops are chosen


def test_eval_transforms_are_deterministic_and_exact():
    info = fake_info(1, native=16)
    x = uint8_image(1)
    tf = build_transforms(info, train=False, hflip=1.0, rand_augment=dict(num_ops=2, magnitude=9))  # ignored
    assert torch.allclose(tf(x), (x.float() / 255 - 0.5) / 0.25, atol=1e-6)
    resize = build_transforms(info, train=False, img_size=28)
    assert torch.equal(resize(x), resize(x)) and resize(x).shape == (1, 28, 28)
    folder = build_transforms(fake_info(3, native=None), train=False, img_size=20)
    rect = uint8_image(3, h=30, w=50)
    assert torch.equal(folder(rect), folder(rect)) and folder(rect).shape == (3, 20, 20)
    pil = Image.fromarray(rect.permute(1, 2, 0).numpy())
    assert torch.allclose(folder(pil), folder(rect))


def test_transform_option_errors():
    info = fake_info(3)
    with pytest.raises(DataError, match="alternatives"):
        build_transforms(info, True, random_resized_crop=True, simple_random_crop=True)
    with pytest.raises(DataError, match="probability"):
        build_transforms(info, True, hflip=1.5)
    with pytest.raises(DataError, match="valid keys"):
        build_transforms(info, True, rand_augment=dict(n=2))
    with pytest.raises(DataError, match="rrc_scale"):
        build_transforms(info, True, random_resized_crop=True, rrc_scale=(0.5, 0.1))


def test_rand_augment_magnitude_on_timm_scale():
    tf = build_transforms(fake_info(3), train=True, rand_augment=dict(num_ops=2, magnitude=9))
    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    assert ra.num_magnitude_bins == 11 and ra.magnitude == 9


# --------------------------------------------------------------------------- Mixup / CutMix

def batch(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_targets_and_determinism(alphas):
    mix = MixupCutmix(10, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1)
    assert mix.active
    x, y = batch()
    x_copy = x.clone()
    state = torch.get_rng_state()
    a_img, a_tgt = mix(x, y, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(x, x_copy)  # the input is not modified
    b_img, b_tgt = mix(x, y, seed=5)
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)
    assert a_tgt.shape == (8, 10) and a_tgt.dtype == torch.float32
    assert torch.allclose(a_tgt.sum(1), torch.ones(8))
    assert float(a_tgt.min()) >= 0.1 / 10 - 1e-6  # smoothing floor
    others = [mix(x, y, seed=s) for s in range(6, 12)]
    assert any(not torch.equal(o[1], a_tgt) for o in others)


def test_mixup_prob_and_switch():
    x, y = batch()
    never = MixupCutmix(10, mixup_alpha=1.0, prob=0.0)
    img, tgt = never(x, y, seed=0)
    assert torch.equal(img, x) and torch.equal(tgt, never.targets(y))
    cut = MixupCutmix(10, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)  # always CutMix
    img, _ = cut(x, y, seed=1)
    rolled = x.roll(1, 0)
    assert bool(((img == x) | (img == rolled)).all())  # pixels are pasted, never blended


def test_mixup_inactive_path_and_label_smoothing():
    mix = MixupCutmix(4, label_smoothing=0.2)
    assert not mix.active
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 3, 1])
    img, tgt = mix(x, y, seed=0)
    assert img is x
    expected = torch.full((3, 4), 0.2 / 4)
    expected[torch.arange(3), y] = 1 - 0.2 + 0.2 / 4
    assert torch.allclose(tgt, expected) and torch.allclose(mix.targets(y), expected)
    with pytest.raises(DataError):
        MixupCutmix(4, mixup_alpha=-1)
    with pytest.raises(DataError, match="labels must lie"):
        mix.targets(torch.tensor([4]))


# --------------------------------------------------------------------------- ResumableSampler

def test_sampler_permutation_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    list(a), list(a)  # iterating does not advance anything
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    first = [d % 50 for d in a]
    assert sorted(first) == list(range(50))
    assert list(a) == [2 * 50 + i for i in first]  # draw = epoch * N + index
    b.set_epoch(3)
    assert [d % 50 for d in b] != first
    assert [d % 50 for d in ResumableSampler(50, seed=4).epoch_draws(2)] != first
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_set_start_skips_exactly():
    s = ResumableSampler(37, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.set_start(10)
    assert list(s) == full[10:] and len(s) == 27
    s.set_epoch(5)
    assert s.start == 0 and len(s) == 37
    s.load_state_dict({"epoch": 4, "start": 10})
    assert list(s) == full[10:]
    with pytest.raises(DataError, match="past the end"):
        s.set_start(38)


@pytest.mark.parametrize("n,replicas,drop_last", [(10, 3, False), (12, 4, False), (10, 3, True), (2, 3, False)])
def test_sampler_distributed_partition(n, replicas, drop_last):
    ranks = [ResumableSampler(n, seed=7, num_replicas=replicas, rank=r, drop_last=drop_last)
             for r in range(replicas)]
    for s in ranks:
        s.set_epoch(1)
    shares = [list(s) for s in ranks]
    assert len({len(share) for share in shares}) == 1 and all(len(share) == len(s) for share, s in zip(shares, ranks))
    indices = [d % n for share in shares for d in share]
    if drop_last:
        assert len(indices) == len(set(indices)) == (n // replicas) * replicas
    else:
        assert set(indices) == set(range(n))
        assert len(shares[0]) == -(-n // replicas)
    draws = [d for share in shares for d in share]
    assert len(draws) == len(set(draws))  # padded duplicates get their own draw ids


def test_sampler_repeated_augmentation():
    n, replicas, repeats = 12, 3, 3
    ranks = [ResumableSampler(n, seed=0, num_replicas=replicas, rank=r, repeats=repeats) for r in range(replicas)]
    shares = [list(s) for s in ranks]
    assert all(len(share) == n // replicas for share in shares)
    draws = [d for share in shares for d in share]
    assert len(draws) == len(set(draws))  # each copy is its own draw, so its own augmentation
    counts = Counter(d % n for d in draws)
    assert set(counts.values()) == {repeats}  # 4 distinct indices, each on all 3 ranks
    for index in counts:
        holders = {r for r, share in enumerate(shares) if any(d % n == index for d in share)}
        assert holders == {0, 1, 2}
    for d in draws:
        epoch, round_, index = ranks[0].decode(d)
        assert epoch == 0 and 0 <= round_ < ranks[0].rounds and 0 <= index < n


def test_sampler_draw_ids_decode_to_valid_indices():
    s = ResumableSampler(7, seed=2, num_replicas=2, rank=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        for d in s:
            e, _, index = s.decode(d)
            assert e == epoch and 0 <= index < 7 and d % 7 == index


def test_sampler_argument_errors():
    with pytest.raises(DataError, match="rank"):
        ResumableSampler(10, num_replicas=2, rank=2)
    with pytest.raises(DataError, match="dataset_len"):
        ResumableSampler(0)
    with pytest.raises(DataError, match="drop_last"):
        ResumableSampler(2, num_replicas=3, rank=0, drop_last=True)


def test_mix_seed_is_stable_and_distinguishes_tuples():
    assert mix_seed(1, 0) == mix_seed(1, 0) != mix_seed(0, 1)
    assert 0 <= mix_seed(-5, 2**70) < 2**63


# --------------------------------------------------------------------------- SeededDataset

@pytest.fixture(scope="module")
def digits_seeded():
    train, _, info = build_datasets("digits", limit_train=64)
    tf = build_transforms(info, train=True, img_size=16, hflip=0.5, simple_random_crop=True,
                          rand_augment=dict(num_ops=2, magnitude=9), random_erasing=0.5)
    return SeededDataset(train, tf, seed=11)


def test_seeded_dataset_same_draw_same_tensor(digits_seeded):
    ds = digits_seeded
    n = len(ds)
    a = ds[5][0]
    torch.rand(10)  # whatever happens to the global RNG in between
    assert torch.equal(ds[5][0], a)
    epochs = [ds[e * n + 5][0] for e in range(1, 4)]  # same image, other epochs
    assert all(not torch.equal(a, other) for other in epochs)
    assert ds[5][1] == ds[n + 5][1]
    other_seed = SeededDataset(ds.base, ds.transform, seed=12)
    assert not torch.equal(other_seed[5][0], a)


def test_seeded_dataset_leaves_global_rng_alone(digits_seeded):
    state, py_state = torch.get_rng_state(), random.getstate()
    digits_seeded[3]
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state


def test_seeded_dataset_dataloader_workers_agree(digits_seeded):
    sampler = ResumableSampler(len(digits_seeded), seed=3)
    sampler.set_epoch(1)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(digits_seeded, batch_size=16, sampler=sampler, num_workers=workers)
        return [x for x, _ in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 4 and all(torch.equal(a, b) for a, b in zip(serial, parallel))
    sampler.set_start(32)  # a resume after two batches gives the remaining batches
    assert all(torch.equal(a, b) for a, b in zip(batches(0), serial[2:]))


def test_seeded_dataset_plain_indices_for_evaluation():
    _, val, info = build_datasets("digits", limit_val=20)
    ds = SeededDataset(val, build_transforms(info, train=False, img_size=12))
    xs = torch.cat([x for x, _ in DataLoader(ds, batch_size=8, sampler=SequentialSampler(ds))])
    assert xs.shape == (20, 1, 12, 12)
    assert torch.equal(xs[7], ds[7][0])


@pytest.mark.parametrize("size", [8, 6, 28])  # digits: the native size (no resize), a downscale, an upscale
def test_seeded_dataset_batches_deterministic_transforms_bit_for_bit(size):
    """A deterministic transform over in-memory images runs once per batch, with exactly the
    tensors and labels of the item-by-item path, in the DataLoader too (workers or not)."""
    train, _, info = build_datasets("digits", limit_train=40)
    for tf in (build_transforms(info, train=False, img_size=size), build_transforms(info, train=True, img_size=size)):
        assert is_deterministic(tf)
        ds = SeededDataset(train, tf, seed=5)
        assert ds.batched
        draws = [3, 0, 39, 40 + 7, 3 * 40 + 12]  # draw ids of later epochs decode to their index
        batch = ds.__getitems__(draws)
        for (x, y), d in zip(batch, draws):
            ref_x, ref_y = ds[d]
            assert torch.equal(x, ref_x) and x.dtype == torch.float32 and y == ref_y and type(y) is int
        sampler = ResumableSampler(len(ds), seed=2)
        loaders = [DataLoader(ds, batch_size=16, sampler=sampler, num_workers=w) for w in (0, 2)]
        by_item = [torch.stack([ds[d][0] for d in chunk]) for chunk in torch.tensor(list(sampler)).split(16)]
        for loader in loaders:
            got = [x for x, _ in loader]
            assert len(got) == len(by_item) and all(torch.equal(a, b) for a, b in zip(got, by_item))


def test_seeded_dataset_with_index_adds_the_base_index():
    """``with_index``: each item also carries the index of ``base`` its draw id decodes to (a per-image
    cache's key, the distillation task's), on the batched and the per-item paths alike."""
    train, _, info = build_datasets("digits", limit_train=16)
    draws = [3, 16 + 5, 2 * 16 + 15]
    for tf in (build_transforms(info, train=False, img_size=8), build_transforms(info, train=True, hflip=0.5)):
        plain, indexed = SeededDataset(train, tf, seed=1), SeededDataset(train, tf, seed=1, with_index=True)
        for (x, y), (xi, yi, i), d in zip(plain.__getitems__(draws), indexed.__getitems__(draws), draws):
            assert torch.equal(x, xi) and y == yi and i == d % 16 and torch.equal(indexed[d][0], x)


def test_seeded_dataset_batches_only_what_it_may():
    """Random transforms, transformed or file-backed bases and no transform keep the per-item
    path; negative draws are refused either way."""
    train, _, info = build_datasets("digits", limit_train=16)
    random_tf = build_transforms(info, train=True, img_size=12, hflip=0.5)
    assert not is_deterministic(random_tf) and not is_deterministic(lambda x: x) and not is_deterministic(None)
    assert not SeededDataset(train, random_tf).batched and not SeededDataset(train, None).batched
    eval_tf = build_transforms(info, train=False, img_size=12)
    pre_transformed = datasets_module.ArrayDataset(train.images, train.targets, train.classes, transform=eval_tf)
    assert not SeededDataset(pre_transformed, eval_tf).batched
    ds = SeededDataset(train, random_tf, seed=1)
    assert all(torch.equal(x, ds[d][0]) for (x, _), d in zip(ds.__getitems__([4, 20, 1]), [4, 20, 1]))
    for tf in (random_tf, eval_tf):
        with pytest.raises(DataError, match="draw ids >= 0"):
            SeededDataset(train, tf).__getitems__([1, -2])
