"""Parameters, multiply-accumulates and a per-stage breakdown of any model.

MACs are counted like fvcore and the papers' tables: one multiply-add of a convolution,
linear layer or matrix product is one MAC, attention's two matrix products included
(``torch.utils.flop_counter`` counts 2 FLOPs per MAC; we halve it). Norms, activations and
pooling are not counted. By default the model is built and run on the ``meta`` device,
so even ViT-H is profiled in well under a second without allocating its weights.

FFTs, which ``torch.utils.flop_counter`` does not count, are counted by formula, following
the GFNet authors' script (raoyongming/GFNet issue #15: fvcore handles for ``rfft2`` /
``irfft2`` of ``N·C·ceil(log2 N)``, counted as MACs like the rest of fvcore's figures), and
their analysis (issue #12: an n-point real FFT costs n/4·log2(n) complex multiplies =
n·log2(n) real ones, a complex FFT twice that). For a transform over a set of dimensions
of n = product of their sizes points in all, applied to ``signals`` = the number of the
other elements:

* real -> complex (``aten._fft_r2c``, ``rfft``/``rfft2``/``rfftn``):
  ``signals · n · ceil(log2 n)`` MACs, n counted on the real input;
* complex -> real (``aten._fft_c2r``, ``irfft*``): the same formula on the op's input, the
  one-sided spectrum (n = H·(W//2+1) for ``irfft2``), as the authors' script counts it;
* complex -> complex (``aten._fft_c2c``, ``fft*``/``ifft*``): ``2 · signals · n · ceil(log2 n)``.

An elementwise product with a complex operand (``aten.mul``; GFNet's filter) counts 4 MACs
per complex-by-complex element (4 real multiplies, the adds fused) and 2 per
complex-by-real one. Elementwise products of real tensors stay uncounted, as before. All
of this is shape arithmetic: it runs on the ``meta`` device (PyTorch has meta kernels for
the FFT ops).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..factory import create_model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class PartProfile:
    """One top-level part of a model: the stem, a stage, the final norm, the head."""

    name: str
    params: int
    macs: int
    resolution: tuple | None = None
    channels: int | None = None
    depth: int | None = None
    mixer: str | None = None


@dataclass
class ModelProfile:
    name: str
    input_size: tuple
    params: int
    macs: int
    parts: list[PartProfile] = field(default_factory=list)
    output_shape: tuple = ()
    feature_shape: tuple = ()
    stage_shapes: list = field(default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params_m"] = round(self.mparams, 3)
        d["gmacs"] = round(self.gmacs, 3)
        return d


def _fft_macs(shape, dims, per_point: int) -> int:
    """MACs of an FFT over ``dims`` of a tensor of ``shape``: ``per_point · n · ceil(log2 n)``
    for each of the ``numel / n`` signals, n being the product of the transformed sizes."""
    n = math.prod(shape[d] for d in dims)
    if n <= 1:
        return 0
    return per_point * (math.prod(shape) // n) * n * math.ceil(math.log2(n))


# FlopCounterMode's formulas get the op's arguments (tensors replaced by their shapes) and
# return FLOPs, two per MAC: count_macs halves the total
def _fft_r2c_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return 2 * _fft_macs(x_shape, dim, 1)


def _fft_c2r_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return 2 * _fft_macs(x_shape, dim, 1)


def _fft_c2c_flops(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return 2 * _fft_macs(x_shape, dim, 2)


def _complex_mul_flops(a, b, *args, out_val=None, **kwargs) -> int:
    """Elementwise products with a complex operand (given the tensors themselves)."""
    if not (isinstance(out_val, torch.Tensor) and out_val.is_complex()):
        return 0
    both = all(isinstance(t, torch.Tensor) and t.is_complex() for t in (a, b))
    return 2 * (4 if both else 2) * out_val.numel()


_complex_mul_flops._get_raw = True  # FlopCounterMode passes the tensors, not their shapes

def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of ``F.scaled_dot_product_attention`` (real tensors take it; the meta device
    takes the counted math path): the same two matrix products as every other backend."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


#: formulas for ops that ``torch.utils.flop_counter`` leaves uncounted (see the module docstring)
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._fft_r2c: _fft_r2c_flops,
    torch.ops.aten._fft_c2r: _fft_c2r_flops,
    torch.ops.aten._fft_c2c: _fft_c2c_flops,
    torch.ops.aten.mul: _complex_mul_flops,
}


@contextlib.contextmanager
def forward_hooks(hooks):
    """Register the forward hook of each ``(module, hook)`` pair for the duration of the block, and remove
    them all when it ends, however it ends."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module in ``model(x)``: a lower bound of the activations
    a training step keeps for its backward pass. Meant for the ``meta`` device (nothing is allocated)."""
    total = 0

    def add(module, args, output):
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    with forward_hooks((m, add) for m in leaves), torch.no_grad():
        model(x)
    return total


def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total MACs of ``model(x)`` and MACs per module (keys: module names, '' = whole model).

    A module whose work is elementwise products that the counter cannot see (LR-Net's local
    relation layer) states it with a ``formula_macs(input_shape)`` method; those MACs are
    added to the module and to each module above it that was called (as the counter's own
    figures are; a ModuleList is not called)."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    stated: dict[str, int] = {}

    def hook(name):
        def add(module, args, output):
            stated[name] = stated.get(name, 0) + int(module.formula_macs(tuple(args[0].shape)))
        return add

    stating = [(m, hook(n)) for n, m in model.named_modules() if callable(getattr(m, "formula_macs", None))]
    with forward_hooks(stating), counter, torch.no_grad():
        model(x)
    prefix = type(model).__name__
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key[len(prefix) + 1:] if key.startswith(prefix + ".") else ("" if key == prefix else key)
        per_module[name] = sum(ops.values()) // 2
    ran = set(per_module) | {""}  # the modules that were called (a ModuleList is not), the model itself
    for name, macs in stated.items():
        parts = name.split(".") if name else []
        owners = {".".join(parts[:i]) for i in range(len(parts))} & ran  # the called modules above it
        for owner in owners | {name}:
            per_module[owner] = per_module.get(owner, 0) + macs
    return counter.get_total_flops() // 2 + sum(stated.values()), per_module


def profile_model(model: nn.Module | str, img_size: int | tuple | None = None, in_chans: int | None = None,
                  batch_size: int = 1, device: str | torch.device = "meta", **create_kwargs) -> ModelProfile:
    """Profile a model (instance or registered name) on one input batch.

    For a name, the model is built on ``device`` with ``img_size`` / ``in_chans`` /
    ``create_kwargs`` passed to ``create_model`` (so models with a fixed input size, like
    MLP-Mixer, are built for that size).
    """
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        kw = dict(create_kwargs)
        if img_size is not None:
            kw["img_size"] = img_size
        if in_chans is not None:
            kw["in_chans"] = in_chans
        with torch.device(device):
            model = create_model(model, **kw)
    else:
        device = next(model.parameters()).device
    model.eval()
    size = img_size if img_size is not None else getattr(model, "img_size", (224, 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    chans = in_chans or getattr(model, "in_chans", 3)
    x = torch.zeros(batch_size, chans, *size, device=device)
    total, per_module = count_macs(model, x)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        stage_maps = model.forward_intermediates(x) if hasattr(model, "forward_intermediates") else []
    if isinstance(logits, tuple):
        logits = logits[0]

    parts: list[PartProfile] = []
    direct = sum(p.numel() for p in model.parameters(recurse=False))
    if direct:
        parts.append(PartProfile("tokens / position embedding", direct, 0))
    mixers = getattr(model, "stage_mixers", [])
    for child_name, child in model.named_children():
        params = count_params(child)
        if isinstance(child, nn.ModuleList) and child_name == "stages":
            for i, stage in enumerate(child):
                shape = tuple(stage_maps[i].shape) if i < len(stage_maps) else None
                parts.append(PartProfile(
                    f"stages.{i}", count_params(stage), per_module.get(f"stages.{i}", 0),
                    resolution=shape[2:] if shape else None, channels=shape[1] if shape else None,
                    depth=len(stage.blocks) if hasattr(stage, "blocks") else None,
                    mixer=mixers[i] if i < len(mixers) else None))
            continue
        if params == 0 and per_module.get(child_name, 0) == 0:
            continue
        part = PartProfile(child_name, params, per_module.get(child_name, 0))
        if child_name == "blocks" and stage_maps:  # isotropic token models
            shape = tuple(stage_maps[-1].shape)
            part.resolution, part.channels, part.depth = shape[2:], shape[1], len(child)
            part.mixer = mixers[0] if mixers else None
        parts.append(part)
    return ModelProfile(name=model.pretrained_cfg.get("architecture", name) if hasattr(model, "pretrained_cfg")
                        else name, input_size=(chans, *size), params=count_params(model), macs=total, parts=parts,
                        output_shape=tuple(logits.shape), feature_shape=tuple(feats.shape),
                        stage_shapes=[tuple(s.shape) for s in stage_maps])
