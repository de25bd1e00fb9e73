"""Training checkpoints: the training state beside the weights, and a directory of them.

* :func:`save_state` / :func:`load_state`: optimizer, scheduler, EMA, counters, RNG states with
  ``torch.save``, refusing anything that ``torch.load(weights_only=True)`` could not read back;
* :func:`rng_state` / :func:`set_rng_state`: the random streams of ``random``, numpy and torch;
* :class:`CheckpointManager`: numbered checkpoints in a directory, rotation, best tracking.

The weights files themselves are the checkpoint room's (:mod:`mixlab.weights`: ``save_weights``,
``load_weights``, ``check_compatible``, ``CheckpointError``).

Every file is written atomically (:func:`mixlab.fileio.atomic_write`): a crash leaves either
the old file or the new one, never half a file.
"""
from __future__ import annotations

import collections
import json
import math
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..config import ConfigError
from ..fileio import atomic_write, write_json
from ..weights import CheckpointError, load_weights, save_weights

__all__ = ["save_state", "load_state", "rng_state", "set_rng_state", "CheckpointManager", "run_weights"]

PathLike = str | os.PathLike


# -- training state --------------------------------------------------------------------------------
#: exact types that torch.load(weights_only=True) reads back (checked by the tests)
_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Tensor, nn.Parameter,
               torch.Size, torch.dtype, torch.device)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value under ``where`` that weights_only cannot load."""
    kind = type(obj)
    if kind in _LEAF_TYPES or kind in torch.serialization.get_safe_globals():
        return
    if kind in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_loadable(k, f"{where} (key {k!r})")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if kind in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    hint = ""
    if isinstance(obj, np.ndarray):
        hint = "; convert it with torch.from_numpy() or .tolist()"
    elif isinstance(obj, np.generic):
        hint = "; convert it with .item()"
    elif callable(obj):
        hint = "; functions and lambdas cannot be saved: store the numbers they are built from"
    elif isinstance(obj, torch.Tensor):
        hint = "; save a plain tensor (e.g. t.as_subclass(torch.Tensor))"
    raise TypeError(f"save_state: {where} is a {kind.__module__}.{kind.__qualname__}, which "
                    f"torch.load(weights_only=True) cannot load back; allowed are tensors, numbers, strings, "
                    f"bytes, None, torch.Size/dtype/device, and dicts, lists, tuples and sets of them{hint}")


def save_state(state: Mapping[str, Any], path: PathLike) -> None:
    """``torch.save(state, path)`` atomically, after checking every value can be loaded back
    with ``torch.load(weights_only=True)`` (a :class:`TypeError` names the first one that cannot)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"save_state expects a dict, got a {type(state).__name__}")
    state = dict(state)
    _check_loadable(state, "state")

    # torch.save writes to the path itself, not through a Python file object: a Ctrl-C then stays a
    # KeyboardInterrupt, where the zip writer would turn it, raised inside the file object's write,
    # into a failed-write RuntimeError that reads like a full disk
    atomic_write(path, lambda tmp: torch.save(state, str(tmp)))


