"""Predicting the classes of image files with a trained model (``mixlab predict``).

:func:`load_predictor` turns what the user names into a :class:`Predictor` (the model in eval mode,
its data configuration, its class names): a run directory (its best checkpoint), a checkpoint file
with mixlab metadata, or a registered model name (or specification) with a weights source.
:func:`find_images` lists the image files of paths and directories; :func:`predict` reads them
with Pillow, prepares them with the model's own data configuration
(:meth:`Preprocessing.eval_transform <mixlab.data.Preprocessing.eval_transform>`, as ``mixlab eval``
does), runs them in batches and yields the top-k classes with their probabilities (softmax).
A file Pillow cannot read is reported and skipped, or with ``strict`` stops everything.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .config import RUN_CONFIG, ConfigError, load_run_config
from .data import Preprocessing, recorded_info
from .engine.checkpoint import run_weights
from .factory import create_model
from .runs import check_class_scores, load_run_model
from .weights import load_metadata

__all__ = ["IMAGE_EXTENSIONS", "Predictor", "Prediction", "Skipped", "load_predictor", "find_images", "predict",
           "read_classes"]

#: the file name endings a directory's images are found by (files named on their own are read whatever their name)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


@dataclass
class Predictor:
    """A model ready to predict: ``model`` (eval mode, on the CPU until :func:`predict` moves it), the
    ``preprocessing`` its inputs get, the ``classes`` of its outputs (``None``: only indices are
    known), and ``source`` (what was loaded, in words)."""

    model: nn.Module
    preprocessing: Preprocessing
    classes: list[str] | None
    source: str

    def label(self, index: int) -> str:
        """The name of output ``index``, or the index as a string where no names are known."""
        return self.classes[index] if self.classes is not None else str(index)


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first: ``indices``, ``labels``, ``probabilities``."""

    image: str
    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict:
        return {"image": self.image, "top_k": [{"label": lab, "index": i, "probability": p} for i, lab, p in
                                                zip(self.indices, self.labels, self.probabilities)]}


@dataclass
class Skipped:
    """An image file that could not be read, and why."""

    image: str
    error: str


def read_classes(path) -> list[str]:
    """Class names from a text file, one a line in output order (blank lines at the end ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the class names file {str(path)!r}: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or any(not n for n in names):
        raise ConfigError(f"{path}: a class names file holds one non-empty name a line (found "
                          f"{'none' if not names else 'an empty line'})")
    return names


def _check_classes(names: list[str] | None, num_classes: int, where: str) -> list[str] | None:
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{where} names {len(names)} classes, the model has {num_classes} outputs; give one name a "
                          f"line for each output, in order")
    return names


def _run_predictor(path: Path, classes: list[str] | None) -> Predictor:
    """The predictor of a run directory (its best checkpoint) or of a checkpoint file inside one."""
    run_dir, weights_path = run_weights(path, use_ema=False)
    check_class_scores(run_dir, "mixlab predict")
    cfg = load_run_config(run_dir)
    metadata = load_metadata(weights_path)
    # the model is rebuilt from what the checkpoint records: the training data need not be at hand
    info = recorded_info(metadata, cfg.data.name, where=str(weights_path))
    names = classes if classes is not None else (info.classes or None)
    if names is None:  # runs written before checkpoints recorded them: the summary may
        try:
            names = json.loads((run_dir / "summary.json").read_text()).get("classes")
        except (OSError, ValueError, AttributeError):
            names = None
    num_classes = info.num_classes
    model = load_run_model(weights_path, info=info)[0]
    where = "--classes" if classes is not None else str(weights_path)
    return Predictor(model, Preprocessing.from_model(model), _check_classes(names, num_classes, where),
                     f"{cfg.model.name} ({weights_path})")


def load_predictor(model_or_run: str, weights: str | None = None, classes_file: str | None = None) -> Predictor:
    """The :class:`Predictor` that ``model_or_run`` names:

    * a run directory (its ``checkpoints/best.safetensors``), or a checkpoint file inside a run: the
      run's model, built from what the checkpoint records (the training data need not be at hand),
      its class names (the checkpoint's metadata, else the run's ``summary.json``);
    * a weights file with mixlab metadata (``mixlab convert``'s output, a checkpoint copied out of its
      run): the model its metadata names;
    * a registered model name or specification, with ``weights`` (a file or ``hf-hub:org/name``): class
      names from the weights' metadata where it has them.

    ``classes_file`` (one name a line) gives or replaces the class names; without any, the outputs are
    named by their index. The data configuration is the checkpoint's
    (:meth:`Preprocessing.from_metadata <mixlab.data.Preprocessing.from_metadata>`, or for weights
    loaded into a named model what :func:`~mixlab.factory.create_pretrained` found). Bad input is a
    ConfigError (or ValueError) saying what would be right."""
    classes = read_classes(classes_file) if classes_file is not None else None
    path = Path(model_or_run)
    if path.exists():
        if weights is not None:
            raise ConfigError(f"{model_or_run!r} is a run or a weights file, which brings its own weights; give "
                              f"--weights with a model name instead")
        run_dir = path if path.is_dir() else path.parent.parent
        if (run_dir / RUN_CONFIG).is_file():
            return _run_predictor(path, classes)
        if path.is_dir():
            raise ConfigError(f"{model_or_run!r} is a directory without {RUN_CONFIG}: give a mixlab run directory, a "
                              f"weights file with mixlab metadata, or a model name with --weights")
        arch = load_metadata(path).get("architecture") if path.suffix.lower() == ".safetensors" else None
        if not arch:
            raise ConfigError(f"{model_or_run!r} has no mixlab metadata naming its model; give the model name and the "
                              f"file as --weights: mixlab predict MODEL --weights {model_or_run} IMAGES...")
        name, weights = arch, str(path)
    else:
        if weights is None:
            raise ConfigError(f"{model_or_run!r} is neither a run directory nor a file; for a registered model name "
                              f"give its weights with --weights FILE or --weights hf-hub:org/name (random weights "
                              f"predict nothing)")
        name = model_or_run
    model = create_model(name, pretrained=weights).eval()
    prep = Preprocessing.from_model(model)
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ConfigError(f"{name} with the weights {weights} has no classifier (num_classes 0); it predicts no class")
    names = classes if classes is not None else model.pretrained_cfg.get("classes")
    where = "--classes" if classes is not None else str(weights)
    return Predictor(model, prep, _check_classes(names, num_classes, where), f"{name} ({weights})")


def find_images(paths: Sequence[str]) -> list[Path]:
    """The image files ``paths`` name: a file as it is (whatever its name), a directory's files with an
    :data:`IMAGE_EXTENSIONS` ending, at any depth, sorted by path; each file once. A path that does not
    exist, or none found at all, is a ConfigError."""
    found: list[Path] = []
    empty = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not inside:
                empty.append(str(p))
            found += inside
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"{str(p)!r} does not exist: give image files or directories of them")
    seen: set[Path] = set()
    unique = [f for f in found if not (f.resolve() in seen or seen.add(f.resolve()))]
    if not unique:
        where = f" in {', '.join(empty)}" if empty else ""
        raise ConfigError(f"no image files found{where} (looked for {', '.join(IMAGE_EXTENSIONS)} files, at any "
                          f"depth)")
    return unique


def _read(path: Path, channels: int) -> torch.Tensor:
    """The image file as a ``uint8`` (C, H, W) tensor of ``channels`` (1: grey, 3: RGB; GIF: its first
    frame). Pillow's exception when the file is not a whole image."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as im:
        im.load()  # decode it all now: a truncated file fails here, not halfway through a batch
        return F.pil_to_tensor(im.convert("L" if channels == 1 else "RGB"))


