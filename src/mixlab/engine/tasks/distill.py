"""Knowledge distillation (``task: distill``), after DeiT ("Training data-efficient image transformers &
distillation through attention", Touvron et al. 2021; facebookresearch/deit's ``losses.py``).

The student learns the labels with the classification task's loss (label smoothing, Mixup/CutMix soft
targets) and, through its distillation head, a frozen teacher's outputs on the same augmented and mixed
batch. A student without a distillation head distils on its one head (logit distillation). The teacher
is a mixlab run directory, a weights file with mixlab metadata, or a registered model with weights; it
sees the batch in its own normalisation and at its own input size (resized, bicubic, where that
differs). With un-augmented training images and no Mixup/CutMix its logits can be cached per image. See
the "Distillation" section of docs/tasks.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ...config import ConfigError, load_run_config
from ...config.tasks.distill import TEACHER_KINDS
from ...data import recorded_info
from ...data.transforms import is_deterministic
from ...factory import check_model_name, create_model
from ...weights import check_compatible, load_metadata, load_weights, read_checkpoint
from ..checkpoint import run_weights
from .base import get_task, register_task
from .classification import ClassificationTask

#: the largest teacher-logit cache ``distill.cache: auto`` keeps in memory (bytes)
AUTO_CACHE_LIMIT = 2 ** 30


def distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, base_loss: torch.Tensor,
                      teacher_logits: torch.Tensor, kind: str = "hard", alpha: float = 0.5,
                      tau: float = 1.0) -> torch.Tensor:
    """DeiT's objective: ``(1 - alpha) * base_loss + alpha * kd``, where ``base_loss`` is the label loss of
    ``cls_logits`` and ``kd`` compares ``dist_logits`` with the teacher's:

    * hard: ``CE(dist_logits, argmax teacher_logits)`` (mean over the batch);
    * soft: ``tau² · KL(softmax(teacher/tau) || softmax(dist/tau))`` reduced as DeiT's ``losses.py`` does:
      summed over batch and classes and divided by their product (``batch x classes``; not PyTorch's
      ``batchmean``, which divides by the batch only).

    ``cls_logits`` only enters through ``base_loss``; it is an argument so that the call names both heads.
    """
    dist_logits, teacher_logits = dist_logits.float(), teacher_logits.float()
    if kind == "hard":
        kd = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    elif kind == "soft":
        kd = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction="sum", log_target=True) * (tau * tau) / dist_logits.numel()
    else:
        raise ValueError(f"distillation kind must be 'hard' or 'soft', got {kind!r}")
    return (1 - alpha) * base_loss + alpha * kd


@dataclass
class TeacherSource:
    """A loaded teacher before it meets the data: the model (CPU, eval mode), what to call it, and what it
    records about its inputs (``None`` where it records nothing)."""

    model: nn.Module
    description: str
    mean: tuple | None
    std: tuple | None
    input_size: tuple | None  # (C, H, W)
    classes: list | None


def _checked(build, what: str):
    """``build()``, with the factory's and the checkpoint room's errors as a ConfigError about ``what``."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"distill.teacher: cannot load {what}: {e}") from None


def _run_teacher(run_dir: Path) -> TeacherSource:
    """The best checkpoint of a mixlab run (its newest when it kept no best), built as the run built it."""
    cfg = load_run_config(run_dir)
    task = get_task(cfg.task)
    if not task.class_scores:
        raise ConfigError(f"distill.teacher: {run_dir} is a run of the task {cfg.task!r}, whose model outputs no "
                          f"class scores; a teacher must be an image classifier")
    _, weights_path = run_weights(run_dir)
    weights, meta = _checked(lambda: load_weights(weights_path), str(weights_path))
    info = _checked(lambda: recorded_info(meta, cfg.data.name, where=str(weights_path)), str(weights_path))
    model = create_model(cfg.model.name, **task(cfg).model_kwargs(info))
    _checked(lambda: check_compatible(model, weights, meta), str(weights_path))
    model.load_state_dict(weights)
    return TeacherSource(model.eval(), f"run {run_dir} ({cfg.model.name}, {weights_path.name})",
                         info.mean, info.std, (info.in_chans, info.img_size, info.img_size), info.classes or None)


