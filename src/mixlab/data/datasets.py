"""Datasets: digits, Fashion-MNIST, CIFAR-10/100 and image folders, behind one ``build_datasets``.

Every dataset built here yields ``(image, label)`` items, ``label`` a Python ``int``. With no
transform, ``image`` is a ``uint8`` :class:`torchvision.tv_tensors.Image` of shape ``(C, H, W)``
at the dataset's native size; that is the documented path for training: build the datasets
untransformed and wrap them in :class:`~mixlab.data.samplers.SeededDataset` with the
transforms of :func:`~mixlab.data.transforms.build_transforms`, so that augmentation is a
deterministic function of (seed, epoch, position)::

    train_base, val_base, info = build_datasets("cifar10", root="data/")
    train = SeededDataset(train_base, build_transforms(info, train=True, hflip=0.5), seed=0)
    val = SeededDataset(val_base, build_transforms(info, train=False))

The small datasets (digits, Fashion-MNIST, CIFAR) are held in memory as one ``uint8``
tensor; image folders are read from disk item by item.
"""
from __future__ import annotations

import codecs
import difflib
import functools
import gzip
import os
import pickle
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = ["DataError", "DatasetInfo", "ArrayDataset", "ImageFileDataset", "build_datasets", "DATASET_NAMES",
           "IMAGENET_MEAN", "IMAGENET_STD", "FASHION_MNIST_SYSTEM_DIR", "cache_dir"]

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

#: Where the Debian package ``dataset-fashion-mnist`` installs the four ``.gz`` IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The names :func:`build_datasets` accepts.
DATASET_NAMES: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")

#: Default square side for image folders (their images have no common native size).
DEFAULT_IMAGEFOLDER_SIZE = 224

#: How many unreadable file names a warning or an error quotes.
_MAX_NAMES_SHOWN = 5


class DataError(ValueError):
    """Every bad-input error of :mod:`mixlab.data`: missing or corrupt files, bad arguments."""


@dataclass
class DatasetInfo:
    """What a model and its transforms need to know about a dataset.

    ``img_size`` is the square side the model will see: the ``img_size`` asked of
    :func:`build_datasets`, else the native one (224 for image folders). ``native_size`` is the
    square side of the stored images (``None`` for image folders, whose images vary).
    ``mean``/``std`` are per channel in 0..1 units (computed from the full train split for
    the small datasets, ImageNet's for image folders). ``num_train``/``num_val`` count the
    items of the returned datasets (after ``limit_*`` and after skipping unreadable images).
    ``skipped`` counts the unreadable images skipped per split (image folders only).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    num_train: int
    num_val: int
    skipped: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    native_size: int | None = None


# --------------------------------------------------------------------------- dataset classes

class ArrayDataset(Dataset):
    """Images held in memory: ``images`` a ``uint8`` tensor ``(N, C, H, W)``, ``labels`` ``(N,)``.

    Items are ``(transform(image), label)``; with ``transform=None`` the image is a fresh
    ``uint8`` :class:`~torchvision.tv_tensors.Image` (a copy, so callers may modify it).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels must have shape ({images.shape[0]},) to match the images, "
                            f"got {tuple(labels.shape)}")
        self.images = images
        self.targets = labels.long()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = tv_tensors.Image(self.images[index].clone())
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ImageFileDataset(Dataset):
    """Images read from disk: ``samples`` a list of ``(path, label)``; each image converted to RGB.

    Items are ``(transform(image), label)``; with ``transform=None`` the image is a ``uint8``
    :class:`~torchvision.tv_tensors.Image` ``(3, H, W)`` at the file's own size. A file that
    cannot be decoded although it passed the scan of :func:`build_datasets` (it changed since)
    raises :class:`DataError` naming it.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
            raise DataError(f"cannot decode image {path}: {exc}; remove or replace the file") from exc
        image = tv_tensors.Image(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
        if self.transform is not None:
            image = self.transform(image)
        return image, label


# --------------------------------------------------------------------------- helpers

def cache_dir() -> Path:
    """The download folder: ``$XDG_CACHE_HOME/mixlab``, by default ``~/.cache/mixlab``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixlab"


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (0..1 units) of a uint8 ``(N, C, H, W)`` tensor.

    Counts the 256 values of each channel instead of converting the images to floats, so it
    needs no more memory than one channel and is exact.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _check_limit(limit: int | None, what: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"{what} must be a positive integer or None (no limit), got {limit!r}")


