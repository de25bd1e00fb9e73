"""``mixlab arena``: train a line-up of models under one recipe, data, budget and seeds, and
report how they compare.

The comparison is by the metric of the arena's task (``cfg.task``, ``--set task=...``; its
:class:`~mixlab.engine.tasks.Metric`): top-1 % for classification and distillation, a reconstruction
loss for masked image modeling, AP for detection, each the same command and the same report. Each run's
``summary.json`` gives its final value (a run without it is refused), the metrics rows give the curves,
and models rank by the mean over the finished seeds, highest first for a "max" metric and lowest first
for a "min" one. The results' fields are named by the metric's key (``top1_mean``, ``val_loss_mean``)
and ``results.json`` records the metric itself (:mod:`mixlab.arena.report`).

Layout of an arena directory::

    arena.json                    the arena's settings (a rerun must match them)
    runs/<model>/seed<k>/         one training run each (config.yaml, checkpoints, metrics, summary.json)
    pretrain/<model>-<method>/    the pretraining entries MODEL@METHOD start from (mixlab.arena.pretrain)
    speed.json                    inference and training throughput per model, measured once
    leaderboard.md / .csv, *.png, index.html, results.json    the report

Each (model, seed) run is a child process (``python -m mixlab train --resume <run dir>``):
its peak memory is its own, it starts from a clean state (threads, seeds, compiled code), and
a failure is confined to it. A run whose ``summary.json`` exists is finished and is skipped
on a rerun; an interrupted one continues from its last checkpoint. Runs go one at a time,
or ``jobs`` at a time (``--jobs``), each child then with ``cores / jobs`` CPU threads: small
models use two cores poorly, so two runs side by side finish sooner than one after the other.

Speed is measured apart from the runs, once per model, between runs (with ``jobs`` > 1:
after the last run, when nothing else is training): images per second of inference (the model's
forward pass) and of a training step of the task (its loss of its ``synthetic_batch``, backward,
AdamW: for classification forward, cross-entropy, backward, AdamW) on random data at the arena's batch
and image size, so that a long run slowed down for a while by other work on the machine does not
distort the table. A task that cannot take a step on random data has the model alone timed instead,
with a note in ``speed.json`` and the report. Delete ``speed.json`` and rerun to measure again.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..config import RUN_CONFIG, Config, ConfigError, build_config
from ..engine.metrics import MetricsLog
from ..engine.tasks import ClassificationTask
from ..fileio import DirectoryBusy, DirectoryLock, write_atomic
from ..engine.trainer import model_slug
from ..models.nano import LINE_UPS
from ..version import __version__
from .pretrain import (check_pretraining, first_difference, parse_entry, prepare_dir, pretrain_config,
                       pretrain_dir, pretraining_summary)

#: what ``mixlab arena`` trains when no model is named: the eight families of the seeds' argument
DEFAULT_MODELS = LINE_UPS["nano"]
#: the default budget on the bundled digits data: all eight nano models in about 5.5 minutes on 2 CPU cores
#: (328 s, measured from a fresh clone with `mixlab arena`)
DIGITS_EPOCHS = 5
#: the square side images are resized to when a dataset's own is smaller than this (digits: 8 px)
MIN_IMG_SIZE = 28

ARENA_FILE = "arena.json"
#: the metric of arenas that name none (classification's): what results written before tasks had metrics hold
_TOP1 = ClassificationTask.metric
#: the fields of a leaderboard entry besides those named by the metric's key (which must not be one of them)
_RESERVED = {"model", "label", "params", "gmacs", "seeds", "finished_seeds", "train_images_per_s",
             "infer_images_per_s", "run_train_images_per_s", "peak_memory_mb", "peak_memory_kind", "wall_s",
             "curves", "status", "train_speed_note", "picture", "pretraining"}


@dataclass
class ArenaSettings:
    """What an arena compares and under which budget."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    data: str = "digits"
    data_root: str | None = None
    epochs: int | None = None       # None: DIGITS_EPOCHS on digits, else the recipe's
    seeds: int = 1                  # seeds 0 .. seeds-1
    recipe: str = "arena"
    img_size: int | None = None     # None: the dataset's own, at least MIN_IMG_SIZE
    batch_size: int | None = None
    device: str = "auto"
    overrides: list[str] = field(default_factory=list)
    out: str | None = None          # None: arena/<data>-<epochs>ep-<seeds>seed
    measure_speed: bool = True
    train: bool = True              # False: train nothing, report what has finished
    jobs: int = 1                   # runs trained at the same time (each with cores / jobs CPU threads)
    pretrain_epochs: int | None = None   # entries MODEL@METHOD: epochs of their pretraining (None: ``epochs``)
    pretrain_overrides: list[str] = field(default_factory=list)  # ... and keys set for it alone


