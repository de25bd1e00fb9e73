"""Mixup / CutMix on batches, with soft targets and label smoothing, deterministic given a seed."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from .datasets import DataError
from .samplers import mix_seed

__all__ = ["MixupCutmix"]


class MixupCutmix:
    """Mixes a batch with torchvision's ``v2.MixUp`` / ``v2.CutMix`` and returns soft targets.

    With both alphas > 0, each batch gets CutMix with probability ``switch_prob``, else Mixup.
    A batch is mixed with probability ``prob``; otherwise its targets are just one-hot.
    Targets are always ``(B, num_classes)`` float with label smoothing applied,
    ``mixed_one_hot * (1 - label_smoothing) + label_smoothing / num_classes``, so the trainer can
    always use a soft-target cross-entropy. When both alphas are 0 (``active`` is False), the
    images are returned unchanged with the smoothed one-hot targets.

    torchvision's Mixup and CutMix pair each image with the previous one in the batch
    (``roll(1)``): feed shuffled batches.

    Calls are deterministic functions of ``seed``: the random draws run under
    :func:`torch.random.fork_rng` with torch's CPU generator seeded by ``seed`` (all of them are
    made on the CPU, whatever the images' device), so the caller's RNG state is left untouched.
    Pass a different seed per step, e.g. ``mix_seed(cfg_seed, global_step)``.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise DataError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 turns one off), "
                            f"got {mixup_alpha!r} and {cutmix_alpha!r}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{name} is a probability and must lie in [0, 1], got {value!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise DataError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.active = self.mixup_alpha > 0 or self.cutmix_alpha > 0

        mixup = v2.MixUp(alpha=self.mixup_alpha, num_classes=num_classes) if self.mixup_alpha > 0 else None
        cutmix = v2.CutMix(alpha=self.cutmix_alpha, num_classes=num_classes) if self.cutmix_alpha > 0 else None
        if mixup is not None and cutmix is not None:
            self._mix = v2.RandomChoice([mixup, cutmix], p=[1.0 - self.switch_prob, self.switch_prob])
        else:
            self._mix = mixup or cutmix

    def __repr__(self) -> str:
        return (f"MixupCutmix(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"label_smoothing={self.label_smoothing})")

    def _smooth(self, soft: Tensor) -> Tensor:
        return soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes

    def targets(self, labels: Tensor) -> Tensor:
        """Smoothed one-hot targets ``(B, num_classes)`` float32 of integer ``labels`` ``(B,)``."""
        self._check_labels(labels)
        one_hot = torch.nn.functional.one_hot(labels.long(), self.num_classes).to(torch.float32)
        return self._smooth(one_hot)

    def _check_labels(self, labels: Tensor) -> None:
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise DataError(f"labels must be integer class indices of shape (B,), got {labels.dtype} "
                            f"{tuple(labels.shape)}")
        # the range is checked on the CPU only: on an accelerator it would cost a sync per step
        if labels.device.type == "cpu" and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"labels must lie in 0..{self.num_classes - 1}, found "
                            f"{int(labels.min())}..{int(labels.max())}")

    def __call__(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Mixed images (a new tensor; the input is not modified) and soft targets ``(B, num_classes)``."""
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise DataError(f"images must be a batch (B, C, H, W) matching labels (B,), got "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if not self.active:
            return images, self.targets(labels)
        self._check_labels(labels)
        with torch.random.fork_rng(devices=[]):
            # seed only the CPU generator: torch.manual_seed would also reseed the CUDA generators
            torch.default_generator.manual_seed(mix_seed(seed))
            if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
                return images, self.targets(labels)
            mixed, soft = self._mix(images, labels.long())
        return mixed, self._smooth(soft.to(torch.float32))
