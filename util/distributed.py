"""This process in the job: torchrun or a plain process, its device, the process group, rank-0 printing, the
collectives, and the parts of sharded (DTensor) tensors.

Every collective of the project goes through the functions below, never through ``torch.distributed`` directly:
they build their tensors on the run's device (NCCL serves CUDA tensors only, gloo CPU ones) and refuse a tensor on
another device with a message that names both, so a misplaced tensor is a clear error on any backend.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

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
    """Rank 0 of the process group, or, before it exists, the process its launcher announces as rank 0 (torchrun's
    RANK): an error in the settings, which every rank finds, is said once."""
    return get_rank() == 0 if is_dist() else os.environ.get("RANK", "0") == "0"


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
_RUN_DEVICE: list[torch.device] = []  # the device of the run that init_distributed set up (its collectives' device)


def launch_world_size() -> int:
    """The world size torchrun announces (1 for a plain process); known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def cuda_device(requested: str, local_rank: int, local_world: int, visible: int) -> torch.device:
    """The GPU of a process: ``requested`` is 'cuda' (each process of a node takes the GPU of its local rank) or
    'cuda:N' (one process per node on GPU N); ``local_world`` processes run on this node, each seeing ``visible``
    GPUs. Launches whose processes would share a GPU, or name one they cannot see, are one error line."""
    if visible == 0:
        raise UserError(f"--device {requested}: CUDA is not available here (use --device cpu)")
    if requested != "cuda":
        index = torch.device(requested).index or 0
        if local_world > 1:
            raise UserError(f"--device {requested} puts all {local_world} processes of this node on GPU {index}; "
                            "give --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if index >= visible:
            raise UserError(f"--device {requested}: this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", index)
    if local_rank >= visible:
        raise UserError(f"{local_world} processes on this node, but each sees only {visible} GPU(s), so local rank "
                        f"{local_rank} has none of its own; give every process a GPU (torchrun --nproc_per_node at "
                        "most the visible GPUs, or one torchrun process per SLURM task with --gpus-per-task 1)")
    return torch.device("cuda", local_rank)


def init_distributed(device: str, dist_url: str = "env://", process_group: bool = False,
                     timeout_minutes: float = 30.0) -> Dist:
    """torchrun (env://) when RANK/WORLD_SIZE are set, else a single process, without a process group unless
    ``process_group`` (FSDP needs one: then a group of one). ``device`` 'auto' is CUDA when available, else the CPU;
    on CUDA each process takes its own GPU (:func:`cuda_device`) and the NCCL group is bound to it. ``timeout_minutes``:
    how long a collective waits for the other ranks before the run fails."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched else 1
        run_device = cuda_device(device, local_rank, local_world, torch.cuda.device_count())
        torch.cuda.set_device(run_device)
    else:
        run_device = torch.device(device)
    cuda = run_device.type == "cuda"
    group = dict(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                 device_id=run_device if cuda else None)
    _RUN_DEVICE[:] = [run_device]
    if launched:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized():  # else the caller's group (e.g. a driver running several runs) is kept
            dist.init_process_group(init_method=dist_url, world_size=world_size, rank=rank, **group)
            _OWN_GROUP.append(True)
        barrier()
        info = Dist(True, rank, world_size, run_device)
    elif process_group:
        dist.init_process_group(store=dist.HashStore(), world_size=1, rank=0, **group)
        _OWN_GROUP.append(True)
        info = Dist(True, 0, 1, run_device)
    else:
        info = Dist(False, 0, 1, run_device)
    print0(f"distributed: {info.distributed} (world size {info.world_size}, device {info.device})")
    return info


def cleanup_distributed() -> None:
    """Tear down the process group that :func:`init_distributed` set up (not one the caller owns)."""
    if is_dist() and _OWN_GROUP:
        _OWN_GROUP.clear()
        dist.destroy_process_group()


@contextlib.contextmanager
def shared_process_group(device: str, dist_url: str = "env://", timeout_minutes: float = 30.0) -> Iterator[Dist]:
    """The process group of a driver that runs several runs one after another in this process (the probe suite):
    set up once by :func:`init_distributed` (none for a plain process), kept by every run inside, which sets up and
    tears down nothing, and torn down when the block ends. Under torchrun a group torn down and set up again in one
    worker would find the previous group's keys in the launcher's store."""
    info = init_distributed(device, dist_url, False, timeout_minutes)
    owned = list(_OWN_GROUP)
    _OWN_GROUP.clear()  # the runs inside see a group they do not own
    try:
        yield info
    finally:
        _OWN_GROUP[:] = owned
        cleanup_distributed()


# ---------------------------------------------------------------------------------------------------
# Collectives
def collective_device() -> torch.device:
    """The device of this run's collectives: the one :func:`init_distributed` chose, else the current GPU for an
    NCCL group and the CPU for any other."""
    if _RUN_DEVICE:
        return _RUN_DEVICE[0]
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_collective_device(*tensors: torch.Tensor) -> None:
    device = collective_device()
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"a collective got a tensor on {t.device}; this run's collectives take tensors on "
                               f"{device} (NCCL serves CUDA tensors only)")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (``op`` 'sum') or maximised ('max') over the ranks, as a new tensor; ``t`` itself without a
    process group. ``t`` must live on the run's device."""
    if not is_dist():
        return t
    _on_collective_device(t)
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def device_values(values: Sequence[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Host numbers as a tensor on the run's device, copied without waiting for the device (pinned memory on
    CUDA), so that building one never adds a host synchronisation."""
    host = torch.tensor(list(values), dtype=dtype, device="cpu")
    device = collective_device()
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def reduced_values(values: Sequence[float], op: str = "sum") -> list[float]:
    """Host numbers summed (or maximised) over the ranks, in float64 (one collective, one host read)."""
    if not is_dist():
        return [float(v) for v in values]
    return all_reduce(device_values(values), op).tolist()


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (``rows`` [n_r, ...], n_r may differ), concatenated in rank order."""
    if not is_dist():
        return rows
    _on_collective_device(rows)
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(get_world_size())]
    dist.all_gather(counts, torch.full((1,), len(rows), dtype=torch.long, device=rows.device))
    lengths = [int(c) for c in torch.cat(counts).tolist()]
    padded = torch.cat([rows, rows.new_zeros(max(lengths) - len(rows), *rows.shape[1:])])
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, lengths)])


def gather_objects(obj) -> list:
    """``obj`` of every rank (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    objs: list = [None] * get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (on the run's device) with rank 0's, in place."""
    if is_dist():
        _on_collective_device(*tensors)
        for t in tensors:
            dist.broadcast(t, src=0)


def barrier() -> None:
    """Wait until every rank gets here (on the run's device: an NCCL barrier knows its GPU)."""
    if is_dist():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# Sharded (DTensor) tensors and wrapped modules
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
