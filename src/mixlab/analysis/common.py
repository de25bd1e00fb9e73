"""What the analysis commands share: loading a model (registered, with weights, or a trained
run), a batch of analysis images, and writing figures and JSON atomically."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn as nn

from .complexity import forward_hooks


def load_model(name: str | None, checkpoint: str | None = None, **kwargs) -> tuple[nn.Module, str, dict]:
    """A model for analysis, in eval mode on the CPU: ``(model, label, data)``.

    * ``checkpoint`` None: ``create_model(name, **kwargs)`` (random initialisation);
    * a mixlab run directory, or a checkpoint file inside one (``RUN/checkpoints/*.safetensors``):
      the run's model with its trained weights, built as the run built it (``name`` may be None;
      if given it must be the run's model);
    * any other weights file or ``hf-hub:`` id: ``create_model(name, pretrained=checkpoint)``.

    ``data`` describes the run's dataset ({} without a run): name, root, img_size, in_chans.
    """
    from ..config import RUN_CONFIG
    from ..factory import create_model

    if checkpoint is not None:
        path = Path(checkpoint)
        run_dir = path if path.is_dir() else path.parent.parent
        if (run_dir / RUN_CONFIG).is_file():
            from ..runs import check_class_scores, load_run_model
            check_class_scores(run_dir, "the analysis commands")
            model, cfg, info, weights = load_run_model(path)
            if name is not None and name != cfg.model.name:
                raise ValueError(f"{checkpoint!r} is a run of {cfg.model.name!r}, not of {name!r}; give that "
                                 f"model name or leave it out")
            data = dict(name=cfg.data.name, root=cfg.data.root, img_size=info.img_size, in_chans=info.in_chans)
            return model, f"{cfg.model.name} ({weights.parent.parent.name})", data
        if path.is_dir():
            raise ValueError(f"{checkpoint!r} is a directory without {RUN_CONFIG}: give a mixlab run directory "
                             f"or a weights file")
        if name is None:
            raise ValueError(f"{checkpoint!r} is not a mixlab run: name the model its weights are for")
        return create_model(name, pretrained=checkpoint, **kwargs).eval(), f"{name} ({path.name})", {}
    if name is None:
        raise ValueError("name a model (see `mixlab list`) or give a run directory as the checkpoint")
    return create_model(name, **kwargs).eval(), name, {}


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model was built for."""
    return (getattr(model, "in_chans", 3), *getattr(model, "img_size", (224, 224)))


def analysis_images(model: nn.Module, data: str | None = None, data_root: str | None = None, num_images: int = 8,
                    seed: int = 0, split: str = "val") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``num_images`` normalised images at the model's input size, with their labels: the first of a
    dataset's validation split (deterministic), or, with no ``data``, standard Gaussian noise (the
    labels then None)."""
    c, h, w = model_input_size(model)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(num_images, c, h, w, generator=g), None
    from ..data import build_datasets, build_transforms

    if h != w:
        raise ValueError(f"the datasets give square images; this model takes {h}x{w}")
    train, val, info = build_datasets(data, root=data_root, img_size=h, seed=seed)
    if info.in_chans != c:
        raise ValueError(f"{data} has {info.in_chans}-channel images, the model takes {c}; build it with "
                         f"in_chans={info.in_chans}")
    ds = val if split == "val" else train
    tf = build_transforms(info, False, h)
    n = min(num_images, len(ds))
    xs, ys = [], []
    for i in range(n):
        img, label = ds[i]
        xs.append(tf(img))
        ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys)


def first_calls(model: nn.Module, x: torch.Tensor, modules) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Run ``model(x)`` without gradients and return, for each ``(name, module)`` of ``modules``
    that ran, ``{name: (module, its input, its output)}`` at its first call: what the module
    really sees inside the network. Copies, since later in-place ops (RepLKNet's ReLU) would
    change them; the hooks return None (a forward hook's return value would replace the output)."""
    seen: dict = {}

    def keep(key):
        def hook(mod, args, out):
            seen.setdefault(key, (mod, args[0].detach().clone(), out.detach().clone()))
        return hook

    with forward_hooks((m, keep(n)) for n, m in modules), torch.no_grad():
        model(x)
    return seen


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_outputs(out_dir, json_name: str, payload: dict, figures: dict | None = None) -> dict[str, Path]:
    """Write ``payload`` as JSON and each ``{file name: matplotlib Figure}`` as PNG into ``out_dir``,
    each file atomically; returns the paths written."""
    from ..fileio import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for fname, fig in (figures or {}).items():
        write_atomic(out / fname, figure_png(fig))
        written[fname] = out / fname
    write_atomic(out / json_name, json.dumps(payload, indent=2, default=_jsonable) + "\n")
    written[json_name] = out / json_name
    return written


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def load_image(path, model: nn.Module) -> torch.Tensor:
    """An image file as the (1, C, H, W) input of ``model``: decoded with Pillow, converted to the
    model's channels (grey or RGB), prepared with its data configuration (input size, crop, mean and
    std: :meth:`Preprocessing.from_model <mixlab.data.Preprocessing.from_model>`, as ``mixlab predict``)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    from ..data import Preprocessing

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} does not exist")
    c = model_input_size(model)[0]
    if c not in (1, 3):
        raise ValueError(f"image files give 1 or 3 channels; this model takes {c}")
    try:
        with Image.open(path) as im:
            img = v2.functional.pil_to_tensor(im.convert("RGB" if c == 3 else "L"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {str(path)!r} as an image (JPEG, PNG, GIF, WebP, ...): {e}") from None
    return Preprocessing.from_model(model).eval_transform()(img)[None]
