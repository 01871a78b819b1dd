"""Metric logging: running meters and progress lines, TensorBoard."""
from __future__ import annotations

import atexit
import datetime
import os
import time
from collections import defaultdict, deque
from typing import Iterable, Iterator

import numpy as np
import torch

from util.distributed import get_world_size, is_main_process, print0, reduced_values
from util.rng import cuda_in_use


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
        count, self.total = reduced_values([self.count, self.total])
        self.count = int(count)

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

    def state_dict(self) -> dict:
        return {"window": self.deque.maxlen, "fmt": self.fmt, "values": list(self.deque), "count": self.count,
                "total": self.total}

    @classmethod
    def from_state(cls, state: dict) -> SmoothedValue:
        meter = cls(state["window"], state["fmt"])
        meter.deque.extend(state["values"])
        meter.count, meter.total = state["count"], state["total"]
        return meter


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

    def state_dict(self) -> dict:
        """The running meters as plain values, in order (a mid-epoch checkpoint holds each rank's)."""
        return {name: meter.state_dict() for name, meter in self.meters.items()}

    def load_state_dict(self, state: dict) -> None:
        self.meters.clear()
        self.meters.update((name, SmoothedValue.from_state(m)) for name, m in state.items())

    def averages(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  batch_size: int = 0, first: int = 0) -> Iterator:
        """Yield from ``iterable``, printing progress every ``print_freq`` steps: ETA, img/s (global,
        from ``batch_size`` per rank), all meters, and peak CUDA memory. ``first``: the step the iterable starts at
        (an epoch resumed in its middle)."""
        n = first + len(iterable)
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable, first):
            yield obj
            iter_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                rate = batch_size * get_world_size() / max(iter_time.median, 1e-9)
                mem = f"  mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB" if cuda_in_use() else ""
                print0(f"{header} [{i}/{n}]  eta: {eta}  {self}  img/s: {rate:.1f}  "
                       f"time/it: {iter_time.median:.4f}{mem}")
        total = time.time() - start
        print0(f"{header} total time: {datetime.timedelta(seconds=int(total))} ({total / max(n - first, 1):.4f} s/it)")


def log_step(log_writer, epoch: float, **scalars: float | torch.Tensor) -> None:
    """Tensorboard scalars against ``epoch_1000x`` (fractional epoch × 1000: curves stay comparable when the
    batch size changes); a no-op without a writer."""
    if log_writer is not None:
        for name, value in scalars.items():
            log_writer.add_scalar(name, value.item() if isinstance(value, torch.Tensor) else value, int(epoch * 1000))


def log_epoch(log_writer, epoch: int, scalars: dict[str, float]) -> None:
    """Tensorboard scalars of a finished epoch (validation accuracy, the monitors) against the epoch; a no-op
    without a writer."""
    if log_writer is not None:
        for name, value in scalars.items():
            log_writer.add_scalar(name, value, epoch)


def make_log_writer(output_dir: str, log_dir: str | None):
    """TensorBoard writer on rank 0 into ``log_dir`` (None: ``output_dir``); None on other ranks or for an empty
    directory. It is also closed (flushed) at exit: a run stopped by a signal keeps its last events."""
    log_dir = output_dir if log_dir is None else log_dir
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
    os.makedirs(log_dir, exist_ok=True)
    writer = SummaryWriter(log_dir=log_dir)
    atexit.register(writer.close)
    return writer
