"""What the comparative benchmarks (``vs_timm.py``, ``reparam.py``, ``local_relation.py``,
``data_loading.py``) share: a model ready to time one batch at a time, the interleaved rounds
whose per-round ratio each of them reports, and the one-line description of the machine.

Each round times ``iters`` batches of every contender back to back, rotating which goes first
(with two contenders: alternating), after ``warmup`` batches each; the ratio contender /
reference is taken per round, so that a machine that slows down or speeds up during the run
moves both sides of a ratio together.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn


class Runner:
    """One model in one mode, ready to time: ``step()`` runs one batch.

    ``mode="infer"``: a forward pass under ``torch.inference_mode``; ``mode="train"``: forward,
    cross-entropy against random labels over ``num_classes``, backward and an SGD step.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, mode: str = "infer", amp: str = "none",
                 num_classes: int = 1000):
        if mode not in ("infer", "train"):
            raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
        if amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        self.model, self.x, self.mode = model, x, mode
        self.amp = (torch.autocast(x.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                    if amp != "none" else None)
        model.train(mode == "train")
        if mode == "train":
            self.y = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def forward(self):
        if self.amp is None:
            return self.model(self.x)
        with self.amp:
            return self.model(self.x)

    def step(self):
        """One batch; in inference mode, returns the output."""
        if self.mode == "infer":
            with torch.inference_mode():
                return self.forward()
        out = self.forward()
        out = out[0] if isinstance(out, tuple) else out
        loss = nn.functional.cross_entropy(out.float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return None

    def sync(self) -> None:
        if self.x.device.type == "cuda":
            torch.cuda.synchronize(self.x.device)

    def time(self, iters: int) -> float:
        """Images per second over ``iters`` batches."""
        self.sync()
        t = time.perf_counter()
        for _ in range(iters):
            self.step()
        self.sync()
        return iters * self.x.shape[0] / (time.perf_counter() - t)


def interleaved(runners: dict[str, Runner], reference: str, *, repeats: int, iters: int, warmup: int,
                report: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Time every runner in ``repeats`` interleaved rounds (see the module's text).

    Returns ``{"img_s": {name: median images/s}, "ratios": {name: [per-round ratio to the
    reference]}, "summary": {name: {ratio_min, ratio_median, ratio_max}}}``, the ratios and
    summaries for every runner but the reference. ``report(round, {name: images/s})`` is
    called after each round (for progress lines).
    """
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not one of the runners ({', '.join(runners)})")
    if repeats < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, iters >= 1 and warmup >= 0; got {repeats}, {iters}, {warmup}")
    for r in runners.values():  # warm-up: allocator, kernel selection, caches
        for _ in range(warmup):
            r.step()
    names = list(runners)
    others = [n for n in names if n != reference]
    speeds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in others}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        got = {n: runners[n].time(iters) for n in order}
        for n in names:
            speeds[n].append(got[n])
        for n in others:
            ratios[n].append(got[n] / got[reference])
        if report is not None:
            report(rep, {n: got[n] for n in names})
    return {"img_s": {n: statistics.median(v) for n, v in speeds.items()}, "ratios": ratios,
            "summary": {n: {"ratio_min": min(v), "ratio_median": statistics.median(v), "ratio_max": max(v)}
                        for n, v in ratios.items()}}


def environment(device: torch.device, *, extra: str = "") -> str:
    """``mixlab X, [extra, ]torch Y, python Z; CPU or GPU``, from the arena's own record of it."""
    from mixlab.arena.runner import environment as mixlab_environment
    env = mixlab_environment(str(device))
    dev = env.get("gpu") or f"{env['cpu']}, {env['torch threads']} threads"
    return f"mixlab {env['mixlab']}, {extra + ', ' if extra else ''}torch {env['torch']}, python {env['python']}; {dev}"
