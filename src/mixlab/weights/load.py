"""Loading checkpoints into mixlab models with clear errors.

:func:`load_pretrained`: read (:func:`~mixlab.weights.io.read_checkpoint`), convert
(:func:`~mixlab.weights.convert.convert_state_dict`), keep the model's own classifier when the
checkpoint's has another number of classes, and load, listing every missing, unexpected and
mis-shaped tensor (:func:`~mixlab.weights.fit.fit_report`) when something does not fit.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .convert import convert_state_dict, detect_format
from .fit import classifier_keys, classifier_prefixes, fit_lines, fit_report, plain_model
from .io import CheckpointError, Source, describe_source, read_checkpoint

__all__ = ["LoadResult", "load_pretrained", "load_state"]

@dataclass
class LoadResult:
    """What :func:`load_pretrained` did.

    ``missing``, ``unexpected`` and ``mismatched`` (``"name: checkpoint shape vs model shape"``)
    are empty after a strict load; ``resized`` names the tensors that the conversion
    resampled to the model's shapes (position embeddings, relative position bias tables);
    ``new_classifier`` is True when the model keeps a freshly initialised classifier because
    the checkpoint's has another number of classes (or none); ``dropped`` lists the
    checkpoint's classifier tensors that were not loaded.
    """
    format: str
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    new_classifier: bool = False
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _stem(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") else parts[-1]


def _resized(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors whose shape the conversion changed (resampled), as far as can be told from outside:
    same name or same storage with another shape, or a new tensor whose shape none of the
    source tensors with the same trailing name has."""
    by_storage = {}
    by_stem: dict[str, set] = {}
    for k, t in source.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), t)
        by_stem.setdefault(_stem(k), set()).add(tuple(t.shape))
    out = []
    for k, t in converted.items():
        origin = source.get(k)
        if origin is None:
            origin = by_storage.get((t.untyped_storage().data_ptr(), t.storage_offset()))
        if origin is not None:
            if origin.numel() != t.numel():
                out.append(k)
        elif _stem(k) in by_stem and tuple(t.shape) not in by_stem[_stem(k)]:
            out.append(k)
    return out


