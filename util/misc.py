"""Distributed set-up, seeding, metric logging and the optimisation step shared by every entry script."""
from __future__ import annotations

import datetime
import math
import os
import random
import sys
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from util.lr_sched import Schedule, adjust_learning_rate


# ---------------------------------------------------------------------------------------------------
# Distributed
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
        raise ValueError("--device cuda requested but CUDA is not available (use --device cpu)")
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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; each rank gets seed + rank so augmentations differ across ranks."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain values only, so that checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    """Python's random state is nested tuples; weights_only loading returns lists where tuples were."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------------
# Precision and the optimisation step
def autocast_context(device: torch.device | str, amp: str):
    """Autocast for --amp bf16/fp16 on the given device; a no-op for --amp off, and for auto (bf16 on CUDA) on other
    devices."""
    device_type = torch.device(device).type
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


class OptimizerStep:
    """Backward of each micro-step, and every ``accum_iter`` micro-steps the update: unscale, clip, step, zero_grad.

    A GradScaler exists only for fp16. ``backward`` divides the loss by ``accum_iter``, so an update applies the
    mean gradient of its micro-steps; a step that backpropagates several losses (Scala's widths) calls
    ``backward`` once per loss and ``update`` once. DDP gradient sync is skipped on micro-steps with ``no_sync``
    (the caller wraps the forward and backward in ``self.sync_context(model, sync)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, amp: str, accum_iter: int = 1,
                 clip_grad: float | None = None, device: torch.device | str = "cpu"):
        self.optimizer = optimizer
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None

    def is_update_step(self, step: int) -> bool:
        return (step + 1) % self.accum_iter == 0

    @staticmethod
    def sync_context(model: torch.nn.Module, sync: bool):
        """Gradients are reduced only by the backward that precedes an update: DDP's ``no_sync`` unless ``sync``,
        FSDP2's ``set_requires_gradient_sync``."""
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        elif hasattr(model, "no_sync") and not sync:
            return model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        """Unscale, clip to ``clip_grad`` (when set), step and zero the gradients; returns the total gradient norm
        before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in params if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else math.inf
        norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else torch.zeros(())
        if self.scaler is None and not torch.isfinite(norm):  # fp16: the scaler skips such steps by itself
            raise FloatingPointError(f"non-finite gradient norm ({norm.item()}): the update was not applied; "
                                     "stopping all ranks (try a lower lr, --clip_grad, or --amp off)")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def __call__(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], step: int) -> torch.Tensor | None:
        """``backward``, then ``update`` on the last micro-step of an accumulation group (its gradient norm),
        else None."""
        self.backward(loss)
        return self.update(params) if self.is_update_step(step) else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def check_finite(loss: torch.Tensor, epoch: int, step: int, dataset=None, max_unreadable: int = 0) -> None:
    """Stop every rank together (one all-reduce: a per-rank exit would hang the others) on a non-finite loss, and
    on more than ``max_unreadable`` unreadable images in ``dataset`` (an ``ImageFiles``; the files are listed)."""
    unreadable = getattr(dataset, "unreadable", None)
    flags = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0,
                          float(unreadable.sum()) if unreadable is not None else 0.0], device=loss.device)
    nonfinite, bad_images = all_reduce_sum(flags).tolist()
    if nonfinite > 0:
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; "
                                 "stopping all ranks (try --amp bf16/off, a lower lr or --clip_grad)")
    if bad_images > max_unreadable:
        paths = dataset.unreadable_paths()
        listed = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
        raise ValueError(f"{int(bad_images)} unreadable training images, more than --max_unreadable allows "
                         f"({max_unreadable}); on this rank: {listed}")


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


def forked_rng():
    """A context whose random draws (CPU and the current CUDA device) leave the training RNG streams untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def verify_update(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], epoch: int) -> None:
    """Before an epoch's results are written, on every rank: the weights are finite and give a finite loss on the
    epoch's last batch, recomputed in eval mode on a forked RNG (training randomness is untouched). Otherwise
    every rank stops and nothing of the epoch is written, so the last checkpoint stays the last good one."""
    raw = unwrap(model)
    training = raw.training
    raw.eval()
    with forked_rng():
        loss = loss_of(raw)
    raw.train(training)
    weights = [local(p) for p in raw.parameters() if p.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in [loss.detach(), *weights]]).all()
    if all_reduce_sum((~finite).float().reshape(1)).item() > 0:
        raise FloatingPointError(f"the weights after epoch {epoch} are non-finite or give a non-finite loss on its "
                                 "last batch: nothing of that epoch was written and the last checkpoint stays the "
                                 "last good one (try a lower lr, --clip_grad, or --amp off)")


