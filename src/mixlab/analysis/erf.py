"""Effective receptive field (ERF), as the large-kernel CNN literature measures it.

Luo et al. (2016) define the ERF of an output unit as the gradient of that unit with respect
to the input; RepLKNet (Ding et al., 2022, ``erf/visualize_erf.py`` and ``erf/analyze_erf.py``
in DingXiaoH/RepLKNet-pytorch) made it the standard picture of "how far a network sees":

1. take the last stage's feature map (B, C, h, w) and its central position (h//2, w//2);
2. the scalar ``sum_c relu(F[:, c, h//2, w//2])``, backpropagated to the input image;
3. the contribution map ``sum over images and channels of relu(∂/∂x)``, an H x W map;
4. for the pictures and the numbers the map is scaled ``log10(map + 1)`` and divided by its
   maximum; the *high-contribution area ratio* at threshold t is the area of the smallest
   square, centred on the image, whose sum exceeds t of the whole map's, over the image's area
   (RepLKNet reports t = 0.2, 0.3, 0.5, 0.99). A larger ratio: the output depends on a larger
   part of the image.

The seeds' claim (``000_*.txt``): the ERF grows as O(k·sqrt(n)) with kernel size k and depth n,
so a stack of large kernels sees much further than a stack of 3x3 of the same depth — measured
here on any model, trained or random, by :func:`effective_receptive_field`.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn as nn

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


@dataclass
class ERFResult:
    """An ERF measurement: the aggregated contribution map and its area ratios."""

    model: str
    contribution: torch.Tensor  # (H, W): sum over images and channels of relu(gradient)
    images: int
    feature_size: tuple[int, int]  # (h, w) of the feature map whose centre is differentiated
    area_ratio: dict[float, float] = field(default_factory=dict)  # threshold -> area ratio
    side: dict[float, int] = field(default_factory=dict)  # threshold -> side of the square (pixels)

    def scaled(self) -> torch.Tensor:
        """``log10(map + 1)`` divided by its maximum: what is drawn and measured."""
        return scaled_map(self.contribution)

    def to_dict(self) -> dict:
        h, w = self.contribution.shape
        return {"model": self.model, "images": self.images, "input_size": [h, w],
                "feature_size": list(self.feature_size),
                "area_ratio": {str(t): r for t, r in self.area_ratio.items()},
                "square_side": {str(t): s for t, s in self.side.items()}}


def scaled_map(contribution: torch.Tensor) -> torch.Tensor:
    m = torch.log10(contribution.double().clamp_min(0) + 1)
    peak = m.max()
    return m / peak if peak > 0 else m


def area_ratios(contribution: torch.Tensor, thresholds=THRESHOLDS) -> tuple[dict[float, float], dict[float, int]]:
    """RepLKNet's high-contribution area ratios of an (H, W) contribution map: for each threshold
    t the smallest centred square holding more than t of the (log-scaled) total, as a fraction of
    the image's area (1.0 if even the whole image does not: a flat map)."""
    m = scaled_map(contribution)
    H, W = m.shape
    total = m.sum()
    cy, cx = H // 2, W // 2
    # the sum of every centred square of half-side r, in one pass: r = 0 .. max(H, W)//2
    rmax = max(cy, cx, H - 1 - cy, W - 1 - cx)
    ys = (torch.arange(H) - cy).abs().view(H, 1)
    xs = (torch.arange(W) - cx).abs().view(1, W)
    ring = torch.maximum(ys, xs)  # the half-side of the smallest centred square holding each pixel
    per_ring = torch.zeros(rmax + 1, dtype=m.dtype).index_add_(0, ring.flatten(), m.flatten())
    cum = per_ring.cumsum(0)
    ratios, sides = {}, {}
    for t in thresholds:
        if not 0 < t < 1:
            raise ValueError(f"ERF thresholds are fractions between 0 and 1, got {t}")
        if total <= 0:
            r = rmax
        else:
            above = torch.nonzero(cum / total > t)
            r = int(above[0]) if len(above) else rmax
        side_h, side_w = min(2 * r + 1, H), min(2 * r + 1, W)
        ratios[t] = side_h * side_w / (H * W)
        sides[t] = 2 * r + 1
    return ratios, sides


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(x, [-1])[0]
    y = model(x)
    if y.ndim != 4:
        raise ValueError(f"the ERF needs a model whose output (or forward_intermediates) is a feature map "
                         f"(B, C, h, w); this one returns shape {tuple(y.shape)}")
    return y


def effective_receptive_field(model: nn.Module, images: torch.Tensor, batch_size: int = 4, name: str | None = None,
                              thresholds=THRESHOLDS) -> ERFResult:
    """The ERF of ``model``'s last stage over ``images`` (N, C, H, W), in eval mode (BatchNorm uses
    its running statistics; no dropout). The model's own training mode is restored afterwards."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = None
    fsize = None
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device=device, dtype=dtype).requires_grad_(True)
            f = _last_feature_map(model, x)
            h, w = f.shape[-2:]
            fsize = (h, w)
            centre = torch.relu(f[:, :, h // 2, w // 2]).sum()
            (grad,) = torch.autograd.grad(centre, x)
            part = torch.relu(grad).sum(dim=(0, 1)).detach().double().cpu()
            total = part if total is None else total + part
    finally:
        model.train(was_training)
    ratios, sides = area_ratios(total, thresholds)
    return ERFResult(name or type(model).__name__, total, images.shape[0], fsize, ratios, sides)


def plot_erf(results: list[ERFResult]):
    """The log-scaled contribution maps side by side, one panel per model, with the area ratio at
    t = 0.2 and 0.5 in each title (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    n = len(results)
    fig = Figure(figsize=(3.2 * n, 3.4))
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, n, i + 1)
        im = ax.imshow(r.scaled().numpy(), cmap="RdYlGn", vmin=0, vmax=1)
        lo, hi = min(r.area_ratio, default=None), (0.5 if 0.5 in r.area_ratio else max(r.area_ratio, default=None))
        label = "" if lo is None else f"\nt={lo}: {100 * r.area_ratio[lo]:.1f}%   t={hi}: {100 * r.area_ratio[hi]:.1f}%"
        ax.set_title(textwrap.fill(r.model, 30) + label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="log10(contribution + 1), normalised")
    return fig
