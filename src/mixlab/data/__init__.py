"""Data for mixlab: datasets, transforms, Mixup/CutMix and resumable, deterministic sampling.

The documented path to reproducible training::

    from mixlab.data import (build_datasets, build_transforms, MixupCutmix, ResumableSampler,
                             SeededDataset, mix_seed)

    train_base, val_base, info = build_datasets("cifar10", root="data/")   # raw uint8 items
    train = SeededDataset(train_base, build_transforms(info, train=True, hflip=0.5), seed=0)
    val = SeededDataset(val_base, build_transforms(info, train=False))
    sampler = ResumableSampler(len(train), seed=0)
    loader = DataLoader(train, batch_size=128, sampler=sampler, num_workers=4)
    mix = MixupCutmix(info.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)          # then sampler.set_start(k) when resuming mid-epoch
        for step, (x, y) in enumerate(loader):
            x, target = mix(x, y, seed=mix_seed(0, epoch, step))

A model's data configuration (input size, mean/std, crop fraction, interpolation: what its
checkpoints record) is a :class:`Preprocessing`; its ``eval_transform`` is the one evaluation
transform (``build_transforms(info, train=False)`` is that of the dataset's own configuration).

Dense data (boxes, instance masks, semantic maps: detection and segmentation) is
:mod:`mixlab.data.dense`: :func:`build_dense_datasets` (synthetic scenes, no download),
:func:`build_dense_transforms` (joint, under :class:`SeededDataset`'s seeding) and
:func:`collate_dense` (docs/dense-data.md).

Every bad-input error of this package is a :class:`DataError` (a ``ValueError``).
"""
from .datasets import DATASET_NAMES, DataError, DatasetInfo, build_datasets
from .dense import (DenseDatasetInfo, SyntheticScenes, build_dense_datasets, build_dense_transforms,
                    collate_dense)
from .mixup import MixupCutmix
from .preprocessing import Preprocessing, recorded_info
from .samplers import ResumableSampler, SeededDataset, mix_seed
from .transforms import build_transforms

__all__ = ["DATASET_NAMES", "DataError", "DatasetInfo", "DenseDatasetInfo", "MixupCutmix", "Preprocessing",
           "ResumableSampler", "SeededDataset", "SyntheticScenes", "build_datasets", "build_dense_datasets",
           "build_dense_transforms", "build_transforms", "collate_dense", "mix_seed", "recorded_info"]
