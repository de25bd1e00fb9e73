"""Arena entries that start from masked image modeling: ``MODEL@METHOD`` and ``MODEL@METHOD-probe``.

An arena compares its entries under one recipe, data, budget and seeds. An entry ``nano_vit@mae`` is
``nano_vit`` fine-tuned from an MAE pretraining of itself, ``nano_vit@mae-probe`` a linear probe
(``model.freeze: backbone``) on the same pretraining, and ``nano_vit`` alone the model from scratch, so that
scratch against SimMIM against MAE is one arena and one report::

    mixlab arena nano_vit nano_vit@simmim nano_vit@mae nano_vit@mae-probe --data fashion-mnist --img-size 32 \\
        --pretrain-epochs 5 --set data.limit_train=5000

Each (model, method) is pretrained once, however many entries and seeds start from it, in
``pretrain/<model>-<method>/`` of the arena directory (a training run like the others: it resumes, its
``pictures/`` show its reconstructions), before the runs that start from it:

- task ``mim`` with the method's recipe (``simmim``, ``mae``: the papers' optimiser and augmentation), seed 0;
- the arena's dataset, image size, device, batch size (``--batch-size``; else the method's recipe's),
  validation images, model keyword arguments, checkpoint and log settings, but **all** its training images
  and none of the arena's other ``--set`` overrides, which are the labelled runs' (``data.limit_train=5000``
  labelled images of 60,000 is the usual question: does pretraining on every image help where labels are
  few?); ``--pretrain-set KEY=VALUE`` sets keys of the pretraining alone;
- ``--pretrain-epochs`` epochs (default: the arena's), the recipe's warm-up shortened in proportion when
  they are fewer than the recipe's (SimMIM's 10 of 100 epochs: 0.5 of 5), unless ``--pretrain-set`` gives one.

A pretraining directory keeps its configuration: a rerun with other pretraining settings is refused once it
has started (as a run's is), and another pretraining needs another ``--out``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from ..config import RUN_CONFIG, SECTIONS, Config, ConfigError, build_config, config_from_dict, load_run_config
from ..engine.trainer import model_slug

PRETRAIN_DIR = "pretrain"
PROBE = "-probe"
_SUFFIX = re.compile(r"^[A-Za-z0-9_]+(-probe)?$")


class Entry(NamedTuple):
    """One name of an arena's line-up: the architecture, and the pretraining it starts from (if any)."""

    name: str                  # as the line-up gives it
    model: str                 # the architecture (a registered name, a spec string or file)
    method: str | None = None  # simmim | mae: fine-tuned (or probed) from that pretraining; None: from scratch
    probe: bool = False        # a linear probe on the pretrained backbone

    @property
    def pretrains(self) -> tuple[str, str] | None:
        """(model, method) of the pretraining it needs, or None."""
        return (self.model, self.method) if self.method else None


def methods() -> tuple[str, ...]:
    """The pretraining methods an entry may name: the choices of ``mim.method``."""
    return tuple(SECTIONS["mim"].choices["method"])


def parse_entry(name: str) -> Entry:
    """``MODEL``, ``MODEL@METHOD`` or ``MODEL@METHOD-probe``; a ConfigError naming the methods for an unknown
    one. A spec string or file containing ``@`` elsewhere is the model's name."""
    model, at, suffix = name.rpartition("@")
    if not at or not model or not _SUFFIX.match(suffix):
        return Entry(name, name)
    probe = suffix.endswith(PROBE)
    method = suffix[: -len(PROBE)] if probe else suffix
    if method not in methods():
        forms = ", ".join(f"{model}@{m}" for m in methods())
        raise ConfigError(f"{name}: {method!r} is not a pretraining method; an arena entry is MODEL (from scratch), "
                          f"MODEL@METHOD (fine-tuned from that pretraining: {forms}) or MODEL@METHOD-probe (a "
                          f"linear probe on it)")
    return Entry(name, model, method, probe)


