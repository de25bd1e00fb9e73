"""Train and eval transforms (torchvision.transforms.v2) for the datasets of :mod:`mixlab.data`.

Inputs are ``uint8`` images, tensors ``(C, H, W)`` or PIL; outputs are ``float32`` tensors
``(C, img_size, img_size)`` normalised with the dataset's mean and std. Everything works on
1-channel images (digits, Fashion-MNIST) as on RGB ones.

All randomness comes from torch's global RNG (torchvision's v2 transforms use nothing else),
which :class:`~mixlab.data.samplers.SeededDataset` seeds per draw.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from .datasets import DataError, DatasetInfo
from .preprocessing import INTERPOLATION as INTERPOLATION_NAME
from .preprocessing import Preprocessing, interpolation_mode

__all__ = ["build_transforms", "is_deterministic"]

#: DeiT's interpolation, for every training resize and crop (evaluation: :class:`Preprocessing`).
INTERPOLATION = interpolation_mode(INTERPOLATION_NAME)

#: 3-Augment's Gaussian blur: DeiT III draws the radius (sigma) from this range.
BLUR_SIGMA = (0.1, 2.0)


#: steps that draw no random numbers and treat each image of a batch on its own
_DETERMINISTIC_STEPS = (v2.ToImage, v2.Resize, v2.CenterCrop, v2.ToDtype, v2.Normalize, v2.ToPureTensor)


def is_deterministic(transform: Callable | None) -> bool:
    """Whether ``transform`` is a :class:`v2.Compose` of steps that draw no random numbers and
    treat each image of a batch on its own (resize, centre crop, dtype, normalisation), as every
    evaluation pipeline of :func:`build_transforms` and a training one without augmentation are.
    Such a transform can run once on a stacked batch of same-sized images, with the same result
    as on each image apart (bit for bit on the CPU, as the tests check). Exact types only: a
    subclass may add randomness."""
    return isinstance(transform, v2.Compose) and all(type(t) in _DETERMINISTIC_STEPS for t in transform.transforms)


def _check_prob(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise DataError(f"{name} is a probability and must lie in [0, 1], got {value!r}")


def _blur_kernel(img_size: int) -> int:
    """An odd kernel covering 3 sigma of the largest blur (13 for sigma 2, as wide as PIL's
    Gaussian blur of DeiT III), narrowed to fit images smaller than that."""
    kernel = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
    kernel = min(kernel, img_size if img_size % 2 else img_size - 1)
    return max(kernel, 1)


def _rand_augment(options: dict, info: DatasetInfo) -> v2.RandAugment:
    """v2.RandAugment from ``options``; the magnitude is on timm's 0..10 scale and the fill is the
    dataset's mean colour unless ``options`` says otherwise."""
    options = dict(options)
    # timm's "m9" is 9 on a 0..10 scale; torchvision's default of 31 bins would make 9 a third as strong
    options.setdefault("num_magnitude_bins", 11)
    options.setdefault("interpolation", InterpolationMode.BILINEAR)  # affine ops on tensors lack bicubic
    # timm fills the corners uncovered by rotate/shear/translate with the mean colour, not black
    options.setdefault("fill", [round(255 * m) for m in info.mean])
    try:
        return v2.RandAugment(**options)
    except TypeError as exc:
        raise DataError(f"rand_augment={options!r} is not valid for v2.RandAugment ({exc}); valid keys: "
                        f"num_ops, magnitude, num_magnitude_bins, interpolation, fill, "
                        f"e.g. dict(num_ops=2, magnitude=9)") from exc


def _three_augment(info: DatasetInfo, size: int) -> v2.RandomChoice:
    """DeiT III's 3-Augment: one of grayscale, solarisation and Gaussian blur, chosen uniformly."""
    return v2.RandomChoice([
        v2.Grayscale(num_output_channels=info.in_chans),  # keeps the channel count; identity on 1 channel
        v2.RandomSolarize(threshold=128, p=1.0),  # on uint8 values
        v2.GaussianBlur(kernel_size=_blur_kernel(size), sigma=BLUR_SIGMA),
    ])


