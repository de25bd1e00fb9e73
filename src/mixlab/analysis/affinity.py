"""The affinity explorer: the matrices A of ``Y = X + (A·V)·W`` that every mixer exposes, for
one image, drawn for a query position, with per-layer statistics across depth.

:func:`capture_affinities` runs the model once and records, for each spatial mixer
(:class:`~mixlab.mixers.base.Mixer`), the input it really sees inside the network and its
affinity ``A`` (B, G, N, M): N query positions, M value positions, G groups of channels
(heads for attention, channels for a depthwise convolution). :func:`query_map` cuts one row out
and lays it on the value grid: what position ``q`` reads from where. The statistics
(:func:`affinity_stats`), over queries and groups:

* ``mean_distance``: the mean distance, in input pixels, between a query and the positions it
  reads, weighted by |A| (the "attention distance" of Dosovitskiy et al., 2021, Fig. 7, for
  any mixer);
* ``entropy``: of each row's |A| normalised to sum 1, in nats (0: one position; log M: uniform);
* ``sparsity``: 1 - the share of positions needed to hold 90% of a row's |A| mass;
* ``static_share``: how much of A is input-independent: 1 for static mixers (convolutions,
  pooling, token MLPs), 0 for dynamic ones (attention), and for Container's mixed affinity
  ``α·A_dyn + β·A_static`` the share ``‖β·A_static‖ / (‖α·A_dyn‖ + ‖β·A_static‖)`` (Frobenius).

Affinities are dense N x M matrices per group: large for big maps with many groups (a
depthwise convolution over 56x56 with 96 channels is 3.8 GB), so layers above ``max_elements``
are skipped and reported as such: use a smaller input for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..mixers.base import Mixer
from .common import first_calls


@dataclass
class LayerAffinity:
    name: str  # module path of the mixer
    kind: str  # dynamic | static | mixed
    mixer: str  # class name
    grid: tuple[int, int]  # (h, w) of the query positions
    value_grid: tuple[int, int]  # (h, w) of the value positions
    prefix: int  # prefix (class) tokens before the grid in the sequence
    affinity: torch.Tensor | None  # (G, N, M) for the first image; None when skipped
    static_share: float | None = None
    skipped: str | None = None
    stats: dict = field(default_factory=dict)


def _grid_of(n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of n positions whose aspect ratio is closest to the image's."""
    H, W = image_hw
    h = min((a for a in range(1, n + 1) if n % a == 0), key=lambda a: abs(math.log(a * a / n) - math.log(H / W)))
    return h, n // h


def _static_share(mixer: nn.Module, x: torch.Tensor) -> float | None:
    if mixer.affinity_kind == "static":
        return 1.0
    if mixer.affinity_kind == "dynamic":
        return 0.0
    if all(hasattr(mixer, a) for a in ("dynamic_affinity", "static_affinity", "mix_weights")):
        alpha, beta = mixer.mix_weights()
        d = float(alpha.abs() * mixer.dynamic_affinity(x).norm())
        s = float(beta.abs() * mixer.static_affinity(x).norm())
        return s / (d + s) if d + s > 0 else None
    return None