def pretrain_dir(out: Path, model: str, method: str) -> Path:
    """Where an arena in ``out`` pretrains ``model`` by ``method``."""
    return Path(out) / PRETRAIN_DIR / model_slug(f"{model}@{method}")


def pretrain_config(base: Config, model: str, method: str, epochs: int | None = None,
                    batch_size: int | None = None, overrides=()) -> Config:
    """The configuration of the arena's pretraining of ``model`` by ``method`` (the module's docstring says
    what it takes from the arena ``base`` and what not); a ConfigError where ``overrides`` are wrong."""
    b = base.to_dict()
    data = {k: v for k, v in b["data"].items() if k != "limit_train"}  # every training image
    flags = {"task": "mim", "mim": {"method": method}, "data": data, "checkpoint": b["checkpoint"], "log": b["log"],
             "model": {"name": model, "kwargs": b["model"]["kwargs"], "layer_scale": b["model"]["layer_scale"]},
             "train": {"device": b["train"]["device"], "seed": 0}}
    if batch_size:
        flags["train"]["batch_size"] = batch_size
    recipe = build_config(flags, recipe=method)
    epochs = epochs or base.train.epochs
    if epochs < 1:
        raise ConfigError(f"--pretrain-epochs must be at least 1, got {epochs}")
    flags["train"]["epochs"] = epochs
    if epochs < recipe.train.epochs:  # the recipe's warm-up, the same share of a shorter schedule
        flags["schedule"] = {"warmup_epochs": recipe.schedule.warmup_epochs * epochs / recipe.train.epochs}
    try:
        return build_config(flags, recipe=method, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(f"the pretraining of {model} by {method} (--pretrain-set): {e}") from None


def check_pretraining(cfg: Config) -> None:
    """Build the pretraining's module once (on the CPU), so that a model the method cannot take (MAE of a
    hierarchical model, an image size its stride does not divide) is refused before anything trains."""
    from ..engine.tasks import build_task
    from ..factory import create_model
    d = cfg.to_dict()
    cpu = config_from_dict({**d, "train": {**d["train"], "device": "cpu"}})
    task = build_task(cpu)
    task.setup(create_model(cpu.model.name, **task.model_kwargs(task.data_info())))


def _comparable(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("output_dir", None)
    return d


def prepare_dir(run_dir: Path, cfg: Config) -> None:
    """Write the pretraining's configuration into ``run_dir``; one that holds another is refused once that
    has trained (a checkpoint or a summary), and replaced before."""
    path = run_dir / RUN_CONFIG
    if path.exists():
        old = load_run_config(run_dir)
        if _comparable(old) == _comparable(cfg):
            return
        started = (run_dir / "summary.json").exists() or any((run_dir / "checkpoints").glob("ckpt-*"))
        if started:
            diff = first_difference(_comparable(old), _comparable(cfg))
            raise ConfigError(f"{run_dir} holds a pretraining with other settings ({diff}); rerun with the "
                              f"--pretrain-epochs, --pretrain-set and --batch-size it was started with, or "
                              f"choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(path)


def pretraining_summary(run_dir: Path) -> dict | None:
    """What the report says of a finished pretraining: method, epochs, final and best reconstruction
    loss, wall time, and its newest picture; None while it has not finished."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    sm = json.loads(path.read_text())
    cfg = load_run_config(run_dir)
    pictures = sorted((run_dir / "pictures").glob("*.png"))
    out = {"run": str(run_dir), "method": cfg.mim.method, "epochs": cfg.train.epochs,
           "val_loss": sm.get("val_loss"),
           "best_val_loss": sm.get("best_val_loss"), "wall_s": sm.get("wall_s")}
    if pictures:
        out["picture"] = str(pictures[-1])
    return out


def first_difference(a, b, path: str = "") -> str:
    """The first key where two nested settings differ, as ``key.sub: OLD then, NEW now`` (what a refusal to mix
    settings in one directory says)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {a!r} then, {b!r} now"