def _file_teacher(path: Path) -> TeacherSource:
    """A weights file whose mixlab metadata names its model (``mixlab convert``'s output, a run's checkpoint)."""
    meta = _checked(lambda: load_metadata(path) if path.suffix == ".safetensors" else read_checkpoint(path)[1],
                    str(path))
    arch = meta.get("architecture")
    if not arch:
        raise ConfigError(f"distill.teacher: {path} has no mixlab metadata naming its model; give the model's name as "
                          f"distill.teacher and this file as distill.teacher_weights")
    return _built_teacher(_checked(lambda: create_model(arch, pretrained=str(path)), str(path)), f"{path} ({arch})")


def _named_teacher(name: str, weights: str, in_chans: int) -> TeacherSource:
    """A registered model (or specification) with the weights of a file or a Hub id, built for ``in_chans``
    input channels (the student's: weights for others do not load)."""
    model = _checked(lambda: create_model(name, pretrained=weights, in_chans=in_chans),
                     f"{name} with the weights {weights}")
    return _built_teacher(model, f"{name} ({weights})")


def _built_teacher(model: nn.Module, description: str) -> TeacherSource:
    """A teacher ``create_model(..., pretrained=...)`` built: what its weights record of their inputs and classes
    (``pretrained_cfg``, :func:`mixlab.factory.create_pretrained`), its input size the model's own."""
    pc = getattr(model, "pretrained_cfg", {}) or {}
    size = pc.get("input_size")
    if size is None and getattr(model, "img_size", None) is not None:
        h, w = (model.img_size, model.img_size) if isinstance(model.img_size, int) else tuple(model.img_size)
        size = (model.in_chans, h, w)
    mean, std = pc.get("mean"), pc.get("std")
    return TeacherSource(model.eval(), description, tuple(mean) if mean else None, tuple(std) if std else None,
                         tuple(size) if size else None, pc.get("classes"))


def load_teacher(teacher: str, teacher_weights: str | None, in_chans: int) -> TeacherSource:
    """The teacher ``distill.teacher`` names (see :data:`mixlab.config.tasks.distill.TEACHER_KINDS`), on the CPU
    in eval mode; ``in_chans``: the student's input channels (for a teacher given by name)."""
    path = Path(teacher)
    if path.is_dir() or path.is_file():
        if teacher_weights is not None:
            raise ConfigError(f"distill.teacher_weights is for a teacher given by model name; {teacher} is a "
                              f"{'directory' if path.is_dir() else 'file'} and brings its own weights: leave "
                              f"distill.teacher_weights out")
        return _run_teacher(path) if path.is_dir() else _file_teacher(path)
    try:
        check_model_name(teacher)
    except ValueError:
        raise ConfigError(f"distill.teacher: {teacher!r} is no directory, no file and no registered model name; give "
                          f"{TEACHER_KINDS}") from None
    if teacher_weights is None:
        raise ConfigError(f"distill.teacher: the model {teacher!r} needs its trained weights: set "
                          f"distill.teacher_weights to a weights file or hf-hub:ORG/NAME (a teacher with random "
                          f"weights teaches nothing)")
    return _named_teacher(teacher, teacher_weights, in_chans)


class TeacherInput(nn.Module):
    """The teacher behind what its inputs need: a batch normalised for the student is re-normalised to
    the teacher's mean/std (``x·std_s + mean_s``, then ``(· − mean_t) / std_t``) and, where ``size`` is
    given (the teacher's recorded input size, when it is not the student's), resized to it (bicubic)."""

    def __init__(self, model: nn.Module, student_norm=None, teacher_norm=None, size: tuple | None = None):
        super().__init__()
        self.model, self.size = model, size
        self.renormalise = student_norm is not None
        if self.renormalise:
            for name, values in zip(("mean_s", "std_s", "mean_t", "std_t"), (*student_norm, *teacher_norm)):
                self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1),
                                     persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = (x * self.std_s + self.mean_s - self.mean_t) / self.std_t
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        return self.model(x)


def _differs(a, b) -> bool:
    return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))


