"""Robustness of trained models: top-1 under occlusion, patch shuffling, noise and other input sizes.

The perturbations follow Naseer et al. (NeurIPS 2021, "Intriguing Properties of Vision
Transformers"), the study the seeds cite (``001_*.txt``) for ViTs' robustness to occlusion and
to shuffled patches:

* **random occlusion** (their "random PatchDrop"): the image is cut into a ``grid`` x ``grid``
  array of patches (14 x 14, the ViT-B/16 grid at 224, by default) and a fraction p of them,
  chosen at random per image, is set to zero — in normalised space, i.e. to the dataset's
  mean colour; p = 0, 0.1, ..., 0.9;
* **centre occlusion**: the same fraction of patches, taken as the centred square block (the
  object usually sits in the middle) — a deterministic, harder variant;
* **patch shuffle**: the image cut into g x g tiles (g = 2, 4, 8) put back in a random order (g = 1
  is the clean image); where the side is not a multiple of g, the central region that is gets
  shuffled and the border stays;
* **Gaussian noise** of standard deviation σ (in units of the dataset's standard deviation, the
  normalised space the model sees): σ = 0.1, 0.25, 0.5, 1.0;
* **input size**: the images resized (bilinear) to s times the training size, s = 0.5 … 1.5,
  each side rounded to the nearest multiple of the model's first stride (its patch or stem
  stride, which the input must divide); a model that cannot take a size (a fixed token count)
  gets no number for it, with the reason.

Everything is seeded: the same command gives the same numbers. :func:`evaluate_robustness`
returns them; :func:`plot_robustness` draws one panel per perturbation, a line per model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

OCCLUSION = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SHUFFLE = (1, 2, 4, 8)
NOISE = (0.0, 0.1, 0.25, 0.5, 1.0)
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def _patch_bounds(n: int, grid: int) -> torch.Tensor:
    """Edges of ``grid`` near-equal segments of a side of n pixels."""
    return torch.linspace(0, n, grid + 1).round().long()


def patch_mask(h: int, w: int, drop, grid: int) -> torch.Tensor:
    """A (h, w) boolean mask, True where the patches with flat indices ``drop`` (of a grid x grid
    array over the image) lie."""
    ys, xs = _patch_bounds(h, grid), _patch_bounds(w, grid)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for k in drop:
        r, c = divmod(int(k), grid)
        mask[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = True
    return mask


def random_occlusion(x: torch.Tensor, fraction: float, grid: int = 14, generator=None) -> torch.Tensor:
    """Zero ``round(fraction · grid²)`` patches chosen at random for each image of (B, C, H, W)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the occluded fraction must lie in [0, 1], got {fraction}")
    B, _, H, W = x.shape
    k = round(fraction * grid * grid)
    out = x.clone()
    if k == 0:
        return out
    for b in range(B):
        drop = torch.randperm(grid * grid, generator=generator)[:k]
        out[b, :, patch_mask(H, W, drop, grid)] = 0
    return out


