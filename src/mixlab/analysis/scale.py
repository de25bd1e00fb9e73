"""Cost against input size: latency, throughput, peak memory and MACs per resolution and batch
size, with the growth exponent fitted in the number of tokens.

The seeds' claim: global attention's cost grows quadratically with the number of tokens N
(its affinity is N x N), windows and convolutions linearly. For each model and batch size,
:func:`measure_scaling` times the forward pass at each resolution and fits
``log(cost) = a + p · log(N)`` by least squares; N is the number of input pixels, which is
proportional to the tokens at every stage of a model, so ``p`` is the exponent in tokens.
Three exponents are fitted: of the MACs (exact, from :func:`~mixlab.analysis.count_macs`), of
the latency (measured), and of the latency over the two largest sizes only (the asymptotic
regime, where the quadratic term of attention dominates the linear ones).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the forward; on the CPU, the
peak of the bytes held by the tensors the forward creates (tracked op by op with a
``TorchDispatchMode``; weights and input excluded, as are the scratch buffers inside fused
kernels, which PyTorch does not expose). The forward runs in inference mode (``torch.no_grad``).
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .complexity import count_macs


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live op outputs (by storage, views counted once) and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, references]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [st.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


@dataclass
class ScalePoint:
    resolution: int
    batch_size: int
    tokens: int  # input pixels (proportional to the tokens of every stage)
    latency_ms: float  # the fastest of the repeats
    images_per_s: float
    peak_memory_mb: float
    macs: int  # per image
    error: str | None = None  # why the point could not be measured (out of memory, size not supported)


@dataclass
class ScaleResult:
    model: str
    device: str
    points: list[ScalePoint] = field(default_factory=list)
    exponents: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> {macs, latency, latency_tail}

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "points": [vars(p) for p in self.points],
                "exponents": {str(b): e for b, e in self.exponents.items()}}


def fit_exponent(tokens, costs) -> float:
    """The least-squares slope of log(cost) against log(tokens) (nan with fewer than two points)."""
    pts = [(math.log(n), math.log(c)) for n, c in zip(tokens, costs) if n > 0 and c > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan")
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        _sync(x.device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append(time.perf_counter() - t0)
    # the fastest repeat: on a shared machine, other work only ever adds time
    return min(times)


def _peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            model(x)
            torch.cuda.synchronize(x.device)
            return torch.cuda.max_memory_allocated(x.device) - base
        tracker = _LiveTensorBytes()
        with tracker:
            model(x)
        return tracker.peak


def measure_scaling(build, resolutions, batch_sizes=(1,), name: str = "model", device="cpu", repeats: int = 5,
                    warmup: int = 2, in_chans: int = 3) -> ScaleResult:
    """Measure ``build(resolution)`` (a function returning the model built for that input size) at
    each resolution and batch size. A size the model does not support, or that runs out of memory,
    is recorded with its error and left out of the fits."""
    resolutions = sorted({int(r) for r in resolutions})
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not resolutions or resolutions[0] < 1 or not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"resolutions and batch sizes must be positive integers, got {resolutions} and {batch_sizes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    result = ScaleResult(name, str(device))
    for r in resolutions:
        try:
            with torch.device("meta"):
                meta_model = build(r)
            macs = count_macs(meta_model.eval(), torch.empty(1, in_chans, r, r, device="meta"))[0]
            model = build(r).eval().to(device)
        except (ValueError, TypeError) as e:
            for b in batch_sizes:
                result.points.append(ScalePoint(r, b, r * r, float("nan"), float("nan"), float("nan"), 0, str(e)))
            continue
        for b in batch_sizes:
            x = torch.randn(b, in_chans, r, r, device=device)
            try:
                latency = _time_forward(model, x, repeats, warmup)
                peak = _peak_memory(model, x)
            except (RuntimeError, ValueError) as e:  # out of memory, or a size the model rejects at run time
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                msg = str(e).splitlines()[0]
                result.points.append(ScalePoint(r, b, r * r, float("nan"), float("nan"), float("nan"), macs, msg))
                continue
            result.points.append(ScalePoint(r, b, r * r, 1e3 * latency, b / latency, peak / 2 ** 20, macs))
        del model
    for b in batch_sizes:
        pts = [p for p in result.points if p.batch_size == b and p.error is None]
        tail = pts[-2:]
        result.exponents[b] = {"macs": fit_exponent([p.tokens for p in pts], [p.macs for p in pts]),
                               "latency": fit_exponent([p.tokens for p in pts], [p.latency_ms for p in pts]),
                               "latency_tail": fit_exponent([p.tokens for p in tail], [p.latency_ms for p in tail])}
    return result


def plot_scaling(results: list[ScaleResult]):
    """Latency against tokens (log-log, with the fitted exponent in the legend), throughput and peak
    memory against resolution, for the smallest batch size of each model (a matplotlib Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for res in results:
        if not res.exponents:
            continue
        b = min(res.exponents)
        pts = [p for p in res.points if p.batch_size == b and p.error is None]
        if not pts:
            continue
        e = res.exponents[b]
        axes[0].loglog([p.tokens for p in pts], [p.latency_ms for p in pts], "o-",
                       label=f"{res.model}: N^{e['latency']:.2f} (MACs N^{e['macs']:.2f})")
        axes[1].plot([p.resolution for p in pts], [p.images_per_s for p in pts], "o-", label=res.model)
        axes[2].plot([p.resolution for p in pts], [p.peak_memory_mb for p in pts], "o-", label=res.model)
    axes[0].set(xlabel="input pixels N (∝ tokens)", ylabel="latency (ms)", title="latency")
    axes[1].set(xlabel="resolution (px)", ylabel="images/s", title="throughput", yscale="log")
    axes[2].set(xlabel="resolution (px)", ylabel="MiB", title="peak memory (forward)", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig
