"""Resumable, distributed sampling and augmentation that is a deterministic function of the draw.

:class:`ResumableSampler` yields *draw ids* rather than bare indices: an integer that encodes
the epoch, the round (see below) and the dataset index, ``draw = (epoch * rounds + round) * N +
index``. :class:`SeededDataset` decodes ``index = draw % N`` and runs the transform with torch's
RNG seeded from ``(seed, draw)``. Every augmented sample is then a function of (seed, epoch,
position) only: the same whatever the number of DataLoader workers, and the same again after
a resume in the middle of an epoch (:meth:`ResumableSampler.set_start`).

``rounds`` is 1 in the plain case, where ``draw = epoch * N + index``. It grows when an epoch
holds the same index more than once: repeated augmentation (``repeats`` copies of each index)
and the padding that gives every rank the same number of samples. Each copy is then a
different round, so it gets its own draw id and hence its own augmentation.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from .datasets import ArrayDataset, DataError
from .transforms import is_deterministic

__all__ = ["ResumableSampler", "SeededDataset", "mix_seed"]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``mix_seed(seed, epoch)``), the same on every
    platform and Python run (unlike ``hash``). Different tuples give unrelated seeds, where
    ``seed + epoch`` would make (seed 1, epoch 0) and (seed 0, epoch 1) collide."""
    entropy = [int(v) % (1 << 64) for v in values]  # SeedSequence wants non-negative integers
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _check_int(value: Any, name: str, minimum: int, what: str = "") -> int:
    """``value`` as an int; a DataError naming ``name`` (and ``what`` it is) where it is not an integer of at
    least ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")
    return int(value)


class ResumableSampler(Sampler[int]):
    """Yields draw ids for a permutation of ``range(N)`` that depends only on ``(seed, epoch)``.

    Distributed training: each of ``num_replicas`` ranks takes a strided share
    (``rank, rank + R, ...``) of the epoch's list, padded cyclically to a multiple of ``R``
    as :class:`~torch.utils.data.distributed.DistributedSampler` does, or cut to one with
    ``drop_last=True``. Together the ranks cover every index.

    ``repeats > 1`` is repeated augmentation (DeiT's ``RASampler``): each index of the
    permutation appears ``repeats`` times in a row before the list is shared out, so its copies
    land on different ranks, and each rank yields only ``ceil(N / R)`` ids per epoch
    (``floor`` with ``drop_last``): an epoch has the usual length but covers about
    ``N / repeats`` distinct images, each seen ``repeats`` times with different augmentations.

    Mid-epoch resume: ``set_epoch(e)`` then ``set_start(k)`` (``k`` = batches done x batch
    size on this rank) makes the next iteration skip the first ``k`` ids of epoch ``e``.
    ``set_epoch`` resets the start to 0, so call it first. ``len()`` is the number of ids the
    next iteration yields (the epoch's ``num_samples`` minus the start).

    Draw ids decode with :meth:`decode`; :class:`SeededDataset` takes them as indices.
    """

    def __init__(self, dataset_len: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, repeats: int = 1, drop_last: bool = False) -> None:
        self.dataset_len = _check_int(dataset_len, "dataset_len", 1)
        self.num_replicas = _check_int(num_replicas, "num_replicas", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise DataError(f"rank must lie in 0..num_replicas-1 = 0..{self.num_replicas - 1}, got {rank}")
        self.repeats = _check_int(repeats, "repeats", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)

        n, r = self.dataset_len, self.num_replicas
        listed = n * self.repeats  # length of the epoch's list before padding / cutting
        per_rank = listed // r if drop_last else math.ceil(listed / r)
        self._total = per_rank * r  # length of the padded / cut list shared out
        if self.repeats == 1:
            self.num_samples = per_rank
        else:  # RASampler: an epoch keeps its usual length
            self.num_samples = n // r if drop_last else math.ceil(n / r)
        if self.num_samples == 0:
            raise DataError(f"drop_last=True leaves nothing: {n} samples cannot give each of {r} ranks one; "
                            f"use drop_last=False or fewer ranks")
        #: how many draw ids each epoch reserves per index (see the module docstring)
        self.rounds = math.ceil(self._total / listed) * self.repeats
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration, and reset the start to 0."""
        self.epoch = _check_int(epoch, "epoch", 0)
        self.start = 0

    def set_start(self, k: int) -> None:
        """Skip the first ``k`` ids of the current epoch on this rank (``k`` = batches done x batch
        size), for a resume in the middle of an epoch. Call after :meth:`set_epoch`."""
        k = _check_int(k, "start", 0)
        if k > self.num_samples:
            raise DataError(f"start {k} is past the end of the epoch: this rank has {self.num_samples} ids "
                            f"per epoch; pass batches done x batch size of the interrupted epoch")
        self.start = k

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's order of ``range(N)``: a function of ``(seed, epoch)`` only."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=g)

    def epoch_draws(self, epoch: int | None = None) -> torch.Tensor:
        """All the draw ids of this rank for an epoch, ignoring the start."""
        epoch = self.epoch if epoch is None else epoch
        n = self.dataset_len
        listed = self.permutation(epoch).repeat_interleave(self.repeats)
        # round of each entry of the (cyclically padded) list: its copy number, plus `repeats`
        # for each wrap-around of the padding
        copy = torch.arange(len(listed)) % self.repeats
        pos = torch.arange(self._total)
        index = listed[pos % len(listed)]
        rounds = (pos // len(listed)) * self.repeats + copy[pos % len(listed)]
        draws = (epoch * self.rounds + rounds) * n + index
        return draws[self.rank::self.num_replicas][: self.num_samples]

    def decode(self, draw: int) -> tuple[int, int, int]:
        """``(epoch, round, index)`` of a draw id."""
        block, index = divmod(int(draw), self.dataset_len)
        epoch, round_ = divmod(block, self.rounds)
        return epoch, round_, index

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_draws()[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``start`` (to restore with :meth:`load_state_dict`)."""
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.set_start(state.get("start", 0))


class SeededDataset(Dataset):
    """Applies ``transform`` to the images of ``base`` with an RNG seeded by ``(seed, draw)``.

    ``base`` yields ``(image, label)`` items before transforms (e.g. from
    :func:`~mixlab.data.build_datasets` with no transforms). The index is a draw id from
    :class:`ResumableSampler`: the sample is ``base[draw % len(base)]`` and the transform runs
    under :func:`torch.random.fork_rng` with torch's CPU generator and Python's ``random``
    seeded from ``mix_seed(seed, draw)``, both restored afterwards. The augmentation of each
    draw is thus a deterministic function of (seed, epoch, position), whatever the number of
    DataLoader workers and across a resume. Plain indices in ``[0, len)`` (e.g. from a
    :class:`~torch.utils.data.SequentialSampler` for evaluation) work too.

    torchvision's v2 transforms draw from torch's global RNG only; Python's ``random`` is seeded
    as well for custom transforms that use it. Transforms that use numpy's global RNG are not
    made deterministic.

    Dense data: where ``base`` yields ``(image, target)`` with ``target`` a mapping (boxes, masks, ...:
    :mod:`mixlab.data.dense`), the transform runs on both, ``image, target = transform(image, target)``,
    under the same seeding, so that torchvision's v2 transforms move the target's boxes and masks with
    the image.

    ``with_index=True`` makes each item ``(image, label, index)``, ``index`` being the index of ``base``
    the draw decodes to (the key of a per-image cache, such as the distillation task's teacher logits).

    A DataLoader asks for whole batches (:meth:`__getitems__`). When the transform draws no
    random numbers (:func:`~mixlab.data.transforms.is_deterministic`: evaluation, or training
    without augmentation) and ``base`` is an untransformed in-memory
    :class:`~mixlab.data.datasets.ArrayDataset`, the batch is indexed at once and transformed
    once, stacked: the same tensors as item by item, bit for bit (tested for the pipelines of
    :func:`~mixlab.data.build_transforms`), without the per-image cost of the pipeline: about
    0.2 ms an image on one CPU thread, against some 3 ms an image for a nano model's training step
    (``benchmarks/data_loading.py``).
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int = 0, with_index: bool = False) -> None:
        if len(base) == 0:  # type: ignore[arg-type]
            raise DataError("the base dataset of a SeededDataset is empty")
        self.base = base
        self.transform = transform
        self.seed = _check_int(seed, "seed", 0)
        #: items are (image, label, index of base) instead of (image, label): a per-image cache's key
        self.with_index = bool(with_index)

    @property
    def batched(self) -> bool:
        """Whether :meth:`__getitems__` transforms a batch at once (see the class docstring)."""
        return (isinstance(self.base, ArrayDataset) and self.base.transform is None
                and is_deterministic(self.transform))

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _index(self, draw: int) -> int:
        """The index of ``base`` that draw id ``draw`` decodes to."""
        if draw < 0:
            raise DataError(f"SeededDataset indices are draw ids >= 0, got {draw}")
        return int(draw) % len(self)

    def __getitem__(self, draw: int) -> tuple[Any, ...]:
        image, label = self.base[self._index(draw)]
        if self.transform is not None:
            if isinstance(label, Mapping):  # a dense target: it moves with the image
                image, label = self._transform(image, draw, label)
            else:
                image = self._transform(image, draw)
        return (image, label, self._index(draw)) if self.with_index else (image, label)

    def _transform(self, image: Any, draw: int, *target: Any) -> Any:
        """``transform(image)``, or ``transform(image, target)`` given a target, with the random streams
        seeded from the draw id."""
        item_seed = mix_seed(self.seed, draw)
        py_state = random.getstate()
        try:
            # devices=[]: only the CPU generator is saved and restored; seeding the default CPU
            # generator (not torch.manual_seed) leaves the CUDA generators alone.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(item_seed)
                random.seed(item_seed)
                return self.transform(image, *target)
        finally:
            random.setstate(py_state)

    def __getitems__(self, draws: list[int]) -> list[tuple[Any, Any]]:
        """The items of a batch of draw ids, as DataLoader asks for them: ``[self[d] for d in
        draws]``, computed on the whole batch at once where :attr:`batched`."""
        if not self.batched or len(draws) == 0:
            return [self[d] for d in draws]
        index = torch.as_tensor([self._index(d) for d in draws], dtype=torch.long)
        images = self.transform(tv_tensors.Image(self.base.images[index]))
        if self.with_index:
            return list(zip(images.unbind(0), self.base.targets[index].tolist(), index.tolist()))
        return list(zip(images.unbind(0), self.base.targets[index].tolist()))
