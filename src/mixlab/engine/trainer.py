"""The training loop, generic over tasks (:mod:`mixlab.engine.tasks` decides the data, the loss
and the evaluation): :class:`Trainer` sets up the model, optimizer and schedule, then runs epochs
of steps, evaluation, metrics and checkpoints.

``train(cfg)`` runs one configuration in one run directory, on a CPU, a GPU, or under
``torchrun`` with DistributedDataParallel. It is safe to interrupt: with
``checkpoint.every_steps`` it checkpoints inside epochs too, and ``resume=True`` continues
from the newest complete checkpoint exactly — same weights, optimizer, schedule, EMA,
sampler position, random streams and the epoch's running loss — so an interrupted and resumed
run ends with the weights and metrics of an uninterrupted one. A resume whose configuration changes
keys of :data:`mixlab.config.RESUME_SAFE` (more epochs, a lower lr, ...) goes on with them from that
checkpoint, on the schedule of the new configuration at the step reached, and records each change
in the run's ``config_history.jsonl``; other changes are refused. One process at a time trains a
run directory: ``train`` holds its lock (:class:`mixlab.fileio.DirectoryLock`) from before the
first check to the end, and a second writer is refused naming the holder.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..analysis import activation_bytes, count_macs, count_params
from ..config import CONFIG_HISTORY, RUN_CONFIG, Config, ConfigError, load_run_config, resume_config
from ..data import Preprocessing, mix_seed
from ..factory import create_model
from ..fileio import DirectoryBusy, DirectoryLock, remove_temporaries, write_atomic
from ..weights import check_compatible, checkpoint_metadata
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, device_memory,
                          init_distributed)
from .ema import ModelEma
from .finetune import describe, freeze_backbone, load_source
from .metrics import MetricsLog
from .optim import build_optimizer
from .scheduler import build_scheduler
from .tasks import build_task


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def _log(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


# -- pieces of a run ---------------------------------------------------------------------------
def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB, process peak RSS


def model_slug(name: str) -> str:
    """A file-name-safe form of a model name: registered names as they are, a specification
    file by its stem, a ``spec:`` string as its words joined by '-' (shortened with a hash
    when long)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name).stem
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")
    if len(slug) > 60:
        slug = f"{slug[:50]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return slug


def run_dir_path(cfg: Config, run_dir=None) -> Path:
    """The run directory: ``run_dir`` if given, else ``output_dir/name`` (``name`` defaults to
    ``<model>-<data>``)."""
    if run_dir is None:
        run_dir = Path(cfg.output_dir) / (cfg.name or f"{model_slug(cfg.model.name)}-{cfg.data.name}")
    return Path(run_dir)