def _limited_indices(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of the first ``limit`` of ``n`` items after a shuffle seeded by ``seed`` (sorted);
    ``None`` when there is no limit or it keeps everything."""
    if limit is None or limit >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values


def _limit_arrays(images: torch.Tensor, labels: torch.Tensor, limit: int | None,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = _limited_indices(len(labels), limit, seed)
    return (images, labels) if keep is None else (images[keep].contiguous(), labels[keep])


def _resolve_name(name: str) -> str:
    """Accept ``Fashion_MNIST``, ``CIFAR10`` and the like; raise a DataError for unknown names."""
    key = str(name).strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
           "image-folder": "imagefolder", "folder": "imagefolder"}.get(key, key)
    if key in DATASET_NAMES:
        return key
    close = difflib.get_close_matches(key, DATASET_NAMES, n=1, cutoff=0.0)
    hint = f" (closest: {close[0]!r})" if close else ""
    raise DataError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------- digits

def _load_digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[str]]:
    """scikit-learn's 1,797 8x8 digits, split 80/20 stratified with the fixed seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # values 0..16 -> 0..255
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=bunch.target,
                                          random_state=0)
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    classes = [str(c) for c in bunch.target_names]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx]), classes


# --------------------------------------------------------------------------- Fashion-MNIST (IDX files)

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or not) as a ``uint8`` array.

    The format: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions,
    then each dimension as a big-endian 32-bit integer, then the data. A wrong magic number,
    a wrong number of dimensions, or a data length that does not match the dimensions raises
    :class:`DataError` naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc} (the file is corrupt or truncated; "
                        f"download it again)") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than the {header}-byte IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes: its magic number is "
                        f"0x{raw[:4].hex()}, expected 0x000008{ndim:02x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"{path} is {problem}: dimensions {dims} need {expected} data bytes, "
                        f"found {len(raw) - header}; download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dirs(root: str | None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    if root is not None:
        # the folder itself, or torchvision's layout under it (what download=True produces)
        return [Path(root), Path(root) / "FashionMNIST" / "raw"]
    return [FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist" / "FashionMNIST" / "raw"]


def _locate_fashion_mnist(root: str | None, download: bool) -> dict[str, Path]:
    searched = _fashion_mnist_dirs(root)
    for folder in searched:
        found = {key: _find_idx_file(folder, stem) for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    if download:
        from torchvision.datasets import FashionMNIST

        target = Path(root) if root is not None else cache_dir() / "fashion-mnist"
        try:
            FashionMNIST(str(target), train=True, download=True)
        except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError)
            raise DataError(f"downloading Fashion-MNIST into {target} failed: {exc}; install it with "
                            f"`apt-get install dataset-fashion-mnist` or pass a folder holding the four "
                            f"IDX files as `--data-root DIR`") from exc
        folder = target / "FashionMNIST" / "raw"
        found = {key: _find_idx_file(folder, stem) for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        searched.append(folder)
    wanted = ", ".join(f"{stem}[.gz]" for stem in _FASHION_FILES.values())
    raise DataError(
        f"Fashion-MNIST not found: looked for {wanted} in {', '.join(str(p) for p in searched)}. "
        f"Get it with `apt-get install dataset-fashion-mnist` (installs into {FASHION_MNIST_SYSTEM_DIR}), "
        f"or point `--data-root DIR` (root=) at a folder holding the files, "
        f"or set `download: true` (download=True) to fetch them into {cache_dir() / 'fashion-mnist'}")


def _load_fashion_mnist(root: str | None, download: bool):
    from torchvision.datasets import FashionMNIST

    files = _locate_fashion_mnist(root, download)
    splits = []
    for split in ("train", "val"):
        images = read_idx(files[f"{split}_images"], ndim=3)
        labels = read_idx(files[f"{split}_labels"], ndim=1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{files[f'{split}_images']} holds {images.shape[1]}x{images.shape[2]} images, "
                            f"Fashion-MNIST's are 28x28")
        if len(labels) != len(images):
            raise DataError(f"{files[f'{split}_labels']} has {len(labels)} labels for the "
                            f"{len(images)} images of {files[f'{split}_images']}; the files do not belong together")
        if len(labels) and labels.max() >= 10:
            raise DataError(f"{files[f'{split}_labels']} has label {labels.max()}, Fashion-MNIST's are 0..9")
        splits.append((torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1], list(FashionMNIST.classes)


# --------------------------------------------------------------------------- CIFAR (python pickles)

@functools.lru_cache(maxsize=1)
def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what numpy arrays are rebuilt from."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):  # pickles name either, whichever numpy wrote them
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # used by pickle protocol 5
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, so a CIFAR file cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _pickle_allowlist()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only "
                                         f"numpy arrays, lists and strings") from None


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read {path}: {exc} (the file is corrupt or truncated; "
                        f"download the dataset again)") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, a CIFAR batch is a dict")
    return obj


_CIFAR = {
    # name: (folder, train files, val files, meta file, label key, class-names key, number of classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", 100),
}


def _locate_cifar(name: str, root: str | None, download: bool) -> Path:
    folder_name, train_files, val_files, meta, *_ = _CIFAR[name]
    needed = train_files + val_files + [meta]
    base = Path(root) if root is not None else cache_dir()
    candidates = [base, base / folder_name]
    for folder in candidates:
        if all((folder / f).is_file() for f in needed):
            return folder
    if download:
        from torchvision.datasets import CIFAR10, CIFAR100

        try:
            (CIFAR10 if name == "cifar10" else CIFAR100)(str(base), train=True, download=True)
        except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError)
            raise DataError(f"downloading {name} into {base} failed: {exc}; download "
                            f"{folder_name} by hand and pass its parent folder as `--data-root DIR`") from exc
        if all((base / folder_name / f).is_file() for f in needed):
            return base / folder_name
    closest = max(candidates, key=lambda c: sum((c / f).is_file() for f in needed))
    missing = [f for f in needed if not (closest / f).is_file()]
    raise DataError(
        f"{name} not found: looked for {folder_name}/{{{', '.join(needed)}}} in "
        f"{' and '.join(str(c) for c in candidates)} (missing: {', '.join(missing)}). Pass the extracted "
        f"folder {folder_name} or its parent as `--data-root DIR` (root=), or set `download: true` "
        f"(download=True) to fetch it into {root if root is not None else cache_dir()}")


def _load_cifar(name: str, root: str | None, download: bool):
    _, train_files, val_files, meta_file, label_key, names_key, num_classes = _CIFAR[name]
    folder = _locate_cifar(name, root, download)
    splits = []
    for files in (train_files, val_files):
        images, labels = [], []
        for file in files:
            path = folder / file
            batch = _load_pickle(path)
            if "data" not in batch or label_key not in batch:
                raise DataError(f"{path} lacks the keys 'data' and {label_key!r} of a {name} batch "
                                f"(has {sorted(batch)})")
            data = np.asarray(batch["data"])
            lab = np.asarray(batch[label_key], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
            if lab.shape != (data.shape[0],):
                raise DataError(f"{path}: {lab.size} labels for {data.shape[0]} images")
            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {lab.min()}..{lab.max()}")
            images.append(data.reshape(-1, 3, 32, 32))  # stored as R, G, B planes: already CHW
            labels.append(lab)
        splits.append((torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))))
    meta = _load_pickle(folder / meta_file)
    classes = [str(c) for c in meta.get(names_key, [])]
    if len(classes) != num_classes:
        raise DataError(f"{folder / meta_file}: {names_key!r} must list {num_classes} class names, "
                        f"found {len(classes)}")
    return splits[0], splits[1], classes


