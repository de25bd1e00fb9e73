"""Optimizers: parameter groups (weight-decay exclusions, layer-wise lr decay) and LAMB.

``build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)`` builds the
optimizer of the ViT / Swin / ConvNeXt / DeiT recipes: no weight decay on 1-D parameters
(norm weights, biases, LayerScale gammas) and on the model's ``no_weight_decay()`` names
(position embeddings, class tokens, relative-position tables), and, for fine-tuning, a
learning-rate scale per depth (``lr_scale`` in each group; the scheduler of
:mod:`mixlab.engine.scheduler` applies it).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..models.base import unwrap_model

__all__ = ["layer_ids", "param_groups", "build_optimizer", "Lamb", "OPTIMIZERS"]

#: top-level names that come after the last block (final norm and classifier heads)
_HEAD_NAMES = frozenset({"norm", "fc_norm", "head", "head_norm", "head_dist"})
_STAGE_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")
_STAGE_OTHER = re.compile(r"^stages\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Map every parameter name to its layer id for layer-wise learning-rate decay.

    With ``L`` blocks in all:

    * ``0``: everything before the first block — ``stem`` / ``patch_embed``, ``cls_token``,
      ``dist_token``, ``pos_embed``, and any other top-level parameter not listed below;
    * ``i + 1`` for ``blocks.i`` (isotropic models: ViT, DeiT);
    * ``k + 1`` for ``stages.s.blocks.j`` where ``k`` is the running index of that block over
      all stages (Swin, ConvNeXt, PoolFormer, ...); other parts of stage ``s``
      (``stages.s.downsample``) get the id of the first block of stage ``s``;
    * ``L + 1``: ``norm``, ``fc_norm``, ``head``, ``head_norm``, ``head_dist``.

    Wrappers (DDP, ``torch.compile``) are removed first; the names are those of the plain
    model. A module that holds the model beside task modules (masked image modeling's decoder)
    says where with a ``backbone_prefix`` attribute (``"encoder."``): the ids are those of the
    model inside it, and the task's own parameters (decoder, mask token) get the top id ``L + 1``
    with the head. Returns ``(ids, L + 2)``, the second being the number of layer ids.
    """
    model = unwrap_model(model)
    prefix = getattr(model, "backbone_prefix", "")
    if prefix:
        inner, num_layers = layer_ids(model.get_submodule(prefix.rstrip(".")))
        return ({n: inner.get(n[len(prefix):], 0) if n.startswith(prefix) else num_layers - 1
                 for n, _ in model.named_parameters()}, num_layers)
    names = [n for n, _ in model.named_parameters()]
    # the number of blocks per stage (a stage without blocks counts 0)
    stage_blocks: dict[int, int] = {}
    n_flat = 0
    for n in names:
        if m := _STAGE_BLOCK.match(n):
            s, j = int(m[1]), int(m[2])
            stage_blocks[s] = max(stage_blocks.get(s, 0), j + 1)
        elif m := _STAGE_OTHER.match(n):
            stage_blocks.setdefault(int(m[1]), 0)
        elif m := _BLOCK.match(n):
            n_flat = max(n_flat, int(m[1]) + 1)
    if stage_blocks and n_flat:
        raise ValueError(f"{type(model).__name__} has both 'blocks.i' and 'stages.s.blocks.j' parameters; "
                         f"layer-wise lr decay needs one of the two layouts")
    first_of_stage, running = {}, 0  # running index of the first block of each stage
    for s in range(max(stage_blocks, default=-1) + 1):
        first_of_stage[s] = running
        running += stage_blocks.get(s, 0)
    num_blocks = n_flat or running
    ids = {}
    for n in names:
        if m := _STAGE_BLOCK.match(n):
            ids[n] = first_of_stage[int(m[1])] + int(m[2]) + 1
        elif m := _STAGE_OTHER.match(n):
            ids[n] = min(first_of_stage[int(m[1])] + 1, num_blocks)  # its stage's first block
        elif m := _BLOCK.match(n):
            ids[n] = int(m[1]) + 1
        elif n.split(".", 1)[0] in _HEAD_NAMES:
            ids[n] = num_blocks + 1
        else:
            ids[n] = 0
    return ids, num_blocks + 2


