"""Reading checkpoints safely and loading them into mixlab models with clear errors.

* :func:`read_checkpoint`: a ``.safetensors`` file, a PyTorch file (``.pth``, ``.pt``,
  ``.bin``, ``.ckpt``; read with ``torch.load(weights_only=True)`` only, never a full
  unpickle), a state dict in memory, or a Hugging Face Hub id (``hf-hub:org/name``) ->
  ``(state_dict, metadata)``;
* :func:`load_pretrained`: read, convert (:func:`~mixlab.weights.convert.convert_state_dict`),
  keep the model's own classifier when the checkpoint's has another number of classes, and
  load, listing every missing, unexpected and mis-shaped tensor when something does not fit;
* :data:`DEFAULT_WEIGHTS`: the checkpoint ``create_model(name, pretrained=True)`` uses.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

__all__ = ["DEFAULT_WEIGHTS", "LoadResult", "read_checkpoint", "load_pretrained", "default_weights",
           "unwrap_checkpoint", "PTH_EXTENSIONS", "SAFETENSORS_EXTENSIONS"]

Source = Union[str, os.PathLike, Mapping]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PTH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
HUB_PREFIX = "hf-hub:"
#: files looked for, in this order, in a Hub repository when the id names none
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")

#: entries of a training checkpoint that may hold the weights, the plain ones first
CONTAINER_KEYS = ("model", "state_dict", "module", "net", "model_ema", "state_dict_ema")
#: key prefixes that wrappers add (DistributedDataParallel, torch.compile), stripped when every key has one
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_INCEPTION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _defaults() -> dict[str, dict]:
    table: dict[str, dict] = {}
    for size in ("tiny", "small", "base"):
        table[f"convnext_{size}"] = {"source": f"hf-hub:timm/convnext_{size}.fb_in1k", **_IMAGENET}
        table[f"swin_{size}_patch4_window7_224"] = {
            "source": f"hf-hub:timm/swin_{size}_patch4_window7_224.ms_in1k", **_IMAGENET}
        for distilled in ("", "distilled_"):
            name = f"deit_{size}_{distilled}patch16_224"
            table[name] = {"source": f"hf-hub:timm/{name}.fb_in1k", **_IMAGENET}
    for size in ("tiny", "small", "base", "large"):
        name = f"vit_{size}_patch16_224"
        table[name] = {"source": f"hf-hub:timm/{name}.augreg_in21k_ft_in1k", **_INCEPTION}
    for name in ("poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"):
        table[name] = {"source": f"hf-hub:timm/{name}.sail_in1k", **_IMAGENET}
    table["resnet50"] = {"source": "hf-hub:timm/resnet50.a1_in1k", **_IMAGENET}
    table["mixer_b16_224"] = {"source": "hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k", **_INCEPTION}
    for name in ("resmlp_12_224", "resmlp_24_224"):
        table[name] = {"source": f"hf-hub:timm/{name}.fb_in1k", **_IMAGENET}
    table["gmlp_s16_224"] = {"source": "hf-hub:timm/gmlp_s16_224.ra3_in1k", **_INCEPTION}
    table["efficientformer_l1"] = {"source": "hf-hub:timm/efficientformer_l1.snap_dist_in1k", **_IMAGENET}
    return dict(sorted(table.items()))


#: mixlab name -> the ImageNet-1k checkpoint that ``pretrained=True`` loads (timm's copies on the
#: Hugging Face Hub) and the normalisation it was trained with
DEFAULT_WEIGHTS: dict[str, dict] = _defaults()


def default_weights(name: str) -> dict:
    """The :data:`DEFAULT_WEIGHTS` entry of ``name``, or a ValueError saying what to pass instead."""
    if name not in DEFAULT_WEIGHTS:
        raise ValueError(f"no default pretrained weights are known for {name!r}; pass a checkpoint instead: "
                         f"pretrained='path/to/weights.safetensors' (or .pth / .bin), a state dict, or a Hugging "
                         f"Face Hub id 'hf-hub:org/name' (models with defaults: {', '.join(DEFAULT_WEIGHTS)})")
    return DEFAULT_WEIGHTS[name]


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


# -- reading ---------------------------------------------------------------------------------------
def describe_source(source: Any) -> str:
    """A short string for a source, as error messages and ``pretrained_cfg["source"]`` show it."""
    if isinstance(source, Mapping):
        return "<state dict>"
    return os.fspath(source) if isinstance(source, os.PathLike) else str(source)


def read_checkpoint(source: Source) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` from a file, a Hub id or a dict in memory.

    ``source`` is one of:

    * a ``.safetensors`` file (its string metadata is returned);
    * a PyTorch file ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``, read with
      ``torch.load(weights_only=True)`` only: a file that pickles Python objects besides
      tensors (an ``argparse.Namespace``, a whole ``nn.Module``) is refused with a ValueError
      explaining how to convert it, since unpickling it could run arbitrary code;
    * a Hugging Face Hub id ``hf-hub:org/name``, ``hf-hub:org/name@revision`` or
      ``hf-hub:org/name[@revision]/file.safetensors`` (without a file name,
      ``model.safetensors`` then ``pytorch_model.bin``; needs ``pip install 'mixlab[hub]'``);
    * a state dict (a mapping of names to tensors).

    Training checkpoints are unwrapped: the tensors under ``model`` / ``state_dict`` (else
    ``module``, ``net``, ``model_ema``, ``state_dict_ema``) are taken (``metadata["container"]``
    says which), a ``module.`` prefix on every key (DistributedDataParallel) is stripped, and
    values that are not tensors (an epoch counter) are dropped.
    """
    if isinstance(source, Mapping):
        return unwrap_checkpoint(source, "the state dict", {})
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint source is a path, a 'hf-hub:org/name' id or a state dict, "
                        f"not a {type(source).__name__}")
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith(HUB_PREFIX):
        return _read_hub(text)
    return _read_file(Path(text))