def expand_models(names) -> list[str]:
    """Model arguments to model names: ``nano`` stands for the default line-up, ``nano-zoo`` for
    the further families' nano models, ``nano-all`` for both, each also with a pretraining
    (``nano@simmim``: every nano model fine-tuned from its SimMIM pretraining); duplicates go."""
    out: list[str] = []
    for n in names or ["nano"]:
        group, at, suffix = n.partition("@")
        for m in [f"{m}{at}{suffix}" for m in LINE_UPS[group]] if group in LINE_UPS else [n]:
            if m not in out:
                out.append(m)
    return out


def model_label(name: str) -> str:
    """A short display name: registered names and spec files as they are, spec strings shortened."""
    if name.endswith((".yaml", ".yml")):
        return Path(name).stem
    text = name[5:].strip() if name.startswith("spec:") else name
    return text if len(text) <= 40 else text[:38] + "…"


def base_config(s: ArenaSettings) -> Config:
    """The training configuration every run shares (the model name is the first model's)."""
    flags: dict = {"model": {"name": parse_entry(s.models[0]).model}, "data": {"name": s.data},
                   "train": {"device": s.device}}
    if s.data_root:
        flags["data"]["root"] = s.data_root
    if s.img_size is not None:  # 0 or less: refused by the configuration's check
        flags["data"]["img_size"] = s.img_size
    if s.batch_size:
        flags["train"]["batch_size"] = s.batch_size
    if s.epochs:
        flags["train"]["epochs"] = s.epochs
    elif s.data == "digits":
        flags["train"]["epochs"] = DIGITS_EPOCHS
    cfg = build_config(flags, recipe=s.recipe, overrides=s.overrides)
    if cfg.data.img_size is None:
        native = _native_size(cfg)
        if native is not None and native < MIN_IMG_SIZE:
            cfg.data.img_size = MIN_IMG_SIZE
    return cfg


def _native_size(cfg: Config) -> int | None:
    from ..data import build_datasets
    _, _, info = build_datasets(cfg.data.name, root=cfg.data.root, download=cfg.data.download,
                                limit_train=1, limit_val=1)
    return info.native_size


def run_config(base: Config, model: str, seed: int, out: Path | None = None) -> Config:
    """The configuration of the run of line-up entry ``model`` with ``seed``: an entry ``MODEL@METHOD`` starts
    from the pretraining in the arena directory ``out`` (:mod:`mixlab.arena.pretrain`), frozen for
    ``MODEL@METHOD-probe``."""
    from ..config import config_from_dict
    entry = parse_entry(model)
    d = base.to_dict()
    d["model"]["name"] = entry.model
    if entry.method and out is not None:
        d["model"]["pretrained"] = str(pretrain_dir(out, entry.model, entry.method).resolve())
    if entry.probe:
        d["model"]["freeze"] = "backbone"
    d["train"]["seed"] = seed
    d["name"] = None
    return config_from_dict(d)


def check_pretrained(base: Config, models: list[str]) -> None:
    """An arena with ``model.pretrained`` compares one model: a source holds one architecture's weights.
    Its weights are loaded into the model once here, so that a source that does not fit is refused before
    anything trains (a ConfigError listing the misfits), not once per seed."""
    if len(models) != 1:
        raise ConfigError(f"model.pretrained {base.model.pretrained!r} holds the weights of one architecture; an "
                          f"arena that starts from it trains one model (name it: mixlab arena MODEL --set "
                          f"model.pretrained=...), not {len(models)}. To compare a linear probe, fine-tuning and "
                          f"training from scratch, run one arena each, with its own --out")
    from ..engine.finetune import load_source
    from ..engine.tasks import build_task
    from ..factory import create_model
    task = build_task(run_config(base, models[0], 0))
    info = task.data_info()
    load_source(create_model(models[0], **task.model_kwargs(info)), base.model.pretrained, info.classes, models[0],
                info.img_size)


def check_teacher(base: Config, models: list[str]) -> None:
    """An arena of distillation runs: the teacher is loaded and checked against the data once here, so that a
    teacher that cannot be loaded or does not fit is refused before anything trains, not once per run."""
    from ..engine.tasks import build_task
    task = build_task(run_config(base, models[0], 0))
    task.teacher_for(task.data_info())


def arena_dir(s: ArenaSettings, base: Config) -> Path:
    if s.out:
        return Path(s.out)
    return Path("arena") / f"{model_slug(base.data.name)}-{base.train.epochs}ep-{s.seeds}seed"


def _shared_settings(s: ArenaSettings, base: Config) -> dict:
    """Everything that must not change between an arena's runs (the model list may grow)."""
    return {"seeds": s.seeds, "train_config": _shared_config(base.to_dict())}


