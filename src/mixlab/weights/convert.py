"""Checkpoint conversion: other libraries' and the authors' state dicts to mixlab's names.

Three steps, each usable on its own:

* :func:`detect_format` names the layout of a state dict: ``'mixlab'``, ``'timm'`` (timm
  1.0's names; facebookresearch/deit's DeiT checkpoints use the same names and are
  reported as ``'timm'``), or one of the authors' original layouts ``'authors-swin'``
  (microsoft/Swin-Transformer, and timm < 0.9, which kept it), ``'authors-convnext'``
  (facebookresearch/ConvNeXt), ``'authors-poolformer'`` (sail-sg/poolformer) and
  ``'authors-container'`` (allenai/container);
* :func:`architecture_kwargs` gives the ``create_model`` arguments a checkpoint needs to
  be reproduced exactly rather than adapted: timm's PoolFormer head (``head_norm``), a
  Swin window size, a ViT / MLP-Mixer input size other than the named model's;
* :func:`convert_state_dict` renames the keys to a given mixlab model's and fits the
  tensors to it where that is meaningful (1x1 convolutions <-> linear layers, ViT/DeiT
  position embeddings resampled to the model's grid, Swin relative position bias tables
  resampled to the model's window). The classifier is converted by name but never
  resized, keys without a counterpart keep their source name, and buffers mixlab
  recomputes (``relative_position_index``, ``attn_mask``) are dropped.

Supported families: ResNet-50, ViT / DeiT (distilled too), Swin, ConvNeXt, MLP-Mixer,
PoolFormer from timm; Swin, ConvNeXt, PoolFormer and Container (``container_v1_light``
-> ``container_light``; the same layout converts into ``container``) from the authors.
Not supported: the MLP-Mixer / ViT authors' JAX ``.npz`` files (use timm's conversions),
and ``container_pam``'s dense static affinity, which no released checkpoint has.
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
from .load import unwrap_checkpoint

__all__ = ["architecture_kwargs", "convert_state_dict", "detect_format", "register_layout"]

#: buffers that checkpoints from other code carry and mixlab recomputes from the shapes
_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")


# ---------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------
def _unwrap(state_dict) -> dict:
    """The tensors of a checkpoint, unwrapped as the loader unwraps them
    (:func:`~mixlab.weights.load.unwrap_checkpoint`: ``{'model': ...}``, ``{'state_dict': ...}``,
    ``module.`` prefixes); an empty dict stays empty, for :func:`_layout` to say so."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    return unwrap_checkpoint(state_dict)[0] if state_dict else {}


def _any(keys: Iterable[str], *patterns: str) -> bool:
    regs = [re.compile(p) for p in patterns]
    return any(r.search(k) for k in keys for r in regs)


#: layouts that families defined in their own modules register (see register_layout)
_EXTRA_MIXLAB_PATTERNS: list[str] = []
_EXTRA_LAYOUTS: list[tuple[str, str, tuple[str, ...], list]] = []
_EXTRA_CLASSES: list[tuple[type, str]] = []


def register_layout(fmt: str, family: str, patterns, rules, *, model_class: type | None = None,
                    mixlab_patterns=()) -> None:
    """Teach detection and conversion another family's layout.

    ``fmt``: 'timm' or 'authors-<family>'; ``family``: the registry family of the mixlab
    models it converts into (their module's name); ``patterns``: regular expressions, one of
    which some key of such a state dict matches (and no key of a mixlab state dict);
    ``rules``: the renaming rules (full-key pattern, replacement or callable on the match);
    ``model_class``: the mixlab class of that family; ``mixlab_patterns``: expressions that
    identify the family's models' own (mixlab) state dicts, checked before any layout.
    Registered layouts are checked before mixlab's built-in patterns and layouts.
    """
    _EXTRA_MIXLAB_PATTERNS.extend(mixlab_patterns)
    _EXTRA_LAYOUTS.append((fmt, family, tuple(patterns), list(rules)))
    if model_class is not None:
        _EXTRA_CLASSES.append((model_class, family))