def build_transforms(info: DatasetInfo, train: bool, img_size: int | None = None, *, hflip: float = 0.0,
                     random_resized_crop: bool = False, rrc_scale: Sequence[float] = (0.08, 1.0),
                     simple_random_crop: bool = False, crop_padding: int = 4, rand_augment: dict | None = None,
                     three_augment: bool = False, color_jitter: float = 0.0,
                     random_erasing: float = 0.0) -> Callable:
    """The transform of one split: ``uint8`` image (tensor or PIL) -> normalised ``float32``
    ``(C, img_size, img_size)`` tensor.

    Eval (``train=False``; the augmentation options are then ignored, so the same keyword
    arguments can be passed for both splits): the evaluation transform of the dataset's data
    configuration (:meth:`Preprocessing.from_data(info, img_size).eval_transform
    <mixlab.data.Preprocessing.eval_transform>`): datasets of a native square size are resized to
    ``img_size`` (nothing is done at the native size); image folders are resized to
    ``int(img_size / 0.875)`` and centre-cropped to ``img_size``.

    Train, in this order:

    1. ``random_resized_crop``: ``RandomResizedCrop(img_size, scale=rrc_scale)``; or
       ``simple_random_crop`` (DeiT III's): resize to ``img_size``, then
       ``RandomCrop(img_size, padding=crop_padding, padding_mode="reflect")``; else a plain
       resize to ``img_size`` (image folders: resize of the short side and centre crop).
    2. ``RandomHorizontalFlip(hflip)`` if ``hflip > 0``.
    3. ``rand_augment``: keyword arguments of ``v2.RandAugment``, e.g. ``dict(num_ops=2,
       magnitude=9)``, which approximates DeiT's ``rand-m9-mstd0.5-inc1`` (timm's RandAugment
       draws the magnitude from N(9, 0.5) and has a slightly different set of ops).
       ``magnitude`` is on timm's 0..10 scale: ``num_magnitude_bins`` defaults to 11 here
       (torchvision's default of 31 would make magnitude 9 mean 9/30 of the maximum, not
       9/10); the fill defaults to the dataset's mean colour, as in timm.
    4. ``three_augment``: DeiT III's 3-Augment, one of grayscale (keeping the channel count),
       ``RandomSolarize(threshold=128, p=1)`` and ``GaussianBlur`` with sigma in (0.1, 2.0)
       (kernel 13, or the largest odd size that fits smaller images).
    5. ``ColorJitter(color_jitter, color_jitter, color_jitter)`` if ``color_jitter > 0``.
    6. Conversion to ``float32`` in 0..1 and ``Normalize(info.mean, info.std)``.
    7. ``RandomErasing(p=random_erasing, value="random")`` if ``random_erasing > 0`` (on the
       normalised image, filling with standard-normal noise as timm's ``mode="pixel"``).

    Resizes and crops use bicubic interpolation (DeiT's) with antialiasing.

    Args:
        info: the dataset's :class:`~mixlab.data.DatasetInfo` (channels, mean, std, sizes).
        train: build the training pipeline (else evaluation).
        img_size: output side (default ``info.img_size``).

    Raises:
        DataError: contradictory or out-of-range options.
    """
    size = info.img_size if img_size is None else img_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"img_size must be a positive integer, got {size!r}")
    if not train:
        return Preprocessing.from_data(info, size).eval_transform(info.native_size)
    variable_size = info.native_size is None  # image folders: images of any size and shape
    resize_needed = variable_size or info.native_size != size

    steps: list[Callable] = [v2.ToImage()]  # PIL or tensor -> tv_tensors.Image (uint8)
    for name, p in (("hflip", hflip), ("random_erasing", random_erasing)):
        _check_prob(p, name)
    if color_jitter < 0:
        raise DataError(f"color_jitter must be >= 0 (0 turns it off), got {color_jitter!r}")
    if random_resized_crop and simple_random_crop:
        raise DataError("random_resized_crop and simple_random_crop are alternatives: set at most one")
    if random_resized_crop:
        lo, hi = rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise DataError(f"rrc_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(rrc_scale)}")
        steps.append(v2.RandomResizedCrop(size, scale=(lo, hi), interpolation=INTERPOLATION, antialias=True))
    else:
        if resize_needed:
            steps.append(v2.Resize(size, interpolation=INTERPOLATION, antialias=True))
        if simple_random_crop:
            if not 0 <= crop_padding < size:
                raise DataError(f"crop_padding must lie in [0, img_size) = [0, {size}) for reflect "
                                f"padding, got {crop_padding!r}")
            steps.append(v2.RandomCrop(size, padding=crop_padding, padding_mode="reflect"))
        elif variable_size:
            steps.append(v2.CenterCrop(size))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rand_augment is not None:
        steps.append(_rand_augment(rand_augment, info))
    if three_augment:
        steps.append(_three_augment(info, size))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))

    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std))]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
