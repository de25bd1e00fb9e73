"""Model registry: ``create_model`` / ``list_models`` with timm's calling conventions."""
from __future__ import annotations

import difflib
import fnmatch
import os
from functools import partial
from typing import Callable, Dict, Mapping

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_FAMILY: Dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    _FAMILY[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted names of registered models matching a shell-style pattern (case-insensitive)."""
    pat = pattern.lower()
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    return sorted(n for n in _REGISTRY
                  if fnmatch.fnmatchcase(n.lower(), pat) and (family is None or _FAMILY[n] == family))


def model_family(name: str) -> str:
    return _FAMILY[resolve_name(name)]


def is_model(name: str) -> bool:
    return name in _REGISTRY


class UnknownModelError(KeyError, ValueError):
    """Raised for a model name that is not registered; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


def resolve_name(name: str) -> str:
    """The registered name itself, or an UnknownModelError listing the closest names."""
    if name in _REGISTRY:
        return name
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
    if not close:
        close = [n for n in _REGISTRY if name.split("_")[0] in n][:5]
    hint = f"; closest registered names: {', '.join(close)}" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{hint} (see `mixlab list`)")


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
      Hub; :data:`mixlab.weights.DEFAULT_WEIGHTS` lists them);
    * a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file, a state dict,
      or a Hub id ``"hf-hub:org/name[@revision]"``; mixlab's, timm's and the authors' layouts
      are converted.

    Keyword arguments the checkpoint's architecture requires are added (passing another
    value is an error); without ``num_classes`` the model gets the checkpoint's number of
    classes, with another one a fresh classifier (and a warning). ``pretrained_cfg["source"]``
    records where the weights came from.
    """
    from .models.spec import create_from_spec, is_spec
    if is_spec(name):
        fn = partial(create_from_spec, name)
    else:
        fn = _REGISTRY[resolve_name(name)]
    if not pretrained and not isinstance(pretrained, Mapping):  # False, None, ""
        model = fn(**kwargs)
        model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}), architecture=name)
    else:
        from .weights.load import create_pretrained
        model = create_pretrained(name, fn, pretrained, kwargs, features_only=features_only)
    if features_only:
        from .models.base import FeatureExtractor
        return FeatureExtractor(model, out_indices)
    return model
