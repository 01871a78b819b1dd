"""One epoch of Scala training: each step runs the sampled widths, composes their losses and makes one optimiser
update (the gradient of the summed losses; only one width's graph is alive at a time)."""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.scala import ScalaConfig, width_losses
from models.vit import upcast
from util.distributed import get_rank
from util.train_loop import TrainingEpoch

WIDTH_NAMES = ("full", "r3", "r2", "s")


def train_one_epoch(model: nn.Module, teacher: nn.Module | None, epoch: TrainingEpoch, scala: ScalaConfig,
                    soft_targets: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    seed: int) -> dict[str, float]:
    """The first ``scala.full_warm_epochs`` epochs train the largest width only; then every step runs
    [l, r3, r2, s] from stable sampling (each rank draws its own r3, r2, as the official seed + rank does).
    ``soft_targets`` mixes the batch and makes its targets distributions (mixup, label smoothing). Gradients are
    all-reduced once per update: by the backward of the last width of its last micro-step."""
    model.train()
    full_only = epoch.epoch < scala.full_warm_epochs
    space = scala.width_space
    for batch in epoch:
        images, targets = soft_targets(batch.images, batch.targets)
        # seeded per step, so that a run resumed anywhere draws the same widths
        rng = random.Random(f"scala-{seed}-{get_rank()}-{epoch.epoch}-{batch.step}")
        ratios = [space.largest] if full_only else space.sample(rng)
        teacher_logits = None
        if teacher is not None:
            with epoch.autocast():
                teacher_logits = teacher(images).float()
        losses = width_losses(model, images, targets, ratios, teacher_logits, scala.transfer_type,
                              scala.ce_coefficient, scala.distillation_alpha)
        values = {}
        for j, name in enumerate(WIDTH_NAMES[:len(ratios)]):
            with epoch.gradient_sync(model, batch.update and j == len(ratios) - 1):
                with epoch.autocast():
                    _, loss = next(losses)  # forward of this width (the previous graph is already freed)
                epoch.backward(loss)
            values[f"loss_{name}"] = loss.detach()
        epoch.step(loss=sum(values.values()), **values)
        if not full_only:
            epoch.meters.update(r3=ratios[1], r2=ratios[2])
        epoch.save_if_agreed()
    return epoch.end(model, lambda m: F.cross_entropy(upcast(m(images, space.largest)), targets))
