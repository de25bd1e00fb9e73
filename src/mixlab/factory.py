"""Building models: :func:`create_model` (timm's calling conventions) and :func:`create_pretrained`.

The names live in :mod:`mixlab.registry`; this module builds from them: a registered model,
a specification (:mod:`mixlab.models.spec`), with weights loaded through :mod:`mixlab.weights`.
"""
from __future__ import annotations

import numbers
import os
from functools import partial
from typing import Any, Mapping

import torch.nn as nn

from .models.base import FeatureExtractor
from .models.spec import check_spec, create_from_spec, is_spec
from .registry import DEFAULT_WEIGHTS, default_weights, model_entrypoint, resolve_name
from .weights import (architecture_kwargs, describe_source, load_state, metadata_config, read_checkpoint,
                      timm_data_config)

__all__ = ["create_model", "create_pretrained", "check_model_name", "check_common_kwargs"]


#: the largest input side and channel count a model is built for (far beyond any real input: a
#: larger one is a typing error, and would fail later in an allocator)
MAX_IMG_SIZE = 16384
MAX_IN_CHANS = 4096


def _count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_common_kwargs(kwargs: dict) -> None:
    """A ValueError for a common argument of ``create_model`` no model can be built with:
    ``in_chans`` and ``img_size`` (an int or an (H, W) pair) positive and plausible,
    ``num_classes`` at least 0 (0: no classifier)."""
    if "in_chans" in kwargs and not (_count(kwargs["in_chans"]) and 1 <= kwargs["in_chans"] <= MAX_IN_CHANS):
        raise ValueError(f"in_chans must be an integer from 1 to {MAX_IN_CHANS} (input channels), "
                         f"got {kwargs['in_chans']!r}")
    if kwargs.get("img_size") is not None:
        size = kwargs["img_size"]
        sides = list(size) if isinstance(size, (list, tuple)) else [size]
        if len(sides) not in (1, 2) or not all(_count(v) and 1 <= v <= MAX_IMG_SIZE for v in sides):
            raise ValueError(f"img_size must be an integer from 1 to {MAX_IMG_SIZE} (the square side) or an (H, W) "
                             f"pair of them, got {size!r}")
    if "num_classes" in kwargs and not (_count(kwargs["num_classes"]) and kwargs["num_classes"] >= 0):
        raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {kwargs['num_classes']!r}")


def check_model_name(name: str) -> None:
    """Raise ValueError (an :class:`~mixlab.registry.UnknownModelError` or a
    :class:`~mixlab.models.spec.SpecError`) unless ``name`` is a registered model or a valid
    specification; builds nothing."""
    if is_spec(name):
        check_spec(name)
    else:
        resolve_name(name)


def create_model(name: str, pretrained: bool | str | os.PathLike | Mapping = False, features_only: bool = False,
                 out_indices=None, **kwargs) -> nn.Module:
    """Build a registered model, or one from a specification (``"spec:patch4 / convnext:2x32 /
    attention:2x64"`` or a ``.yaml`` file; see :mod:`mixlab.models.spec`).

    Common keyword arguments (timm's names): ``num_classes``, ``in_chans``, ``img_size``,
    ``drop_rate``, ``drop_path_rate``; family-specific ones are listed by
    ``help(mixlab.models.<family>)``. ``features_only=True`` returns a
    :class:`~mixlab.models.base.FeatureExtractor` giving the multi-scale NCHW feature maps
    of the stages in ``out_indices`` (default: all).

    ``pretrained`` loads weights (strictly; see :func:`mixlab.weights.load_pretrained`):

    * ``True``: the default ImageNet checkpoint of ``name`` (timm's, from the Hugging Face
      Hub; :data:`mixlab.registry.DEFAULT_WEIGHTS` lists them);
    * a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file, a state dict,
      or a Hub id ``"hf-hub:org/name[@revision]"``; mixlab's, timm's and the authors' layouts
      are converted.

    Keyword arguments the checkpoint's architecture requires are added (passing another
    value is an error); without ``num_classes`` the model gets the checkpoint's number of
    classes, with another one a fresh classifier (and a warning). ``pretrained_cfg["source"]``
    records where the weights came from, ``pretrained_cfg["classes"]`` the class names a mixlab
    checkpoint records (when the model keeps its classifier), ``mean``, ``std``, ``crop_pct`` and
    ``interpolation`` the weights' data configuration and ``data_config_source`` where it was found
    (see :func:`create_pretrained`).
    """
    check_common_kwargs(kwargs)
    fn = partial(create_from_spec, name) if is_spec(name) else model_entrypoint(name)
    if not pretrained and not isinstance(pretrained, Mapping):  # False, None, ""
        model = fn(**kwargs)
        model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}), architecture=name)
    else:
        model = create_pretrained(name, fn, pretrained, kwargs, features_only=features_only)
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
    return norm(a) == norm(b)


#: architecture arguments the conversion adapts the weights to (position embeddings and relative
#: position bias tables are resampled): the caller's value wins over the checkpoint's
ADAPTABLE_KWARGS = ("img_size", "window_size")


