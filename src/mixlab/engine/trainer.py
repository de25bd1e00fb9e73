"""The training loop, readable top to bottom: data, model, optimizer, schedule, then epochs
of steps, evaluation, metrics and checkpoints.

``train(cfg)`` runs one configuration in one run directory, on a CPU, a GPU, or under
``torchrun`` with DistributedDataParallel. It is safe to interrupt: with
``checkpoint.every_steps`` it checkpoints inside epochs too, and ``resume=True`` continues
from the newest complete checkpoint exactly — same weights, optimizer, schedule, EMA,
sampler position and random streams — so an interrupted and resumed run ends with the
weights of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..analysis import count_macs, count_params
from ..config import RUN_CONFIG, Config, ConfigError, load_run_config
from ..data import MixupCutmix, ResumableSampler, SeededDataset, build_datasets, build_transforms, mix_seed
from ..fileio import write_atomic
from ..registry import create_model
from ..version import __version__
from .checkpoint import CheckpointManager, check_compatible, load_weights, rng_state, set_rng_state
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from .ema import ModelEma
from .metrics import MetricsLog, binary_cross_entropy, soft_cross_entropy, topk_correct
from .optim import build_optimizer
from .scheduler import build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


def _log(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


# -- pieces of a run ---------------------------------------------------------------------------
def model_kwargs(cfg: Config, info) -> dict:
    kw = dict(cfg.model.kwargs)
    kw.update(num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size,
              drop_path_rate=cfg.model.drop_path_rate, drop_rate=cfg.model.drop_rate)
    if cfg.model.layer_scale is not None:
        kw["layer_scale"] = cfg.model.layer_scale
    return kw


def build_data(cfg: Config, dinfo: DistInfo, with_train: bool = True):
    """Datasets, transforms, samplers and loaders for a configuration (the training loader and
    sampler are None when ``with_train`` is False: evaluation only)."""
    d, a = cfg.data, cfg.aug
    base_train, base_val, info = build_datasets(d.name, root=d.root, img_size=d.img_size, download=d.download,
                                                strict=d.strict, limit_train=d.limit_train, limit_val=d.limit_val,
                                                seed=cfg.train.seed)
    train_tf = build_transforms(info, True, info.img_size, hflip=a.hflip, random_resized_crop=a.random_resized_crop,
                                rrc_scale=tuple(a.rrc_scale), simple_random_crop=a.simple_random_crop,
                                crop_padding=a.crop_padding, rand_augment=a.rand_augment,
                                three_augment=a.three_augment, color_jitter=a.color_jitter,
                                random_erasing=a.random_erasing)
    val_tf = build_transforms(info, False, info.img_size)
    val_ds = SeededDataset(base_val, val_tf, seed=cfg.train.seed)
    pin = dinfo.device.type == "cuda"
    bs = cfg.train.batch_size
    val_indices = list(range(dinfo.rank, len(val_ds), dinfo.world_size))  # disjoint shards: exact totals
    val_loader = DataLoader(val_ds, batch_size=max(bs, 64), sampler=val_indices, num_workers=d.num_workers,
                            pin_memory=pin)
    if not with_train:
        return None, val_loader, None, info
    train_ds = SeededDataset(base_train, train_tf, seed=cfg.train.seed)
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=cfg.train.seed, num_replicas=dinfo.world_size,
                               rank=dinfo.rank, repeats=a.repeated_aug)
    if len(sampler) < bs:
        raise ConfigError(f"train.batch_size {bs} is larger than this process's share of the training set "
                          f"({len(sampler)} images); use a batch size of at most {len(sampler)}")
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=d.num_workers, drop_last=True,
                              pin_memory=pin, persistent_workers=False)
    return train_loader, val_loader, sampler, info


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none", dinfo: DistInfo | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader (all ranks)."""
    dinfo = dinfo or DistInfo(device=device)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss sum, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        c1, c5 = topk_correct(logits, y)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        sums += torch.tensor([c1, c5, float(loss), len(y)], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(device), dinfo).cpu() if dinfo.enabled else sums
    n = max(sums[3].item(), 1)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "images": int(sums[3].item())}


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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


def resolve_run_dir(cfg: Config, run_dir=None, resume: bool = False) -> Path:
    if run_dir is None:
        run_dir = Path(cfg.output_dir) / (cfg.name or f"{model_slug(cfg.model.name)}-{cfg.data.name}")
    run_dir = Path(run_dir)
    if not resume and (run_dir / RUN_CONFIG).exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                          f"or choose another --name / --output")
    return run_dir


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: Config, run_dir=None, resume: bool = False) -> dict:
    """Train and evaluate ``cfg``; returns the summary (also written to ``summary.json``)."""
    dinfo = init_distributed(cfg.train.device)
    try:
        return _train(cfg, dinfo, run_dir, resume)
    finally:
        cleanup(dinfo)


