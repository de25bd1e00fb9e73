"""PyTorch's own distributed engine, as launched by ``torchrun``: process group set-up,
the rank that writes, and metric reduction (sums of tensors, gathers of Python objects)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: the device strings every command accepts (``--device``, ``train.device``)
DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a device string names: ``auto`` (the process's GPU if there is one, else the CPU),
    ``cpu``, ``cuda`` (the process's GPU), ``cuda:N`` or ``mps``; a ValueError naming the choices
    for anything else, or for a device this machine does not have."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device {spec!r} is not one of {DEVICE_CHOICES}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: no CUDA device is available; use 'cpu' or 'auto'")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device(f"cuda:{index or local_rank}")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {spec!r}: MPS (Apple's GPU) is not available here; use 'cpu' or 'auto'")
    return torch.device(kind)


def device_memory(device: torch.device) -> int | None:
    """Total bytes of memory of ``device`` (a GPU's, or the machine's RAM for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA,
    gloo on CPU. A plain ``python``/``mixlab`` launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """Every process's ``obj`` (any picklable Python object), in rank order, on every process: ``[obj]``
    alone in a world of one. Under DDP it is ``torch.distributed.all_gather_object``, which pickles through
    the process group's device (NCCL needs ``torch.cuda.set_device``, done by :func:`init_distributed`)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
