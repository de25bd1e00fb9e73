"""A model's data configuration: how an image is prepared for it at evaluation and prediction.

:class:`Preprocessing` holds what timm's ``resolve_model_data_config`` returns (input size,
mean, std, crop fraction, interpolation), and :meth:`Preprocessing.eval_transform` is the one
evaluation transform of mixlab: the evaluation split of every dataset
(:func:`~mixlab.data.build_transforms` with ``train=False``), ``mixlab eval`` with a checkpoint's
own configuration and ``mixlab predict`` all use it.

The evaluation transform (timm's, "center" crop mode): resize so that the centre crop of the
input size keeps the fraction ``crop_pct`` of the resized image's side (the shorter side to
``floor(side / crop_pct)`` for a square input; each side so for another one), centre-crop to the
input size, scale to 0..1, normalise with ``mean`` and ``std``. ``crop_pct`` 1.0 resizes only
(the shorter side to the input size; a square image is resized to it exactly).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from ..weights import metadata_config
from .datasets import DataError, DatasetInfo

__all__ = ["Preprocessing", "EVAL_CROP_PCT", "INTERPOLATION", "INTERPOLATIONS", "interpolation_mode",
           "dataset_crop_pct", "recorded_info"]

#: the interpolation mixlab trains and evaluates with (DeiT's)
INTERPOLATION = "bicubic"

#: the interpolations a data configuration may name, as torchvision's modes
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}

#: the centre crop of evaluation on image folders keeps this fraction of the resized side
EVAL_CROP_PCT = 0.875


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode for an interpolation name of :data:`INTERPOLATIONS`."""
    try:
        return INTERPOLATIONS[name]
    except (KeyError, TypeError):
        raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}") from None


def dataset_crop_pct(native_size: int | None) -> float:
    """The crop fraction of mixlab's evaluation of a dataset: 1.0 (resize only) for a dataset of one
    native square size (digits, Fashion-MNIST, CIFAR), :data:`EVAL_CROP_PCT` for image folders
    (``native_size`` None)."""
    return EVAL_CROP_PCT if native_size is None else 1.0


