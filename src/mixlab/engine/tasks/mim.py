"""Masked image modeling (``task: mim``): SimMIM or MAE pretraining of a backbone without labels.

The model ``create_model`` builds (without a classifier) becomes the ``encoder`` of a
:class:`~mixlab.models.mim.SimMIM` or :class:`~mixlab.models.mim.MAE` module; the run's checkpoints hold that
module, and fine-tuning (``--pretrained RUN``) reads the encoder back. The best checkpoint has the lowest
validation reconstruction loss, measured with the same masks every epoch (drawn from the image's place in the
validation set), so that epochs compare. Every ``mim.picture_every`` epochs a picture of original, masked and
reconstructed validation images is written to ``pictures/`` in the run directory. See docs/mim.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ...config import ConfigError
from ...data import mix_seed
from ...fileio import atomic_write
from ...models.base import unwrap_model
from ...models.mim import MAE, SimMIM, mask_patch_choices, random_mask, stem_stride
from ..distributed import all_reduce_sum
from .base import Metric, Task, TaskData, register_task
from .classification import build_image_data, image_datasets

#: the methods' own mask ratios (SimMIM's paper: 0.6 with 32 px mask patches; MAE's: 0.75)
DEFAULT_RATIO = {"simmim": 0.6, "mae": 0.75}
#: the grid side of SimMIM's masks: 32 px mask patches on its 192 px pretraining images
SIMMIM_GRID = 6
PICTURES = "pictures"
#: images smaller than this are shown enlarged in the pictures
PICTURE_SIDE = 96


def default_mask_patch(img_size: int, stem_stride: int) -> int:
    """The mask patch whose grid is nearest SimMIM's (32 px patches on 192 px images: 6 a side; 7 at 224), among
    the multiples of the stem's stride that divide the image (ties: the larger patch)."""
    choices = [p for p in mask_patch_choices(img_size, stem_stride) if img_size // p >= 2] or [stem_stride]
    return min(choices, key=lambda p: (abs(img_size / p - SIMMIM_GRID), -p))


@register_task
class MaskedImageModeling(Task):
    """Learn to reconstruct hidden patches of unlabelled images; the best checkpoint has the lowest validation
    loss."""

    name = "mim"
    metric = Metric("val_loss", "reconstruction loss", "min", "", ".4f")
    class_scores = False

    def __init__(self, cfg, dinfo=None):
        super().__init__(cfg, dinfo)
        self.method = cfg.mim.method
        self.ratio = cfg.mim.mask_ratio if cfg.mim.mask_ratio is not None else DEFAULT_RATIO[self.method]
        self.info = None
        self.val_loader = None

    # -- data and model ---------------------------------------------------------------------
    def data_info(self):
        return image_datasets(self.cfg, download=False, labelled=False)[2]

    def build_data(self, with_train: bool = True) -> TaskData:
        data = build_image_data(self.cfg, self.dinfo, with_train, labelled=False)
        self.info, self.val_loader = data.info, data.val_loader
        return data

    def model_kwargs(self, info) -> dict:
        return {**super().model_kwargs(info), "num_classes": 0}  # an encoder: no classifier to pretrain

    def setup(self, model: nn.Module) -> nn.Module:
        """The model inside SimMIM or MAE; a ConfigError saying why when it cannot be (MAE of a hierarchical
        model, a mask patch that does not fit, an image size the model's stride does not divide)."""
        m = self.cfg.mim
        try:
            if self.method == "mae":
                module = MAE(model, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                             decoder_heads=m.decoder_heads, norm_pix_loss=m.norm_pix_loss)
            else:
                mask_patch = m.mask_patch
                if mask_patch is None:
                    mask_patch = default_mask_patch(math.gcd(*model.img_size), stem_stride(model))
                module = SimMIM(model, mask_patch=mask_patch)
        except ValueError as e:
            raise ConfigError(f"mim.method {self.method} with {self.cfg.model.name}: {e}") from None
        return module.to(self.device)

    # -- training ---------------------------------------------------------------------------
    def _mask(self, module: nn.Module, batch: int, generator=None) -> torch.Tensor:
        grid = module.grid
        mask = random_mask(batch, grid[0] * grid[1], self.ratio, generator=generator, device=self.device)
        return mask.reshape(batch, *grid) if isinstance(module, SimMIM) else mask

    def loss(self, model: nn.Module, batch, seed: int) -> tuple[torch.Tensor, int]:
        x = batch[0].to(self.device, non_blocking=True)
        module = unwrap_model(model)
        mask = self._mask(module, x.shape[0])  # the global generator, seeded by the loop from the position
        with self.autocast():
            out = model(x, mask)
        return module.loss(x, out, mask), x.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict:
        """The mean reconstruction loss over the loader (all processes), each batch with masks drawn from its
        place in the validation set: the same masks every epoch."""
        model.eval()
        module = unwrap_model(model)
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(loader):
            x = batch[0].to(self.device, non_blocking=True)
            g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, i, self.dinfo.rank, 7))
            mask = self._mask(module, x.shape[0], generator=g)
            with self.autocast():
                out = model(x, mask)
            total += torch.tensor([float(module.loss(x, out, mask)) * x.shape[0], x.shape[0]], dtype=torch.float64)
        if self.dinfo.enabled:
            total = all_reduce_sum(total.to(self.device), self.dinfo).cpu()
        n = max(total[1].item(), 1)
        return {"loss": total[0].item() / n, "images": int(total[1].item())}

    # -- reports ------------------------------------------------------------------------------
    def epoch_fields(self, metrics: dict, ema: bool = False) -> dict:
        return {"ema_val_loss": metrics["loss"]} if ema else {"val_loss": metrics["loss"]}

    def epoch_log(self, row: dict) -> str:
        return ((f", val reconstruction loss {row['val_loss']:.4f}" if "val_loss" in row else "")
                + (f", EMA {row['ema_val_loss']:.4f}" if "ema_val_loss" in row else ""))

    def summary_fields(self, metrics: dict) -> dict:
        m = self.cfg.mim
        fields = {"val_loss": metrics["loss"], "loss": metrics["loss"],
                  "mim": {"method": self.method, "mask_ratio": self.ratio}}
        if self.method == "mae":
            fields["mim"].update(decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                                 decoder_heads=m.decoder_heads, norm_pix_loss=m.norm_pix_loss)
        return fields

    def final_log(self, summary: dict) -> str:
        return f"val reconstruction loss {summary['val_loss']:.4f} (best {summary['best_val_loss']:.4f})"

    # -- pictures ------------------------------------------------------------------------------
    def pictures(self, model: nn.Module, out_dir) -> list:
        return [write_picture(self, model, Path(out_dir) / "reconstructions.png")]

    def epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, last: bool) -> None:
        every = self.cfg.mim.picture_every
        if every and (epoch % every == 0 or last) and self.dinfo.is_main:
            write_picture(self, model, Path(run_dir) / PICTURES / f"epoch{epoch:03d}.png")