def create_pretrained(name: str, build, pretrained: Any, kwargs: dict, features_only: bool = False) -> nn.Module:
    """Build ``build(**kwargs)`` for the checkpoint ``pretrained`` and load it (``create_model``'s work).

    The keyword arguments the checkpoint requires (:func:`~mixlab.weights.convert.architecture_kwargs`)
    are added. One the caller passed with another value is an error, except ``img_size`` and
    ``window_size``, which the conversion adapts the weights to (an error only if the
    weights then do not fit). A mixlab-written checkpoint's input size and channels, and for a
    checkpoint of this very model the other arguments it records (``model_kwargs``), are the
    defaults; without an explicit ``num_classes`` the model takes the checkpoint's number of
    classes.

    The weights' data configuration goes to ``model.pretrained_cfg`` (``mean``, ``std``,
    ``crop_pct``, ``interpolation``, and ``data_config_source`` saying where each came from), taken
    from the first of: a mixlab checkpoint's metadata; timm's ``pretrained_cfg`` (the ``config.json``
    of a timm repository, next to the file or on the Hub); for a timm checkpoint of a model with
    default weights, what timm's ``pretrained_cfg`` says of those
    (:data:`~mixlab.registry.DEFAULT_WEIGHTS`); the model's own defaults (crop 1.0, bicubic).
    """
    extra_cfg: dict = {}
    if pretrained is True:
        entry = default_weights(name)
        source = entry["source"]
        extra_cfg = {k: v for k, v in entry.items() if k != "source"}
    else:
        source = pretrained
    state_dict, metadata = read_checkpoint(source)
    try:
        needed = dict(architecture_kwargs(name, state_dict) or {})
    except ValueError:  # a layout the converter does not know: loading will say what does not fit
        needed = {}
    conflicts = [k for k in needed if k in kwargs and not _same(kwargs[k], needed[k])]
    fixed = [k for k in conflicts if k not in ADAPTABLE_KWARGS]
    if fixed:
        shown = "; ".join(f"it needs {k}={needed[k]!r}, {k}={kwargs[k]!r} was passed" for k in fixed)
        raise ValueError(f"{name}: the checkpoint {describe_source(source)} was made for another architecture "
                         f"than the keyword arguments ask for: {shown}. Leave {', '.join(fixed)} out, or use a "
                         f"checkpoint made for that architecture")
    from_meta = metadata_config(metadata)
    # a mixlab checkpoint of this model: built with the other arguments its metadata records
    own = from_meta.get("model_kwargs", {}) if metadata.get("architecture") == name else {}
    defaults: dict = dict(own)
    if "input_size" in from_meta:
        c, h, w = from_meta["input_size"]
        defaults.update(in_chans=c, img_size=h if h == w else (h, w))
    model = build(**{**defaults, **needed, **kwargs})
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}), architecture=name)
    if features_only:
        model.reset_classifier(0)  # the feature extractor has none: the checkpoint's is not needed
    adopt = not features_only and "num_classes" not in kwargs and "num_classes" not in needed
    try:
        result = load_state(model, state_dict, metadata, describe_source(source), strict=True,
                            num_classes_from_checkpoint=adopt, architecture_kwargs=needed, stacklevel=4)
    except ValueError as e:
        if not conflicts:
            raise
        shown = ", ".join(f"{k}={needed[k]!r} ({k}={kwargs[k]!r} was passed)" for k in conflicts)
        raise ValueError(f"{name}: the checkpoint {describe_source(source)} was made for {shown}, and its weights "
                         f"cannot be adapted to the arguments passed; leave {', '.join(conflicts)} out.\n{e}") from e
    cfg = _data_config(name, source, metadata, from_meta, extra_cfg, result.format)
    classes = from_meta.get("classes")
    if classes is not None and len(classes) == getattr(model, "num_classes", None):  # the checkpoint's classifier
        cfg["classes"] = classes
    applied = {k: v for k, v in own.items() if k not in kwargs and k not in needed}
    if applied:  # what the checkpoint's metadata built it with (mixlab convert records them again)
        cfg["model_kwargs"] = applied
    model.pretrained_cfg.update(cfg, source=describe_source(source), source_format=result.format)
    return model


#: the keys of a data configuration that ``pretrained_cfg`` holds
_DATA_KEYS = ("mean", "std", "crop_pct", "interpolation")


def _data_config(name: str, source: Any, metadata: Mapping[str, str], from_meta: dict, extra_cfg: dict,
                 fmt: str) -> dict:
    """``pretrained_cfg`` entries of the weights' data configuration, each key from the first place
    that has it (:func:`create_pretrained` lists them), with ``data_config_source`` naming them."""
    timm = timm_data_config(metadata)
    known = default_weights(name) if fmt == "timm" and name in DEFAULT_WEIGHTS else {}
    places = [(from_meta, "the checkpoint's mixlab metadata"),
              (timm, "timm's pretrained_cfg (config.json)"),
              (extra_cfg, "timm's pretrained_cfg of the default weights"),
              (known, f"timm's pretrained_cfg of {name}'s default weights {known.get('source')} (the checkpoint "
                      f"records none)")]
    out: dict = {}
    said: dict[str, list[str]] = {}
    for values, where in places:
        for key in _DATA_KEYS:
            if key not in out and values.get(key) is not None:
                out[key] = tuple(values[key]) if key in ("mean", "std") else values[key]
                said.setdefault(where, []).append(key)
    rest = [k for k in _DATA_KEYS if k not in out]
    parts = [f"{', '.join(keys)} from {where}" for where, keys in said.items()]
    if rest:
        parts.append(f"{', '.join(rest)}: mixlab's defaults")
    out["data_config_source"] = "; ".join(parts)
    return out
