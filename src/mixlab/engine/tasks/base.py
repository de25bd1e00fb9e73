"""The task protocol: what a training run asks its model to learn, and the registry of tasks by name.

The training loop (:mod:`mixlab.engine.trainer`) owns everything a task does not decide: the
model, optimizer, schedule, EMA, accumulation, AMP, DDP, checkpoints, resume and logs. A task
decides its data, the loss of one batch, its evaluation and what is reported. See docs/tasks.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...config import Config, ConfigError
from ..distributed import DistInfo


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of ``train.amp`` (none | bf16 | fp16) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class Metric:
    """What a task is judged by: the key of its metrics rows and of ``summary.json`` (``best_<key>`` there too)
    that picks ``best.safetensors`` and ranks the arena, how people call it, whether higher or lower is
    better, its unit and how to print it."""

    #: the key in the per-epoch metrics rows and in summary.json
    key: str
    #: what a table's column and a log line call it ("top-1", "reconstruction loss")
    label: str
    #: "max" (higher is better) or "min"
    mode: str = "max"
    #: "%" or "" (a plain number)
    unit: str = ""
    #: the format of one value (``format(value, fmt)``)
    fmt: str = ".2f"

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"Metric {self.key!r}: mode must be 'max' or 'min', got {self.mode!r}")

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.mode == "max" else a < b

    def format(self, value: float | None, with_unit: bool = True) -> str:
        if value is None:
            return "—"
        return format(value, self.fmt) + (self.unit if with_unit else "")


@dataclass
class TaskData:
    """A task's data. ``info`` (a :class:`mixlab.data.DatasetInfo`) describes what the model is
    built for and what the run logs; ``train_loader`` and ``sampler`` are None when only
    evaluating. The sampler must be resumable (``set_epoch``, ``set_start``), and every training
    batch must hold ``train.batch_size`` samples: resume counts positions in batches."""

    train_loader: Any
    val_loader: Any
    sampler: Any
    info: Any


class Task:
    """One kind of training. Subclasses set ``name``, ``best_metric`` and ``best_mode`` and
    implement the methods that raise NotImplementedError; the others have defaults.

    The task's :attr:`metric` picks the best checkpoint and ranks the arena. A task whose ``setup`` returns a
    module holding the model beside its own modules (a decoder) gives that module a ``backbone_prefix``
    attribute saying where the model sits in its weights (``"encoder."``): the optimizer's parameter groups,
    the checkpoints' metadata and fine-tuning from the run read it.

    A task is built from the run's configuration and process (``Task(cfg, dinfo)``); the loop then
    calls ``build_data``, ``model_kwargs`` (for ``create_model``), ``setup`` once, ``loss`` for
    every micro-batch, ``evaluate`` at evaluation epochs (on the model and on its EMA), and the
    ``*_fields`` / ``*_log`` methods to fill the metrics rows, the log and ``summary.json``.
    """

    #: the ``task:`` value of a configuration
    name: ClassVar[str] = ""
    #: the metric that picks ``best.safetensors`` and ranks the arena: its key is a field of the per-epoch
    #: metrics rows (see :meth:`epoch_fields`) and of summary.json (see :meth:`summary_fields`)
    metric: ClassVar[Metric | None] = None
    #: whether the trained model outputs class scores (what ``eval``, the arena and the analysis commands read)
    class_scores: ClassVar[bool] = False

    def __init__(self, cfg: Config, dinfo: DistInfo | None = None):
        self.cfg = cfg
        self.dinfo = dinfo or DistInfo()
        self.device = self.dinfo.device

    def autocast(self):
        """The run's mixed-precision context; forward passes run inside it."""
        return autocast(self.device, self.cfg.train.amp)

    # -- data and model ---------------------------------------------------------------------
    def build_data(self, with_train: bool = True) -> TaskData:
        raise NotImplementedError

    def data_info(self):
        """The DatasetInfo of the run's data without building loaders (to rebuild a trained model)."""
        raise NotImplementedError

    def model_kwargs(self, info) -> dict:
        """Keyword arguments of ``create_model(cfg.model.name, ...)`` for data described by ``info``."""
        cfg = self.cfg
        kw = dict(cfg.model.kwargs)
        kw.update(num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size,
                  drop_path_rate=cfg.model.drop_path_rate, drop_rate=cfg.model.drop_rate)
        if cfg.model.layer_scale is not None:
            kw["layer_scale"] = cfg.model.layer_scale
        return kw

    def setup(self, model: nn.Module) -> nn.Module:
        """Called once with the model on its device, before the optimizer is built; returns the
        module to train, checkpoint and evaluate: the model itself, or a module holding it with the
        task's trainable extra modules (a masked-image-modeling decoder). Frozen helpers (a
        distillation teacher) are built here and kept by the task."""
        return model

    def synthetic_batch(self, n: int, info) -> Any:
        """A batch of ``n`` random samples shaped as the training loader gives them (on the CPU), for
        timing a training step without data (the arena's speed probe): images and class labels here."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, info.in_chans, info.img_size, info.img_size, generator=g)
        return x, torch.randint(0, max(info.num_classes, 1), (n,), generator=g)

    # -- training ---------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch, seed: int) -> tuple[torch.Tensor, int]:
        """The loss of one micro-batch as the loader gave it (on the CPU), and its number of
        samples. The task moves the batch to ``self.device``, runs the forward pass inside
        :meth:`autocast`, and draws its randomness from the global generator (seeded by the loop
        from the batch's position) or from ``seed`` (the same position, another stream)."""
        raise NotImplementedError

    # -- evaluation and reports ---------------------------------------------------------------
    def evaluate(self, model: nn.Module, loader) -> dict:
        """Metrics of ``model`` over ``loader``, reduced over all processes."""
        raise NotImplementedError

    def epoch_fields(self, metrics: dict, ema: bool = False) -> dict:
        """The fields an evaluation adds to the per-epoch metrics row (of the EMA weights with ``ema``)."""
        raise NotImplementedError

    def epoch_log(self, row: dict) -> str:
        """What the per-epoch log line says about the evaluation in ``row`` ("" when there was none)."""
        return ""

    def summary_fields(self, metrics: dict) -> dict:
        """The fields of the last evaluation in ``summary.json`` (before ``best_<best_metric>``)."""
        raise NotImplementedError

    def final_log(self, summary: dict) -> str:
        """The end-of-run log line's account of ``summary``."""
        return ""

    def pictures(self, model: nn.Module, out_dir) -> list:
        """Draw what the task shows of ``model`` into the folder ``out_dir`` (``mixlab eval --out``; masked
        image modeling: its reconstructions of validation images) after :meth:`build_data`; the paths written
        (none here). It must not draw from the global random generators."""
        return []

    def epoch_end(self, model: nn.Module, epoch: int, run_dir, last: bool) -> None:
        """Called in every process after each epoch's evaluation (``epoch`` counts from 1; ``last`` for the
        run's last) with the trained module: write what the task shows of its progress into ``run_dir`` (the
        masked-image-modeling task's pictures). It must not draw from the global random generators."""


#: the tasks by name; :func:`register_task` adds one
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` the task named ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if not isinstance(cls.metric, Metric):
        raise ValueError(f"{cls.__name__}.metric must be a Metric (the key that picks the best checkpoint and "
                         f"ranks the arena), got {cls.metric!r}")
    if TASKS.get(cls.name, cls) is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered ({TASKS[cls.name].__name__})")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The task class named ``name``; a ConfigError naming the known tasks if there is none."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"task: unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def build_task(cfg: Config, dinfo: DistInfo | None = None) -> Task:
    """The task of a configuration (its ``task:`` key), for the process ``dinfo``."""
    return get_task(cfg.task)(cfg, dinfo)
