"""Name tables, filled by the model files when :mod:`mixlab.models` is imported.

A leaf module: it imports nothing of mixlab and no model. Building things from these tables is
others' work (:mod:`mixlab.factory` builds models, :mod:`mixlab.weights` converts checkpoints,
:mod:`mixlab.models.spec` builds specifications).

* models: :func:`register_model`, :func:`list_models`, :func:`is_model`, :func:`model_family`,
  :func:`resolve_name`, :func:`model_entrypoint`;
* checkpoint layouts (timm's and the authors' names of a family): :func:`register_layout`;
* default weights per model name (``pretrained=True``): :func:`register_default_weights`,
  :data:`DEFAULT_WEIGHTS`, :func:`default_weights`;
* the ``create_model`` arguments a family's checkpoint needs: :func:`register_architecture_kwargs`;
* spec mixers (the stage types of :mod:`mixlab.models.spec`): :func:`register_spec_mixer`, :data:`MIXERS`.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

# -- models ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable] = {}
_FAMILY: dict[str, str] = {}


def register_model(fn: Callable) -> Callable:
    """Register a model entry point under its function name; its family is its module's name."""
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


def model_entrypoint(name: str) -> Callable:
    """The function registered as ``name`` (keyword arguments -> model); UnknownModelError if none."""
    return _REGISTRY[resolve_name(name)]


# -- checkpoint layouts ------------------------------------------------------------------------------
#: a renaming rule: (full-key pattern, replacement, tuple of candidate replacements, or callable on the match)
Rule = tuple[str, object]


@dataclass(frozen=True)
class Layout:
    """How one family's checkpoints are named in one format (see :func:`register_layout`)."""
    format: str
    family: str
    patterns: Union[tuple[str, ...], Callable[[list[str]], bool]]
    rules: Union[tuple[Rule, ...], Callable[[list[str]], list[Rule]]]
    mixlab_patterns: tuple[str, ...] = ()
    broad: bool = False
    warning: Callable[[dict, dict], Union[str, None]] | None = None


LAYOUTS: list[Layout] = []
#: mixlab model class -> the family whose layouts convert into it
MODEL_CLASSES: dict[type, str] = {}


def register_layout(fmt: str, family: str, patterns, rules, *, model_class: type | None = None,
                    mixlab_patterns: Sequence[str] = (), broad: bool = False, warning: Callable | None = None
                    ) -> None:
    """Teach detection and conversion (:mod:`mixlab.weights.convert`) another layout of a family.

    ``fmt``: 'timm' or 'authors-<family>'; ``family``: the registry family of the mixlab models it
    converts into (their module's name); ``patterns``: regular expressions, one of which some key
    of such a state dict matches (and no key of a mixlab state dict), or a function of the list of
    keys saying whether it is this layout; ``rules``: the renaming rules, (full-key pattern,
    replacement) pairs where the replacement is a string, a tuple of candidate strings (the first
    the model has wins) or a function of the match returning the name or None (drop the key), or
    a function of the list of keys returning such rules; ``model_class``: the mixlab class of the
    family (a subclass's own registration wins); ``mixlab_patterns``: expressions that identify the
    family's own (mixlab) state dicts; ``warning(state_dict, model_state_dict)``: a warning to give
    when converting such a checkpoint into that model (or None), e.g. about a head that differs.

    Detection order: the mixlab patterns of the layouts that are not ``broad``, then those
    layouts in registration order; then mixlab's generic patterns and the mixlab patterns of
    the ``broad`` layouts, then the ``broad`` layouts in registration order. ``broad`` is for
    names other families' checkpoints share (timm's ViT ``blocks.N.attn.qkv``, ``cls_token``):
    such layouts answer only when no specific one does.
    """
    if isinstance(patterns, str):
        raise TypeError("patterns: a list of regular expressions or a function of the keys, not one string")
    LAYOUTS.append(Layout(fmt, family, patterns if callable(patterns) else tuple(patterns),
                          rules if callable(rules) else tuple(rules), tuple(mixlab_patterns), broad, warning))
    if model_class is not None:
        MODEL_CLASSES[model_class] = family


def layouts_in_order() -> list[Layout]:
    """The registered layouts in detection order: the specific ones, then the broad ones."""
    return [x for x in LAYOUTS if not x.broad] + [x for x in LAYOUTS if x.broad]


def family_of_class(cls: type) -> str | None:
    """The family registered for ``cls`` or its nearest registered base class, or None."""
    return next((MODEL_CLASSES[c] for c in cls.__mro__ if c in MODEL_CLASSES), None)