def predict(predictor: Predictor, images: Sequence[Path], batch_size: int = 32, top_k: int = 5,
            device: str | torch.device = "cpu", strict: bool = False, progress: bool = False
            ) -> Iterator[Prediction | Skipped]:
    """The predictions of ``images``: a :class:`Prediction` for each image read, in the order of
    ``images``, and a :class:`Skipped` for each file Pillow cannot read, as soon as it fails (before the
    predictions of a batch still being filled; with ``strict``, a ConfigError at the first instead). Images are prepared with ``predictor.preprocessing`` and run ``batch_size`` at a time on
    ``device``; ``top_k`` is capped by the number of classes; ``progress`` shows a bar on stderr."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    prep = predictor.preprocessing
    channels = prep.input_size[0]
    if channels not in (1, 3):
        raise ConfigError(f"image files give 1 (grey) or 3 (RGB) channels; this model takes {channels}")
    transform = prep.eval_transform()
    model = predictor.model.to(device).eval()
    bar = _bar(progress, len(images))
    batch: list[tuple[Path, torch.Tensor]] = []

    def run(batch) -> list[Prediction]:
        x = torch.stack([t for _, t in batch]).to(device)
        with torch.inference_mode():
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        k = min(top_k, probs.shape[-1])
        p, idx = probs.topk(k, dim=-1)
        return [Prediction(str(path), i.tolist(), [predictor.label(j) for j in i.tolist()], q.tolist())
                for (path, _), i, q in zip(batch, idx, p)]

    try:
        for path in images:
            try:
                x = transform(_read(path, channels))
            except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
                why = " ".join(str(e).split()) or type(e).__name__
                if strict:
                    raise ConfigError(f"unreadable image {path}: {why} (--strict stops at the first; without it "
                                      f"such files are reported and skipped)") from None
                yield Skipped(str(path), why)
                if bar is not None:
                    bar.update(1)
                continue
            batch.append((path, x))
            if len(batch) == batch_size:
                yield from run(batch)
                if bar is not None:
                    bar.update(len(batch))
                batch = []
        if batch:
            yield from run(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def _bar(enabled: bool, total: int) -> Callable | None:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="predict", unit="image", dynamic_ncols=True, leave=False, file=sys.stderr)
