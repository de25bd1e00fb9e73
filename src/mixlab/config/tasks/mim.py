"""The ``mim:`` section: the keys of masked image modeling (``task: mim``, ``mixlab.engine.tasks.mim``). See
docs/mim.md."""
from __future__ import annotations

from dataclasses import dataclass

from ..section import ConfigError, TaskSection


@dataclass
class MimConfig:
    """Masked image modeling (``task: mim``): SimMIM ("SimMIM: A Simple Framework for Masked Image Modeling")
    or MAE ("Masked Autoencoders Are Scalable Vision Learners"). See docs/mim.md."""
    #: simmim (any model with a patch stem) | mae (plain ViTs and one-stage attention specifications)
    method: str = "simmim"
    #: the share of patches hidden, in (0, 1); None: the method's own (SimMIM 0.6, MAE 0.75)
    mask_ratio: float | None = None
    #: SimMIM: the side of a mask patch in pixels (a multiple of the model's patch dividing the image); None:
    #: the valid size whose grid is nearest SimMIM's (32 px patches on 192 px images: 6 a side)
    mask_patch: int | None = None
    #: MAE: the decoder's width, depth and heads (the paper's 512, 8, 16)
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    #: MAE: predict per-patch normalised pixels (the paper's best setting)
    norm_pix_loss: bool = False
    #: write a picture of original / masked / reconstructed validation images every N epochs (and at the
    #: last); 0: never
    picture_every: int = 1
    #: how many validation images the picture shows
    picture_images: int = 8


def validate(cfg) -> None:
    """The checks of ``task: mim``'s keys that their types cannot express (what depends on the model, such as
    a mask patch that fits its stem, is checked when the run builds it)."""
    m = cfg.mim
    if m.mask_ratio is not None and not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"mim.mask_ratio is the share of patches hidden and must lie strictly between 0 and 1, "
                          f"got {m.mask_ratio} (SimMIM uses 0.6, MAE 0.75)")
    if m.mask_patch is not None and m.mask_patch < 1:
        raise ConfigError(f"mim.mask_patch must be a number of pixels (a multiple of the model's patch), got "
                          f"{m.mask_patch}")
    for key in ("decoder_dim", "decoder_depth", "decoder_heads", "picture_images"):
        if getattr(m, key) < 1:
            raise ConfigError(f"mim.{key} must be at least 1, got {getattr(m, key)}")
    if m.picture_every < 0:
        raise ConfigError(f"mim.picture_every must be 0 (no pictures) or a number of epochs, got {m.picture_every}")
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        raise ConfigError("task mim learns without labels: aug.mixup and aug.cutmix mix labels; set them to 0")


SECTION = TaskSection(
    "mim", MimConfig, task="mim", purpose="to pretrain by masked image modeling", validate=validate,
    choices={"method": ("simmim", "mae")}, resume_safe=("picture_every", "picture_images"),
    resume_refused="the checkpoints hold an encoder and decoder trained with this method and masking")
