"""Whether a state dict fits a model: the one fit report of the checkpoint room.

:func:`fit_report` lists the missing, unexpected and mis-shaped tensors and tells the
classifier apart; :func:`fit_lines` words it. :func:`~mixlab.weights.load.load_state`
(``load_pretrained``, ``create_model(pretrained=...)``) and :func:`check_compatible` (resuming
and evaluating training runs) both report through them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.base import FeatureExtractor, unwrap_model
from .io import CheckpointError

__all__ = ["FitReport", "fit_report", "fit_lines", "check_compatible", "classifier_prefixes", "classifier_keys",
           "plain_model"]

#: BatchNorm's step counters: the loader fills them from the model where a checkpoint has none
COUNTER = "num_batches_tracked"


def plain_model(model: nn.Module) -> nn.Module:
    """The model inside wrappers: DDP, ``torch.compile``, EMA holders and ``features_only``."""
    while True:
        model = unwrap_model(model)
        if isinstance(model, FeatureExtractor):
            model = model.model
        else:
            return model


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the model's classifier(s): ``get_classifier()``'s, mixlab's ``head.fc``,
    DeiT's ``head_dist``, and a plain linear ``head`` / ``fc`` / ``classifier`` of other models."""
    prefixes = []
    if hasattr(model, "get_classifier"):
        fc = model.get_classifier()
        prefixes += [n for n, m in model.named_modules() if m is fc and n]
    prefixes += [n for n in ("head.fc", "head_dist") if n not in prefixes]
    prefixes += [n for n in ("head", "fc", "classifier") if n not in prefixes
                 and isinstance(getattr(model, n, None), nn.Linear)]
    return prefixes


def classifier_keys(state_dict: Mapping, prefixes: list[str]) -> list[str]:
    """The classifier tensors of ``state_dict``: ``<prefix>.weight`` / ``.bias`` that it has."""
    return [f"{p}.{s}" for p in prefixes for s in ("weight", "bias") if f"{p}.{s}" in state_dict]


@dataclass
class FitReport:
    """How a state dict fits a model. ``mismatched``: ``"name: checkpoint shape vs model shape"``;
    ``classifier``: one sentence per classifier tensor that differs (other classes, or none on one side)."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    classifier: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:  # True when something does not fit
        return bool(self.missing or self.unexpected or self.mismatched)


def fit_report(model_sd: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], prefixes: list[str],
               exempt=()) -> FitReport:
    """What of ``state_dict`` does not fit ``model_sd`` (a model's state dict); names in ``exempt``
    and BatchNorm's step counters may be absent from ``state_dict`` (the model keeps its values)."""
    exempt = set(exempt)
    r = FitReport()
    r.missing = [k for k in model_sd if k not in state_dict and k not in exempt and not k.endswith(COUNTER)]
    r.unexpected = [k for k in state_dict if k not in model_sd and not k.endswith(COUNTER)]
    r.mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(model_sd[k].shape)}" for k in model_sd
                    if k in state_dict and tuple(state_dict[k].shape) != tuple(model_sd[k].shape)]
    for prefix in prefixes:
        key = f"{prefix}.weight"
        ours, theirs = model_sd.get(key), state_dict.get(key)
        if ours is not None and theirs is not None and ours.shape[:1] != theirs.shape[:1]:
            r.classifier.append(f"classifier {key}: the checkpoint has {theirs.shape[0]} classes, the model "
                                f"{ours.shape[0]}; build the model with num_classes={theirs.shape[0]}, or drop the "
                                f"checkpoint's {prefix}.* entries and load with strict=False to fine-tune a new head")
        elif ours is None and theirs is not None and theirs.ndim >= 1 and key not in exempt:
            r.classifier.append(f"classifier {key}: the checkpoint has {theirs.shape[0]} classes, the model has no "
                                f"classifier (num_classes=0)")
        elif ours is not None and theirs is None and key in r.missing:
            r.classifier.append(f"classifier {key}: the checkpoint has no classifier, the model has "
                                f"{ours.shape[0]} classes (build it with num_classes=0, or load with strict=False)")
    return r


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "\n      ".join(items[:limit])
    more = f"\n      ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def fit_lines(r: FitReport) -> list[str]:
    """The report as lines ``"  - ..."``: counts, then the names (the first 20 of each kind)."""
    lines = []
    if r.missing:
        lines.append(f"  - {len(r.missing)} missing key(s) (in the model, not in the checkpoint):\n      "
                     + _listing(r.missing))
    if r.unexpected:
        lines.append(f"  - {len(r.unexpected)} unexpected key(s) (in the checkpoint, not in the model):\n      "
                     + _listing(r.unexpected))
        for prefix in ("module.", "_orig_mod."):
            if r.missing and all(k.startswith(prefix) for k in r.unexpected):
                lines.append(f"  - the checkpoint's keys start with {prefix!r} (saved from a wrapped model); "
                             f"strip that prefix, or save the unwrapped model's state_dict()")
    if r.mismatched:
        lines.append(f"  - {len(r.mismatched)} shape mismatch(es) (checkpoint vs model):\n      "
                     + _listing(r.mismatched))
    lines += [f"  - {c}" for c in r.classifier]
    return lines


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Raise :class:`~mixlab.weights.io.CheckpointError` unless ``state_dict`` (in mixlab's names, as
    a training run saves it) loads strictly into ``model``.

    Checked: the architecture (``metadata["architecture"]`` against
    ``model.pretrained_cfg["architecture"]`` when both are set), missing and unexpected
    keys, and shapes; the message is :func:`fit_lines`'s, with the class counts of both
    classifiers when they differ.
    """
    model = plain_model(model)
    problems = []
    ckpt_arch = (metadata or {}).get("architecture")
    model_arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if ckpt_arch and model_arch and ckpt_arch != model_arch:
        problems.append(f"  - architecture: the checkpoint is for {ckpt_arch!r}, the model is {model_arch!r}")
    expected = model.state_dict()
    counters = [k for k in expected if k.endswith(COUNTER) and k not in state_dict]
    report = fit_report(expected, state_dict, classifier_prefixes(model))
    report.missing += counters  # load_state_dict(strict=True) needs them too
    report.unexpected += [k for k in state_dict if k.endswith(COUNTER) and k not in expected]
    problems += fit_lines(report)
    if problems:
        name = model_arch or type(model).__name__
        raise CheckpointError(f"the checkpoint does not fit the model ({name}):\n" + "\n".join(problems))