def load_state(path: PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``, onto the CPU by default (optimizers move their
    state to their parameters' device on ``load_state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file at {str(path)!r}")
    return torch.load(path, map_location=map_location, weights_only=True)


# -- random number generators ---------------------------------------------------------------------
def rng_state() -> dict:
    """The states of Python's ``random``, numpy's global generator, torch's CPU generator and
    (when CUDA is available) every CUDA device's generator, as tensors, numbers and lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`. CUDA states are restored for the
    devices present (a state saved on more GPUs restores the first ones)."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"not an rng_state() dict: missing {', '.join(missing)} (it has {', '.join(map(str, state))})")
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy() if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"])
    np.random.set_state((n["name"], keys.astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


# -- a directory of checkpoints --------------------------------------------------------------------
class CheckpointManager:
    """Numbered checkpoints of one training run in ``directory``.

    Each checkpoint is two files: ``ckpt-{step:08d}.safetensors`` (the model weights and
    string metadata) and ``ckpt-{step:08d}.state.pt`` (the training state). The state file
    is written second, so a checkpoint is *complete* only when both exist; after both,
    ``latest.json`` is updated (for people and tools; :meth:`latest` scans the files).

    Args:
        directory: created by the first save (reading an absent one finds no checkpoint and writes nothing).
        keep_last: how many complete checkpoints to keep (>= 1). Older ones are deleted
            after a new one is complete, never before; the one just written is always kept.
        keep_best: hard-link (or copy) the weights of the checkpoint with the best
            ``metric`` to ``best.safetensors``, described by ``best.json``
            (``metric``, ``epoch``, ``step``, ``checkpoint``).
        mode: ``"max"`` (accuracy) or ``"min"`` (loss): which direction improves.

    The directory is meant to hold one run written by one process: steps increase, and
    "latest" means the complete checkpoint with the highest step.
    """

    WEIGHTS_SUFFIX = ".safetensors"
    STATE_SUFFIX = ".state.pt"
    PREFIX = "ckpt-"

    def __init__(self, directory: PathLike, keep_last: int = 2, keep_best: bool = True, mode: str = "max"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the checkpoints to keep for resuming), got {keep_last}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (higher metric is better) or 'min' (lower is better), got {mode!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.mode = mode
        self._best: dict | None = None
        best_json = self.directory / "best.json"
        if keep_best and best_json.is_file():
            try:
                self._best = json.loads(best_json.read_text())
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"ignoring unreadable {best_json} ({e}); the best metric starts afresh")
            if self._best is not None and self._best.get("mode", mode) != mode:
                warnings.warn(f"{best_json} was written with mode={self._best['mode']!r}, this manager uses "
                              f"mode={mode!r}; the best metric starts afresh")
                self._best = None

    # -- paths ----------------------------------------------------------------------------------
    def stem(self, step: int) -> Path:
        """The stem path of the checkpoint of ``step`` (``<dir>/ckpt-00000123``)."""
        return self.directory / f"{self.PREFIX}{step:08d}"

    @classmethod
    def _files(cls, stem: Path) -> tuple[Path, Path]:
        return stem.with_name(stem.name + cls.WEIGHTS_SUFFIX), stem.with_name(stem.name + cls.STATE_SUFFIX)

    def _scan(self) -> dict[int, dict[str, bool]]:
        """step -> which of the two files exist, for every ``ckpt-*`` file in the directory."""
        found: dict[int, dict[str, bool]] = {}
        for p in self.directory.glob(f"{self.PREFIX}*"):
            for kind, suffix in (("weights", self.WEIGHTS_SUFFIX), ("state", self.STATE_SUFFIX)):
                digits = p.name[len(self.PREFIX):-len(suffix)] if p.name.endswith(suffix) else ""
                if digits.isdigit():
                    found.setdefault(int(digits), {"weights": False, "state": False})[kind] = True
        return found

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(s for s, f in self._scan().items() if f["weights"] and f["state"])

    def latest(self) -> Path | None:
        """The stem path of the newest complete checkpoint, or None (partial ones are ignored)."""
        steps = self.complete_steps()
        return self.stem(steps[-1]) if steps else None

    @property
    def best_metric(self) -> float | None:
        """The best metric saved so far (also after a restart, from ``best.json``), or None."""
        return None if self._best is None else self._best.get("metric")

    def _improves(self, metric: float | None) -> bool:
        if metric is None or not math.isfinite(metric):
            return False
        best = self.best_metric
        return best is None or (metric > best if self.mode == "max" else metric < best)

    # -- save / load ----------------------------------------------------------------------------
    def save(self, model_state: Mapping[str, torch.Tensor], train_state: Mapping[str, Any], *, epoch: int, step: int,
             metric: float | None = None, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the checkpoint of ``step`` and return its stem path.

        ``metadata`` (strings) goes into the safetensors header together with ``epoch``,
        ``step``, ``metric`` (if given) and a ``checkpoint_id`` that ties the two files
        together. Then ``latest.json`` is updated, the best weights if ``metric`` improves,
        and finally old checkpoints beyond ``keep_last`` (and partial ones older than this)
        are deleted.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        stem = self.stem(step)
        weights_path, state_path = self._files(stem)
        ckpt_id = uuid.uuid4().hex
        meta = dict(metadata or {})
        meta.update(epoch=str(epoch), step=str(step), checkpoint_id=ckpt_id)
        if metric is not None:
            meta["metric"] = repr(float(metric))
        newer = [s for s in self.complete_steps() if s > step]
        if newer:
            warnings.warn(f"{self.directory} already holds checkpoints of later steps ({newer}); latest() will "
                          f"keep returning step {newer[-1]} until this run passes it")

        # check the state before writing anything, so a bad state leaves no partial checkpoint
        train_state = dict(train_state)
        _check_loadable(train_state, "train_state")
        state = {"train_state": train_state, "epoch": int(epoch), "step": int(step),
                 "metric": None if metric is None else float(metric), "checkpoint_id": ckpt_id}
        save_weights(model_state, weights_path, meta)
        save_state(state, state_path)  # the checkpoint is complete from here on
        write_json(self.directory / "latest.json",
                    {"checkpoint": stem.name, "epoch": state["epoch"], "step": step, "metric": state["metric"]})
        if self.keep_best and self._improves(state["metric"]):
            self._save_best(weights_path, state["metric"], state["epoch"], step, stem.name)
        self._rotate(keep=step)
        return stem

    def _save_best(self, weights_path: Path, metric: float, epoch: int, step: int, name: str) -> None:
        def link_or_copy(tmp: Path) -> None:
            tmp.unlink()
            try:
                os.link(weights_path, tmp)  # no copy: the inode outlives the rotated checkpoint
            except OSError:
                shutil.copyfile(weights_path, tmp)

        atomic_write(self.directory / "best.safetensors", link_or_copy)
        self._best = {"metric": metric, "epoch": epoch, "step": step, "checkpoint": name, "mode": self.mode}
        write_json(self.directory / "best.json", self._best)

    def _rotate(self, keep: int) -> None:
        """Delete complete checkpoints beyond ``keep_last`` (never step ``keep``) and partial
        checkpoints older than ``keep``."""
        found = self._scan()
        complete = sorted(s for s, f in found.items() if f["weights"] and f["state"])
        others = [s for s in complete if s != keep]
        survivors = set(others[max(0, len(others) - (self.keep_last - 1)):] if self.keep_last > 1 else []) | {keep}
        doomed = [s for s in complete if s not in survivors]
        doomed += [s for s, f in found.items() if not (f["weights"] and f["state"]) and s < keep]
        for s in doomed:
            weights_path, state_path = self._files(self.stem(s))
            state_path.unlink(missing_ok=True)  # the state first: a half-deleted checkpoint is partial
            weights_path.unlink(missing_ok=True)

    def _resolve(self, path: PathLike | None) -> Path:
        if path is None:
            stem = self.latest()
            if stem is None:
                raise CheckpointError(f"no complete checkpoint in {str(self.directory)!r} (a checkpoint needs both "
                                      f"ckpt-<step>{self.WEIGHTS_SUFFIX} and ckpt-<step>{self.STATE_SUFFIX})")
            return stem
        p = Path(path)
        for suffix in (self.STATE_SUFFIX, self.WEIGHTS_SUFFIX):
            if p.name.endswith(suffix):
                p = p.with_name(p.name[: -len(suffix)])
                break
        inside = self.directory / p
        if not p.is_absolute() and not any(f.exists() for f in self._files(p)) \
                and any(f.exists() for f in self._files(inside)):
            return inside  # a name relative to the checkpoint directory
        return p

    def load(self, path: PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
        """``(weights, train_state, metadata)`` of a checkpoint: the newest complete one by
        default, or the one named by ``path`` (its stem or either of its files)."""
        stem = self._resolve(path)
        weights_path, state_path = self._files(stem)
        absent = [p.name for p in (weights_path, state_path) if not p.is_file()]
        if absent:
            raise CheckpointError(f"checkpoint {str(stem)!r} is incomplete or does not exist: {', '.join(absent)} "
                                  f"missing; complete checkpoints: "
                                  f"{[self.stem(s).name for s in self.complete_steps()]}")
        weights, metadata = load_weights(weights_path)
        state = load_state(state_path)
        if not isinstance(state, dict) or "train_state" not in state:
            raise CheckpointError(f"{str(state_path)!r} was not written by CheckpointManager.save")
        ids = metadata.get("checkpoint_id"), state.get("checkpoint_id")
        if ids[0] and ids[1] and ids[0] != ids[1]:
            raise CheckpointError(f"the two files of {str(stem)!r} come from different saves (a save of the same "
                                  f"step was interrupted); resume from another checkpoint")
        return weights, state["train_state"], metadata


def run_weights(path: PathLike, use_ema: bool = False) -> tuple[Path, Path]:
    """``(run directory, weights file)`` of a run directory (its ``best.safetensors``; with ``use_ema``,
    or when it has no best yet, its newest checkpoint's, whose training state holds the EMA weights) or
    of one of its checkpoint files; a ConfigError when there is none."""
    path = Path(path)
    if path.is_dir():
        run_dir, weights_path = path, path / "checkpoints" / "best.safetensors"
        if use_ema or not weights_path.exists():
            latest = CheckpointManager(path / "checkpoints").latest()
            if latest is None:
                raise ConfigError(f"{path} has no checkpoint (checkpoints/best.safetensors or ckpt-*): give the "
                                  f"directory of a mixlab run that has trained at least one epoch")
            weights_path = latest.with_name(latest.name + CheckpointManager.WEIGHTS_SUFFIX)
    else:
        weights_path, run_dir = path, path.parent.parent
    if not weights_path.exists():
        raise ConfigError(f"checkpoint {str(weights_path)!r} does not exist")
    return run_dir, weights_path
