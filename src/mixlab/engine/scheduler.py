"""Per-optimizer-step learning-rate schedules with linear warm-up: cosine, constant, step.

``build_scheduler(optimizer, "cosine", total_steps=T, warmup_steps=W)`` returns a
:class:`torch.optim.lr_scheduler.LRScheduler`; call its ``step()`` after every
``optimizer.step()``. At step ``t`` (0 before the first ``step()``) the learning rate of a
parameter group whose learning rate was ``base`` when the scheduler was built, and whose
``"lr_scale"`` is ``s`` (1 when absent; see :func:`mixlab.engine.optim.param_groups`), is
``s * f(t)`` with

* warm-up, ``t < W``: ``f(t) = warmup_lr + (base - warmup_lr) * t / W``;
* ``"cosine"``: ``f(t) = min_lr + (base - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2``,
  reaching ``min_lr`` at ``t = T`` and staying there;
* ``"constant"``: ``f(t) = base``;
* ``"step"``: ``f(t) = base * gamma ** k``, ``k`` the number of milestones ``<= t``.

``warmup_lr`` and ``min_lr`` are absolute learning rates (the same for every group before
scaling). The value is computed in closed form from the step count, so the state is just
numbers: ``state_dict()`` survives ``torch.save`` / ``torch.load(weights_only=True)`` and a
freshly built scheduler continues exactly after ``load_state_dict``.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupScheduler", "build_scheduler", "SCHEDULES"]

#: the schedule names accepted by :func:`build_scheduler`
SCHEDULES = ("cosine", "constant", "step")


class WarmupScheduler(LRScheduler):
    """Linear warm-up followed by a cosine, constant or step schedule (see the module doc).

    Its state (``state_dict()``) is the schedule's parameters, the groups' base learning
    rates and ``lr_scale`` values, and the step count: numbers and lists only.
    """

    def __init__(self, optimizer: Optimizer, name: str = "cosine", total_steps: int | None = None,
                 warmup_steps: int = 0, warmup_lr: float = 1e-6, min_lr: float = 1e-5,
                 step_milestones: Sequence[int] = (), gamma: float = 0.1, last_epoch: int = -1):
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if name == "cosine":
            if total_steps is None:
                raise ValueError("the cosine schedule needs total_steps (the number of optimizer steps of the run)")
            if total_steps <= warmup_steps:
                raise ValueError(f"total_steps ({total_steps}) must be larger than warmup_steps ({warmup_steps}) "
                                 f"for the cosine schedule")
        milestones = [int(m) for m in step_milestones]
        if milestones != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"step_milestones must be non-negative step numbers in increasing order, "
                             f"got {list(step_milestones)}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.name = name
        self.total_steps = None if total_steps is None else int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)
        self.milestones = milestones
        self.gamma = float(gamma)
        self.lr_scales = [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, base_lr: float, lr_scale: float = 1.0) -> float:
        """The learning rate at ``step`` of a group with base lr ``base_lr`` and ``lr_scale``."""
        t = max(step, 0)
        if t < self.warmup_steps:
            lr = self.warmup_lr + (base_lr - self.warmup_lr) * t / self.warmup_steps
        elif self.name == "cosine":
            progress = min((t - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
            lr = self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.name == "step":
            lr = base_lr * self.gamma ** sum(1 for m in self.milestones if m <= t)
        else:  # constant
            lr = base_lr
        return lr_scale * lr

    def continue_at(self, step: int) -> None:
        """Put this schedule at ``step`` and set the optimizer's learning rates to its values there.

        For a resumed run whose learning rate or schedule changed: build the new schedule, load
        the optimizer's state (which brings back the old groups' ``lr`` and ``initial_lr``), then
        call this with the step the run reached instead of ``load_state_dict`` (which would bring
        back the old schedule). Each group gets ``initial_lr`` = this schedule's base lr and
        ``lr`` = its value at ``step``, times the group's ``lr_scale``.
        """
        self.last_epoch = step
        self._last_lr = self.get_lr()
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr

    def get_lr(self) -> list[float]:
        """The learning rates of all groups at the current step (``last_epoch``)."""
        if len(self.lr_scales) != len(self.base_lrs):
            raise ValueError(f"the optimizer has {len(self.base_lrs)} parameter groups but the scheduler state has "
                             f"{len(self.lr_scales)} lr scales; build the scheduler on the optimizer it was saved with")
        return [self.lr_at(self.last_epoch, float(base), scale) for base, scale in zip(self.base_lrs, self.lr_scales)]


def build_scheduler(optimizer: Optimizer, name: str = "cosine", total_steps: int | None = None,
                    warmup_steps: int = 0, warmup_lr: float = 1e-6, min_lr: float = 1e-5,
                    step_milestones: Sequence[int] = (), gamma: float = 0.1) -> WarmupScheduler:
    """A per-optimizer-step schedule (see the module doc for the formulas).

    Args:
        optimizer: its groups' current ``lr`` are the base learning rates; their ``lr_scale``
            (if any) multiplies every value of the schedule.
        name: ``"cosine"``, ``"constant"`` or ``"step"``.
        total_steps: the optimizer steps of the whole run, warm-up included (cosine only).
        warmup_steps: steps of linear warm-up from ``warmup_lr`` to the base lr.
        warmup_lr, min_lr: absolute start of the warm-up and end of the cosine.
        step_milestones, gamma: for ``"step"``, the lr is multiplied by ``gamma`` at each
            milestone step.
    """
    return WarmupScheduler(optimizer, name.lower(), total_steps, warmup_steps, warmup_lr, min_lr,
                           step_milestones, gamma)