def _matches(name: str, patterns: set[str]) -> bool:
    """``name`` is one of ``patterns`` or lies inside a module named by one of them."""
    return name in patterns or any(name.startswith(p + ".") for p in patterns)


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float | None = None,
                 no_decay_names: Iterable[str] = ()) -> list[dict]:
    """Optimizer parameter groups with weight-decay exclusions and optional layer-wise lr decay.

    No weight decay is applied to: parameters with at most one dimension (norm weights,
    biases, LayerScale gammas, ...), the names returned by ``no_weight_decay()`` of the model
    and of any module inside it that has that method (prefixed with that module's name: a
    backbone held as ``encoder`` by a task's module keeps its exclusions), and
    ``no_decay_names`` (a name also covers every parameter of the module it names, e.g.
    ``"stem"``). Frozen parameters (``requires_grad=False``) are left out.

    With ``layer_decay`` (in ``(0, 1]``), parameters are also grouped by :func:`layer_ids`,
    and the group of layer id ``i`` gets ``lr_scale = layer_decay ** (L + 1 - i)``: 1 for
    the head, ``layer_decay`` for the last block, ... Each group carries ``"params"``,
    ``"names"``, ``"lr"`` (the given ``lr``, *not* multiplied by ``lr_scale``: the scheduler
    of :func:`mixlab.engine.scheduler.build_scheduler` does that), ``"weight_decay"`` and
    ``"lr_scale"`` (1.0 without layer decay), plus ``"layer_id"`` with layer decay. Empty
    groups are dropped.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (typically 0.65-0.9) or None, got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    model = unwrap_model(model)
    skip = set(no_decay_names)
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    ids, num_layers = layer_ids(model) if layer_decay is not None else ({}, 0)

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not _matches(name, skip)
        layer = ids.get(name, 0)
        key = (layer, decay)
        if key not in groups:
            group = {"params": [], "names": [], "lr": lr, "weight_decay": weight_decay if decay else 0.0,
                     "lr_scale": 1.0}
            if layer_decay is not None:
                group["lr_scale"] = float(layer_decay ** (num_layers - 1 - layer))
                group["layer_id"] = layer
            groups[key] = group
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # order: by layer, decayed group first; a group exists only once it holds a parameter
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def _sgd(groups, lr, momentum, betas, eps, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **kw)


def _adamw(groups, lr, momentum, betas, eps, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def _adam(groups, lr, momentum, betas, eps, **kw) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **kw)


def _lamb(groups, lr, momentum, betas, eps, **kw) -> torch.optim.Optimizer:
    return Lamb(groups, lr=lr, betas=betas, eps=eps, **kw)


#: optimizer name -> constructor taking (param groups, lr, momentum, betas, eps, **extra options)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw, "sgd": _sgd, "lamb": _lamb, "adam": _adam}


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05,
                    momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    layer_decay: float | None = None, no_decay_names: Iterable[str] = (),
                    **kwargs) -> torch.optim.Optimizer:
    """Build an optimizer over :func:`param_groups` of ``model``.

    ``name`` is one of:

    * ``"adamw"``: :class:`torch.optim.AdamW` (decoupled weight decay);
    * ``"sgd"``: :class:`torch.optim.SGD` with Nesterov momentum (plain SGD if ``momentum`` is 0);
    * ``"lamb"``: :class:`Lamb` (which also clips the global gradient norm to 1 by default);
    * ``"adam"``: :class:`torch.optim.Adam` (weight decay as an L2 term in the gradient).

    ``momentum`` is used by SGD only, ``betas`` and ``eps`` by the others. Extra keyword
    arguments go to the optimizer's constructor (e.g. ``foreach=True``, or
    ``max_grad_norm=None`` for LAMB).
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay, lr, layer_decay, no_decay_names)
    if not groups:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no trainable parameters "
                         f"(all have requires_grad=False); nothing to optimize")
    return OPTIMIZERS[key](groups, lr, momentum, tuple(betas), eps, **kwargs)


class Lamb(torch.optim.Optimizer):
    r"""LAMB: layer-wise adaptive moments (You et al., 2020, "Large Batch Optimization for
    Deep Learning: Training BERT in 76 minutes", Algorithm 2), as used by DeiT III.

    For each parameter ``x`` with gradient ``g`` at step ``t``:

    .. math::
        m &= \beta_1 m + (1 - \beta_1) g, \qquad v = \beta_2 v + (1 - \beta_2) g^2 \\
        r &= \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda x \\
        x &\leftarrow x - \eta \, \frac{\lVert x \rVert}{\lVert r \rVert} \, r

    i.e. Adam's bias-corrected update with decoupled weight decay :math:`\lambda x` added,
    scaled by the per-parameter *trust ratio* :math:`\lVert x \rVert / \lVert r \rVert`
    (taken as 1 when either norm is 0, e.g. for zero-initialised biases).

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon` (the paper uses 1e-6).
        weight_decay: :math:`\lambda`, decoupled (not added to the gradient).
        max_grad_norm: before the moments are updated, all gradients (over every group) are
            scaled by ``min(1, max_grad_norm / total_norm)``, where ``total_norm`` is the L2
            norm of all gradients together. This global clipping is not part of the paper's
            algorithm but of the common implementations (NVIDIA's, timm's) that DeiT III
            used, hence the default of 1.0; ``None`` or 0 disables it. It acts on top of any
            clipping done before ``step()``.
        always_adapt: apply the trust ratio to every parameter, as in the paper (default).
            ``False`` applies it only in groups with ``weight_decay != 0`` and uses the plain
            Adam update elsewhere (the common implementations' default).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float | None = 1.0, always_adapt: bool = True):
        if lr < 0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {tuple(betas)}")
        if eps <= 0:
            raise ValueError(f"Lamb: eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"Lamb: max_grad_norm must be > 0, or None / 0 to disable clipping, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        always_adapt=always_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def _clip_divisor(self) -> torch.Tensor | None:
        """``max(1, total_norm / max_grad_norm)`` over all gradients, or None without clipping."""
        max_norm = self.defaults["max_grad_norm"]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not max_norm or not grads:
            return None
        device = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g.float()).to(device) for g in grads])
        return torch.clamp(torch.linalg.vector_norm(norms) / max_norm, min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One LAMB update; ``closure`` re-evaluates the model and returns the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor = self._clip_divisor()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            adapt = group["always_adapt"] or wd != 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients; use torch.optim.SparseAdam")
                grad = p.grad if divisor is None else p.grad / divisor.to(p.grad.device, p.grad.dtype)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt_().add_(eps))
                if wd != 0:
                    update.add_(p, alpha=wd)
                if adapt:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-lr)
        return loss