def centre_occlusion(x: torch.Tensor, fraction: float, grid: int = 14) -> torch.Tensor:
    """Zero the ``round(fraction · grid²)`` patches nearest the image centre (a centred block: patches
    taken in order of their distance to the centre, ties broken by position)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the occluded fraction must lie in [0, 1], got {fraction}")
    k = round(fraction * grid * grid)
    out = x.clone()
    if k == 0:
        return out
    c = (grid - 1) / 2
    idx = torch.arange(grid * grid)
    r, q = idx // grid, idx % grid
    dist = torch.maximum((r - c).abs(), (q - c).abs()) * grid * grid + (r - c).abs() + (q - c).abs()
    order = sorted(range(grid * grid), key=lambda i: (float(dist[i]), i))
    out[:, :, patch_mask(x.shape[-2], x.shape[-1], order[:k], grid)] = 0
    return out


def patch_shuffle(x: torch.Tensor, grid: int, generator=None) -> torch.Tensor:
    """Cut each image into grid x grid tiles and put them back in a random order (one permutation
    per image). Only the centred region whose sides are multiples of ``grid`` is shuffled."""
    if grid < 1:
        raise ValueError(f"the shuffle grid must be >= 1, got {grid}")
    B, C, H, W = x.shape
    out = x.clone()
    if grid == 1:
        return out
    th, tw = H // grid, W // grid
    if th == 0 or tw == 0:
        raise ValueError(f"a {H}x{W} image cannot be cut into {grid}x{grid} tiles")
    y0, x0 = (H - th * grid) // 2, (W - tw * grid) // 2
    region = out[:, :, y0:y0 + th * grid, x0:x0 + tw * grid]
    tiles = region.reshape(B, C, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, C, th, tw)
    perm = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(B)])
    tiles = tiles[torch.arange(B)[:, None], perm]
    region.copy_(tiles.reshape(B, grid, grid, C, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(region.shape))
    return out


def gaussian_noise(x: torch.Tensor, sigma: float, generator=None) -> torch.Tensor:
    if sigma < 0:
        raise ValueError(f"the noise's standard deviation must be >= 0, got {sigma}")
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def resized_size(hw, scale: float, multiple: int = 1) -> tuple[int, int]:
    """``scale`` times the size ``hw``, each side rounded to the nearest multiple of ``multiple``."""
    return tuple(max(multiple, round(n * scale / multiple) * multiple) for n in hw)


def resize(x: torch.Tensor, scale: float, multiple: int = 1) -> torch.Tensor:
    H, W = x.shape[-2:]
    size = resized_size((H, W), scale, multiple)
    return x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                                   antialias=scale < 1)


@dataclass
class RobustnessResult:
    model: str
    images: int
    clean_top1: float
    curves: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)  # name -> (level, top-1)
    errors: dict[str, str] = field(default_factory=dict)  # "resolution 0.5" -> why not measured
    sizes: dict[float, tuple[int, int]] = field(default_factory=dict)  # resolution scale -> the input size used

    def to_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "clean_top1": self.clean_top1,
                "curves": {k: [list(p) for p in v] for k, v in self.curves.items()}, "errors": self.errors,
                "resolution_sizes": {str(k): list(v) for k, v in self.sizes.items()}}


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(x)


def evaluate_robustness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, name: str = "model",
                        grid: int = 14, occlusion=OCCLUSION, shuffle=SHUFFLE, noise=NOISE, scales=SCALES,
                        batch_size: int = 256, seed: int = 0) -> RobustnessResult:
    """Top-1 (%) of ``model`` on normalised ``images`` (N, C, H, W) with ``labels`` under each
    perturbation and level (see the module docstring); the model is evaluated in eval mode."""
    if images.ndim != 4 or len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"give N images (N, C, H, W) and N labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    was_training = model.training
    model.eval()
    try:
        clean = _top1(model, images, labels, batch_size)
        res = RobustnessResult(name, len(images), clean)
        g = torch.Generator().manual_seed(seed)
        res.curves["random occlusion"] = [
            (p, _top1(model, random_occlusion(images, p, grid, g), labels, batch_size)) for p in occlusion]
        res.curves["centre occlusion"] = [(p, _top1(model, centre_occlusion(images, p, grid), labels, batch_size))
                                          for p in occlusion]
        res.curves["patch shuffle"] = [(k, _top1(model, patch_shuffle(images, k, g), labels, batch_size))
                                       for k in shuffle]
        res.curves["gaussian noise"] = [(s, _top1(model, gaussian_noise(images, s, g), labels, batch_size))
                                        for s in noise]
        curve = []
        # sizes the model's stem can cut: the multiple of its first stage's stride nearest s times the size
        multiple = int(getattr(model, "feature_info", [{}])[0].get("reduction", 1) or 1)
        res.sizes = {s: resized_size(images.shape[-2:], s, multiple) for s in scales}
        for s in scales:
            try:
                curve.append((s, _top1(model, resize(images, s, multiple), labels, batch_size)))
            except (ValueError, RuntimeError) as e:
                curve.append((s, None))
                res.errors[f"resolution {s}"] = str(e).splitlines()[0]
        res.curves["resolution"] = curve
    finally:
        model.train(was_training)
    return res


_AXES = {"random occlusion": "patches dropped (fraction)", "centre occlusion": "patches dropped (fraction)",
         "patch shuffle": "shuffle grid (g x g tiles)", "gaussian noise": "noise σ (dataset std units)",
         "resolution": "input size / training size"}


def plot_robustness(results: list[RobustnessResult]):
    """One panel per perturbation, top-1 against its level, one line per model (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    names = list(_AXES)
    fig = Figure(figsize=(3.4 * len(names), 3.4))
    for k, key in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        for r in results:
            pts = [(a, b) for a, b in r.curves.get(key, []) if b is not None]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=r.model, ms=3)
        ax.set(title=key, xlabel=_AXES[key], ylim=(0, 100))
        if k == 0:
            ax.set_ylabel("top-1 (%)")
        if key == "patch shuffle":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    return fig
