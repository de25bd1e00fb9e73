"""Checkpoint conversion: other libraries' and the authors' state dicts to mixlab's names.

Generic machinery: what a family's checkpoints look like is registered by its model file
(:func:`mixlab.registry.register_layout` and :func:`~mixlab.registry.register_architecture_kwargs`).
Three steps, each usable on its own:

* :func:`detect_format` names the layout of a state dict: ``'mixlab'``, ``'timm'`` (timm
  1.0's names; facebookresearch/deit's DeiT checkpoints use the same names and are
  reported as ``'timm'``), or one of the authors' original layouts ``'authors-<family>'``;
* :func:`architecture_kwargs` gives the ``create_model`` arguments a checkpoint needs to
  be reproduced exactly rather than adapted (a Swin window size, a ViT input size, ...);
* :func:`convert_state_dict` renames the keys to a given mixlab model's and fits the
  tensors to it where that is meaningful (1x1 convolutions <-> linear layers, position
  embeddings resampled to the model's grid, relative position bias tables resampled to
  the model's window). The classifier is converted by name but never resized, keys
  without a counterpart keep their source name, and buffers mixlab recomputes
  (``relative_position_index``, ``attn_mask``) are dropped.

The error for a layout no family registered lists the registered ones.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.pos import resample_abs_pos_embed
from ..registry import (ARCHITECTURE_KWARGS, Layout, family_of_class, is_model, layouts_in_order, model_entrypoint,
                        model_family)
from .fit import classifier_prefixes
from .io import unwrap_checkpoint

__all__ = ["architecture_kwargs", "convert_state_dict", "detect_format"]

#: buffers that checkpoints from other code carry and mixlab recomputes from the shapes
_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")

#: names only mixlab's own models use (any family): checked after the specific layouts and
#: before the broad ones (see :func:`mixlab.registry.register_layout`)
MIXLAB_PATTERNS = (r"(^|\.)mixer\.", r"^stages\.\d+\.blocks\.\d+\.ls[12]?\.gamma$",
                   r"^stages\.\d+\.downsample\.(proj|pre_norm|post_norm)\.", r"^stem\.convs\.")


# ---------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------
def _unwrap(state_dict) -> dict:
    """The tensors of a checkpoint, unwrapped as the loader unwraps them
    (:func:`~mixlab.weights.io.unwrap_checkpoint`: ``{'model': ...}``, ``{'state_dict': ...}``,
    ``module.`` prefixes); an empty dict stays empty, for :func:`_layout` to say so."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    return unwrap_checkpoint(state_dict)[0] if state_dict else {}


def _any(keys: Iterable[str], *patterns: str) -> bool:
    regs = [re.compile(p) for p in patterns]
    return any(r.search(k) for k in keys for r in regs)


def _matches(layout: Layout, keys: list[str]) -> bool:
    return layout.patterns(keys) if callable(layout.patterns) else _any(keys, *layout.patterns)


def _layout(sd: dict) -> tuple[str, str | None]:
    """(format, family) of a state dict; family is None for mixlab's own format."""
    keys = list(sd)
    if not keys:
        raise ValueError("cannot detect the format of an empty state dict")
    ordered = layouts_in_order()
    specific = [x for x in ordered if not x.broad]
    broad = ordered[len(specific):]
    # a specific layout's patterns match no mixlab key (register_layout's contract), while some
    # of its other keys may look like mixlab's (timm's EfficientFormer has `ls1.gamma`): the
    # specific families' own names, then their layouts; then mixlab's generic names with the
    # broad families' own, then the broad layouts
    for group in (specific, broad):
        mixlab = [p for x in group for p in x.mixlab_patterns] + (list(MIXLAB_PATTERNS) if group is broad else [])
        if _any(keys, *mixlab):
            return "mixlab", None
        for x in group:
            if _matches(x, keys):
                return x.format, x.family
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise ValueError(f"unrecognised state dict layout (keys: {sample}). Supported: mixlab's own names; "
                     f"{_supported(ordered)}")


def _supported(layouts: list[Layout]) -> str:
    """The registered layouts in words: timm's, then the authors' (by family), then any other format."""
    timm = sorted({x.family for x in layouts if x.format == "timm"})
    authors = sorted({x.family for x in layouts if x.format.startswith("authors-")})
    other = sorted({f"{x.format} ({x.family})" for x in layouts if x.format != "timm"
                    and not x.format.startswith("authors-")})
    parts = ([f"timm 1.0's names of the families {', '.join(timm)}"] if timm else []) + \
        ([f"the authors' original names of {', '.join(authors)}"] if authors else []) + other
    return "; ".join(parts) or "no other layout is registered"


def detect_format(state_dict: dict) -> str:
    """The naming scheme of a state dict: 'mixlab', 'timm', or 'authors-<family>'
    (the registered layouts: see :func:`mixlab.registry.register_layout`).

    A checkpoint wrapped as ``{'model': ...}`` or ``{'state_dict': ...}`` is looked into.
    Raises ValueError for a layout it does not know.
    """
    return _layout(_unwrap(state_dict))[0]


# ---------------------------------------------------------------------------------------
# renaming: (full-key pattern, replacement or tuple of candidate replacements or callable);
# the first pattern that matches wins; keys no pattern matches keep their name
# ---------------------------------------------------------------------------------------
def _find(fmt: str, family: str | None) -> Layout | None:
    """The registered layout (format, family); None for mixlab's own."""
    return next((x for x in layouts_in_order() if (x.format, x.family) == (fmt, family)), None)


def _candidates(key: str, rules: list[tuple[re.Pattern, object]]) -> tuple[str, ...]:
    for pat, rep in rules:
        m = pat.match(key)
        if m is None:
            continue
        if callable(rep):
            new = rep(m)
            return (new,) if new else ()
        if isinstance(rep, tuple):
            return tuple(m.expand(r) for r in rep)
        return (m.expand(rep),)
    return (key,)