def _layout(sd: dict) -> tuple[str, str | None]:
    """(format, family) of a state dict; family is None for mixlab's own format."""
    keys = list(sd)
    if not keys:
        raise ValueError("cannot detect the format of an empty state dict")
    # the registered families' own names, then their foreign layouts, before mixlab's built-in
    # patterns: a registered layout's patterns match no mixlab key (register_layout's contract),
    # while some of its other keys may look like mixlab's (timm's EfficientFormer has `ls1.gamma`)
    if _any(keys, *_EXTRA_MIXLAB_PATTERNS):
        return "mixlab", None
    for fmt, family, patterns, _ in _EXTRA_LAYOUTS:
        if _any(keys, *patterns):
            return fmt, family
    if _any(keys, r"(^|\.)mixer\.", r"^pos_embed\.pos_embed$", r"^stem\.bn\.",
            r"^stages\.\d+\.blocks\.\d+\.ls[12]?\.gamma$", r"^stages\.\d+\.downsample\.(proj|pre_norm|post_norm)\.",
            r"^stem\.convs\.", r"^stages\.\d+\.blocks\.\d+\.(conv|bn)[123]\."):
        return "mixlab", None
    if _any(keys, r"^patch_embed[1-4]\.", r"^blocks[1-4]\.\d+\."):
        return "authors-container", "container"
    if _any(keys, r"^network\.\d+\."):
        return "authors-poolformer", "poolformer"
    if _any(keys, r"^downsample_layers\.\d+\.", r"^stages\.\d+\.\d+\.(dwconv|pwconv1|pwconv2)\."):
        return "authors-convnext", "convnext"
    if _any(keys, r"^layers\.\d+\.blocks\.\d+\."):
        # the authors (and timm < 0.9) merge patches at the END of stage i (layers.0 has one,
        # the last has none) and call the classifier `head`; timm >= 0.9 merges at the start
        if _any(keys, r"^layers\.0\.downsample\."):
            return "authors-swin", "swin"
        if not _any(keys, r"^layers\.\d+\.downsample\.") and "head.weight" in sd:
            return "authors-swin", "swin"
        return "timm", "swin"
    if _any(keys, r"^layer[1-4]\.\d+\.", r"^conv1\.weight$"):
        return "timm", "resnet"
    if _any(keys, r"^blocks\.\d+\.mlp_tokens\."):
        return "timm", "mlp_mixer"
    if _any(keys, r"^stages\.\d+\.blocks\.\d+\.conv_dw\.", r"^stem\.0\.weight$"):
        return "timm", "convnext"
    if _any(keys, r"\.layer_scale[12]\.scale$", r"^stages\.\d+\.downsample\.conv\.", r"^stem\.conv\.weight$"):
        return "timm", "poolformer"
    if _any(keys, r"^blocks\.\d+\.attn\.qkv\.", r"^pos_embed$", r"^cls_token$"):
        return "timm", "vit"
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise ValueError(
        f"unrecognised state dict layout (keys: {sample}). Supported: mixlab's own names; timm 1.0 names for "
        f"resnet50, vit_*/deit_*, swin_*, convnext_*, mixer_*, poolformer_*; the authors' layouts of Swin "
        f"(microsoft/Swin-Transformer), ConvNeXt (facebookresearch/ConvNeXt), DeiT (facebookresearch/deit), "
        f"PoolFormer (sail-sg/poolformer) and Container (allenai/container); and those the families register: "
        f"{', '.join(f'{fmt} {family}' for fmt, family, _, _ in _EXTRA_LAYOUTS) or 'none'}")


def detect_format(state_dict: dict) -> str:
    """The naming scheme of a state dict: 'mixlab', 'timm', or 'authors-<family>'
    ('authors-swin', 'authors-convnext', 'authors-poolformer', 'authors-container').

    A checkpoint wrapped as ``{'model': ...}`` or ``{'state_dict': ...}`` is looked into.
    Raises ValueError for a layout it does not know.
    """
    return _layout(_unwrap(state_dict))[0]


# ---------------------------------------------------------------------------------------
# renaming rules: (full-key pattern, replacement or tuple of candidate replacements);
# the first pattern that matches wins; keys no pattern matches keep their name
# ---------------------------------------------------------------------------------------
Rule = tuple[str, object]