def resolve_run_dir(cfg: Config, run_dir=None, resume: bool = False) -> Path:
    """The run directory; a new run (not ``resume``) is refused where one is already (checked
    holding the directory's lock, see :func:`hold_run_dir`)."""
    run_dir = run_dir_path(cfg, run_dir)
    if not resume and (run_dir / RUN_CONFIG).exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                          f"or choose another --name / --output")
    return run_dir


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: Config, run_dir=None, resume: bool = False) -> dict:
    """Train and evaluate ``cfg``; returns the summary (also written to ``summary.json``)."""
    dinfo = init_distributed(cfg.train.device)
    try:
        run_dir = run_dir_path(cfg, run_dir)
        with hold_run_dir(run_dir, dinfo):
            return Trainer(cfg, dinfo, run_dir, resume).run()
    finally:
        cleanup(dinfo)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, dinfo: DistInfo):
    """Hold ``run_dir`` for this run: the main process takes its lock (creating the directory),
    and every process raises ConfigError naming the holder when another process has it. A run
    that fails before it wrote ``config.yaml`` into a directory this call created leaves none."""
    lock, refusal, created = None, None, []
    if dinfo.is_main:
        here = run_dir.absolute()
        created = list(itertools.takewhile(lambda d: not d.exists(), (here, *here.parents)))  # deepest first
        try:
            lock = DirectoryLock(run_dir)
        except DirectoryBusy as e:
            refusal = (f"run directory {str(run_dir)!r} is being trained by {e.holder}; wait for it to finish, or "
                       f"choose another --name / --output")
    refusal = broadcast_object(refusal, dinfo)  # under torchrun: the other ranks refuse too
    if refusal is not None:
        raise ConfigError(refusal)
    try:
        yield
    except BaseException:
        if lock is not None and created and not (run_dir / RUN_CONFIG).exists():
            lock.release(remove=True)  # nothing of a run was written: leave no directory behind
            for d in (run_dir / "checkpoints", *created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
        raise
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    """One training run of one process: ``Trainer(cfg, dinfo, run_dir, resume).run()``.

    The steps, in order: set-up (``__init__``: configuration, task, data, model, optimization,
    checkpoints), ``_resume``, ``_remove_temporaries``, ``_open_run_dir``, then per epoch
    ``_train_epoch`` (micro-batches, ``_optimizer_step``, mid-epoch ``_save``) and ``_end_epoch``
    (``_evaluate``, the metrics row), ``_save``, and ``_finish`` (``summary.json``). What the model
    learns, from which data and how it is evaluated is the task's (:mod:`mixlab.engine.tasks`); the
    loop knows no task. The run directory is this process's while it runs (:func:`train` holds its
    lock).
    """

    def __init__(self, cfg: Config, dinfo: DistInfo, run_dir, resume: bool):
        self.t_start = time.time()
        self.dinfo, self.device = dinfo, dinfo.device
        if cfg.train.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp fp16 needs a CUDA device; on the CPU use bf16 (or none)")
        self.run_dir = resolve_run_dir(cfg, run_dir, resume)
        self.changes: list[tuple] = []  # (key, old, new): what this resume changes (config.RESUME_SAFE keys only)
        if resume and (self.run_dir / RUN_CONFIG).exists():  # a resumed run keeps its configuration but safe changes
            cfg, self.changes = resume_config(load_run_config(self.run_dir), cfg)
        self.cfg, self.tc, self.resume = cfg, cfg.train, resume
        self.task = build_task(cfg, dinfo)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                      keep_best=cfg.checkpoint.keep_best, mode=self.task.metric.mode)
        torch.manual_seed(self.tc.seed)
        if self.tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._setup_data()
        self._setup_model()
        self._setup_optimization()
        info = self.info
        # what the run's evaluation does (its checkpoints' data configuration), what the run started from
        # (model.pretrained) and what trains (model.freeze) go into every checkpoint
        prep = Preprocessing.from_data(info)
        extra = {"freeze": cfg.model.freeze}
        if self.pretrained is not None:
            extra["pretrained"] = json.dumps(self.pretrained)
        if self.backbone_prefix:  # the task's module holds the model: where, and what else it holds
            extra.update(backbone_prefix=self.backbone_prefix, task_modules=json.dumps(self.task_modules))
        self.metadata = checkpoint_metadata(cfg.model.name, num_classes=self.num_classes, in_chans=info.in_chans,
                                            img_size=info.img_size, mean=prep.mean, std=prep.std,
                                            crop_pct=prep.crop_pct, interpolation=prep.interpolation,
                                            model_kwargs=cfg.model.kwargs, classes=info.classes, task=cfg.task,
                                            **extra)
        # the position and the account of the run (restored by _resume)
        self.epoch, self.step, self.batch_in_epoch, self.train_time, self.images_seen = 0, 0, 0, 0.0, 0
        self.loss_sum, self.loss_n = 0.0, 0  # the running train loss of the epoch (its metrics row)
        self.last_eval: dict = {}
        self.ema_eval: dict = {}
        self.metrics: MetricsLog | None = None  # the main process's metric files and TensorBoard (_open_run_dir)
        self.tb = None

    # -- set-up ---------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        data = self.task.build_data()
        self.train_loader, self.val_loader, self.sampler, self.info = (data.train_loader, data.val_loader,
                                                                       data.sampler, data.info)
        if self.info.skipped.get("train") or self.info.skipped.get("val"):
            _log(self.dinfo, f"skipped unreadable images: {self.info.skipped}")

    def _setup_model(self) -> None:
        """Build the model; load ``model.pretrained`` into it (not when resuming from a checkpoint, which holds
        the weights) and freeze its backbone for ``model.freeze: backbone``; then the task's set-up."""
        cfg, info = self.cfg, self.info
        kw = self.task.model_kwargs(info)
        model = create_model(cfg.model.name, **kw)
        self.pretrained: dict | None = None  # what the run started from (restored by _resume)
        if cfg.model.pretrained is not None and not (self.resume and self.ckpt.latest() is not None):
            self.pretrained, notes = load_source(model, cfg.model.pretrained, info.classes, cfg.model.name,
                                                info.img_size)
            _log(self.dinfo, describe(self.pretrained))
            for note in notes:
                _log(self.dinfo, f"note: {note}")
        model = model.to(self.device)
        self.frozen: list[nn.Module] = []  # modules kept in eval mode during training (a linear probe's backbone)
        if cfg.model.freeze == "backbone":
            self.frozen = freeze_backbone(model)
            if cfg.model.pretrained is None:
                _log(self.dinfo, "note: model.freeze backbone without model.pretrained trains a classifier on the "
                                 "features of a randomly initialised network (a baseline, not a probe of learned "
                                 "features)")
        self.num_classes = model.num_classes  # what the model classifies (0: a task's encoder, no classifier)
        self.backbone_params = count_params(model)
        model = self.task.setup(model)
        # a task's module holding the model beside its own (a decoder): where the model is, and what else trains
        self.backbone_prefix = getattr(model, "backbone_prefix", "")
        self.task_modules = sorted({n.split(".", 1)[0] for n, _ in model.state_dict().items()
                                    if not n.startswith(self.backbone_prefix)}) if self.backbone_prefix else []
        self.params = count_params(model)
        self.trainable = count_params(model, trainable_only=True)
        if self.tc.sync_bn and self.dinfo.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        with torch.device("meta"):
            meta = create_model(cfg.model.name, **kw).eval()
            self.macs, _ = count_macs(meta, torch.empty(1, info.in_chans, info.img_size, info.img_size))
            self._check_memory(meta)
        self.raw_model = self.model = model  # self.model becomes the DDP / compiled wrapper in _open_run_dir

    def _check_memory(self, meta: nn.Module) -> None:
        """Refuse, before anything is allocated or written, a step whose activations alone (a lower
        bound, counted on the meta device) exceed the device's whole memory."""
        tc, info = self.tc, self.info
        have = device_memory(self.device)
        need = activation_bytes(meta, torch.empty(tc.batch_size, info.in_chans, info.img_size, info.img_size,
                                                  device="meta"))
        need = need // 2 if tc.amp != "none" else need  # 16-bit activations
        if have is not None and need > have:
            raise ConfigError(f"one training step of {self.cfg.model.name} at {info.img_size}px, batch "
                              f"{tc.batch_size}, needs more than {need / 2 ** 30:.0f} GiB for its activations, more "
                              f"than this {self.device.type} has ({have / 2 ** 30:.0f} GiB); use a smaller "
                              f"data.img_size (--img-size) or train.batch_size (--batch-size)")

    def _setup_optimization(self) -> None:
        tc, oc, sc = self.tc, self.cfg.optimizer, self.cfg.schedule
        self.global_batch = tc.batch_size * self.dinfo.world_size * tc.accum_steps
        self.lr = oc.lr if oc.lr is not None else oc.base_lr * self.global_batch / oc.lr_base_batch
        extra = {"max_grad_norm": None} if oc.name == "lamb" else {}  # clipping is optimizer.clip_grad's job
        self.optimizer = build_optimizer(self.model, oc.name, lr=self.lr, weight_decay=oc.weight_decay,
                                         momentum=oc.momentum, betas=tuple(oc.betas), eps=oc.eps,
                                         layer_decay=oc.layer_decay, **extra)
        self.batches_per_epoch = len(self.train_loader)  # a full epoch (a resumed epoch's loader is shorter)
        self.steps_per_epoch = self.batches_per_epoch // tc.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.accum_steps {tc.accum_steps} exceeds the {self.batches_per_epoch} batches of "
                              f"an epoch")
        total_steps = tc.epochs * self.steps_per_epoch
        # a warm-up as long as the whole run (a 1-epoch run of a 1-warm-up-epoch recipe) is cut short
        warmup_steps = min(round(sc.warmup_epochs * self.steps_per_epoch), total_steps - 1)
        self.scheduler = build_scheduler(self.optimizer, sc.name, total_steps=total_steps, warmup_steps=warmup_steps,
                                         warmup_lr=sc.warmup_lr, min_lr=sc.min_lr,
                                         step_milestones=[round(m * self.steps_per_epoch) for m in sc.milestones],
                                         gamma=sc.gamma)
        ema = self.cfg.ema
        self.ema = ModelEma(self.model, decay=ema.decay, warmup=ema.warmup) if ema.enabled else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> bool:
        """Restore the newest complete checkpoint when resuming; True if the run is already finished."""
        latest = self.ckpt.latest() if self.resume else None
        if latest is not None:
            weights, state, meta = self.ckpt.load(latest)
            if "pretrained" in meta:  # what the run started from, recorded by its first checkpoint
                self.pretrained = json.loads(meta["pretrained"])
                self.metadata["pretrained"] = meta["pretrained"]
            check_compatible(self.raw_model, weights, meta)
            self.raw_model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.changes:  # the new lr and schedule (built for the new length) go on from the step reached
                self.scheduler.continue_at(state["scheduler"]["last_epoch"])
            else:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            if self.scaler.is_enabled() and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
            self.train_time, self.images_seen = state["train_time"], state["images_seen"]
            done = self.epoch + (self.batch_in_epoch > 0)  # epochs begun
            if self.tc.epochs < done:
                trained = f"{self.epoch} epochs"
                if self.batch_in_epoch:
                    trained += f" and {self.batch_in_epoch} batches"
                raise ConfigError(f"train.epochs {self.tc.epochs}: the run has already trained {trained}; "
                                  f"give at least {done}")
            # a mid-epoch checkpoint's running loss (older checkpoints lack it: the epoch's row then covers
            # only the batches after the resume)
            self.loss_sum, self.loss_n = state.get("epoch_loss_sum", 0.0), state.get("epoch_loss_n", 0)
            set_rng_state(state["rng"])
            _log(self.dinfo, f"resumed from {latest.name}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                             f"step {self.step}")
        elif self.resume:
            _log(self.dinfo, f"nothing to resume in {self.run_dir}; starting from the beginning")
        return self.epoch >= self.tc.epochs and latest is not None and (self.run_dir / "summary.json").exists()

    def _remove_temporaries(self) -> None:
        """Delete the temporary files of writes that a kill interrupted (safe: no other process writes here)."""
        if self.dinfo.is_main:
            removed = remove_temporaries(self.run_dir) + remove_temporaries(self.run_dir / "checkpoints")
            if removed:
                _log(self.dinfo, f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                                 + ", ".join(str(p.relative_to(self.run_dir)) for p in removed))

    def _open_run_dir(self) -> None:
        """Write config.yaml, open the metric logs, and wrap the model for DDP / torch.compile."""
        dinfo = self.dinfo
        if dinfo.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._record_changes()
            self.cfg.save(self.run_dir / RUN_CONFIG)
        barrier(dinfo)
        self.metrics = MetricsLog(self.run_dir) if dinfo.is_main else None
        if self.metrics is not None:
            self.metrics.truncate(self.epoch + 1)
        self.tb = _tensorboard(self.run_dir, self.cfg) if dinfo.is_main else None
        if dinfo.enabled:
            self.model = DistributedDataParallel(self.model,
                                                 device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.tc.compile:
            self.model = torch.compile(self.model)

    def _record_changes(self) -> None:
        """Append this resume's configuration changes to ``config_history.jsonl``, each with the position it
        takes effect at (``step`` optimizer steps and ``epoch`` epochs done, ``batch_in_epoch`` batches into the
        next); config.yaml, written next, is the configuration from then on."""
        if not self.changes:
            return
        when = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        lines = "".join(json.dumps({**when, "key": k, "old": old, "new": new}) + "\n" for k, old, new in self.changes)
        history = self.run_dir / CONFIG_HISTORY
        write_atomic(history, (history.read_text() if history.exists() else "") + lines)  # never a torn line
        _log(self.dinfo, f"changed on resume at step {self.step}: "
                         + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in self.changes))

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        if self._resume():
            unchanged = f"; nothing was changed (give more than {self.tc.epochs} --epochs to train on)"
            _log(self.dinfo, f"{self.run_dir} is already complete" + (unchanged if self.changes else ""))
            return json.loads((self.run_dir / "summary.json").read_text())
        self._remove_temporaries()
        self._open_run_dir()
        cfg, tc, info = self.cfg, self.tc, self.info
        trainable = "all trainable" if self.trainable == self.params else f"{self.trainable:,} trainable"
        inside = (f" inside {type(self.raw_model).__name__} ({self.backbone_params / 1e6:.2f}M in the model, "
                  f"{(self.params - self.backbone_params) / 1e6:.2f}M in {', '.join(self.task_modules)})"
                  if self.backbone_prefix else "")
        _log(self.dinfo, f"training {cfg.model.name}{inside} ({self.params / 1e6:.2f}M params, {trainable}, "
                         f"{self.macs / 1e9:.3f} GMACs "
                         f"at {info.img_size}px) on {info.name} ({info.num_train} train / {info.num_val} val images) "
                         f"for {tc.epochs} epochs, {self.steps_per_epoch} steps each, lr {self.lr:.3g}, global batch "
                         f"{self.global_batch}, {self.dinfo.world_size} process(es) on {self.device}; run directory "
                         f"{self.run_dir}")
        while self.epoch < tc.epochs:
            self._train_epoch()
            row = self._end_epoch()
            self._save(self.epoch, 0, metric=row.get(self.task.metric.key))
        return self._finish()

    def _train_epoch(self) -> None:
        tc, dinfo, log = self.tc, self.dinfo, self.cfg.log
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batch_in_epoch * tc.batch_size)
        self.model.train()
        for m in self.frozen:  # a frozen backbone computes fixed features: no BatchNorm statistics, no dropout
            m.eval()
        self.epoch_images, self.t_epoch = 0, time.time()
        show_bar = str(log.progress).lower() == "true" or (str(log.progress).lower() == "auto" and sys.stderr.isatty())
        bar = _progress(show_bar and dinfo.is_main, self.batches_per_epoch, self.batch_in_epoch, self.epoch,
                        tc.epochs)
        for i, batch in enumerate(self.train_loader, start=self.batch_in_epoch):
            torch.manual_seed(mix_seed(tc.seed, self.epoch, i, dinfo.rank))  # randomness depends on the position only
            last_micro = (i + 1) % tc.accum_steps == 0
            self._micro_step(batch, i, last_micro)
            if last_micro:
                self._optimizer_step()
                every = self.cfg.checkpoint.every_steps
                if every and self.step % every == 0 and i + 1 < self.batches_per_epoch:
                    self._account_time()  # a mid-epoch checkpoint: account for the work so far
                    self._save(self.epoch, i + 1)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{self.loss_sum / self.loss_n:.4f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            elif dinfo.is_main and log.print_every and (i + 1) % log.print_every == 0:
                print(f"  epoch {self.epoch + 1} batch {i + 1}/{self.batches_per_epoch} loss "
                      f"{self.loss_sum / self.loss_n:.4f} lr {self.optimizer.param_groups[0]['lr']:.2e}", flush=True)
        if bar is not None:
            bar.close()

    def _micro_step(self, batch, i: int, last_micro: bool) -> None:
        """Forward and backward of one micro-batch (gradients are synchronised on the last one only)."""
        dinfo = self.dinfo
        seed = mix_seed(self.tc.seed, self.epoch, i, dinfo.rank, 1)
        sync = self.model.no_sync() if (dinfo.enabled and not last_micro) else contextlib.nullcontext()
        with sync:
            loss, n = self.task.loss(self.model, batch, seed)
            self._stop_if_diverged(loss, i)
            self.scaler.scale(loss / self.tc.accum_steps).backward()
        self.loss_sum += loss.item()
        self.loss_n += 1
        self.epoch_images += n

    def _stop_if_diverged(self, loss: torch.Tensor, i: int) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if all_reduce_sum(bad, self.dinfo).item() > 0:
            where = f"optimizer step {self.step + 1} (epoch {self.epoch + 1}, batch {i + 1})"
            good = self.ckpt.latest()
            go_on = "To go on from it" if good else "To start again"
            amp = ", or turn mixed precision off with --amp none" if self.tc.amp != "none" else ""
            raise TrainingDiverged(
                f"the loss became {loss.item()} at {where}; training stopped and nothing was overwritten. "
                f"The last good checkpoint is {good if good else 'none (no checkpoint was written yet)'}. "
                f"{go_on} with half the learning rate: mixlab train --resume {shlex.quote(str(self.run_dir))} "
                f"--lr {self.lr / 2:.3g} (or clip the gradients with --set optimizer.clip_grad=1.0{amp}).")

    def _optimizer_step(self) -> None:
        clip = self.cfg.optimizer.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.step += 1

    def _account_time(self) -> None:
        """Add the time and images since the last account to the run's totals."""
        now = time.time()
        self.train_time, self.t_epoch = self.train_time + (now - self.t_epoch), now
        self.images_seen, self.epoch_images = self.images_seen + self.epoch_images * self.dinfo.world_size, 0

    def _end_epoch(self) -> dict:
        """Close the epoch's account, evaluate when due, and log the epoch's metrics row."""
        tc = self.tc
        self.train_time += time.time() - self.t_epoch
        self.images_seen += self.epoch_images * self.dinfo.world_size
        self.batch_in_epoch = 0
        self.epoch += 1
        row = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": self.loss_sum / max(self.loss_n, 1),
               "train_images_per_s": self.images_seen / max(self.train_time, 1e-9)}
        self.loss_sum, self.loss_n = 0.0, 0
        if self.epoch % tc.eval_every == 0 or self.epoch == tc.epochs:
            row.update(self._evaluate())
            self.task.epoch_end(self.raw_model, self.epoch, self.run_dir, last=self.epoch == tc.epochs)
        row["wall_s"] = time.time() - self.t_start
        if self.metrics is not None:
            self.metrics.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.tb.add_scalar(k, v, self.epoch)
        _log(self.dinfo, f"epoch {self.epoch}/{tc.epochs}: train loss {row['train_loss']:.4f}"
                         + self.task.epoch_log(row) + f", {row['train_images_per_s']:.0f} img/s")
        return row

    def _evaluate(self) -> dict:
        """Evaluate the model (and its EMA); the fields they add to the epoch's metrics row."""
        self.last_eval = self.task.evaluate(self.raw_model, self.val_loader)
        fields = self.task.epoch_fields(self.last_eval)
        if self.ema is not None:
            self.ema_eval = self.task.evaluate(self.ema.module, self.val_loader)
            fields.update(self.task.epoch_fields(self.ema_eval, ema=True))
        return fields

    # -- checkpoint and finish ------------------------------------------------------------------
    def _save(self, epoch: int, batch_in_epoch: int, metric: float | None = None) -> None:
        """Checkpoint the weights and the training state at (``epoch``, ``batch_in_epoch``)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                 "step": self.step, "batch_in_epoch": batch_in_epoch, "train_time": self.train_time,
                 "images_seen": self.images_seen, "rng": rng_state(),
                 "epoch_loss_sum": self.loss_sum, "epoch_loss_n": self.loss_n}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.dinfo.is_main:
            self.ckpt.save(self.raw_model.state_dict(), state, epoch=epoch, step=self.step, metric=metric,
                           metadata=self.metadata)
        barrier(self.dinfo)

    def _finish(self) -> dict:
        """Write ``summary.json`` (main process) and return the summary."""
        task, info, device, dinfo = self.task, self.info, self.device, self.dinfo
        if not self.last_eval:  # resumed a finished run whose summary was lost
            self.last_eval = task.evaluate(self.raw_model, self.val_loader)
        key = task.metric.key
        best = None
        if self.metrics is not None:
            pick = max if task.metric.mode == "max" else min
            best = pick((r[key] for r in self.metrics.rows if key in r),
                        default=task.epoch_fields(self.last_eval)[key])
        summary = {"task": task.name, "model": self.cfg.model.name, "data": info.name, "img_size": info.img_size,
                   "in_chans": info.in_chans, "num_classes": info.num_classes, **task.summary_fields(self.last_eval),
                   f"best_{key}": best, "epochs": self.tc.epochs, "steps": self.step,
                   "train_images_per_s": self.images_seen / max(self.train_time, 1e-9), "train_s": self.train_time,
                   "wall_s": time.time() - self.t_start, "peak_memory_mb": _peak_memory_mb(device),
                   "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
                   "params": self.params, "trainable_params": self.trainable, "backbone_params": self.backbone_params,
                   "gmacs": self.macs / 1e9,
                   "device": str(device),
                   "world_size": dinfo.world_size, "global_batch": self.global_batch, "lr": self.lr,
                   "skipped_images": info.skipped, "mean": list(info.mean), "std": list(info.std),
                   "classes": list(info.classes), "pretrained": self.pretrained, "freeze": self.cfg.model.freeze}
        # the metric's last value under its key (what the arena reads), where summary_fields names it otherwise
        summary.setdefault(key, task.epoch_fields(self.last_eval)[key])
        if self.ema_eval:
            summary.update(task.epoch_fields(self.ema_eval, ema=True))
        if dinfo.is_main:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            said = ", ".join(s for s in (task.final_log(summary), f"{summary['wall_s']:.0f} s") if s)
            _log(dinfo, f"done: {said}; summary in {self.run_dir / 'summary.json'}")
        if self.tb is not None:
            self.tb.close()
        return summary


def _progress(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", dynamic_ncols=True,
                leave=False)


def _tensorboard(run_dir: Path, cfg: Config):
    if not cfg.log.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))