@register_task
class DistillationTask(ClassificationTask):
    """Classification with a teacher: DeiT's hard or soft distillation (``distill.*``). The best checkpoint
    has the highest validation top-1 of the student's own output (a distilled model averages its heads);
    distilled students also report each head alone (``top1_cls``, ``top1_dist``)."""

    name = "distill"

    def __init__(self, cfg, dinfo=None):
        super().__init__(cfg, dinfo)
        self.teacher: nn.Module | None = None
        self.teacher_description, self.teacher_top1 = "", None
        self.train_dataset, self.val_loader, self.info = None, None, None
        self.use_cache, self.cache = False, None  # the cache: teacher logits by training-image index

    def build_data(self, with_train: bool = True):
        """The classification task's data; with the cache on, training batches also carry each image's index."""
        data = super().build_data(with_train)
        if not with_train:
            return data
        self.train_dataset, self.val_loader, self.info = data.train_loader.dataset, data.val_loader, data.info
        self.use_cache = self._cache_allowed(self.train_dataset)
        self.train_dataset.with_index = self.use_cache
        return data

    def _cache_allowed(self, train_dataset) -> bool:
        """Whether the teacher's logits are cached: ``distill.cache`` and whether each training image reaches
        the teacher the same every epoch (no random transform, no Mixup/CutMix)."""
        setting = str(self.cfg.distill.cache).lower()
        if setting == "false":
            return False
        why_not = []
        if not is_deterministic(train_dataset.transform):
            why_not.append("the training transform augments the images (aug.*)")
        if self.mixer.active:
            why_not.append("Mixup/CutMix mixes the batches (aug.mixup, aug.cutmix)")
        if setting == "true" and why_not:
            raise ConfigError(f"distill.cache true: the teacher sees each training image differently every epoch "
                              f"({'; '.join(why_not)}), so its logits cannot be cached; set distill.cache to auto "
                              f"or false, or turn that augmentation off")
        size = len(train_dataset) * self.info.num_classes * 4
        return not why_not and (setting == "true" or size <= AUTO_CACHE_LIMIT)

    def setup(self, model: nn.Module) -> nn.Module:
        """A student with a distillation head returns both heads in training; with training data built, the
        teacher is loaded, checked against the data, moved to the device and measured on the validation set."""
        if getattr(model, "distilled", False):
            model.distilled_training = True
        if self.train_dataset is None:  # rebuilding a trained student (mixlab.runs): no teacher
            return model
        dc, info = self.cfg.distill, self.info
        teacher, src = self.teacher_for(info)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher_description = src.description
        self.teacher_top1 = ClassificationTask.evaluate(self, self.teacher, self.val_loader)["top1"]
        if self.dinfo.is_main:
            head = ("its distillation head" if getattr(model, "distilled", False)
                    else "its one head (logit distillation)")
            unknown = ("; the teacher records no mean/std: it sees the student's normalisation"
                       if src.mean is None or src.std is None else "")
            print(f"distilling into {head} from {src.description}: top-1 {self.teacher_top1:.2f}% on {info.name}'s "
                  f"validation images; {dc.type}, alpha {dc.alpha}, tau {dc.tau}, teacher logits "
                  f"{'cached per image' if self.use_cache else 'computed every batch'}{unknown}", flush=True)
        return model

    def teacher_for(self, info) -> tuple[nn.Module, TeacherSource]:
        """The configuration's teacher (``distill.teacher``), checked against the data ``info`` and behind
        :class:`TeacherInput` (a ConfigError when it cannot be loaded or does not fit), and its source. The arena
        calls it once before any run trains."""
        dc = self.cfg.distill
        with torch.random.fork_rng(devices=[]):  # building the teacher draws no numbers from the run's streams
            src = load_teacher(dc.teacher, dc.teacher_weights, info.in_chans)
        return self._fit_teacher(src, info), src

    def _fit_teacher(self, src: TeacherSource, info) -> nn.Module:
        """``src``'s model behind :class:`TeacherInput` for the student's data; a teacher of another class
        count, other class names or another channel count is a ConfigError."""
        model, where = src.model, src.description
        chans = src.input_size[0] if src.input_size else getattr(model, "in_chans", info.in_chans)
        if chans != info.in_chans:
            raise ConfigError(f"distill.teacher {where} takes {chans}-channel images, {info.name} has {info.in_chans} "
                              f"channels; distil from a teacher trained on images like the student's")
        num_classes = getattr(model, "num_classes", None)
        if num_classes != info.num_classes:
            raise ConfigError(f"distill.teacher {where} classifies {num_classes} classes, {info.name} has "
                              f"{info.num_classes}; the teacher must be trained on the student's classes")
        if src.classes is not None and list(src.classes) != list(info.classes):
            diff = [f"class {i}: {a!r} for the teacher, {b!r} in the data"
                    for i, (a, b) in enumerate(zip(src.classes, info.classes)) if a != b]
            raise ConfigError(f"distill.teacher {where} was trained on other class names than {info.name}'s ("
                              + "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
                              + "); its outputs would teach other labels")
        norm = None
        if src.mean is not None and src.std is not None and (_differs(src.mean, info.mean) or
                                                             _differs(src.std, info.std)):
            norm = ((tuple(info.mean), tuple(info.std)), (tuple(src.mean), tuple(src.std)))
        # the size it was trained at, where recorded: a teacher that could take the student's size still scores
        # far worse at a size it was not trained for (a nano_resnet trained at 8 px on digits: 20% top-1 at
        # 8 px, 7.8% at 16 px)
        size = None
        if src.input_size is not None and tuple(src.input_size[1:]) != (info.img_size, info.img_size):
            size = tuple(src.input_size[1:])
        return TeacherInput(model, *(norm or (None, None)), size=size)

    # -- training -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_cache(self) -> None:
        """The teacher's logits of every training image, by index, in index order and fixed batches (the same
        whenever they are computed, so a resumed run recomputes exactly the cache it had)."""
        ds, n = self.train_dataset, len(self.train_dataset)
        loader = DataLoader(ds, batch_size=max(self.cfg.train.batch_size, 64), sampler=range(n),
                            num_workers=self.cfg.data.num_workers)
        cache = torch.empty(n, self.info.num_classes, dtype=torch.float32, device=self.device)
        for x, _, index in loader:
            cache[index.to(self.device)] = self._teacher_logits(x.to(self.device))
        self.cache = cache

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.teacher(x).float()

    def loss(self, model: nn.Module, batch, seed: int) -> tuple[torch.Tensor, int]:
        """DeiT's loss (:func:`distillation_loss`) of one micro-batch; the teacher sees the student's (mixed)
        batch, or its cached logits are looked up by image index (a batch without indices, such as the arena
        speed probe's :meth:`synthetic_batch`, has the teacher run on it)."""
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        x, targets = self.mixer(x, y, seed=seed)
        if self.use_cache and len(batch) > 2:
            if self.cache is None:
                self.fill_cache()
            teacher_logits = self.cache[batch[2].to(self.device)]
        else:
            teacher_logits = self._teacher_logits(x)
        with self.autocast():
            out = model(x)
        cls_logits, dist_logits = out if isinstance(out, tuple) else (out, out)
        dc = self.cfg.distill
        loss = distillation_loss(cls_logits, dist_logits, self.loss_fn(cls_logits, targets), teacher_logits,
                                 dc.type, dc.alpha, dc.tau)
        return loss, x.shape[0]

    # -- evaluation and reports -----------------------------------------------------------------------
    def eval_logits(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's own output and, for a student with a distillation head, each head alone (``top1_cls``,
        ``top1_dist`` in the metrics): one forward pass, the output being the heads' average (DeiT's inference)."""
        if not getattr(model, "distilled", False):
            return super().eval_logits(model, x)
        cls_logits, dist_logits = model.forward_heads(model.forward_features(x))
        return (cls_logits + dist_logits) / 2, {"top1_cls": cls_logits, "top1_dist": dist_logits}

    def epoch_fields(self, metrics: dict, ema: bool = False) -> dict:
        fields = super().epoch_fields(metrics, ema)
        prefix = "ema_" if ema else ""
        fields.update({prefix + k: metrics[k] for k in ("top1_cls", "top1_dist") if k in metrics})
        return fields

    def epoch_log(self, row: dict) -> str:
        heads = (f" (class head {row['top1_cls']:.2f}%, distillation head {row['top1_dist']:.2f}%)"
                 if "top1_cls" in row else "")
        return super().epoch_log(row) + heads

    def summary_fields(self, metrics: dict) -> dict:
        dc = self.cfg.distill
        fields = super().summary_fields(metrics)
        fields.update({k: metrics[k] for k in ("top1_cls", "top1_dist") if k in metrics})
        fields["distill"] = {"teacher": self.teacher_description, "teacher_top1": self.teacher_top1,
                             "type": dc.type, "alpha": dc.alpha, "tau": dc.tau, "cache": self.use_cache}
        return fields

    def final_log(self, summary: dict) -> str:
        heads = (f", class head {summary['top1_cls']:.2f}%, distillation head {summary['top1_dist']:.2f}%"
                 if "top1_cls" in summary else "")
        return super().final_log(summary) + heads + f"; teacher top-1 {summary['distill']['teacher_top1']:.2f}%"