_TIMM_RESNET: list[Rule] = [
    (r"^conv1\.(.+)$", r"stem.conv.\1"),
    (r"^bn1\.(.+)$", r"stem.bn.\1"),
    (r"^layer(\d+)\.(\d+)\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
    (r"^fc\.(.+)$", r"head.fc.\1"),
]

_TIMM_VIT: list[Rule] = [
    (r"^pos_embed$", "pos_embed.pos_embed"),
    (r"^blocks\.(\d+)\.attn\.(.+)$", r"blocks.\1.mixer.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^fc_norm\.(.+)$", r"head.norm.\1"),
]


def _swin_rules(merge_at_end: bool) -> list[Rule]:
    shift = 1 if merge_at_end else 0
    return [
        (r"^patch_embed\.(.+)$", r"stem.\1"),
        (r"^layers\.(\d+)\.downsample\.(.+)$", lambda m: f"stages.{int(m[1]) + shift}.downsample.{m[2]}"),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.(.+)$", r"stages.\1.blocks.\2.mixer.\3"),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", r"stages.\1.blocks.\2.\3"),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]


_TIMM_CONVNEXT: list[Rule] = [
    (r"^stem\.0\.(.+)$", r"stem.proj.\1"),
    (r"^stem\.1\.(.+)$", r"stem.norm.\1"),
    (r"^stages\.(\d+)\.downsample\.0\.(.+)$", r"stages.\1.downsample.pre_norm.\2"),
    (r"^stages\.(\d+)\.downsample\.1\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(.+)$", r"stages.\1.blocks.\2.mixer.conv.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"stages.\1.blocks.\2.ls.gamma"),
]

_AUTHORS_CONVNEXT: list[Rule] = [
    (r"^downsample_layers\.0\.0\.(.+)$", r"stem.proj.\1"),
    (r"^downsample_layers\.0\.1\.(.+)$", r"stem.norm.\1"),
    (r"^downsample_layers\.(\d+)\.0\.(.+)$", r"stages.\1.downsample.pre_norm.\2"),
    (r"^downsample_layers\.(\d+)\.1\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.(.+)$", r"stages.\1.blocks.\2.mixer.conv.\3"),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.(.+)$", r"stages.\1.blocks.\2.mlp.fc1.\3"),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.(.+)$", r"stages.\1.blocks.\2.mlp.fc2.\3"),
    (r"^stages\.(\d+)\.(\d+)\.gamma$", r"stages.\1.blocks.\2.ls.gamma"),
    (r"^stages\.(\d+)\.(\d+)\.norm\.(.+)$", r"stages.\1.blocks.\2.norm.\3"),
    (r"^norm\.(.+)$", r"head.norm.\1"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

_TIMM_MIXER: list[Rule] = [
    (r"^blocks\.(\d+)\.mlp_tokens\.(.+)$", r"stages.0.blocks.\1.mixer.\2"),
    (r"^blocks\.(\d+)\.mlp_channels\.(.+)$", r"stages.0.blocks.\1.mlp.\2"),
    (r"^blocks\.(\d+)\.(.+)$", r"stages.0.blocks.\1.\2"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

# the final norm's weights go to whichever place the model has: head.norm (the 'pooled'
# PoolFormer, timm's) or norm (the 'group' PoolFormer, the authors'); timm's pretrained
# PoolFormer weights are the authors', so either placement is a trained network
_TIMM_POOLFORMER: list[Rule] = [
    (r"^stem\.conv\.(.+)$", r"stem.proj.\1"),
    (r"^stages\.(\d+)\.downsample\.conv\.(.+)$", r"stages.\1.downsample.proj.\2"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.layer_scale([12])\.scale$", r"stages.\1.blocks.\2.ls\3.gamma"),
    (r"^head\.norm\.(.+)$", (r"head.norm.\1", r"norm.\1")),
]


def _authors_poolformer_rules(keys: list[str]) -> list[Rule]:
    # `network` interleaves stages and downsamplings (PatchEmbed, with a `proj` conv);
    # a downsampling opens the next stage
    idx = sorted({int(m[1]) for k in keys if (m := re.match(r"^network\.(\d+)\.", k))})
    down = {i for i in idx if _any((k for k in keys if k.startswith(f"network.{i}.")), rf"^network\.{i}\.proj\.")}
    where, stage = {}, 0
    for i in idx:  # a stage's index, or for a downsampling the stage it opens
        where[i] = stage
        stage += i not in down

    def block(m, rest: str):
        i = int(m[1])
        return None if i in down else f"stages.{where[i]}.blocks.{m[2]}.{rest}"

    return [
        (r"^patch_embed\.proj\.(.+)$", r"stem.proj.\1"),
        (r"^network\.(\d+)\.proj\.(.+)$",
         lambda m: f"stages.{where[int(m[1])]}.downsample.proj.{m[2]}" if int(m[1]) in down else None),
        (r"^network\.(\d+)\.(\d+)\.layer_scale_([12])$", lambda m: block(m, f"ls{m[3]}.gamma")),
        (r"^network\.(\d+)\.(\d+)\.(.+)$", lambda m: block(m, m[3])),
        (r"^norm\.(.+)$", (r"norm.\1", r"head.norm.\1")),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]


def _cblock(m) -> str:
    """mixlab's name of the authors' block ``blocks{s}.{j}`` (stages counted from 1)."""
    return f"stages.{int(m[1]) - 1}.blocks.{m[2]}"


_AUTHORS_CONTAINER: list[Rule] = [
    (r"^patch_embed1\.(proj|norm)\.(.+)$", r"stem.\1.\2"),
    (r"^patch_embed([2-4])\.proj\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.downsample.proj.{m[2]}"),
    (r"^patch_embed([2-4])\.norm\.(.+)$", lambda m: f"stages.{int(m[1]) - 1}.downsample.post_norm.{m[2]}"),
    (r"^blocks([1-4])\.(\d+)\.pos_embed\.(.+)$", lambda m: f"{_cblock(m)}.pos.proj.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.conv1\.(.+)$", lambda m: f"{_cblock(m)}.mixer.qkv.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.conv2\.(.+)$", lambda m: f"{_cblock(m)}.mixer.proj.{m[3]}"),
    # the depthwise convolution: `attn` in the static-only block, `conv` in the mixed one
    (r"^blocks([1-4])\.(\d+)\.(?:attn|conv)\.(weight|bias)$", lambda m: f"{_cblock(m)}.mixer.conv.{m[3]}"),
    (r"^blocks([1-4])\.(\d+)\.sa_weight$", lambda m: f"{_cblock(m)}.mixer.sa_weight"),
    (r"^blocks([1-4])\.(\d+)\.(.+)$", lambda m: f"{_cblock(m)}.{m[3]}"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


def _rules_for(fmt: str, family: str | None, keys: list[str]) -> list[Rule]:
    if fmt == "mixlab":
        return []
    for xfmt, xfamily, _, rules in _EXTRA_LAYOUTS:
        if (xfmt, xfamily) == (fmt, family):
            return rules
    if fmt == "authors-swin":
        return _swin_rules(merge_at_end=True)
    if fmt == "authors-convnext":
        return _AUTHORS_CONVNEXT
    if fmt == "authors-poolformer":
        return _authors_poolformer_rules(keys)
    if fmt == "authors-container":
        return _AUTHORS_CONTAINER
    return {"resnet": _TIMM_RESNET, "vit": _TIMM_VIT, "swin": _swin_rules(merge_at_end=False),
            "convnext": _TIMM_CONVNEXT, "mlp_mixer": _TIMM_MIXER, "poolformer": _TIMM_POOLFORMER}[family]


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
    from ..models.container import Container
    from ..models.convnext import ConvNeXt
    from ..models.mlp_mixer import MlpMixer
    from ..models.poolformer import PoolFormer
    from ..models.resnet import ResNet
    from ..models.swin import SwinTransformer
    from ..models.vit import VisionTransformer
    # registered classes first: a family may subclass a built-in one
    for cls, fam in (*_EXTRA_CLASSES, (VisionTransformer, "vit"), (SwinTransformer, "swin"), (ConvNeXt, "convnext"),
                     (MlpMixer, "mlp_mixer"), (PoolFormer, "poolformer"), (ResNet, "resnet"),
                     (Container, "container")):
        if isinstance(model, cls):
            return fam
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch:
        from ..registry import is_model, model_family
        if is_model(arch):
            return model_family(arch)
    return None


def _strip_ones(shape) -> tuple[int, ...]:
    s = list(shape)
    while len(s) > 1 and s[-1] == 1:
        s.pop()
    return tuple(s)


def _is_classifier(key: str) -> bool:
    return key.startswith(("head.fc.", "head_dist.")) or key in ("head.weight", "head.bias")


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


def _fit(key: str, value: torch.Tensor, target: dict, model: nn.Module) -> torch.Tensor:
    """``value`` fitted to the model's tensor ``key`` where that is meaningful; otherwise
    unchanged (the loader reports the shape mismatch)."""
    want = target.get(key)
    if want is None or not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(want.shape):
        return value
    if _is_classifier(key):
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
    rules = [(re.compile(p), r) for p, r in _rules_for(fmt, family, list(sd))]
    target = model.state_dict()
    if (fmt, family) == ("timm", "poolformer") and "head.norm.weight" in sd and "head.norm.weight" not in target:
        warnings.warn("this is timm's PoolFormer checkpoint, which normalises after pooling; the model normalises "
                      "the feature map before pooling (head_norm='group', the authors' network), so its outputs "
                      "will differ from timm's: build it with head_norm='pooled' to reproduce them "
                      "(create_model(..., pretrained=...) does so itself)", stacklevel=2)
    out: dict = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in _DROPPED_BUFFERS:
            continue
        cands = _candidates(key, rules)
        # the classifier keeps mixlab's name even where the model has none (num_classes=0),
        # so that the loader can tell it from other unexpected keys
        new = next((c for c in cands if (c in target or _is_classifier(c)) and c not in out), key)
        if new in out:  # a source name that collides with a converted one: keep both visible
            new = f"{key} (unconverted)"
        out[new] = _fit(new, value, target, model)
    return out


# ---------------------------------------------------------------------------------------
# architecture arguments
# ---------------------------------------------------------------------------------------
def _first(sd: dict, *names: str):
    return next((sd[n] for n in names if n in sd), None)


def _default_model(model_name: str) -> nn.Module | None:
    from ..registry import create_model, is_model
    if not is_model(model_name):
        return None
    with torch.device("meta"):
        return create_model(model_name)


def architecture_kwargs(model_name: str, state_dict: dict) -> dict:
    """Extra ``create_model`` keyword arguments a checkpoint needs (none for most).

    * PoolFormer from timm (or a mixlab checkpoint of that variant): ``head_norm='pooled'``
      (timm pools before its final norm, the authors normalise the map; see
      :class:`mixlab.models.poolformer.PoolFormer`);
    * Swin whose relative position tables are for another window than the named model's:
      ``window_size``;
    * ViT / DeiT whose position embedding, or MLP-Mixer whose token MLP, is for another
      grid: ``img_size`` (otherwise the embedding is resampled, the Mixer cannot load).

    Arguments the user gives explicitly should take precedence over these.
    """
    sd = _unwrap(state_dict)
    fmt, _ = _layout(sd)
    model = _default_model(model_name)
    family = _model_family(model) if model is not None else None
    kwargs: dict = {}
    if family == "poolformer":
        if fmt == "timm" or (fmt == "mixlab" and "head.norm.weight" in sd and "norm.weight" not in sd):
            kwargs["head_norm"] = "pooled"
    elif family == "swin":
        table = next((v for k, v in sd.items() if k.endswith("relative_position_bias_table")), None)
        if table is not None and table.ndim == 2:
            side = math.isqrt(table.shape[0])
            if side * side == table.shape[0] and side % 2 == 1:
                window = (side + 1) // 2
                have = model.stages[0].blocks[0].mixer.window_size
                if (window, window) != tuple(have):
                    kwargs["window_size"] = window
    elif family == "vit":
        pos = _first(sd, "pos_embed.pos_embed", "pos_embed")
        proj = _first(sd, "patch_embed.proj.weight")
        if pos is not None and proj is not None and pos.ndim == 3:
            for p in (model.num_prefix_tokens, 1, 2, 0):
                side = math.isqrt(max(pos.shape[1] - p, 0))
                if side and side * side == pos.shape[1] - p:
                    img = side * proj.shape[-1]
                    if (img, img) != tuple(model.img_size):
                        kwargs["img_size"] = img
                    break
    elif family == "mlp_mixer":
        fc1 = _first(sd, "stages.0.blocks.0.mixer.fc1.weight", "blocks.0.mlp_tokens.fc1.weight")
        proj = _first(sd, "stem.proj.weight")
        if fc1 is not None and proj is not None:
            side = math.isqrt(fc1.shape[1])
            if side * side == fc1.shape[1]:
                img = side * proj.shape[-1]
                if (img, img) != tuple(model.img_size):
                    kwargs["img_size"] = img
    return kwargs
