"""Per-iteration learning-rate schedule: linear warmup then half-cycle cosine (MAE style, stateless)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Schedule:
    """Linear from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then cosine from ``lr`` to ``min_lr`` over the
    remaining epochs. Fractional epochs: the lr changes every iteration."""

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: float
    epochs: int

    def at(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * epoch / self.warmup_epochs
        progress = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-12)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float,
                         schedule: Schedule | Sequence[Schedule]) -> None:
    """Write the scheduled lr into every param group (times its ``lr_scale`` for layer decay): one schedule for all
    groups, or one per group (the heads of an lr sweep, each with its own peak)."""
    schedules = schedule if isinstance(schedule, Sequence) else [schedule] * len(optimizer.param_groups)
    for group, own in zip(optimizer.param_groups, schedules, strict=True):
        group["lr"] = own.at(epoch) * group.get("lr_scale", 1.0)
