"""Exponential moving average (EMA) of a model's weights, as in the ConvNeXt and DeiT recipes.

:class:`ModelEma` keeps an averaged copy of a model next to it::

    ema = ModelEma(model, decay=0.9999)
    for x, y in loader:
        ...; optimizer.step()
        ema.update(model)             # model may be DDP-wrapped or torch.compile'd
    evaluate(ema.module)              # the averaged copy, in eval mode

It is built on :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` and ``use_buffers=True`` (so BatchNorm
running statistics are averaged too). Two things are added around it:

* integer buffers (BatchNorm's ``num_batches_tracked``, Swin's ``relative_position_index``)
  are *copied* from the model instead of averaged: ``get_ema_multi_avg_fn`` computes
  ``ema * decay + model * (1 - decay)`` in floating point and writes it back into the
  integer tensor, which truncates (5 * 0.9999 + 5 * 0.0001 can become 4);
* an optional warm-up of the decay, and a check that the model given to :meth:`update`
  has the structure of the averaged copy (``AveragedModel`` zips the two silently).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..models.base import unwrap_model

__all__ = ["ModelEma"]


class _EmaAverage:
    """The ``multi_avg_fn`` given to :class:`AveragedModel`: EMA for floating-point tensors
    (by :func:`get_ema_multi_avg_fn`), a plain copy for integer ones. ``AveragedModel``
    calls it once per group of tensors sharing a device and dtype. ``decay`` is set by
    :meth:`ModelEma.update` before each update (it changes during warm-up)."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor], num_averaged) -> None:
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            get_ema_multi_avg_fn(self.decay)(ema_tensors, model_tensors, num_averaged)
        else:
            for e, m in zip(ema_tensors, model_tensors, strict=True):
                e.copy_(m)


class ModelEma:
    """Exponential moving average of a model's parameters and floating-point buffers.

    Args:
        model: the model to average (wrappers are removed with :func:`unwrap_model`); a
            copy of it is made, on ``device`` if given.
        decay: the EMA decay ``d``; each update does ``ema = d * ema + (1 - d) * model``.
        warmup: if True, the update that follows ``n`` updates uses the decay
            ``min(decay, (1 + n) / (10 + n))`` (0.18 for the second update, 0.5 after 8,
            0.9 after 80, 0.99 after 890 ...), so that early in training the average is
            not dominated by the random initial weights.
        device: where to keep the averaged copy (e.g. ``"cpu"`` to save GPU memory); by
            default the model's device.

    The first :meth:`update` copies the model (the convention of ``AveragedModel``: the
    average starts from the weights after the first optimizer step, not from the ones at
    construction); every later update averages. Integer buffers are always copied.

    :attr:`module` is the averaged copy, in eval mode with ``requires_grad=False``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False,
                 device: torch.device | str | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1] (typically 0.999 to 0.99999), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._average = _EmaAverage(self.decay)
        self._averaged = AveragedModel(unwrap_model(model), device=device, multi_avg_fn=self._average,
                                       use_buffers=True)
        self._averaged.module.eval().requires_grad_(False)
        self._updates = 0  # mirrors AveragedModel.n_averaged, without reading a GPU tensor each step
        self._checked = False

    # -- the average -----------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode), to evaluate or to save."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        """How many times :meth:`update` has been called (including restored ones)."""
        return self._updates

    def decay_at(self, n: int) -> float:
        """The decay used by the update that follows ``n`` updates (the first, ``n = 0``, copies)."""
        if n == 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (wrapped or not) into the average."""
        model = unwrap_model(model)
        if not self._checked:
            self._check_structure(model)
            self._checked = True
        self._average.decay = self.decay_at(self._updates)
        self._averaged.update_parameters(model)
        self._updates += 1

    def _check_structure(self, model: nn.Module) -> None:
        def shapes(m: nn.Module) -> list[tuple[int, ...]]:
            return [tuple(t.shape) for t in (*m.parameters(), *m.buffers())]

        mine, theirs = shapes(self.module), shapes(model)
        if mine != theirs:
            raise ValueError(
                f"ModelEma.update got a model that does not match the averaged one "
                f"({len(theirs)} parameters and buffers vs {len(mine)}, or different shapes); pass the model "
                f"the ModelEma was created from ({type(self.module).__name__}), not {type(model).__name__}")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors (``"module.<name>"`` and ``"n_averaged"``): loadable with
        ``torch.load(weights_only=True)`` and storable as safetensors."""
        return self._averaged.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`. A plain model state dict (without ``"n_averaged"``)
        is accepted too: the average then starts from those weights, and the next update
        averages into them rather than copying over them."""
        if "n_averaged" in state_dict:
            self._averaged.load_state_dict(state_dict)
        else:
            if any(k.startswith("module.") for k in state_dict):
                raise ValueError("this EMA state dict has 'module.*' keys but no 'n_averaged': pass the complete "
                                 "dict returned by ModelEma.state_dict(), or a plain model state dict")
            self.module.load_state_dict(state_dict)
            self._averaged.n_averaged.fill_(1)
        self._updates = int(self._averaged.n_averaged.item())
        self.module.eval()

    def __repr__(self) -> str:
        return (f"ModelEma({type(self.module).__name__}, decay={self.decay}, warmup={self.warmup}, "
                f"updates={self._updates})")