def _train(cfg: Config, dinfo: DistInfo, run_dir, resume: bool) -> dict:
    t_start = time.time()
    device, tc = dinfo.device, cfg.train
    if tc.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp fp16 needs a CUDA device; on the CPU use bf16 (or none)")
    run_dir = resolve_run_dir(cfg, run_dir, resume)
    if resume and (run_dir / RUN_CONFIG).exists():  # a resumed run keeps its own configuration
        saved = load_run_config(run_dir)
        if saved.to_dict() != cfg.to_dict():
            _log(dinfo, f"resuming {run_dir} with the configuration it was started with")
        cfg, tc = saved, saved.train
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    train_loader, val_loader, sampler, info = build_data(cfg, dinfo)
    if info.skipped.get("train") or info.skipped.get("val"):
        _log(dinfo, f"skipped unreadable images: {info.skipped}")
    kw = model_kwargs(cfg, info)
    model = create_model(cfg.model.name, **kw).to(device)
    if tc.sync_bn and dinfo.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with torch.device("meta"):
        meta = create_model(cfg.model.name, **kw).eval()
        macs, _ = count_macs(meta, torch.empty(1, info.in_chans, info.img_size, info.img_size))
    params = count_params(model)

    global_batch = tc.batch_size * dinfo.world_size * tc.accum_steps
    oc = cfg.optimizer
    lr = oc.lr if oc.lr is not None else oc.base_lr * global_batch / oc.lr_base_batch
    extra = {"max_grad_norm": None} if oc.name == "lamb" else {}  # clipping is optimizer.clip_grad's job
    optimizer = build_optimizer(model, oc.name, lr=lr, weight_decay=oc.weight_decay, momentum=oc.momentum,
                                betas=tuple(oc.betas), eps=oc.eps, layer_decay=oc.layer_decay, **extra)
    batches_per_epoch = len(train_loader)  # a full epoch (a resumed epoch's loader is shorter)
    steps_per_epoch = batches_per_epoch // tc.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"train.accum_steps {tc.accum_steps} exceeds the {batches_per_epoch} batches of an epoch")
    sc = cfg.schedule
    total_steps = tc.epochs * steps_per_epoch
    # a warm-up as long as the whole run (a 1-epoch run of a 1-warm-up-epoch recipe) is cut short
    warmup_steps = min(round(sc.warmup_epochs * steps_per_epoch), total_steps - 1)
    scheduler = build_scheduler(optimizer, sc.name, total_steps=total_steps,
                                warmup_steps=warmup_steps, warmup_lr=sc.warmup_lr,
                                min_lr=sc.min_lr, step_milestones=[round(m * steps_per_epoch) for m in sc.milestones],
                                gamma=sc.gamma)
    ema = ModelEma(model, decay=cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    scaler = torch.amp.GradScaler("cuda") if tc.amp == "fp16" else None
    mixer = MixupCutmix(info.num_classes, mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix,
                        prob=cfg.aug.mix_prob, switch_prob=cfg.aug.switch_prob, label_smoothing=tc.label_smoothing)
    loss_fn = binary_cross_entropy if tc.loss == "bce" else soft_cross_entropy
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                             keep_best=cfg.checkpoint.keep_best, mode="max")
    metadata = {"architecture": cfg.model.name, "num_classes": str(info.num_classes),
                "in_chans": str(info.in_chans), "img_size": str(info.img_size), "mean": json.dumps(info.mean),
                "std": json.dumps(info.std), "mixlab_version": __version__,
                "model_kwargs": json.dumps(cfg.model.kwargs)}

    # -- resume ------------------------------------------------------------------------------
    epoch, step, batch_in_epoch, train_time, images_seen = 0, 0, 0, 0.0, 0
    latest = ckpt.latest() if resume else None
    if latest is not None:
        weights, state, meta_ck = ckpt.load(latest)
        check_compatible(model, weights, meta_ck)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        train_time, images_seen = state["train_time"], state["images_seen"]
        set_rng_state(state["rng"])
        _log(dinfo, f"resumed from {latest.name}: epoch {epoch + 1}, batch {batch_in_epoch}, step {step}")
    elif resume:
        _log(dinfo, f"nothing to resume in {run_dir}; starting from the beginning")
    if epoch >= tc.epochs and latest is not None and (run_dir / "summary.json").exists():
        _log(dinfo, f"{run_dir} is already complete")
        return json.loads((run_dir / "summary.json").read_text())

    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / RUN_CONFIG)
    barrier(dinfo)
    metrics = MetricsLog(run_dir) if dinfo.is_main else None
    if metrics is not None:
        metrics.truncate(epoch + 1)
    tb = _tensorboard(run_dir, cfg) if dinfo.is_main else None

    raw_model = model
    if dinfo.enabled:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)

    def save(epoch_: int, batch_: int, metric: float | None = None):
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch_,
                 "step": step, "batch_in_epoch": batch_, "train_time": train_time, "images_seen": images_seen,
                 "rng": rng_state()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if dinfo.is_main:
            ckpt.save(raw_model.state_dict(), state, epoch=epoch_, step=step, metric=metric, metadata=metadata)
        barrier(dinfo)

    show_bar = str(cfg.log.progress).lower() == "true" or (str(cfg.log.progress).lower() == "auto"
                                                          and sys.stderr.isatty())
    _log(dinfo, f"training {cfg.model.name} ({params / 1e6:.2f}M params, {macs / 1e9:.3f} GMACs at "
                f"{info.img_size}px) on {info.name} ({info.num_train} train / {info.num_val} val images) for "
                f"{tc.epochs} epochs, {steps_per_epoch} steps each, lr {lr:.3g}, global batch {global_batch}, "
                f"{dinfo.world_size} process(es) on {device}; run directory {run_dir}")
    last_eval: dict = {}
    ema_eval: dict = {}
    while epoch < tc.epochs:
        sampler.set_epoch(epoch)
        sampler.set_start(batch_in_epoch * tc.batch_size)
        model.train()
        loss_sum, loss_n, epoch_images, t_epoch = 0.0, 0, 0, time.time()
        bar = _progress(show_bar and dinfo.is_main, batches_per_epoch, batch_in_epoch, epoch, tc.epochs)
        for i, (x, y) in enumerate(train_loader, start=batch_in_epoch):
            torch.manual_seed(mix_seed(tc.seed, epoch, i, dinfo.rank))  # randomness depends on the position only
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, targets = mixer(x, y, seed=mix_seed(tc.seed, epoch, i, dinfo.rank, 1))
            last_micro = (i + 1) % tc.accum_steps == 0
            sync = model.no_sync() if (dinfo.enabled and not last_micro) else contextlib.nullcontext()
            with sync:
                with _autocast(device, tc.amp):
                    logits = model(x)
                    if isinstance(logits, tuple):  # distillation-token models: class head only
                        logits = logits[0]
                loss = loss_fn(logits, targets)
                bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
                if all_reduce_sum(bad, dinfo).item() > 0:
                    where = (f"optimizer step {step + 1} (epoch {epoch + 1}, batch {i + 1})")
                    good = ckpt.latest()
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at {where}; training stopped and nothing was overwritten. "
                        f"The last good checkpoint is {good if good else 'none (no checkpoint was written yet)'}. "
                        f"Lower optimizer.lr, set optimizer.clip_grad, or turn amp off, then --resume.")
                scaled = loss / tc.accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item()
            loss_n += 1
            epoch_images += x.shape[0]
            if last_micro:
                if oc.clip_grad:
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), oc.clip_grad)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(raw_model)
                step += 1
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 \
                        and i + 1 < batches_per_epoch:  # a mid-epoch checkpoint: account for the work so far
                    now = time.time()
                    train_time, t_epoch = train_time + (now - t_epoch), now
                    images_seen, epoch_images = images_seen + epoch_images * dinfo.world_size, 0
                    save(epoch, i + 1)
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            elif dinfo.is_main and cfg.log.print_every and (i + 1) % cfg.log.print_every == 0:
                print(f"  epoch {epoch + 1} batch {i + 1}/{batches_per_epoch} loss {loss_sum / loss_n:.4f} "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
        if bar is not None:
            bar.close()
        train_time += time.time() - t_epoch
        images_seen += epoch_images * dinfo.world_size
        batch_in_epoch = 0
        epoch += 1
        row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / max(loss_n, 1), "train_images_per_s": images_seen / max(train_time, 1e-9)}
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            last_eval = evaluate(raw_model, val_loader, device, tc.amp, dinfo)
            row.update(top1=last_eval["top1"], top5=last_eval["top5"], val_loss=last_eval["loss"])
            if ema is not None:
                ema_eval = evaluate(ema.module, val_loader, device, tc.amp, dinfo)
                row.update(ema_top1=ema_eval["top1"], ema_top5=ema_eval["top5"])
        row["wall_s"] = time.time() - t_start
        if metrics is not None:
            metrics.append(row)
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch)
        _log(dinfo, f"epoch {epoch}/{tc.epochs}: train loss {row['train_loss']:.4f}"
                    + (f", val top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%" if "top1" in row else "")
                    + (f", EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "")
                    + f", {row['train_images_per_s']:.0f} img/s")
        save(epoch, 0, metric=row.get("top1"))

    if not last_eval:  # resumed a finished run whose summary was lost
        last_eval = evaluate(raw_model, val_loader, device, tc.amp, dinfo)
    best = max((r["top1"] for r in metrics.rows if "top1" in r), default=last_eval["top1"]) if metrics else None
    summary = {"model": cfg.model.name, "data": info.name, "img_size": info.img_size, "in_chans": info.in_chans,
               "num_classes": info.num_classes, "top1": last_eval["top1"], "top5": last_eval["top5"],
               "loss": last_eval["loss"], "best_top1": best, "epochs": tc.epochs, "steps": step,
               "train_images_per_s": images_seen / max(train_time, 1e-9), "train_s": train_time,
               "wall_s": time.time() - t_start, "peak_memory_mb": _peak_memory_mb(device),
               "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
               "params": params, "gmacs": macs / 1e9, "device": str(device), "world_size": dinfo.world_size,
               "global_batch": global_batch, "lr": lr, "skipped_images": info.skipped}
    if ema_eval:
        summary.update(ema_top1=ema_eval["top1"], ema_top5=ema_eval["top5"])
    if dinfo.is_main:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        _log(dinfo, f"done: top-1 {summary['top1']:.2f}% (best {best:.2f}%), {summary['wall_s']:.0f} s; "
                    f"summary in {run_dir / 'summary.json'}")
    if tb is not None:
        tb.close()
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


# -- evaluation of a saved run --------------------------------------------------------------------
def _run_weights(path, use_ema: bool) -> tuple[Path, Path]:
    """(run directory, weights file) of a run directory or of one of its checkpoint files."""
    path = Path(path)
    if path.is_dir():
        # the best weights by default; the EMA weights live in the training state of the newest checkpoint
        run_dir, weights_path = path, path / "checkpoints" / "best.safetensors"
        if use_ema or not weights_path.exists():
            latest = CheckpointManager(path / "checkpoints").latest()
            if latest is None:
                raise ConfigError(f"{path} has no checkpoint to evaluate")
            weights_path = latest.with_suffix(".safetensors")
    else:
        weights_path, run_dir = path, path.parent.parent
    if not weights_path.exists():
        raise ConfigError(f"checkpoint {str(weights_path)!r} does not exist")
    return run_dir, weights_path


def load_run_model(path, use_ema: bool = False, info=None):
    """The trained model of a run directory or checkpoint file, built as the run built it.

    Returns ``(model, cfg, info, weights_path)``; ``info`` (the dataset's DatasetInfo) is read
    from the run's dataset unless given. The model is on the CPU, in eval mode.
    """
    run_dir, weights_path = _run_weights(path, use_ema)
    cfg = load_run_config(run_dir)  # a checkpoint is loaded as the run that wrote it built its model
    if info is None:
        d = cfg.data
        info = build_datasets(d.name, root=d.root, img_size=d.img_size, download=False, strict=d.strict,
                              limit_train=d.limit_train, limit_val=d.limit_val, seed=cfg.train.seed)[2]
    model = create_model(cfg.model.name, **model_kwargs(cfg, info))
    weights, meta = load_weights(weights_path)
    if use_ema:
        state_file = weights_path.with_name(weights_path.name.replace(".safetensors", ".state.pt"))
        from .checkpoint import load_state
        state = load_state(state_file)["train_state"]
        if "ema" not in state:
            raise ConfigError(f"{state_file} holds no EMA weights (the run had ema.enabled false)")
        ema = ModelEma(model)
        ema.load_state_dict(state["ema"])
        model = ema.module
    else:
        check_compatible(model, weights, meta)
        model.load_state_dict(weights)
    return model.eval(), cfg, info, weights_path


def evaluate_run(path, data: str | None = None, data_root: str | None = None, use_ema: bool = False,
                 device: str = "auto", batch_size: int | None = None) -> dict:
    """Evaluate a run directory or one of its checkpoints on the validation split of its
    dataset, or of ``data`` (same classes and channels). For a run directory: its
    ``best.safetensors``, or with ``use_ema`` the EMA weights of its newest checkpoint."""
    run_dir, weights_path = _run_weights(path, use_ema)
    cfg = load_run_config(run_dir)
    if data:
        cfg.data.name = data
    if data_root:
        cfg.data.root = data_root
    cfg.train.device = device
    if batch_size:
        cfg.train.batch_size = batch_size
    dinfo = init_distributed(device)
    _, val_loader, _, info = build_data(cfg, dinfo, with_train=False)
    model = load_run_model(weights_path, use_ema, info=info)[0].to(dinfo.device)
    result = evaluate(model, val_loader, dinfo.device, cfg.train.amp, dinfo)
    result.update(checkpoint=str(weights_path), data=info.name, model=cfg.model.name)
    return result
