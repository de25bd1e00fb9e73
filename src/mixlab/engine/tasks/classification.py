"""Image classification: mixup/cutmix and label smoothing, a soft-target cross-entropy or binary
cross-entropy loss, top-1 / top-5 accuracy."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ...config import ConfigError
from ...data import MixupCutmix, ResumableSampler, SeededDataset, build_datasets, build_transforms
from ..distributed import all_reduce_sum
from ..metrics import binary_cross_entropy, soft_cross_entropy, topk_correct
from .base import Metric, Task, TaskData, register_task


@register_task
class ClassificationTask(Task):
    """Learn the dataset's labels; the best checkpoint has the highest validation top-1."""

    name = "classification"
    metric = Metric("top1", "top-1", "max", "%", ".2f")
    class_scores = True

    def __init__(self, cfg, dinfo=None):
        super().__init__(cfg, dinfo)
        self.loss_fn = binary_cross_entropy if cfg.train.loss == "bce" else soft_cross_entropy
        self.mixer = None  # built with the training data: it needs the class count

    def data_info(self):
        return image_datasets(self.cfg, download=False)[2]

    def build_data(self, with_train: bool = True) -> TaskData:
        """Datasets, transforms, samplers and loaders (:func:`build_image_data`); Mixup/CutMix for the training
        batches."""
        data = build_image_data(self.cfg, self.dinfo, with_train)
        if with_train:
            a = self.cfg.aug
            self.mixer = MixupCutmix(data.info.num_classes, mixup_alpha=a.mixup, cutmix_alpha=a.cutmix,
                                     prob=a.mix_prob, switch_prob=a.switch_prob,
                                     label_smoothing=self.cfg.train.label_smoothing)
        return data

    def loss(self, model: nn.Module, batch, seed: int) -> tuple[torch.Tensor, int]:
        x, y = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x, targets = self.mixer(x, y, seed=seed)
        with self.autocast():
            logits = model(x)
            if isinstance(logits, tuple):  # distillation-token models: class head only
                logits = logits[0]
        return self.loss_fn(logits, targets), x.shape[0]

    def eval_logits(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits that :meth:`evaluate` scores for a batch (the model's output), and further named logits
        whose top-1 it reports beside them (none here; the distillation task's heads)."""
        return model(x), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict:
        """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader (all ranks), and the top-1 (%) of
        each further logits of :meth:`eval_logits`, in one pass."""
        device, dinfo = self.device, self.dinfo
        model.eval()
        sums, names = None, []  # correct1, correct5, loss sum, count, then the further logits' correct1
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.autocast():
                logits, more = self.eval_logits(model, x)
            c1, c5 = topk_correct(logits, y)
            loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            row = [c1, c5, float(loss), len(y)] + [topk_correct(v, y, ks=(1,))[0] for v in more.values()]
            sums = torch.tensor(row, dtype=torch.float64) + (0 if sums is None else sums)
            names = list(more)
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64)
        sums = all_reduce_sum(sums.to(device), dinfo).cpu() if dinfo.enabled else sums
        n = max(sums[3].item(), 1)
        return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
                "images": int(sums[3].item()), **{k: 100 * sums[4 + i].item() / n for i, k in enumerate(names)}}

    def epoch_fields(self, metrics: dict, ema: bool = False) -> dict:
        if ema:
            return {"ema_top1": metrics["top1"], "ema_top5": metrics["top5"]}
        return {"top1": metrics["top1"], "top5": metrics["top5"], "val_loss": metrics["loss"]}

    def epoch_log(self, row: dict) -> str:
        return ((f", val top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%" if "top1" in row else "")
                + (f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else ""))

    def summary_fields(self, metrics: dict) -> dict:
        return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"]}

    def final_log(self, summary: dict) -> str:
        return f"top-1 {summary['top1']:.2f}% (best {summary['best_top1']:.2f}%)"


def image_datasets(cfg, download: bool, labelled: bool = True):
    """The configuration's untransformed (train, val, info) datasets (``labelled=False``: an image folder needs
    no class folders)."""
    d = cfg.data
    return build_datasets(d.name, root=d.root, img_size=d.img_size, download=download, strict=d.strict,
                          limit_train=d.limit_train, limit_val=d.limit_val, seed=cfg.train.seed, labelled=labelled)


def build_image_data(cfg, dinfo, with_train: bool = True, labelled: bool = True) -> TaskData:
    """The image tasks' data: datasets, the ``aug:`` training transform and the evaluation transform, per-draw
    seeded datasets, the resumable sampler and the loaders (validation: disjoint shards of the processes,
    for exact totals); the training ones only ``with_train``."""
    d, a = cfg.data, cfg.aug
    base_train, base_val, info = image_datasets(cfg, download=d.download, labelled=labelled)
    train_tf = build_transforms(info, True, info.img_size, hflip=a.hflip,
                                random_resized_crop=a.random_resized_crop, rrc_scale=tuple(a.rrc_scale),
                                simple_random_crop=a.simple_random_crop, crop_padding=a.crop_padding,
                                rand_augment=a.rand_augment, three_augment=a.three_augment,
                                color_jitter=a.color_jitter, random_erasing=a.random_erasing)
    val_tf = build_transforms(info, False, info.img_size)
    val_ds = SeededDataset(base_val, val_tf, seed=cfg.train.seed)
    pin = dinfo.device.type == "cuda"
    bs = cfg.train.batch_size
    val_indices = list(range(dinfo.rank, len(val_ds), dinfo.world_size))  # disjoint shards: exact totals
    val_loader = DataLoader(val_ds, batch_size=max(bs, 64), sampler=val_indices, num_workers=d.num_workers,
                            pin_memory=pin)
    if not with_train:
        return TaskData(None, val_loader, None, info)
    train_ds = SeededDataset(base_train, train_tf, seed=cfg.train.seed)
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=cfg.train.seed, num_replicas=dinfo.world_size,
                               rank=dinfo.rank, repeats=a.repeated_aug)
    if len(sampler) < bs:
        raise ConfigError(f"train.batch_size {bs} is larger than this process's share of the training set "
                          f"({len(sampler)} images); use a batch size of at most {len(sampler)}")
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=d.num_workers,
                              drop_last=True, pin_memory=pin, persistent_workers=False)
    return TaskData(train_loader, val_loader, sampler, info)