# ---------------------------------------------------------------------------------------------------
# Logging
class SmoothedValue:
    """Window median plus a global average that can be synchronised across ranks."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v.item() if isinstance(v, torch.Tensor) else float(v), n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def averages(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  batch_size: int = 0) -> Iterator:
        """Yield from ``iterable``, printing progress every ``print_freq`` steps: ETA, img/s (global,
        from ``batch_size`` per rank), all meters, and peak CUDA memory."""
        n = len(iterable)
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            yield obj
            iter_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                rate = batch_size * get_world_size() / max(iter_time.median, 1e-9)
                mem = f"  mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB" if torch.cuda.is_available() else ""
                print0(f"{header} [{i}/{n}]  eta: {eta}  {self}  img/s: {rate:.1f}  "
                       f"time/it: {iter_time.median:.4f}{mem}")
        total = time.time() - start
        print0(f"{header} total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s/it)")


def log_step(log_writer, epoch: float, **scalars: float | torch.Tensor) -> None:
    """Tensorboard scalars against ``epoch_1000x`` (fractional epoch × 1000: curves stay comparable when the
    batch size changes); a no-op without a writer."""
    if log_writer is not None:
        for name, value in scalars.items():
            log_writer.add_scalar(name, value.item() if isinstance(value, torch.Tensor) else value, int(epoch * 1000))


@dataclass(frozen=True)
class Loop:
    """What every training epoch needs besides the model, the data and the optimiser step."""

    device: torch.device
    amp: str
    accum_iter: int
    print_freq: int
    batch_size: int  # per process, for the img/s of the progress line
    schedule: Schedule
    max_unreadable: int = 0  # unreadable training images allowed before the run stops

    def check(self, loss: torch.Tensor, epoch: int, step: int, dataset) -> None:
        check_finite(loss, epoch, step, dataset, self.max_unreadable)


def epoch_batches(loader, optimizer: torch.optim.Optimizer, epoch: int, loop: Loop) -> tuple[MetricLogger, Iterator]:
    """The loop head shared by every training epoch: a MetricLogger (progress lines) and an iterator of
    (step, fractional epoch, images, targets) on the loop's device. The lr is set at the start of each accumulation
    group, and a trailing incomplete group is dropped (its gradients would leak into the next epoch)."""
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
    steps = len(loader) // loop.accum_iter * loop.accum_iter

    def batches() -> Iterator:
        for step, (images, targets) in enumerate(logger.log_every(loader, loop.print_freq, f"Epoch [{epoch}]",
                                                                  loop.batch_size)):
            if step >= steps:
                break
            if step % loop.accum_iter == 0:
                adjust_learning_rate(optimizer, epoch + step / steps, loop.schedule)
            yield (step, epoch + step / steps, images.to(loop.device, non_blocking=True),
                   targets.to(loop.device, non_blocking=True))

    return logger, batches()


def make_log_writer(log_dir: str):
    """TensorBoard writer on rank 0 (None elsewhere or for an empty ``log_dir``)."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
    """Run ``main(sys.argv[1:])``; bad input (unknown or foreign flags, impossible settings, missing files, corrupt
    checkpoints, unknown names) ends with one 'error: ...' line and exit code 2 instead of a traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if not getattr(e, "every_rank", False) or is_main_process():  # the same error on every rank: said once
            print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        raise SystemExit(2) from None


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused implementation: one kernel over all parameters instead of a loop per tensor (measured
    on the 2-core CPU for the 94M-parameter xtra_vit_small_patch16: 0.07 vs 0.47 s per step)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)
