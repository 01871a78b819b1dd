"""This process in the job: torchrun or a plain process, the process group, rank-0 printing, collectives, and the
parts of sharded (DTensor) tensors."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from util.errors import UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, with a timestamp (no global monkey-patching of print)."""
    if is_main_process():
        now = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{now}]", *args, **kwargs, flush=True)


@dataclass(frozen=True)
class Dist:
    """This process in the job: whether a process group exists, rank, world size and its device."""

    distributed: bool
    rank: int
    world_size: int
    device: torch.device


_OWN_GROUP: list[bool] = []  # non-empty while a process group set up by init_distributed exists


def init_distributed(device: str, dist_url: str = "env://", process_group: bool = False) -> Dist:
    """torchrun (env://) when RANK/WORLD_SIZE are set, else a single process, without a process group unless
    ``process_group`` (FSDP needs one: then a group of one). NCCL when the device is CUDA, gloo on CPU. ``device``
    'auto' is CUDA when available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available (use --device cpu)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        if not dist.is_initialized():  # else the caller's group (e.g. a driver running several runs) is kept
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", init_method=dist_url,
                                    world_size=world_size, rank=rank)
            _OWN_GROUP.append(True)
        dist.barrier()
        info = Dist(True, rank, world_size, torch.device(device))
    elif process_group:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(),
                                world_size=1, rank=0)
        _OWN_GROUP.append(True)
        info = Dist(True, 0, 1, torch.device(device))
    else:
        info = Dist(False, 0, 1, torch.device(device))
    print0(f"distributed: {info.distributed} (world size {info.world_size}, device {info.device})")
    return info


def launch_world_size() -> int:
    """The world size torchrun announces (1 for a plain process); known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def cleanup_distributed() -> None:
    """Tear down the process group that :func:`init_distributed` set up (not one the caller owns)."""
    if is_dist() and _OWN_GROUP:
        _OWN_GROUP.clear()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP sharded the model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded or replicated) tensor, e.g. FSDP's gradient norm."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