def _read_file(path: Path, where: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    where = where or str(path)
    suffix = path.suffix.lower()
    accepted = ", ".join(SAFETENSORS_EXTENSIONS + PTH_EXTENSIONS)
    if suffix not in SAFETENSORS_EXTENSIONS + PTH_EXTENSIONS:
        raise ValueError(f"cannot read {where!r}: unknown checkpoint extension {path.suffix or '(none)'!r}; "
                         f"accepted are {accepted}, a Hugging Face Hub id 'hf-hub:org/name', or a state dict")
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ValueError(f"no checkpoint file at {where!r}{hint}; check the path "
                         f"(Hub ids are written 'hf-hub:org/name')")
    if suffix in SAFETENSORS_EXTENSIONS:
        return _read_safetensors(path, where)
    return _read_torch(path, where)


def _read_safetensors(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import safetensors
    import safetensors.torch

    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{where!r} is not a readable safetensors file ({e})") from e
    return unwrap_checkpoint(state_dict, repr(where), metadata)


def _trusted_conversion_hint(path: Path, from_hub: bool) -> str:
    out = "weights.safetensors" if from_hub else str(path.with_suffix(".safetensors"))
    return ("python -c \"import torch, safetensors.torch as st; c = torch.load(" + repr(str(path)) +
            ", map_location='cpu', weights_only=False); c = c.get('model', c.get('state_dict', c)) "
            "if isinstance(c, dict) else c; c = c.state_dict() if hasattr(c, 'state_dict') else c; "
            "st.save_file({k: v.contiguous().clone() for k, v in c.items() if isinstance(v, torch.Tensor)}, "
            + repr(out) + ")\"")


def _read_torch(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            what = f"Python objects besides tensors (e.g. {found.group(1)})"
        else:
            reason = re.search(r"(Unsupported [^\n.]*)", text)
            what = ("data that torch.load(weights_only=True) does not accept"
                    + (f" ({reason.group(1).strip()})" if reason else "") +
                    "; it may not be a PyTorch checkpoint at all")
        raise ValueError(
            f"{where!r} holds {what}. mixlab will not unpickle it: unpickling can run arbitrary code. If you "
            f"trust the file, convert it to safetensors in a trusted environment, e.g.\n  "
            f"{_trusted_conversion_hint(path, from_hub=where.startswith(HUB_PREFIX))}\n"
            f"then load the .safetensors file") from None
    except (EOFError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "the file is empty or truncated"
        raise ValueError(f"{where!r} is not a readable PyTorch checkpoint ({reason})") from e
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise ValueError(f"{where!r} holds a {type(obj).__name__}, not a state dict (a dict of names to tensors)")
    return unwrap_checkpoint(obj, repr(where), {})


def _has_tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def unwrap_checkpoint(obj: Mapping, where: str = "the state dict", metadata: Mapping[str, str] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict inside a (possibly nested) training checkpoint, with wrapper prefixes
    stripped and non-tensor values dropped; ``metadata`` says what was done."""
    metadata = dict(metadata or {})
    path: list[str] = []
    for _ in range(4):  # a container entry holding a dict of tensors (or another container) wins over the top level
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and (
            _has_tensors(obj[k]) or any(isinstance(obj[k].get(c), Mapping) for c in CONTAINER_KEYS))), None)
        if inner is None:
            break
        path.append(inner)
        obj = obj[inner]
    if path:
        metadata["container"] = "/".join(path)
    state_dict: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            state_dict[k] = v
        else:
            dropped.append(str(k))
    if not state_dict:
        entries = ", ".join(map(str, list(obj)[:10])) or "nothing"
        raise ValueError(f"{where} holds no tensors (found: {entries}); expected a state dict, or a checkpoint "
                         f"with one under {' / '.join(repr(k) for k in CONTAINER_KEYS)}")
    if dropped:
        metadata["dropped"] = ", ".join(dropped)
    for prefix in WRAPPER_PREFIXES:
        while state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
            metadata["stripped_prefix"] = metadata.get("stripped_prefix", "") + prefix
    return state_dict, metadata


def parse_hub_id(source: str) -> tuple[str, str | None, str | None]:
    """``hf-hub:org/name[@revision][/path/file.ext]`` -> ``(repo_id, revision, filename)``."""
    rest = source[len(HUB_PREFIX):].strip()
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{source!r} is not a Hub id; write 'hf-hub:org/name', 'hf-hub:org/name@revision' or "
                         f"'hf-hub:org/name/file.safetensors'")
    name, _, revision = parts[1].partition("@")
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{name}", revision or None, filename


def _version() -> str:
    from ..version import __version__
    return __version__


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read_hub(source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    repo_id, revision, filename = parse_hub_id(source)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import utils as errors
    except ImportError:
        raise ValueError(f"loading {source!r} needs the huggingface_hub package: pip install 'mixlab[hub]' "
                         f"(or download the file yourself and pass its path)") from None
    local_only = _env_true("HF_HUB_OFFLINE")  # honoured at call time, not only at import
    candidates = [filename] if filename else list(HUB_FILENAMES)
    unreachable: BaseException | None = None
    for name in candidates:
        try:
            path = hf_hub_download(repo_id, name, revision=revision, local_files_only=local_only,
                                   library_name="mixlab", library_version=_version())
        except errors.LocalEntryNotFoundError as e:  # offline, or the Hub could not be reached
            unreachable = e
            local_only = True  # look for the remaining names in the cache only: no more timeouts
            continue
        except errors.RepositoryNotFoundError:
            raise ValueError(f"{source!r}: there is no Hugging Face Hub repository {repo_id!r} (or it is private or "
                             f"gated: log in with `huggingface-cli login`)") from None
        except errors.RevisionNotFoundError:
            raise ValueError(f"{source!r}: the repository {repo_id!r} has no revision {revision!r}") from None
        except errors.EntryNotFoundError:
            continue  # not in this repository: try the next name
        except (ConnectionError, TimeoutError) as e:
            unreachable = e
            local_only = True
            continue
        except Exception as e:  # an HTTP error, or a transport error of whichever HTTP client
            if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
                unreachable = e
                local_only = True
                continue
            raise ValueError(f"could not download {source!r} from the Hugging Face Hub: {e}") from e
        metadata = {"hub_repo": repo_id, "hub_file": name}
        if revision:
            metadata["hub_revision"] = revision
        state_dict, file_meta = _read_file(Path(path), where=f"{HUB_PREFIX}{repo_id}/{name}")
        return state_dict, {**file_meta, **metadata}
    tried = " or ".join(candidates)
    if unreachable is not None:
        why = ("offline mode is on (HF_HUB_OFFLINE)" if _env_true("HF_HUB_OFFLINE")
               else "the Hub could not be reached (no network?)")
        raise ValueError(
            f"cannot download {source!r}: {why}, and {tried} of {repo_id!r} is not in the local Hugging Face cache. "
            f"Download the file where the Hub can be reached (e.g. `huggingface-cli download {repo_id} "
            f"{candidates[0]}`) and pass the local file instead, e.g. pretrained='path/to/{candidates[0]}' or "
            f"`mixlab convert path/to/{candidates[0]} OUT.safetensors --model NAME`")
    raise ValueError(f"{source!r}: the repository {repo_id!r} has no {tried}; name the file: "
                     f"'hf-hub:{repo_id}/FILE.safetensors'")


def metadata_config(metadata: Mapping[str, str]) -> dict:
    """``mean``, ``std``, ``input_size`` and ``num_classes`` from a mixlab-written checkpoint's
    metadata (``input_size`` as JSON ``[C, H, W]``, or ``in_chans`` and ``img_size``)."""
    cfg: dict = {}

    def parse(key):
        try:
            return json.loads(metadata[key])
        except (KeyError, TypeError, ValueError):
            return None

    for key in ("mean", "std"):
        value = parse(key)
        if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
            cfg[key] = tuple(float(x) for x in value)
    size = parse("input_size")
    if isinstance(size, list) and len(size) == 3 and all(isinstance(x, int) for x in size):
        cfg["input_size"] = tuple(size)
    else:
        img, chans = parse("img_size"), parse("in_chans")
        if isinstance(img, int) and isinstance(chans, int):
            cfg["input_size"] = (chans, img, img)
    num_classes = parse("num_classes")
    if isinstance(num_classes, int):
        cfg["num_classes"] = num_classes
    return cfg


# -- loading ---------------------------------------------------------------------------------------
def _unwrap_model(model: nn.Module) -> nn.Module:
    from ..engine.ema import unwrap_model
    from ..models.base import FeatureExtractor

    while True:
        model = unwrap_model(model)
        if isinstance(model, FeatureExtractor):
            model = model.model
        else:
            return model


def _classifier_prefixes(model: nn.Module) -> list[str]:
    prefixes = ["head.fc", "head_dist"]
    if hasattr(model, "get_classifier"):
        fc = model.get_classifier()
        prefixes += [n for n, m in model.named_modules() if m is fc and n and n not in prefixes]
    return prefixes


def _classifier_keys(state_dict: Mapping, prefixes: list[str]) -> list[str]:
    return [f"{p}.{s}" for p in prefixes for s in ("weight", "bias") if f"{p}.{s}" in state_dict]


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
    from .convert import convert_state_dict, detect_format

    names = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    known = sum(k in model_sd for k in names)
    classifier = set(_classifier_keys(model_sd, prefixes)) | set(_classifier_keys(state_dict, prefixes))
    if known == len(names) and all(state_dict[k].shape == model_sd[k].shape for k in names if k not in classifier):
        return "mixlab", dict(state_dict)
    try:
        return detect_format(dict(state_dict)), dict(convert_state_dict(dict(state_dict), model))
    except ValueError:
        if names and known >= len(names) / 2:
            return "mixlab", dict(state_dict)
        raise


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "\n      ".join(items[:limit])
    more = f"\n      ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def load_pretrained(model: nn.Module, source: Source, strict: bool = True,
                    num_classes_from_checkpoint: bool = False) -> LoadResult:
    """Load the weights of ``source`` (see :func:`read_checkpoint`) into ``model``.

    The checkpoint is converted to mixlab's names (timm's and the authors' layouts; position
    embeddings and relative position bias tables resampled to the model). When its classifier
    has another number of classes than the model's (or there is none), the model keeps its
    freshly initialised classifier and a warning says so; with
    ``num_classes_from_checkpoint=True`` the model's classifier is instead rebuilt with the
    checkpoint's number of classes and loaded.

    With ``strict=True`` any missing, unexpected or mis-shaped tensor raises a ValueError
    listing them all (BatchNorm's ``num_batches_tracked`` counters excepted); with
    ``strict=False`` what fits is loaded and the rest is reported in the returned
    :class:`LoadResult`. ``model`` may be wrapped (``features_only``, DDP, ``torch.compile``).
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
    model = _unwrap_model(model)
    metadata = dict(metadata or {})
    prefixes = _classifier_prefixes(model)
    model_sd = model.state_dict()
    fmt, converted = _convert(state_dict, model, model_sd, prefixes)
    result = LoadResult(format=fmt, source=source, metadata=metadata, resized=_resized(state_dict, converted))

    # -- the classifier --------------------------------------------------------------------------
    ours, theirs = _classifier_keys(model_sd, prefixes), _classifier_keys(converted, prefixes)
    fresh: list[str] = []  # the model's classifier tensors that keep their initialisation
    n_model = model_sd["head.fc.weight"].shape[0] if "head.fc.weight" in model_sd else 0
    w = converted.get("head.fc.weight")
    if num_classes_from_checkpoint and w is not None and w.ndim == 2 and w.shape[0] != n_model and (
            n_model == 0 or w.shape[1:] == model_sd["head.fc.weight"].shape[1:]):
        model.reset_classifier(w.shape[0])  # the checkpoint's number of classes
        model_sd = model.state_dict()
        ours, n_model = _classifier_keys(model_sd, prefixes), w.shape[0]
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
    counter = "num_batches_tracked"
    result.missing = [k for k in model_sd if k not in converted and k not in fresh and not k.endswith(counter)]
    result.unexpected = [k for k in converted if k not in model_sd and not k.endswith(counter)]
    result.mismatched = [f"{k}: {tuple(converted[k].shape)} vs {tuple(model_sd[k].shape)}" for k in model_sd
                         if k in converted and converted[k].shape != model_sd[k].shape]
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise ValueError(_mismatch_message(model, result, architecture_kwargs))

    final = {k: v for k, v in converted.items() if k in model_sd and v.shape == model_sd[k].shape}
    for k in model_sd:  # counters and the fresh classifier: the model's own values
        if k not in final and (k.endswith(counter) or k in fresh):
            final[k] = model_sd[k]
    model.load_state_dict(final, strict=strict)
    return result


def _mismatch_message(model: nn.Module, r: LoadResult, arch_kwargs: Mapping | None) -> str:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    lines = [f"the checkpoint {r.source} does not fit the model {name!r} (detected checkpoint format: {r.format}):"]
    if r.missing:
        lines.append(f"  - {len(r.missing)} missing key(s) (in the model, not in the checkpoint):\n      "
                     + _listing(r.missing))
    if r.unexpected:
        lines.append(f"  - {len(r.unexpected)} unexpected key(s) (in the checkpoint, not in the model):\n      "
                     + _listing(r.unexpected))
    if r.mismatched:
        lines.append(f"  - {len(r.mismatched)} shape mismatch(es) (checkpoint vs model):\n      "
                     + _listing(r.mismatched))
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


# -- create_model(pretrained=...) ------------------------------------------------------------------
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
    weights then do not fit). A mixlab-written checkpoint's input size and channels are the
    defaults; without an explicit ``num_classes`` the model takes the checkpoint's number of
    classes.
    """
    from .convert import architecture_kwargs

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
    defaults: dict = {}
    if "input_size" in from_meta:
        c, h, w = from_meta["input_size"]
        defaults = {"in_chans": c, "img_size": h if h == w else (h, w)}
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
    cfg = {**extra_cfg, **{k: v for k, v in from_meta.items() if k in ("mean", "std")}}
    model.pretrained_cfg.update(cfg, source=describe_source(source), source_format=result.format)
    return model