def _with_new_keys(saved: dict) -> dict:
    """The shared settings an ``arena.json`` records, with the configuration keys added to mixlab since it was
    written (a ``distill:`` section, ...) at their defaults: an arena started before goes on."""
    def fill(defaults, have):
        if not isinstance(defaults, dict) or not isinstance(have, dict):
            return have
        return {**defaults, **{k: fill(defaults.get(k), v) for k, v in have.items()}}
    if not isinstance(saved.get("train_config"), dict):
        return saved
    return {**saved, "train_config": fill(_shared_config(Config().to_dict()), saved["train_config"])}


def _shared_config(d: dict) -> dict:
    """A configuration's dictionary less what may differ between an arena's runs."""
    d["model"] = {k: v for k, v in d["model"].items() if k != "name"}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("seed", "device")}
    d.pop("name", None)
    d.pop("output_dir", None)
    return d


def environment(device: str) -> dict:
    import torch
    import torchvision
    env = {"mixlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "platform": platform.platform(), "cpu": _cpu_name(),
           "cpu cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads())}
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    env["device"] = dev
    if dev.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(dev))
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- one run ------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the arena process dies, so a killed arena leaves no
    orphan training on in the background (a rerun would otherwise race it). SIGINT gets its
    default action back (an arena started in the background by a script has it ignored), so
    that an interrupted arena can stop its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_threads(jobs: int) -> int:
    """CPU threads for each of ``jobs`` runs trained at the same time: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // jobs)


def job_gpus(device: str) -> list[str]:
    """The GPUs side-by-side runs are spread over: every visible one when the arena's device is
    ``auto`` or ``cuda`` and there are several (ids as ``CUDA_VISIBLE_DEVICES`` names them);
    none otherwise (the CPU, one GPU, or a device the user named, which every run then uses)."""
    if device not in ("auto", "cuda"):
        return []
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def train_in_child(run_dir: Path, prefix: str, quiet: bool = False, threads: int | None = None,
                   running: set | None = None, gpu: str | None = None) -> int:
    """Run (or continue) the training run in ``run_dir`` in a child process, appending its
    output to ``run_dir/train.log`` and echoing it with ``prefix``. Returns the exit status.
    ``threads``: the child's CPU threads (default: PyTorch's); ``running``: a set the child's
    process is kept in while it runs (so that an interrupted arena can stop it); ``gpu``: the
    only GPU the child sees (``CUDA_VISIBLE_DEVICES``)."""
    cmd = [sys.executable, "-m", "mixlab", "train", "--resume", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    kw = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  + (f", {threads} CPU thread(s)" if threads is not None else "")
                  + (f", GPU {gpu}" if gpu is not None else "") + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kw)
        if running is not None:
            running.add(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if not quiet and (line.startswith(("epoch ", "done:", "resumed", "error")) or "Error" in line):
                    print(f"{prefix} {line.rstrip()}", flush=True)
            return proc.wait()
        except BaseException:  # Ctrl-C reaches the child too; let it stop, then pass the interrupt on
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
            raise
        finally:
            if running is not None:
                running.discard(proc)


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# -- measurements ----------------------------------------------------------------------------
def _images_per_s(step, batch_size: int, device, min_time: float, context=None) -> float:
    """Images per second of ``step`` (one batch of ``batch_size``): two warm-up calls, then calls until
    ``min_time`` seconds have passed (at least 3, at most 200); the median call counts."""
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: list[float] = []
    with context or contextlib.nullcontext():
        for _ in range(2):
            step()
        sync()
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < min_time:
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
            if len(times) >= 200:
                break
    return batch_size / statistics.median(times)


def measure_speed(model_name: str, img_size: int, in_chans: int, num_classes: int, device: str = "cpu",
                  batch_size: int = 64, min_time: float = 1.0, train: bool = False,
                  model_kwargs: dict | None = None) -> float:
    """Images per second of the model alone: inference (eval mode, no gradients) or, with ``train``, a
    training step of a classifier (forward, cross-entropy on random labels, backward, AdamW step) on random
    data; the median of a timed loop (:func:`_images_per_s`). ``model_kwargs``: further ``create_model``
    arguments. The arena times a task's own training step with :func:`task_train_speed`."""
    import torch

    from ..factory import create_model
    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_model(model_name, **{**(model_kwargs or {}), "img_size": img_size, "in_chans": in_chans,
                                        "num_classes": num_classes}).to(dev)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=dev)
    if not train:
        model.eval()
        return _images_per_s(lambda: model(x), batch_size, dev, min_time, torch.inference_mode())
    y = torch.randint(0, max(num_classes, 1), (batch_size,), device=dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _images_per_s(step, batch_size, dev, min_time)


def task_train_speed(cfg: Config, device: str = "cpu", batch_size: int | None = None,
                     min_time: float = 1.0) -> float:
    """Images per second of a training step of the run ``cfg`` describes, as its task takes one: the task
    is built as the trainer builds it (its data, the model of ``task.model_kwargs``, its backbone frozen for
    ``model.freeze: backbone``, the module ``task.setup`` returns), then each step is the task's ``loss`` of
    its ``synthetic_batch`` (random data of the training loader's shape), backward and an AdamW step on the
    trainable parameters. For classification that is forward, cross-entropy (with the recipe's label
    smoothing), backward, AdamW, as before tasks had their own metric. Raises whatever the task raises where
    it cannot take a step on random data (the caller falls back to :func:`measure_speed`); what the task
    prints while it loads is kept off the terminal."""
    import io

    import torch

    from ..engine.distributed import DistInfo
    from ..engine.finetune import freeze_backbone
    from ..engine.tasks import build_task
    from ..factory import create_model
    dev = torch.device(device)
    n = batch_size or cfg.train.batch_size
    torch.manual_seed(0)
    task = build_task(cfg, DistInfo(device=dev))
    with contextlib.redirect_stdout(io.StringIO()):  # e.g. a distillation teacher's top-1, measured in setup
        info = task.build_data(with_train=True).info
        model = create_model(cfg.model.name, **task.model_kwargs(info)).to(dev)
        frozen = freeze_backbone(model) if cfg.model.freeze == "backbone" else []  # a linear probe's step
        module = task.setup(model)
    module.train()
    for m in frozen:  # as the trainer keeps them: fixed features
        m.eval()
    batch = task.synthetic_batch(n, info)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss, _ = task.loss(module, batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _images_per_s(step, n, dev, min_time)


def arena_metric(base: Config):
    """The metric that ranks an arena: its task's (``cfg.task``; top-1 for classification and distillation)."""
    from ..engine.tasks import get_task
    return get_task(base.task).metric


def _curve(run_dir: Path, key: str) -> list[list[float]]:
    """[epoch, value of the metric ``key``] of every evaluated epoch of a run so far."""
    return [[r["epoch"], r[key]] for r in MetricsLog(run_dir).rows if r.get(key) is not None]


def _check_run_task(run_dir: Path, metric) -> None:
    """Refuse, with a ConfigError that says why, a run whose task (its config.yaml's) this mixlab does not know
    or is not ranked by the arena's ``metric``: its numbers would be compared with others of another kind."""
    from ..config import load_run_config
    from ..engine.tasks import TASKS
    name = load_run_config(run_dir).task
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"{run_dir} is a run of the task {name!r}, which this mixlab does not know (known tasks: "
                          f"{', '.join(sorted(TASKS))}); the arena ranks runs by their task's metric")
    if task.metric.key != metric.key:
        raise ConfigError(f"{run_dir} is a run of the task {name!r}, judged by {task.metric.label}; the arena ranks "
                          f"by {metric.label}, its own task's metric")


def _metric_of(run_dir: Path, summary: dict, metric) -> float:
    """The final value of ``metric`` in a finished run's summary; a ConfigError where it has none (the run
    is of another task than the arena's, or its task does not write its metric's key into summary.json)."""
    if summary.get(metric.key) is None:
        raise ConfigError(f"{run_dir / 'summary.json'} has no {metric.key!r} ({metric.label}, the metric the arena "
                          f"ranks by for its task {summary.get('task', 'classification')!r}); the arena compares "
                          f"runs of one task that record their metric")
    return summary[metric.key]


def collect(model: str, seeds: list[int], runs: Path, speed: dict, failures: dict, metric=None) -> dict:
    """One leaderboard entry from the run directories of ``model``; ``metric`` (a Task's :class:`Metric`,
    default classification's top-1) names the fields: ``<key>`` (per finished seed), ``<key>_mean``,
    ``<key>_std``, ``best_<key>_mean``, and the curves' values."""
    metric = metric or _TOP1
    key = metric.key
    if key in _RESERVED:
        raise ConfigError(f"the metric key {key!r} is a field name of the arena's results; name the metric otherwise")
    slug = model_slug(model)
    summaries, curves, values = {}, {}, {}
    for s in seeds:
        rd = runs / slug / f"seed{s}"
        if (rd / "summary.json").exists():
            _check_run_task(rd, metric)
            summaries[s] = json.loads((rd / "summary.json").read_text())
            values[s] = _metric_of(rd, summaries[s], metric)
        curves[str(s)] = _curve(rd, key)
    done = [s for s in seeds if s in summaries]
    per_seed = [values[s] for s in done]
    first = summaries[done[0]] if done else {}

    def mean(field):
        vals = [summaries[s][field] for s in done if summaries[s].get(field) is not None]
        return statistics.fmean(vals) if vals else None

    status = "done" if len(done) == len(seeds) else f"{len(done)}/{len(seeds)} seeds"
    if model in failures:
        status = f"failed: {failures[model]}"
    mem = [summaries[s]["peak_memory_mb"] for s in done if summaries[s].get("peak_memory_mb") is not None]
    got = speed.get(model) or {}
    entry = {"model": model, "label": model_label(model), "params": first.get("params"), "gmacs": first.get("gmacs"),
             "seeds": seeds, "finished_seeds": done, key: per_seed,
             f"{key}_mean": statistics.fmean(per_seed) if per_seed else None,
             f"{key}_std": (statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0) if per_seed else None,
             f"best_{key}_mean": mean(f"best_{key}"), "train_images_per_s": got.get("train"),
             "infer_images_per_s": got.get("infer"),
             "run_train_images_per_s": mean("train_images_per_s"), "peak_memory_mb": max(mem) if mem else None,
             "peak_memory_kind": first.get("peak_memory_kind"), "wall_s": mean("wall_s"),
             "curves": curves, "status": status}
    if got.get("train_note"):  # the task's own training step could not be timed (speed.json says why)
        entry["train_speed_note"] = got["train_note"]
    pictures = sorted((runs / slug / f"seed{done[0]}" / "pictures").glob("*.png")) if done else []
    if pictures:  # what the task draws of its runs (masked image modeling's reconstructions): the newest
        entry["picture"] = str(pictures[-1])
    return entry


# -- the arena -------------------------------------------------------------------------------
def run_arena(s: ArenaSettings, quiet: bool = False) -> dict:
    """Train every (model, seed) not yet finished, then write the report. Returns
    ``{"out": dir, "report": paths, "results": entries, "failed": [models]}``."""
    from .report import write_report

    s.models = expand_models(s.models)
    if s.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {s.seeds}")
    if s.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (runs trained at the same time), got {s.jobs}")
    base = base_config(s)
    for m in s.models:  # every name or spec is checked before anything trains
        run_config(base, m, 0)
    pretrainings = pretraining_configs(s, base)
    if s.train:  # the data and the device too: a wrong root or device fails here, not in every run
        from ..engine.distributed import pick_device
        pick_device(s.device)
        if s.img_size is not None:  # without one, base_config has opened the data for its native size
            _native_size(base)
        if base.model.pretrained is not None:
            check_pretrained(base, s.models)
        if base.task == "distill":
            check_teacher(base, s.models)
        for cfg in pretrainings.values():
            check_pretraining(cfg)
    out = arena_dir(s, base)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = DirectoryLock(out)
    except DirectoryBusy:
        raise ConfigError(f"another arena is running in {out}; wait for it, or use another --out") from None
    with lock:
        if s.train:
            for (model, method), cfg in pretrainings.items():
                prepare_dir(pretrain_dir(out, model, method), cfg)
        return ArenaRun(s, base, out, quiet, list(pretrainings)).run(write_report)


def pretraining_configs(s: ArenaSettings, base: Config) -> dict:
    """{(model, method): configuration} of the pretrainings the line-up's ``MODEL@METHOD`` entries start from
    (:mod:`mixlab.arena.pretrain`); a ConfigError where such entries cannot be (an arena that is itself
    pretraining, or one that starts every run from ``model.pretrained``) or the pretraining settings are wrong."""
    needed = list(dict.fromkeys(e.pretrains for e in map(parse_entry, s.models) if e.pretrains))
    if not needed:
        if s.pretrain_epochs is not None or s.pretrain_overrides:
            raise ConfigError("--pretrain-epochs and --pretrain-set set the pretraining of entries MODEL@METHOD "
                              "(e.g. nano_vit@mae), and the line-up has none")
        return {}
    if base.task == "mim":
        raise ConfigError(f"{needed[0][0]}@{needed[0][1]}: an arena of task mim is itself the pretraining; name the "
                          f"models alone, or run a classification arena with MODEL@METHOD entries")
    if base.model.pretrained is not None:
        raise ConfigError(f"model.pretrained {base.model.pretrained!r} starts every run from one source; entries "
                          f"MODEL@METHOD start from their own pretraining: use one or the other")
    return {(model, method): pretrain_config(base, model, method, s.pretrain_epochs, s.batch_size,
                                             s.pretrain_overrides)
            for model, method in needed}


class PlannedRun(NamedTuple):
    """One (model, seed) training run of an arena, or the pretraining its entries ``MODEL@METHOD`` start from."""

    model: str
    seed: int
    dir: Path
    tag: str  # the prefix of its messages, e.g. "[3/16 nano_vit seed 0]"
    needs: Path | None = None  # the pretraining run that must have finished before this run starts
    pretraining: bool = False


class ArenaRun:
    """One invocation of ``mixlab arena`` on its directory: checks the directory's settings,
    trains the runs not yet finished in a pool of ``jobs`` child processes (``--jobs 1``: a
    pool of one), measures each model's speed on an idle machine, and writes the report.

    Speed is measured between runs with one job, after the last run with several (when nothing
    else is training). A run that fails marks its model failed: its other seeds are not tried.
    """

    def __init__(self, s: ArenaSettings, base: Config, out: Path, quiet: bool = False,
                 pretrainings: list[tuple[str, str]] = ()):
        self.s, self.base, self.out, self.quiet = s, base, out, quiet
        self.pretrainings = list(pretrainings)  # (model, method) of the entries MODEL@METHOD, in line-up order
        self.seeds = list(range(s.seeds))
        self.runs = out / "runs"
        self.speed_file = out / "speed.json"
        self.speed_all: dict = {}             # speed.json: every model measured in this directory
        self.failures: dict[str, str] = {}    # model -> why its run failed
        self.pretrain_failures: dict[Path, str] = {}  # pretraining run directory -> why it failed
        # the pool: with one job the child keeps PyTorch's choice of threads and sees every GPU, and the
        # speed is measured between runs; with several each child gets its share of the cores (and its
        # own GPU where there are several), and the speed is measured after the last run
        self.between_runs = s.jobs == 1
        self.threads = child_threads(s.jobs) if s.jobs > 1 else None
        self.gpus = job_gpus(s.device) if s.jobs > 1 else []
        self._slots: list[int] = []          # free job slots; slot k runs on GPU gpus[k % len(gpus)]
        self._pending: list[PlannedRun] = []  # the planned runs not yet started or skipped
        self._active: dict = {}              # future -> (run, slot)
        self._running: set = set()           # the child processes

    def say(self, *args) -> None:
        if not self.quiet:
            print(*args, flush=True)

    # -- the whole invocation ---------------------------------------------------------------
    def run(self, write_report) -> dict:
        """Train, measure, then write the report with ``write_report``; returns what ``run_arena`` does."""
        s, base, out = self.s, self.base, self.out
        shared = self.check_settings()
        self.speed_all = json.loads(self.speed_file.read_text()) if self.speed_file.exists() else {}
        self.say(f"arena: {len(s.models)} models x {len(self.seeds)} seed(s) on {base.data.name}, "
                 f"{base.train.epochs} epochs, recipe {base.recipe}; report in {out}")
        t0 = time.time()
        interrupted = False
        try:
            self.train(self.planned_runs())
            for m in s.models:  # after the last run: nothing else is training (one job: measured already)
                if m not in self.failures:
                    self.measure(m)
        except KeyboardInterrupt:
            interrupted = True
            self.say("\ninterrupted: writing the report of what has finished; rerun the same command to continue")
        speed = {m: self.speed_all[_speed_key(m, base)] for m in s.models if self.speed_all.get(_speed_key(m, base))}
        metric = arena_metric(base)
        results = [collect(m, self.seeds, self.runs, speed, self.failures, metric) for m in s.models]
        for r in results:
            self.add_pretraining(r)
        config = {"models": s.models, "task": base.task, "data": base.data.name, "img_size": base.data.img_size,
                  "epochs": base.train.epochs, "batch_size": base.train.batch_size, "seeds": self.seeds,
                  "recipe": base.recipe,
                  "jobs": s.jobs,  # of this invocation; each run's train.log says how many CPU threads it had
                  **({"pretraining": {"epochs": s.pretrain_epochs or base.train.epochs,
                                      "overrides": list(s.pretrain_overrides)}} if self.pretrainings else {}),
                  "train_config": shared["train_config"],
                  "command": " ".join(["mixlab", "arena", *sys.argv[2:]]) if sys.argv[1:2] == ["arena"] else None}
        report = write_report(out, results, config, environment(base.train.device), metric=metric)
        self.say(f"arena: {time.time() - t0:.0f} s; report: {Path(report['html']).resolve()}")
        if interrupted:
            raise KeyboardInterrupt
        return {"out": str(out), "report": report, "results": results, "failed": sorted(self.failures)}

    def check_settings(self) -> dict:
        """The settings every run shares; a directory holding an arena with others is refused.
        ``arena.json`` records them, with the model list (which may grow)."""
        shared = _shared_settings(self.s, self.base)
        arena_file = self.out / ARENA_FILE
        if arena_file.exists():
            saved = json.loads(arena_file.read_text())
            saved["shared"] = _with_new_keys(saved.get("shared", {}))
            if saved.get("shared") != shared and not self._any_run_started():
                # nothing trained under the old settings (e.g. a first attempt with a wrong data root): replace
                # them, and the configurations its runs were given
                for config in self.runs.glob(f"*/seed*/{RUN_CONFIG}"):
                    config.unlink()
                saved = {"models": [], "shared": shared}
            if saved.get("shared") != shared:
                diff = first_difference(saved.get("shared", {}), shared)
                raise ConfigError(f"{self.out} holds an arena with other settings ({diff}); rerun with the settings "
                                  f"it was started with to continue it, or choose another --out")
            models = saved["models"] + [m for m in self.s.models if m not in saved["models"]]
        else:
            models = list(self.s.models)
        write_atomic(arena_file, json.dumps({"models": models, "shared": shared}, indent=2) + "\n")
        return shared

    def add_pretraining(self, entry: dict) -> None:
        """An entry ``MODEL@METHOD``'s pretraining in its results (``pretraining``: method, epochs, losses, wall
        time, run directory), and its picture where the entry's own runs draw none."""
        e = parse_entry(entry["model"])
        if not e.method:
            return
        run_dir = pretrain_dir(self.out, e.model, e.method)
        got = pretraining_summary(run_dir) or {"run": str(run_dir), "method": e.method}
        entry["pretraining"] = {**got, "probe": e.probe}
        if got.get("picture") and not entry.get("picture"):
            entry["picture"] = got["picture"]

    def _any_run_started(self) -> bool:
        """Whether a run of this arena has written a checkpoint (or finished): then its settings are fixed."""
        return any(self.runs.glob("*/seed*/summary.json")) or any(self.runs.glob("*/seed*/checkpoints/ckpt-*"))

    def planned_runs(self) -> list[PlannedRun]:
        """The pretrainings the entries ``MODEL@METHOD`` start from, then every (model, seed), seed-major: a
        partial arena already has every model once."""
        entries = [parse_entry(m) for m in self.s.models]
        planned = [PlannedRun(f"{model}@{method}", 0, pretrain_dir(self.out, model, method),
                              f"[pretraining {model_label(model)} by {method}]", pretraining=True)
                   for model, method in self.pretrainings]
        n_total = len(self.s.models) * len(self.seeds)
        for seed in self.seeds:
            for k, e in enumerate(entries):
                tag = f"[{seed * len(entries) + k + 1}/{n_total} {model_label(e.name)} seed {seed}]"
                needs = pretrain_dir(self.out, e.model, e.method) if e.method else None
                planned.append(PlannedRun(e.name, seed, self.runs / model_slug(e.name) / f"seed{seed}", tag, needs))
        return planned

    # -- one run --------------------------------------------------------------------------------
    def start(self, run: PlannedRun) -> None:
        """Create the run's directory and configuration (kept if it exists: the run continues; a pretraining's
        is written before, by :func:`mixlab.arena.pretrain.prepare_dir`)."""
        run.dir.mkdir(parents=True, exist_ok=True)
        if not (run.dir / RUN_CONFIG).exists():
            run_config(self.base, run.model, run.seed, self.out).save(run.dir / RUN_CONFIG)
        self.say(f"{run.tag} training")

    def failed(self, run: PlannedRun, rc: int) -> None:
        # its other seeds would most likely fail the same way: not tried; nor the entries of a failed pretraining
        why = "diverged (loss NaN/inf)" if rc == 3 else f"exit status {rc}"
        if run.pretraining:
            self.pretrain_failures[run.dir] = f"{why}; see {run.dir / 'train.log'}"
        else:
            self.failures[run.model] = f"seed {run.seed}: {why}; see {run.dir / 'train.log'}"
        self.say(f"{run.tag} FAILED ({why}); its log ends:\n{_tail(run.dir / 'train.log')}")

    def measure(self, model: str) -> None:
        """Time the model's speed once (kept in speed.json), if a finished run gives its input size."""
        key = _speed_key(model, self.base)
        if self.s.measure_speed and key not in self.speed_all:  # once per model, on a machine that is not training
            got = _speed_of(model, self.runs, self.seeds, self.base)
            if got is not None:  # None: no finished run of the model yet to take the input size from
                if got.get("train_note"):
                    self.say(f"arena: speed of {model_label(model)}: {got['train_note']}")
                self.speed_all[key] = got
                write_atomic(self.speed_file, json.dumps(self.speed_all, indent=2) + "\n")

    # -- the pool -------------------------------------------------------------------------------
    def train(self, planned: list[PlannedRun]) -> None:
        """Train the unfinished runs of ``planned`` ``jobs`` at a time, in order (one job: one after
        the other, each model's speed measured after its run, before the next starts). On an
        interrupt, the running children are stopped (SIGINT: they keep their last checkpoint) and
        the interrupt is passed on."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        jobs = self.s.jobs
        self._slots, self._pending, self._active = list(range(jobs)), list(planned), {}
        if self.s.train and jobs > 1:
            self.say(f"arena: {jobs} runs at a time, {self.threads} CPU thread(s) each"
                     + (f", spread over GPUs {', '.join(self.gpus)}" if self.gpus else ""))
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            for _ in range(jobs):
                self._submit_next(pool)
            while self._active:
                done, _ = wait(list(self._active), timeout=1.0, return_when=FIRST_COMPLETED)
                for f in done:
                    run, slot = self._active.pop(f)
                    self._slots.append(slot)
                    rc = f.result()
                    if rc != 0:
                        self.failed(run, rc)
                    elif self.between_runs and not run.pretraining:
                        self.measure(run.model)  # between runs: an idle machine
                    while self._slots and self._submit_next(pool):  # a pretraining may free several runs
                        pass
        except KeyboardInterrupt:
            self._stop_children()
            raise
        finally:
            pool.shutdown(wait=True)

    def _submit_next(self, pool) -> bool:
        """Start the next pending run that is neither finished nor of a failed model, and whose pretraining (if
        it needs one) has finished; runs waiting for a pretraining in progress stay pending. Returns whether
        one started."""
        for run in list(self._pending):
            if run.needs is not None and not (run.needs / "summary.json").exists():
                why = self.pretrain_failures.get(run.needs)
                if why:
                    self.failures.setdefault(run.model, f"its pretraining failed: {why}")
                elif self.s.train:
                    continue  # its pretraining is running or pending: wait
            self._pending.remove(run)
            if run.model in self.failures and not run.pretraining:
                continue
            if (run.dir / "summary.json").exists():
                self.say(f"{run.tag} finished earlier, skipped")
                if self.between_runs and not run.pretraining:
                    self.measure(run.model)
                continue
            if not self.s.train:
                continue
            self.start(run)
            slot = self._slots.pop(0)
            gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
            future = pool.submit(train_in_child, run.dir, run.tag, self.quiet, self.threads, self._running, gpu)
            self._active[future] = (run, slot)
            return True
        return False

    def _stop_children(self) -> None:
        """SIGINT to every running child, then up to 30 s for them to end; those left are killed."""
        for proc in list(self._running):  # a Ctrl-C reached them already; a signal to the arena alone did not
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        for proc in list(self._running):
            with contextlib.suppress(Exception):
                proc.wait(timeout=max(0.1, deadline - time.time()))
            if proc.poll() is None:
                proc.kill()


def _speed_key(model: str, base: Config) -> str:
    """speed.json's key of a model's figures: what they depend on (a training step also on the task: a task
    other than classification adds its name, so that figures measured before tasks existed stay valid)."""
    key = f"{model}|{base.data.img_size}|{base.train.batch_size}|{base.train.device}"
    return key if base.task == "classification" else f"{key}|{base.task}"


def _speed_of(model: str, runs: Path, seeds: list[int], base: Config) -> dict | None:
    """Inference and training images/s at the input the runs saw, at the arena's batch size, on the device a
    finished run trained on: inference is the model's forward pass (channels and classes from the run's
    summary); training is the run's task's own step (:func:`task_train_speed`, from the run's configuration).
    Where the task cannot take a step on random data, the model alone is timed as a classifier and
    ``train_note`` says so and why."""
    from ..config import load_run_config
    for seed in seeds:
        run_dir = runs / model_slug(model) / f"seed{seed}"
        path = run_dir / "summary.json"
        if path.exists():
            sm = json.loads(path.read_text())
            device, batch = sm.get("device", "cpu"), base.train.batch_size
            cfg = load_run_config(run_dir)
            args = (cfg.model.name, sm["img_size"], sm["in_chans"], sm["num_classes"], device, batch)
            got = {"infer": measure_speed(*args, model_kwargs=dict(cfg.model.kwargs))}
            try:
                got["train"] = task_train_speed(cfg, device, batch)
            except Exception as e:  # noqa: BLE001 - any task's failure: the model alone is timed instead
                why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                got["train"] = measure_speed(*args, train=True, model_kwargs=dict(cfg.model.kwargs))
                got["train_note"] = (f"task {cfg.task!r} could not take a training step on random data ({why}); "
                                     f"timed as the model alone: forward, cross-entropy, backward, AdamW")
            return got
    return None
