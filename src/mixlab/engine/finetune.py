"""Fine-tuning and linear probes: the weights a run starts from (``model.pretrained``) and the
frozen backbone of a linear probe (``model.freeze: backbone``). See docs/finetuning.md.

:func:`load_source` loads a run directory's best checkpoint, a weights file or a Hub id into a
freshly built model through :func:`mixlab.weights.load_state` (timm's and the authors' layouts
converted, position embeddings and relative-position tables resampled); the classifier is kept
when it classifies the run's classes, and freshly initialised when the source has another number
of classes or records other class names. Anything else that does not fit is a ConfigError listing
it. :func:`freeze_backbone` leaves only the classifier head(s) trainable and names the modules
that stay in eval mode during training (so that BatchNorm statistics and dropout of the frozen
backbone do not move or act).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from ..config import ConfigError
from ..weights import describe_source, load_state, metadata_config, read_checkpoint
from ..weights.fit import classifier_keys, classifier_prefixes, plain_model
from ..weights.io import DROPPED_KEY, HUB_PREFIX
from .checkpoint import run_weights

__all__ = ["load_source", "describe", "freeze_backbone"]


def _weights_of(source: str) -> tuple[str, str]:
    """``(kind, what to read)``: a run directory's best checkpoint, a weights file, or a Hub id."""
    if source.startswith(HUB_PREFIX):
        return "hub", source
    path = Path(source)
    if path.is_dir():
        try:
            return "run", str(run_weights(path)[1])
        except ConfigError as e:
            raise ConfigError(f"model.pretrained: {e}") from None
    return "file", source  # read_checkpoint says what is wrong with a missing or unreadable file


def load_source(model: nn.Module, source: str, classes: Sequence[str], model_name: str,
                img_size: int | None = None) -> tuple[dict, list[str]]:
    """Load the weights of ``source`` (``model.pretrained``) into ``model`` (``model_name``), built for the
    run's data whose class names are ``classes`` and input side ``img_size``; returns ``(description, notes)``.

    The classifier is kept when the source's has the model's number of classes and, where the source
    records class names (mixlab's runs and converted files do), the same names in the same order;
    otherwise it keeps its fresh initialisation. The description (``summary.json``'s ``pretrained``)
    holds ``source``, ``kind`` (run | file | hub), ``weights`` (the file read), ``format`` (mixlab,
    timm, ...), ``architecture`` (what the source records, or None), ``head`` (kept | fresh),
    ``head_reason`` and ``resized`` (tensors resampled to the model). ``notes`` are the loader's other
    remarks and a word where the source records another input size than ``img_size``, for the log. A
    source that cannot be read or does not fit is a ConfigError listing every missing, unexpected and
    mis-shaped tensor.
    """
    kind, weights = _weights_of(source)
    with warnings.catch_warnings(record=True) as read_notes:
        warnings.simplefilter("always")
        try:
            state_dict, metadata = read_checkpoint(weights)  # a task run's module: its model only (and a note)
        except ValueError as e:  # CheckpointError, or a Hub id that cannot be fetched
            raise ConfigError(f"model.pretrained: {e}") from None
    dropped = json.loads(metadata.get(DROPPED_KEY, "[]"))
    recorded = metadata_config(metadata)
    theirs, ours = recorded.get("classes"), [str(c) for c in classes]
    reason = None
    if theirs is not None and len(theirs) == len(ours) and list(theirs) != ours:
        # the same number of classes, other ones: the source's classifier would score other labels
        differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
        reason = (f"the source was trained on other classes ({'; '.join(differ[:3])}"
                  + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "") + ")")
        for k in classifier_keys(state_dict, classifier_prefixes(plain_model(model))):
            state_dict.pop(k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load_state(model, state_dict, metadata, describe_source(source), strict=True,
                                architecture_kwargs=recorded.get("model_kwargs"))
        except ValueError as e:
            architecture = metadata.get("architecture")
            if architecture and architecture != model_name:  # the likely cause, said first
                raise ConfigError(f"model.pretrained: {source} holds a {architecture} and this run's model is "
                                  f"{model_name}: its weights do not fit (set model.name / --model to {architecture}, "
                                  f"or start from weights of {model_name}). {e}") from None
            raise ConfigError(f"model.pretrained: {e}") from None
    if result.new_classifier and reason is None:
        n_source = recorded.get("num_classes") or (len(theirs) if theirs else "another number of")
        reason = (f"the source classifies {n_source} classes, the data has {len(ours)}" if result.dropped
                  else "the source has no classifier")
    architecture = metadata.get("architecture")
    notes = [str(w.message) for w in [*read_notes, *caught] if "classifier" not in str(w.message)]
    if architecture and architecture != model_name:
        notes.append(f"the source records the architecture {architecture!r}; its tensors fit {model_name!r}")
    size = recorded.get("input_size")
    if img_size is not None and size is not None and tuple(size[1:]) != (img_size, img_size):
        notes.append(f"the source was trained at {size[1]}x{size[2]} px, this run's input is {img_size}x{img_size} "
                     f"(data.img_size, --img-size {size[1]} to match)")
    description = {"source": source, "kind": kind, "weights": weights, "format": result.format,
                   "architecture": architecture, "head": "fresh" if result.new_classifier else "kept",
                   "head_reason": reason, "resized": list(result.resized), "task": metadata.get("task"),
                   "dropped": dropped}
    return description, notes


def describe(pretrained: dict) -> str:
    """One line on what a run started from, for the log."""
    what = {"run": "the run", "file": "the weights file", "hub": "the Hub weights"}[pretrained["kind"]]
    arch = f" ({pretrained['architecture']})" if pretrained.get("architecture") else ""
    head = ("its classifier kept" if pretrained["head"] == "kept"
            else f"a fresh classifier: {pretrained['head_reason']}")
    resized = f"; resampled to this model: {', '.join(pretrained['resized'])}" if pretrained.get("resized") else ""
    dropped = (f"; took the {pretrained.get('task') or 'task'} run's backbone and left out "
               f"{', '.join(pretrained['dropped'])}" if pretrained.get("dropped") else "")
    return (f"starting from {what} {pretrained['source']}{arch}, {pretrained['format']} layout, {head}{resized}"
            f"{dropped}")


def freeze_backbone(model: nn.Module) -> list[nn.Module]:
    """Freeze every parameter of ``model`` but its classifier head(s) (:func:`classifier_prefixes`:
    ``head.fc``, ``head_dist``, ...); return the modules to put back in eval mode whenever the model
    is put in train mode: all but the classifiers and the modules holding them. A frozen backbone
    then computes fixed features: its BatchNorm statistics do not move and its dropout and drop path
    do not act. A ConfigError when the model has no classifier."""
    plain = plain_model(model)
    modules = dict(plain.named_modules())
    heads = [p for p in classifier_prefixes(plain) if isinstance(modules.get(p), nn.Module)
             and any(True for _ in modules[p].parameters())]
    if not heads:
        raise ConfigError(f"model.freeze backbone: {type(plain).__name__} has no classifier head to train "
                          f"(a linear probe trains the classifier only)")

    def inside(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    for name, p in plain.named_parameters():
        p.requires_grad_(inside(name))
    holders = {""} | {".".join(h.split(".")[:i]) for h in heads for i in range(1, h.count(".") + 1)}
    return [m for n, m in modules.items() if n not in holders and not inside(n)]
