"""Weight files: the one reader and writer of mixlab's checkpoint room.

* :func:`read_checkpoint`: a ``.safetensors`` file, a PyTorch file (``.pth``, ``.pt``,
  ``.bin``, ``.ckpt``; read with ``torch.load(weights_only=True)`` only, never a full
  unpickle), a state dict in memory, or a Hugging Face Hub id (``hf-hub:org/name``) ->
  ``(state_dict, metadata)``, unwrapped from training checkpoints;
* :func:`save_weights` / :func:`load_weights`: a state dict and its string metadata as a
  safetensors file, written atomically (:func:`mixlab.fileio.atomic_write`), read back as it is
  (:func:`load_metadata`: the metadata alone);
* :func:`checkpoint_metadata` writes, :func:`metadata_config` reads the string metadata of a
  mixlab checkpoint (training runs and ``mixlab convert`` write the same keys).

A file that cannot be read, or holds no tensors, raises :class:`CheckpointError` (a ValueError)
naming it; a Hub id that cannot be fetched, a ValueError saying why.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import safetensors
import safetensors.torch
import torch

from ..fileio import atomic_write
from ..version import __version__

__all__ = ["CheckpointError", "read_checkpoint", "unwrap_checkpoint", "describe_source", "parse_hub_id",
           "save_weights", "load_weights", "load_metadata", "checkpoint_metadata", "metadata_config",
           "timm_data_config",
           "PTH_EXTENSIONS", "SAFETENSORS_EXTENSIONS"]

Source = Union[str, os.PathLike, Mapping]
PathLike = Union[str, os.PathLike]
SAFETENSORS_EXTENSIONS = (".safetensors",)
PTH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
HUB_PREFIX = "hf-hub:"
#: files looked for, in this order, in a Hub repository when the id names none
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")

#: timm's description of a checkpoint on the Hub (and in a downloaded copy of its repository), whose
#: ``pretrained_cfg`` holds the weights' data configuration
TIMM_CONFIG = "config.json"
#: the metadata entry in which :func:`read_checkpoint` returns that data configuration (JSON)
TIMM_DATA_CONFIG_KEY = "timm_data_config"

#: entries of a training checkpoint that may hold the weights, the plain ones first
CONTAINER_KEYS = ("model", "state_dict", "module", "net", "model_ema", "state_dict_ema")
#: key prefixes that wrappers add (DistributedDataParallel, torch.compile), stripped when every key has one
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, incomplete, or does not fit the model it is loaded into."""


# -- reading ---------------------------------------------------------------------------------------
def describe_source(source: Any) -> str:
    """A short string for a source, as error messages and ``pretrained_cfg["source"]`` show it."""
    if isinstance(source, Mapping):
        return "<state dict>"
    return os.fspath(source) if isinstance(source, os.PathLike) else str(source)


#: the metadata entry :func:`read_checkpoint` adds when it took a task run's model out of its module
DROPPED_KEY = "backbone_dropped"


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

    A file next to a timm ``config.json`` (a timm repository on the Hub, or a downloaded copy of
    one) gets its data configuration in ``metadata["timm_data_config"]`` (:func:`timm_data_config`).

    The checkpoint of a run whose task trains the model inside a module of its own (masked image
    modeling: the model as ``encoder`` beside a decoder) records where the model is
    (``metadata["backbone_prefix"]``): only the model's tensors are returned, with that prefix
    stripped; ``metadata["backbone_dropped"]`` (JSON) and a warning name the task's tensors left
    out (:func:`backbone_state`).
    """
    if isinstance(source, Mapping):
        return unwrap_checkpoint(source, "the state dict", {})
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a checkpoint source is a path, a 'hf-hub:org/name' id or a state dict, "
                        f"not a {type(source).__name__}")
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith(HUB_PREFIX):
        state_dict, metadata = _read_hub(text)
    else:
        state_dict, metadata = _read_file(Path(text))
    state_dict, dropped = backbone_state(state_dict, metadata)
    if dropped:
        metadata[DROPPED_KEY] = json.dumps(dropped)
        warnings.warn(f"{text} holds a {metadata.get('task', 'task')} run's module: took its model "
                      f"({metadata['backbone_prefix']}*) and left out the task's own tensors: {', '.join(dropped)}",
                      UserWarning, stacklevel=2)
    return state_dict, metadata


def backbone_state(state_dict: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors of a checkpoint whose metadata records a ``backbone_prefix`` (the module a task
    trained holds the model there: ``encoder.``), prefix stripped, and the names of the task's tensors left
    out, grouped by their first part (``decoder.*``, ``mask_token``); a checkpoint without one as it is."""
    prefix = metadata.get("backbone_prefix") or ""
    if not prefix:
        return dict(state_dict), []
    kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        raise CheckpointError(f"the checkpoint records its model under {prefix!r} but holds no tensor there")
    dropped = sorted({k.split(".", 1)[0] + (".*" if "." in k else "") for k in state_dict if not k.startswith(prefix)})
    return kept, dropped