@torch.no_grad()
def write_picture(task: MaskedImageModeling, model: nn.Module, path: Path) -> Path:
    """A picture of the first ``mim.picture_images`` validation images: originals in the first row, what the
    encoder sees (hidden patches grey) in the second, the reconstructions with the visible patches pasted back
    in the third; the same images and masks every time. Written atomically as a PNG."""
    from torchvision.utils import make_grid, save_image

    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    n = task.cfg.mim.picture_images
    ds = task.val_loader.dataset
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(task.device)
    mask = task._mask(module, x.shape[0], generator=torch.Generator().manual_seed(mix_seed(task.cfg.train.seed, 99)))
    with task.autocast():
        masked, rec = module.reconstruct(x, mask)
    mean = torch.tensor(task.info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(task.info.std, device=x.device).view(1, -1, 1, 1)
    shown = [(t.float() * std + mean).clamp(0, 1) for t in (x, masked, rec)]
    hidden = module.hidden_pixels(mask.float())[:, :1]
    shown[1] = shown[1] * (1 - hidden) + 0.5 * hidden  # hidden patches grey
    images = torch.cat(shown).cpu()
    scale = -(-PICTURE_SIDE // images.shape[-1])  # small images shown larger, pixels as blocks
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    grid = make_grid(images, nrow=x.shape[0], padding=2, pad_value=1.0)
    if was_training:
        module.train()
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="PNG"))
    return path
