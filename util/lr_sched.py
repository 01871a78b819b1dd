"""Per-iteration learning-rate schedule: linear warmup then half-cycle cosine (MAE style, stateless)."""
from __future__ import annotations

import argparse
import math

import torch


def lr_at(epoch: float, args: argparse.Namespace) -> float:
    """lr at a fractional epoch: linear from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then cosine
    from ``lr`` to ``min_lr`` over the remaining epochs."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr + (args.lr - args.warmup_lr) * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: argparse.Namespace) -> float:
    """Write the scheduled lr into every param group (times its ``lr_scale`` for layer decay)."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