def _read_file(path: Path, where: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    where = where or str(path)
    suffix = path.suffix.lower()
    accepted = ", ".join(SAFETENSORS_EXTENSIONS + PTH_EXTENSIONS)
    if suffix not in SAFETENSORS_EXTENSIONS + PTH_EXTENSIONS:
        raise CheckpointError(f"cannot read {where!r}: unknown checkpoint extension {path.suffix or '(none)'!r}; "
                         f"accepted are {accepted}, a Hugging Face Hub id 'hf-hub:org/name', or a state dict")
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise CheckpointError(f"no checkpoint file at {where!r}{hint}; check the path "
                         f"(Hub ids are written 'hf-hub:org/name')")
    state_dict, metadata = (_read_safetensors if suffix in SAFETENSORS_EXTENSIONS else _read_torch)(path, where)
    timm_cfg = _timm_data_config(path.parent / TIMM_CONFIG)
    if timm_cfg:
        metadata[TIMM_DATA_CONFIG_KEY] = json.dumps(timm_cfg)
    return state_dict, metadata


def _timm_data_config(path: Path) -> dict:
    """The data configuration in a timm ``config.json`` (its ``pretrained_cfg``: ``input_size``,
    ``mean``, ``std``, ``crop_pct``, ``interpolation``, those present), or {} where there is none
    or it cannot be read (it only describes the weights: a broken one does not stop loading them)."""
    try:
        cfg = json.loads(path.read_text()).get("pretrained_cfg")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if cfg.get(k) is not None}


def timm_data_config(metadata: Mapping[str, str]) -> dict:
    """The data configuration timm's ``config.json`` next to the checkpoint gave
    (:func:`read_checkpoint` keeps it in the metadata as ``timm_data_config``), or {}."""
    try:
        cfg = json.loads(metadata[TIMM_DATA_CONFIG_KEY])
    except (KeyError, TypeError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}




def _safetensors_file(path: Path, where: str, device: str | torch.device = "cpu", with_tensors: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none unless ``with_tensors``) and string metadata of a safetensors file, as they are."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where!r} is not a readable safetensors file ({e})") from e
    return tensors, metadata