# -- default weights -------------------------------------------------------------------------------
#: model name -> the checkpoint ``create_model(name, pretrained=True)`` loads (``source``: timm's copy on
#: the Hugging Face Hub) and what timm's ``pretrained_cfg`` says of it that mixlab uses (``mean``, ``std``,
#: ``crop_pct``, ``interpolation``: its data configuration)
DEFAULT_WEIGHTS: dict[str, dict] = {}

IMAGENET_MEAN_STD = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
INCEPTION_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def register_default_weights(name: str, source: str, *, mean: tuple, std: tuple, crop_pct: float = 0.875,
                             interpolation: str = "bicubic") -> None:
    """The default checkpoint of the model ``name``: its ``source`` (``hf-hub:org/name`` or a path)
    and the data configuration it was trained and evaluated with (timm's ``pretrained_cfg``: the
    normalisation, the centre crop's fraction and the interpolation; the defaults are timm's)."""
    if name in DEFAULT_WEIGHTS:
        raise ValueError(f"default weights of {name!r} are registered twice")
    DEFAULT_WEIGHTS[name] = {"source": source, "mean": tuple(mean), "std": tuple(std), "crop_pct": float(crop_pct),
                             "interpolation": interpolation}


def default_weights(name: str) -> dict:
    """The :data:`DEFAULT_WEIGHTS` entry of ``name``, or a ValueError saying what to pass instead."""
    if name not in DEFAULT_WEIGHTS:
        raise ValueError(f"no default pretrained weights are known for {name!r}; pass a checkpoint instead: "
                         f"pretrained='path/to/weights.safetensors' (or .pth / .bin), a state dict, or a Hugging "
                         f"Face Hub id 'hf-hub:org/name' (models with defaults: {', '.join(sorted(DEFAULT_WEIGHTS))})")
    return DEFAULT_WEIGHTS[name]


# -- architecture arguments --------------------------------------------------------------------------
#: family -> fn(state_dict, format, model) -> the create_model keyword arguments the checkpoint needs;
#: ``model`` is the named model built with its defaults (on the meta device)
ARCHITECTURE_KWARGS: dict[str, Callable] = {}


def register_architecture_kwargs(family: str, fn: Callable) -> None:
    """``fn(state_dict, fmt, model) -> dict``: the keyword arguments a checkpoint of ``family`` (in
    the detected format ``fmt``; ``model``: the requested model with default arguments) needs to be
    reproduced exactly rather than adapted, e.g. another window size."""
    if family in ARCHITECTURE_KWARGS:
        raise ValueError(f"architecture arguments of family {family!r} are registered twice")
    ARCHITECTURE_KWARGS[family] = fn


# -- spec mixers ------------------------------------------------------------------------------------
class SpecMixer(NamedTuple):
    """A stage type of specifications (see :func:`register_spec_mixer`)."""
    options: dict
    description: str
    block: Callable
    strided: bool = False
    check: Callable | None = None


#: spec mixer name -> SpecMixer, in registration order (``mixlab list --mixers`` shows them so)
MIXERS: dict[str, SpecMixer] = {}


def register_spec_mixer(name: str, options: dict, description: str, block: Callable, *, strided: bool = False,
                        check: Callable | None = None) -> None:
    """Make a mixer available to specifications (and so to nano models and the arena).

    ``options``: the stage options it takes, with their defaults; ``description``: the text
    ``mixlab info`` shows; ``block(stage, width, grid, mlp_ratio, drop_path, index, drop)``
    returns one block of the stage (``index``: its position in the stage; ``grid``: the
    (H, W) feature map it will see at the model's ``img_size``). A block maps a
    channels-last (B, H, W, C) map to one of the same shape. The stage's downsampling and
    position encoding are the specification's, as for every mixer.

    ``strided``: the blocks are ResNet's kind: the first block of a stage downsamples itself
    (``downsample: stride``, the default, or ``none``) and takes the previous stage's width, and a
    context module may sit in every block (``context_placement: block``); ``block`` then also
    receives ``in_chs``, ``stride`` and ``context`` (a factory of the context module, or None) as
    keyword arguments. ``check(stage)``: an error message for a stage the block cannot be built
    for, or None.
    """
    if name in MIXERS:
        raise ValueError(f"spec mixer {name!r} is already registered")
    MIXERS[name] = SpecMixer(dict(options), description, block, strided, check)