@dataclass(frozen=True)
class Preprocessing:
    """The data configuration of a model: ``input_size`` (C, H, W), per-channel ``mean`` and
    ``std`` (0..1 units), ``crop_pct`` (the fraction of the resized image the centre crop keeps;
    1.0: resize only) and ``interpolation`` (bicubic | bilinear | nearest). Checked on creation
    (a :class:`~mixlab.data.DataError` says what is wrong)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = INTERPOLATION

    def __post_init__(self):
        size = tuple(self.input_size)
        if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise DataError(f"input_size must be (channels, height, width) of positive integers, "
                            f"got {self.input_size!r}")
        object.__setattr__(self, "input_size", size)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, Sequence) or len(value) != size[0] or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise DataError(f"{key} must hold one number per input channel ({size[0]}), got {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise DataError(f"std must be positive, got {self.std}")
        crop = self.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0.0 < crop <= 1.0:
            raise DataError(f"crop_pct must be a fraction in (0, 1] (1.0: resize only), got {crop!r}")
        object.__setattr__(self, "crop_pct", float(crop))
        interpolation_mode(self.interpolation)

    # -- where a configuration comes from --------------------------------------------------------
    @classmethod
    def from_data(cls, info: DatasetInfo, img_size: int | None = None) -> Preprocessing:
        """What mixlab's evaluation of the dataset ``info`` does at ``img_size`` (default
        ``info.img_size``): its mean and std, bicubic, a crop of :func:`dataset_crop_pct`."""
        size = info.img_size if img_size is None else img_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise DataError(f"img_size must be a positive integer, got {size!r}")
        return cls((int(info.in_chans), size, size), tuple(info.mean), tuple(info.std),
                   dataset_crop_pct(info.native_size), INTERPOLATION)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], fallback: Preprocessing | None = None,
                      where: str = "the checkpoint") -> Preprocessing:
        """The configuration a mixlab checkpoint's string metadata records
        (:func:`~mixlab.weights.checkpoint_metadata`).

        A key the metadata lacks is taken from ``fallback``: checkpoints written before mixlab
        recorded ``crop_pct`` and ``interpolation`` were evaluated with their evaluation data's own
        transform, which ``fallback`` (:meth:`from_data` of that data) reproduces. Without a
        fallback a missing ``crop_pct`` is 1.0 and a missing ``interpolation`` bicubic (what
        mixlab's runs on datasets of one image size did), and a missing input size, mean or std
        is a DataError naming ``where``."""
        recorded = metadata_config(metadata)
        values = {}
        for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
            if key in recorded:
                values[key] = recorded[key]
            elif fallback is not None:
                values[key] = getattr(fallback, key)
        missing = [k for k in ("input_size", "mean", "std") if k not in values]
        if missing:
            raise DataError(f"{where} records no {', '.join(missing)} of its inputs (no mixlab metadata?); convert "
                            f"it with `mixlab convert SRC OUT.safetensors --model NAME`, which records them")
        return cls(**values)

    @classmethod
    def from_model(cls, model) -> Preprocessing:
        """The configuration of a built model: its input size (``in_chans``, ``img_size``) and what
        its ``pretrained_cfg`` says (``create_model(..., pretrained=...)`` puts the weights' data
        configuration there; see :func:`mixlab.factory.create_pretrained`): crop 1.0 and bicubic
        where it says nothing."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        c = int(getattr(model, "in_chans", cfg.get("input_size", (3,))[0]))
        h, w = getattr(model, "img_size", tuple(cfg.get("input_size", (c, 224, 224)))[1:])
        return cls((c, int(h), int(w)), tuple(cfg.get("mean", (0.5,) * c)), tuple(cfg.get("std", (0.5,) * c)),
                   cfg.get("crop_pct", 1.0), cfg.get("interpolation", INTERPOLATION))

    # -- what it does ------------------------------------------------------------------------------
    def eval_transform(self, native_size: int | None = None) -> Callable:
        """The evaluation transform: a ``uint8`` image (PIL or tensor, with :attr:`input_size`'s
        channels) -> ``float32`` tensor of :attr:`input_size`. Resize and centre crop as the module
        says; ``native_size`` (the square side every input has, when known) leaves them out when
        they would change nothing (a dataset at its native size with ``crop_pct`` 1.0)."""
        _, h, w = self.input_size
        mode = interpolation_mode(self.interpolation)
        steps: list[Callable] = [v2.ToImage()]
        if not (native_size is not None and native_size == h == w and self.crop_pct == 1.0):
            if h == w:
                steps.append(v2.Resize(math.floor(h / self.crop_pct), interpolation=mode, antialias=True))
            else:
                steps.append(v2.Resize((math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)),
                                       interpolation=mode, antialias=True))
            if self.crop_pct < 1.0 or native_size is None or h != w:
                steps.append(v2.CenterCrop((h, w)))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std)),
                  v2.ToPureTensor()]
        return v2.Compose(steps)

    def to_dict(self) -> dict:
        """JSON-ready: ``input_size``, ``mean``, ``std`` as lists, ``crop_pct``, ``interpolation``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def metadata(self) -> dict[str, str]:
        """The ``crop_pct`` and ``interpolation`` entries of checkpoint metadata (the other keys are
        :func:`~mixlab.weights.checkpoint_metadata`'s arguments)."""
        return {"crop_pct": json.dumps(self.crop_pct), "interpolation": self.interpolation}

    def describe(self) -> str:
        """One line, e.g. ``3x224x224, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), crop 0.875,
        bicubic``."""
        c, h, w = self.input_size
        rounded = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"{c}x{h}x{w}, mean {rounded(self.mean)}, std {rounded(self.std)}, crop {self.crop_pct:g}, "
                f"{self.interpolation}")

    def differences(self, other: Preprocessing, labels: tuple[str, str] = ("here", "there")) -> list[str]:
        """What ``other`` does otherwise than this configuration, one phrase per key, e.g.
        ``"crop 1 (here) vs 0.875 (there)"`` with ``labels`` naming the two; empty when they prepare
        images alike."""
        a_, b_ = labels
        said = []
        if self.input_size != other.input_size:
            said.append("input " + "x".join(map(str, self.input_size)) + f" ({a_}) vs "
                        + "x".join(map(str, other.input_size)) + f" ({b_})")
        for key in ("mean", "std"):
            a, b = getattr(self, key), getattr(other, key)
            if len(a) != len(b) or any(abs(x - y) > 1e-6 for x, y in zip(a, b)):
                said.append(f"{key} {tuple(round(x, 4) for x in a)} ({a_}) vs {tuple(round(x, 4) for x in b)} ({b_})")
        if abs(self.crop_pct - other.crop_pct) > 1e-9:
            said.append(f"crop {self.crop_pct:g} ({a_}) vs {other.crop_pct:g} ({b_})")
        if self.interpolation != other.interpolation:
            said.append(f"interpolation {self.interpolation} ({a_}) vs {other.interpolation} ({b_})")
        return said


def recorded_info(metadata: Mapping[str, str], data_name: str, where: str = "the checkpoint") -> DatasetInfo:
    """The :class:`~mixlab.data.DatasetInfo` a mixlab checkpoint records of the data its model was built for
    (classes, channels, square input size, mean and std; no images counted), so that a run's model can be
    rebuilt without its training data at hand. ``data_name`` is the run's dataset (image folders have no one
    native size). A DataError names ``where`` when the metadata lacks what a classifier's checkpoint holds."""
    prep = Preprocessing.from_metadata(metadata, where=where)
    recorded = metadata_config(metadata)
    c, h, w = prep.input_size
    if h != w:
        raise DataError(f"{where} records a {h}x{w} input; mixlab runs train on square images")
    if "num_classes" not in recorded:
        raise DataError(f"{where} records no number of classes; it is not a classifier's checkpoint")
    return DatasetInfo(name=data_name, num_classes=recorded["num_classes"], in_chans=c, img_size=h, mean=prep.mean,
                       std=prep.std, classes=list(recorded.get("classes") or []), num_train=0, num_val=0,
                       native_size=None if data_name == "imagefolder" else h)