def capture_affinities(model: nn.Module, image: torch.Tensor, layers=None, max_elements: int = 150_000_000
                       ) -> list[LayerAffinity]:
    """Run ``model`` on ``image`` (1, C, H, W) in eval mode and return the affinity of every spatial
    mixer, or of those in ``layers`` (module names, or indices into the list of mixers)."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"give one image as a (1, C, H, W) tensor, got shape {tuple(image.shape)}")
    mixers = [(n, m) for n, m in model.named_modules() if isinstance(m, Mixer)]
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no spatial mixer exposing an affinity (a dense convolution "
                         f"mixes positions and channels at once: ResNet has none)")
    names = [n for n, _ in mixers]
    if layers is not None:
        chosen = []
        for key in layers:
            if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
                i = int(key)
                if not -len(mixers) <= i < len(mixers):
                    raise ValueError(f"layer index {i} is out of range: the model has {len(mixers)} mixers (0.."
                                     f"{len(mixers) - 1})")
                chosen.append(mixers[i])
            elif key in names:
                chosen.append(mixers[names.index(key)])
            else:
                raise ValueError(f"no mixer named {key!r}; the mixers are: {', '.join(names[:12])}"
                                 + (" ..." if len(names) > 12 else ""))
        mixers = chosen
    was_training = model.training
    model.eval()
    try:
        seen = {n: inp for n, (_, inp, _) in first_calls(model, image, mixers).items()}
    finally:
        model.train(was_training)
    out = []
    H, W = image.shape[-2:]
    with torch.no_grad():
        for name, m in mixers:
            if name not in seen:
                continue  # not on this forward's path
            x = seen[name]
            if x.ndim == 4:
                grid, prefix = tuple(x.shape[1:3]), 0
                n = grid[0] * grid[1]
            else:
                prefix = int(getattr(model, "num_prefix_tokens", 0)) if x.shape[1] > 1 else 0
                n = x.shape[1] - prefix
                grid = _grid_of(n, (H, W))
            M = m.values(x).shape[1]
            kind = m.affinity_kind
            groups = _count_groups(m, x)
            size = groups * (n + prefix) * M
            if size > max_elements:
                out.append(LayerAffinity(name, kind, type(m).__name__, grid, grid, prefix, None, None,
                                         f"its affinity has {size:,} elements ({size * 4 / 2**30:.1f} GiB) at this "
                                         f"input size; use a smaller --img-size for this layer"))
                continue
            A = m.affinity(x)[0].detach().float()  # (G, N or 1, M); a static one may be a parameter view
            vprefix = prefix if M == x.shape[1] else 0
            vgrid = grid if M - vprefix == n else _grid_of(M - vprefix, (H, W))
            la = LayerAffinity(name, kind, type(m).__name__, grid, vgrid, prefix, A, _static_share(m, x))
            la.stats = affinity_stats(la, (H, W))
            out.append(la)
    return out


def _count_groups(mixer: nn.Module, x: torch.Tensor) -> int:
    for attr in ("num_heads", "heads", "groups"):
        v = getattr(mixer, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return x.shape[-1]  # the worst case: one group per channel


def query_map(layer: LayerAffinity, query: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """The affinity row of the grid position under image pixel ``query`` = (x, y), laid on the value
    grid: (G, h_v, w_v). For a query-less row (class attention) the single row is used."""
    if layer.affinity is None:
        raise ValueError(f"{layer.name} was skipped: {layer.skipped}")
    A = layer.affinity
    qx, qy = query
    H, W = image_hw
    if not (0 <= qx < W and 0 <= qy < H):
        raise ValueError(f"query {query} lies outside the {W}x{H} image (x in 0..{W - 1}, y in 0..{H - 1})")
    h, w = layer.grid
    if A.shape[1] == 1:
        row = A[:, 0]
    else:
        i = layer.prefix + (qy * h // H) * w + (qx * w // W)
        row = A[:, min(i, A.shape[1] - 1)]
    vh, vw = layer.value_grid
    return row[:, row.shape[-1] - vh * vw:].reshape(-1, vh, vw)


def affinity_stats(layer: LayerAffinity, image_hw: tuple[int, int]) -> dict:
    """The per-layer statistics of the module docstring (over all queries and groups)."""
    A = layer.affinity.double().abs()
    vh, vw = layer.value_grid
    grid_part = A[:, :, A.shape[-1] - vh * vw:]  # the value grid (prefix tokens have no position)
    G, Nq, M = grid_part.shape
    H, W = image_hw
    h, w = layer.grid
    # query and value positions in input pixels (cell centres)
    if Nq == h * w + layer.prefix and layer.prefix:
        grid_part = grid_part[:, layer.prefix:]
        Nq = h * w
    if Nq == h * w:
        qy = (torch.arange(h, dtype=torch.float64) + 0.5) * H / h
        qx = (torch.arange(w, dtype=torch.float64) + 0.5) * W / w
        q = torch.stack(torch.meshgrid(qy, qx, indexing="ij"), -1).reshape(-1, 2)
    else:  # rows without a position (class attention): distances from the image centre
        q = torch.tensor([[H / 2, W / 2]], dtype=torch.float64).expand(Nq, 2)
    vy = (torch.arange(vh, dtype=torch.float64) + 0.5) * H / vh
    vx = (torch.arange(vw, dtype=torch.float64) + 0.5) * W / vw
    v = torch.stack(torch.meshgrid(vy, vx, indexing="ij"), -1).reshape(-1, 2)
    dist = torch.cdist(q, v)  # (Nq, M)
    mass = grid_part.sum(-1, keepdim=True)
    p = grid_part / mass.clamp_min(1e-30)
    valid = mass.squeeze(-1) > 0
    mean_distance = float((p * dist).sum(-1)[valid].mean()) if valid.any() else 0.0
    entropy = float((-(p * p.clamp_min(1e-30).log()).sum(-1))[valid].mean()) if valid.any() else 0.0
    sorted_p = p.sort(-1, descending=True).values.cumsum(-1)
    needed = (sorted_p < 0.9).sum(-1) + 1  # positions to reach 90% of the mass
    sparsity = float((1 - needed.double() / M)[valid].mean()) if valid.any() else 0.0
    return {"mean_distance": mean_distance, "entropy": entropy, "max_entropy": math.log(M), "sparsity": sparsity,
            "static_share": layer.static_share, "groups": G, "queries": Nq, "values": M}


def plot_query(image: torch.Tensor, layers: list[LayerAffinity], query: tuple[int, int], max_groups: int = 4):
    """For each layer a row of panels: the image, then each group's (up to ``max_groups``) affinity
    row for the query, upsampled over the image (a matplotlib Figure)."""
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    shown = [la for la in layers if la.affinity is not None]
    if not shown:
        raise ValueError("no layer's affinity could be drawn (all were skipped)")
    img = image[0].float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    img = img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()
    H, W = image.shape[-2:]
    cols = 1 + min(max_groups, max(la.affinity.shape[0] for la in shown))
    fig = Figure(figsize=(2.1 * cols, 2.2 * len(shown)))
    for r, la in enumerate(shown):
        maps = query_map(la, query, (H, W))[:max_groups]
        up = F.interpolate(maps[None].float(), size=(H, W), mode="nearest")[0]
        ax = fig.add_subplot(len(shown), cols, r * cols + 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.plot([query[0]], [query[1]], "r+", ms=10, mew=2)
        ax.set_title(f"{la.name}\n{la.mixer} ({la.kind})", fontsize=6)
        ax.axis("off")
        for g in range(maps.shape[0]):
            ax = fig.add_subplot(len(shown), cols, r * cols + 2 + g)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, alpha=0.35)
            lim = float(up[g].abs().max()) or 1.0
            if bool((up[g] >= 0).all()):  # weights (softmax, pooling): a sequential map from zero
                ax.imshow(up[g].numpy(), cmap="inferno", vmin=0, vmax=lim, alpha=0.8)
            else:  # signed (convolution kernels, token MLPs): a diverging map around zero
                ax.imshow(up[g].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.75)
            ax.plot([query[0]], [query[1]], "k+", ms=8)
            ax.set_title(f"group {g}", fontsize=6)
            ax.axis("off")
    return fig


def plot_depth(layers: list[LayerAffinity]):
    """The statistics against depth (mixer index), one panel each (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    shown = [(i, la) for i, la in enumerate(layers) if la.affinity is not None]
    keys = [("mean_distance", "mean distance (px)"), ("entropy", "entropy (nats)"), ("sparsity", "sparsity"),
            ("static_share", "static share")]
    fig = Figure(figsize=(13, 3.2))
    for k, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), k + 1)
        xs = [i for i, la in shown if la.stats.get(key) is not None]
        ys = [la.stats[key] for i, la in shown if la.stats.get(key) is not None]
        ax.plot(xs, ys, "o-")
        ax.set(xlabel="mixer (depth)", title=label)
        ax.grid(True, alpha=0.3)
    return fig