def _read_safetensors(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state_dict, metadata = _safetensors_file(path, where)
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
        raise CheckpointError(
            f"{where!r} holds {what}. mixlab will not unpickle it: unpickling can run arbitrary code. If you "
            f"trust the file, convert it to safetensors in a trusted environment, e.g.\n  "
            f"{_trusted_conversion_hint(path, from_hub=where.startswith(HUB_PREFIX))}\n"
            f"then load the .safetensors file") from None
    except (EOFError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "the file is empty or truncated"
        raise CheckpointError(f"{where!r} is not a readable PyTorch checkpoint ({reason})") from e
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{where!r} holds a {type(obj).__name__}, not a state dict (a dict of names to tensors)")
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
        raise CheckpointError(f"{where} holds no tensors (found: {entries}); expected a state dict, or a checkpoint "
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
                                   library_name="mixlab", library_version=__version__)
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
        if "/" not in name:  # timm's config.json (its pretrained_cfg) lands next to the file, where _read_file reads it
            try:
                hf_hub_download(repo_id, TIMM_CONFIG, revision=revision, local_files_only=local_only,
                                library_name="mixlab", library_version=__version__)
            except Exception:  # no config.json (not a timm repository), or offline: the weights need none
                pass
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
    """``mean``, ``std``, ``input_size``, ``num_classes``, ``classes`` (the class names, a list),
    ``crop_pct``, ``interpolation`` and ``model_kwargs`` (the model's other ``create_model`` arguments,
    when there are any) from a mixlab-written
    checkpoint's metadata (``input_size`` as JSON ``[C, H, W]``, or ``in_chans`` and ``img_size``); a
    key the metadata lacks (earlier versions wrote no ``classes``, ``crop_pct``, ``interpolation``) is
    left out. :meth:`mixlab.data.Preprocessing.from_metadata` builds the data configuration from it."""
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
    classes = parse("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        cfg["classes"] = classes
    crop = parse("crop_pct")
    if isinstance(crop, (int, float)) and not isinstance(crop, bool):
        cfg["crop_pct"] = float(crop)
    if isinstance(metadata.get("interpolation"), str):
        cfg["interpolation"] = metadata["interpolation"]
    model_kwargs = parse("model_kwargs")
    if isinstance(model_kwargs, dict) and model_kwargs:
        cfg["model_kwargs"] = model_kwargs
    return cfg


# -- safetensors files of mixlab's own ---------------------------------------------------------------
def save_weights(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
                 ) -> None:
    """Write ``state_dict`` (names -> tensors) and string ``metadata`` as a safetensors file, atomically.

    Non-contiguous tensors and tensors sharing memory with an earlier one (tied weights,
    views) are cloned first, as safetensors requires. Tensors on a GPU are copied to the CPU.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[torch.device, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save_weights: state dict keys must be strings, got {name!r} ({type(name).__name__})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_weights: {name!r} is a {type(t).__name__}, not a tensor; safetensors stores tensors "
                            f"only (put other values in the metadata as strings, or use save_state)")
        t = t.detach()
        if t.layout != torch.strided:
            raise TypeError(f"save_weights: {name!r} is a {t.layout} tensor; convert it with .to_dense() first")
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in seen_storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen_storages.add(storage)
        tensors[name] = t
    meta = None
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            k, v = next(iter(bad.items()))
            raise TypeError(f"save_weights: metadata must map strings to strings; {k!r} maps to a "
                            f"{type(v).__name__} ({v!r}); convert it with str() or json.dumps()")
        meta = dict(metadata)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file as it is: ``(state_dict, metadata)`` (metadata ``{}`` when there is none).
    FileNotFoundError when there is no file, CheckpointError when it is not safetensors."""
    path = _weights_file(path)
    return _safetensors_file(path, str(path), device)


def load_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors (``{}`` when there is none).
    FileNotFoundError when there is no file, CheckpointError when it is not safetensors."""
    path = _weights_file(path)
    return _safetensors_file(path, str(path), with_tensors=False)[1]


def _weights_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {str(path)!r}")
    return path


# -- metadata --------------------------------------------------------------------------------------
#: the interpolations a checkpoint's ``interpolation`` may name (timm's names)
INTERPOLATION_NAMES = ("bicubic", "bilinear", "nearest")


def checkpoint_metadata(architecture: str, *, num_classes: int, in_chans: int, img_size, mean, std,
                        crop_pct: float, interpolation: str, model_kwargs: Mapping | None = None,
                        classes: Sequence[str] | None = None, **extra: str) -> dict[str, str]:
    """The string metadata of a mixlab checkpoint (a training run's or ``mixlab convert``'s).

    ``architecture``: the model name (or specification) to build; ``img_size``: an int or (H, W);
    ``mean`` / ``std``: the input normalisation; ``crop_pct`` / ``interpolation``: the rest of the
    evaluation transform (:class:`mixlab.data.Preprocessing`: the fraction of the resized image the
    centre crop keeps, 1.0 for resize only; bicubic, bilinear or nearest); ``model_kwargs``: the other ``create_model``
    keyword arguments; ``classes``: the class names of the training data in label order (a
    classifier's ``num_classes`` outputs; another task's outputs may be other things), left out when
    not given; ``extra``: more string entries (``source``, ``source_format``, ...).
    Written: ``architecture``, ``num_classes``, ``in_chans``, ``img_size`` (JSON int or [H, W]),
    ``input_size`` (JSON [C, H, W]), ``mean``, ``std`` (JSON lists), ``crop_pct`` (JSON float),
    ``interpolation``, ``model_kwargs`` (JSON),
    ``mixlab_version``, ``classes`` (JSON list) when given, then ``extra``; :func:`metadata_config`
    reads them back.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(f"checkpoint_metadata: crop_pct is a fraction in (0, 1] (1.0: resize only), got {crop_pct!r}")
    if interpolation not in INTERPOLATION_NAMES:
        raise ValueError(f"checkpoint_metadata: interpolation is one of {', '.join(INTERPOLATION_NAMES)}, "
                         f"got {interpolation!r}")
    meta = {"architecture": str(architecture), "num_classes": str(int(num_classes)), "in_chans": str(int(in_chans)),
            "img_size": json.dumps(h if h == w else [h, w]), "input_size": json.dumps([int(in_chans), h, w]),
            "mean": json.dumps([float(x) for x in mean]), "std": json.dumps([float(x) for x in std]),
            "crop_pct": json.dumps(float(crop_pct)), "interpolation": str(interpolation),
            "model_kwargs": json.dumps(dict(model_kwargs or {})), "mixlab_version": __version__}
    if classes is not None:
        meta["classes"] = json.dumps([str(c) for c in classes])
    bad = [k for k, v in extra.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"checkpoint_metadata: extra entries are strings; {', '.join(bad)} are not")
    return {**meta, **extra}