# --------------------------------------------------------------------------- image folders

def _image_is_readable(path: str) -> bool:
    """Whether PIL opens and verifies the file; a JPEG is also decoded (at 1/8 scale, which is cheap),
    since ``verify`` does not read JPEG data and a file cut short would otherwise fail only when loaded."""
    try:
        with Image.open(path) as img:
            img.verify()
            jpeg = img.format == "JPEG"
        if jpeg:
            with Image.open(path) as img:
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
        return True
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        return False


def _scan_split(samples: list[tuple[str, int]], limit: int | None, seed: int, strict: bool,
                folder: Path, classes: list[str]) -> tuple[list[tuple[str, int]], int]:
    """Keep the readable images of one split and count the unreadable ones met.

    With a ``limit``, the images are scanned in an order shuffled by ``seed`` until ``limit``
    readable ones are found (so a quick run does not scan a whole large folder). The kept
    samples are returned in folder order.
    """
    if limit is None:
        order = list(range(len(samples)))
    else:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    want = len(samples) if limit is None else min(limit, len(samples))
    kept: list[int] = []
    bad: list[str] = []
    chunk = 256
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            for i, ok in zip(idx, pool.map(_image_is_readable, (samples[i][0] for i in idx))):
                if ok:
                    if len(kept) < want:
                        kept.append(i)
                else:
                    if strict:
                        raise DataError(f"unreadable image {samples[i][0]} (PIL cannot open or verify it); "
                                        f"remove or replace it, or build with strict=False to skip such files")
                    bad.append(samples[i][0])
            if len(kept) >= want:
                break
    if bad:
        shown = ", ".join(bad[:_MAX_NAMES_SHOWN]) + (", ..." if len(bad) > _MAX_NAMES_SHOWN else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {folder}: {shown}", stacklevel=4)
    kept_samples = [samples[i] for i in sorted(kept)]
    present = {label for _, label in kept_samples}
    if limit is None:
        for label, cls in enumerate(classes):
            if label not in present:
                raise DataError(f"class folder {folder / cls} has no readable image (all its images were "
                                f"skipped as unreadable); fix or remove them")
    return kept_samples, len(bad)


def _folder_root(root: str | None, layout: str) -> Path:
    """An image folder's root, which must exist; ``layout`` ends the message that says what it holds."""
    if root is None:
        raise DataError(f"the imagefolder dataset needs root= (`--data-root DIR`): a folder with train/ and val/ "
                        f"subfolders{layout}")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder root {base} does not exist or is not a folder")
    return base


def _load_imagefolder(root: str | None, strict: bool, limit_train: int | None, limit_val: int | None,
                      seed: int):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    base = _folder_root(root, ", each holding one folder of images per class")
    split_dirs = {split: base / split for split in ("train", "val")}
    for split, folder in split_dirs.items():
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: an image folder root needs train/ and val/ subfolders, "
                            f"each holding one folder of images per class")
    found: dict[str, list[str]] = {}
    for split, folder in split_dirs.items():
        try:
            found[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise DataError(f"{folder} holds no class folders; put the images of each class in "
                            f"{folder}/<class name>/") from None
    classes = found["train"]
    if found["val"] != classes:
        only_train = sorted(set(classes) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(classes))
        raise DataError(f"train/ and val/ of {base} must hold the same class folders: "
                        f"missing from val/: {only_train or 'none'}; only in val/: {only_val or 'none'}")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    kept: dict[str, list[tuple[str, int]]] = {}
    skipped: dict[str, int] = {}
    for split, folder in split_dirs.items():
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        present = {label for _, label in samples}
        empty = [str(folder / c) for c in classes if class_to_idx[c] not in present]
        if empty:
            raise DataError(f"empty class folder(s), with no image files ({', '.join(IMG_EXTENSIONS)}): "
                            f"{', '.join(empty)}; add images or remove the folder from both train/ and val/")
        limit = limit_train if split == "train" else limit_val
        kept[split], skipped[split] = _scan_split(samples, limit, seed, strict, folder, classes)
    return kept, skipped, classes


def _load_unlabelled_folder(root: str | None, strict: bool, limit_train: int | None, limit_val: int | None,
                            seed: int):
    """The images under root/train/ and root/val/ (at any depth: class folders are allowed and ignored), for
    tasks that learn without labels; every label is 0 and there are no classes."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    base = _folder_root(root, " of images (without labels, class folders are not needed)")
    kept: dict[str, list[tuple[str, int]]] = {}
    skipped: dict[str, int] = {}
    for split in ("train", "val"):
        folder = base / split
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: an image folder root needs train/ and val/ subfolders of images")
        samples = [(str(f), 0) for f in sorted(folder.rglob("*"))
                   if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS)]
        if not samples:
            raise DataError(f"{folder} holds no images (files ending in {', '.join(IMG_EXTENSIONS)}); put the "
                            f"training images in {base / 'train'} and the validation images in {base / 'val'}")
        limit = limit_train if split == "train" else limit_val
        kept[split], skipped[split] = _scan_split(samples, limit, seed, strict, folder, [])
        if not kept[split]:
            raise DataError(f"{folder} holds no readable image (all {len(samples)} were skipped as unreadable)")
    return kept, skipped, []


# --------------------------------------------------------------------------- entry point

def build_datasets(name: str, root: str | None = None, img_size: int | None = None, download: bool = False,
                   strict: bool = False, limit_train: int | None = None, limit_val: int | None = None,
                   train_transform: Callable | None = None, val_transform: Callable | None = None,
                   seed: int = 0, labelled: bool = True) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build the train and validation datasets of ``name`` and describe them.

    Args:
        name: ``digits`` (scikit-learn's 8x8 digits, split 80/20 stratified with the fixed seed 0),
            ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``imagefolder`` (``root/train/<class>/*``
            and ``root/val/<class>/*``).
        root: where the files are. Fashion-MNIST: the folder of the four IDX files (default: the
            Debian package's ``/usr/share/datasets/fashion-mnist``, then the download cache).
            CIFAR: the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` or its parent
            (default: the download cache ``~/.cache/mixlab``). Image folders: required.
        img_size: the square side the transforms resize to, reported as ``info.img_size``
            (default: the native size; 224 for image folders).
        download: fetch Fashion-MNIST or CIFAR with torchvision's downloaders when not found
            (into ``root`` if given, else into ``~/.cache/mixlab``).
        strict: image folders only: raise :class:`DataError` on the first unreadable image
            instead of skipping unreadable images with a warning.
        limit_train, limit_val: keep only the first N items after a shuffle seeded by ``seed``
            (kept in their original order), for tests and quick runs.
        train_transform, val_transform: applied to each image (with torch's global RNG). Leave
            them ``None`` to get raw ``uint8`` images and wrap the datasets in
            :class:`~mixlab.data.samplers.SeededDataset` for reproducible augmentation.
        seed: the seed of the ``limit_*`` shuffles.
        labelled: False for tasks that learn without labels (masked image modeling): an image folder's
            ``train/`` and ``val/`` may then hold images at any depth, without class folders (every label
            is 0, ``info.classes`` is empty); the other datasets keep their labels, unused.

    Returns:
        ``(train, val, info)``; items are ``(image, label)``.

    Raises:
        DataError: unknown name, missing or corrupt files, bad arguments.
    """
    key = _resolve_name(name)
    if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1):
        raise DataError(f"img_size must be a positive integer (the square side) or None, got {img_size!r}")
    _check_limit(limit_train, "limit_train")
    _check_limit(limit_val, "limit_val")

    if key == "imagefolder":
        load = _load_imagefolder if labelled else _load_unlabelled_folder
        kept, skipped, classes = load(root, strict, limit_train, limit_val, seed)
        train = ImageFileDataset(kept["train"], classes, train_transform)
        val = ImageFileDataset(kept["val"], classes, val_transform)
        info = DatasetInfo(name=key, num_classes=len(classes), in_chans=3,
                           img_size=img_size or DEFAULT_IMAGEFOLDER_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           classes=classes, num_train=len(train), num_val=len(val), skipped=skipped,
                           native_size=None)
        return train, val, info

    if key == "digits":
        (train_x, train_y), (val_x, val_y), classes = _load_digits()
    elif key == "fashion-mnist":
        (train_x, train_y), (val_x, val_y), classes = _load_fashion_mnist(root, download)
    else:
        (train_x, train_y), (val_x, val_y), classes = _load_cifar(key, root, download)
    mean, std = _channel_stats(train_x)  # from the full train split, whatever the limits
    train_x, train_y = _limit_arrays(train_x, train_y, limit_train, seed)
    val_x, val_y = _limit_arrays(val_x, val_y, limit_val, seed)
    train = ArrayDataset(train_x, train_y, classes, train_transform)
    val = ArrayDataset(val_x, val_y, classes, val_transform)
    native = int(train_x.shape[-1])
    info = DatasetInfo(name=key, num_classes=len(classes), in_chans=int(train_x.shape[1]),
                       img_size=img_size or native, mean=mean, std=std, classes=classes,
                       num_train=len(train), num_val=len(val), skipped={"train": 0, "val": 0},
                       native_size=native)
    return train, val, info