def _convert(state_dict: Mapping[str, torch.Tensor], model: nn.Module, model_sd: Mapping[str, torch.Tensor],
             prefixes: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """``(format, state dict in the model's names)``.

    A checkpoint whose every name is one of the model's is mixlab's own: it is passed to the
    converter only when a shape differs (to resample position embeddings), and kept as it is
    when the converter cannot place it. Another one goes to the converter; when that does not
    recognise the layout but most names are the model's, it is taken as a mixlab checkpoint
    with a few stray or missing tensors, which the loader then lists.
    """
    names = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    known = sum(k in model_sd for k in names)
    classifier = set(classifier_keys(model_sd, prefixes)) | set(classifier_keys(state_dict, prefixes))
    if known == len(names) and all(state_dict[k].shape == model_sd[k].shape for k in names if k not in classifier):
        return "mixlab", dict(state_dict)
    try:
        return detect_format(dict(state_dict)), dict(convert_state_dict(dict(state_dict), model))
    except ValueError:
        if names and known >= len(names) / 2:
            return "mixlab", dict(state_dict)
        raise


def load_pretrained(model: nn.Module, source: Source, strict: bool = True,
                    num_classes_from_checkpoint: bool = False) -> LoadResult:
    """Load the weights of ``source`` (see :func:`read_checkpoint`) into ``model``.

    The checkpoint is converted to mixlab's names (timm's and the authors' layouts; position
    embeddings and relative position bias tables resampled to the model). When its classifier
    has another number of classes than the model's (or there is none), the model keeps its
    freshly initialised classifier and a warning says so; with
    ``num_classes_from_checkpoint=True`` the model's classifier is instead rebuilt with the
    checkpoint's number of classes and loaded.

    With ``strict=True`` any missing, unexpected or mis-shaped tensor raises a
    :class:`~mixlab.weights.io.CheckpointError` (a ValueError) listing them all (BatchNorm's
    ``num_batches_tracked`` counters excepted); with ``strict=False`` what fits is loaded and the
    rest is reported in the returned :class:`LoadResult`. ``model`` may be wrapped (``features_only``, DDP, ``torch.compile``).
    """
    state_dict, metadata = read_checkpoint(source)
    return load_state(model, state_dict, metadata, describe_source(source), strict=strict,
                      num_classes_from_checkpoint=num_classes_from_checkpoint, stacklevel=3)


def load_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               source: str = "<state dict>", strict: bool = True, num_classes_from_checkpoint: bool = False,
               architecture_kwargs: Mapping | None = None, stacklevel: int = 2) -> LoadResult:
    """:func:`load_pretrained` for a checkpoint already read by :func:`read_checkpoint`
    (``architecture_kwargs``: what the checkpoint asked for, shown in errors; ``stacklevel``:
    of the classifier warning)."""
    model = plain_model(model)
    metadata = dict(metadata or {})
    prefixes = classifier_prefixes(model)
    model_sd = model.state_dict()
    fmt, converted = _convert(state_dict, model, model_sd, prefixes)
    result = LoadResult(format=fmt, source=source, metadata=metadata, resized=_resized(state_dict, converted))

    # -- the classifier --------------------------------------------------------------------------
    ours, theirs = classifier_keys(model_sd, prefixes), classifier_keys(converted, prefixes)
    fresh: list[str] = []  # the model's classifier tensors that keep their initialisation
    n_model = model_sd["head.fc.weight"].shape[0] if "head.fc.weight" in model_sd else 0
    w = converted.get("head.fc.weight")
    if num_classes_from_checkpoint and w is not None and w.ndim == 2 and w.shape[0] != n_model and (
            n_model == 0 or w.shape[1:] == model_sd["head.fc.weight"].shape[1:]):
        model.reset_classifier(w.shape[0])  # the checkpoint's number of classes
        model_sd = model.state_dict()
        ours, n_model = classifier_keys(model_sd, prefixes), w.shape[0]
    if not ours:  # the model has no classifier (num_classes=0, features_only): drop the checkpoint's
        result.dropped = theirs
    elif not theirs:
        fresh = ours
        warnings.warn(f"the checkpoint {source} has no classifier: a new classifier of {n_model} classes was "
                      f"initialised (fine-tune it)", stacklevel=stacklevel)
    else:
        differ = [k for k in theirs if k in model_sd and converted[k].shape != model_sd[k].shape]
        same_features = all(converted[k].shape[1:] == model_sd[k].shape[1:] for k in differ)
        if differ and same_features:
            n_ckpt = converted[differ[0]].shape[0] if w is None else w.shape[0]
            result.dropped = [k for k in theirs if k in model_sd]
            fresh = ours
            warnings.warn(f"a new classifier of {n_model} classes was initialised because the checkpoint {source} "
                          f"has {n_ckpt} (fine-tune it; num_classes={n_ckpt} loads the checkpoint's)",
                          stacklevel=stacklevel)
    for k in result.dropped:
        converted.pop(k)
    result.new_classifier = bool(fresh)

    # -- compare with the model --------------------------------------------------------------------
    report = fit_report(model_sd, converted, prefixes, exempt=fresh)
    result.missing, result.unexpected, result.mismatched = report.missing, report.unexpected, report.mismatched
    if strict and report:
        raise CheckpointError(_mismatch_message(model, result, fit_lines(report), architecture_kwargs))

    final = {k: v for k, v in converted.items() if k in model_sd and v.shape == model_sd[k].shape}
    for k in model_sd:  # counters and the fresh classifier: the model's own values
        if k not in final and (k.endswith("num_batches_tracked") or k in fresh):
            final[k] = model_sd[k]
    model.load_state_dict(final, strict=strict)
    return result


def _mismatch_message(model: nn.Module, r: LoadResult, fit: list[str], arch_kwargs: Mapping | None) -> str:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    lines = [f"the checkpoint {r.source} does not fit the model {name!r} (detected checkpoint format: {r.format}):",
             *fit]
    ckpt_arch = r.metadata.get("architecture")
    if ckpt_arch and ckpt_arch != name:
        lines.append(f"  - the checkpoint's metadata says it is for {ckpt_arch!r}")
    kw = dict(arch_kwargs or {})
    lines.append("check: that the model name (and size) is the checkpoint's architecture; that the architecture "
                 "keyword arguments agree with it (" + (f"the checkpoint asked for {kw}" if kw else
                                                         "none were derived from the checkpoint") +
                 f"); that the detected format ({r.format}) is right. load_pretrained(..., strict=False) "
                 f"loads only what fits.")
    return "\n".join(lines)