# ---------------------------------------------------------------------------------------
# the model side
# ---------------------------------------------------------------------------------------
def _model_family(model: nn.Module) -> str | None:
    """The registry family of a mixlab model, from its class (or its registered name)."""
    family = family_of_class(type(model))
    if family is not None:
        return family
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch and is_model(arch):
        return model_family(arch)
    return None


def _strip_ones(shape) -> tuple[int, ...]:
    s = list(shape)
    while len(s) > 1 and s[-1] == 1:
        s.pop()
    return tuple(s)


def _resample_rel_table(table: torch.Tensor, window) -> torch.Tensor:
    """Bicubic resampling of a ((2w-1)^2, heads) relative position bias table to another
    window (Swin's rule for fine-tuning at another window size)."""
    L, heads = table.shape
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"relative position bias table of {L} rows is not square")
    new = (2 * window[0] - 1, 2 * window[1] - 1)
    grid = table.t().reshape(1, heads, side, side).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.reshape(heads, -1).t().contiguous().to(table.dtype)


def _fit(key: str, value: torch.Tensor, target: dict, model: nn.Module, classifier: tuple[str, ...]) -> torch.Tensor:
    """``value`` fitted to the model's tensor ``key`` where that is meaningful; otherwise
    unchanged (the loader reports the shape mismatch). ``classifier``: prefixes of the classifier's names."""
    want = target.get(key)
    if want is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(want.shape):
        return value
    if key.startswith(classifier):
        return value  # the loader decides what to do about another num_classes
    if key.endswith("pos_embed.pos_embed") and value.ndim == 3 and value.shape[-1] == want.shape[-1]:
        module = model.get_submodule(key[: -len(".pos_embed")])
        p = module.num_prefix_tokens
        side = math.isqrt(max(value.shape[1] - p, 0))
        if side > 0 and side * side == value.shape[1] - p:
            return resample_abs_pos_embed(value, module.grid_size, (side, side), num_prefix_tokens=p)
        return value
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want.shape[1]:
        module = model.get_submodule(key[: -len(".relative_position_bias_table")])
        side = math.isqrt(value.shape[0])
        if side * side == value.shape[0]:
            return _resample_rel_table(value, module.window_size)
        return value
    if _strip_ones(value.shape) == _strip_ones(want.shape):
        return value.reshape(want.shape)  # 1x1 convolution <-> linear layer, (C, 1, 1) <-> (C,)
    return value


def convert_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """``state_dict`` renamed to ``model``'s keys, with position embeddings and relative
    position bias tables resampled to ``model``'s shapes; the classifier is left as it is.

    * ``state_dict``: mixlab's, timm's or the authors' layout (see :func:`detect_format`);
      a ``{'model': ...}`` wrapper and a ``module.`` prefix are removed;
    * ``model``: the mixlab model the weights are for (only its keys and shapes are read:
      a model on the meta device will do).

    Keys without a counterpart in ``model`` keep their source name, so that the loader can
    report them as unexpected; ``relative_position_index`` / ``attn_mask`` buffers are
    dropped. Raises ValueError when the checkpoint is for another family than ``model``.
    """
    sd = _unwrap(state_dict)
    fmt, family = _layout(sd)
    if fmt != "mixlab":
        have = _model_family(model)
        if have != family:
            arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
            what = f"a mixlab {have} model" if have else "a model with no known conversion"
            raise ValueError(f"the state dict is a {fmt} {family} checkpoint, but {arch!r} is {what}; "
                             f"build the matching mixlab model (mixlab list --family {family})")
    target = model.state_dict()
    classifier = tuple(f"{p}." for p in classifier_prefixes(model))
    layout = _find(fmt, family)
    rules = [] if layout is None else list(layout.rules(list(sd)) if callable(layout.rules) else layout.rules)
    rules = [(re.compile(p), r) for p, r in rules]
    note = layout.warning(sd, target) if layout is not None and layout.warning is not None else None
    if note:
        warnings.warn(note, stacklevel=2)
    out: dict = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in _DROPPED_BUFFERS:
            continue
        cands = _candidates(key, rules)
        # the classifier keeps mixlab's name even where the model has none (num_classes=0),
        # so that the loader can tell it from other unexpected keys
        new = next((c for c in cands if (c in target or c.startswith(classifier)) and c not in out), key)
        if new in out:  # a source name that collides with a converted one: keep both visible
            new = f"{key} (unconverted)"
        out[new] = _fit(new, value, target, model, classifier)
    return out


# ---------------------------------------------------------------------------------------
# architecture arguments
# ---------------------------------------------------------------------------------------
def _default_model(model_name: str) -> nn.Module | None:
    if not is_model(model_name):
        return None
    with torch.device("meta"):
        model = model_entrypoint(model_name)()
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}), architecture=model_name)
    return model


def architecture_kwargs(model_name: str, state_dict: dict) -> dict:
    """Extra ``create_model`` keyword arguments a checkpoint needs (none for most): what the
    family of ``model_name`` registered (:func:`mixlab.registry.register_architecture_kwargs`)
    computes from the checkpoint, e.g. ``head_norm='pooled'`` for timm's PoolFormer, the
    ``window_size`` of a Swin checkpoint, the ``img_size`` of a ViT or MLP-Mixer one.

    Arguments the user gives explicitly should take precedence over these.
    """
    sd = _unwrap(state_dict)
    fmt, _ = _layout(sd)
    model = _default_model(model_name)
    family = _model_family(model) if model is not None else None
    fn = ARCHITECTURE_KWARGS.get(family)
    return dict(fn(sd, fmt, model)) if fn is not None else {}
