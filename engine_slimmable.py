"""One epoch of Scala training: each step runs the sampled widths, composes their losses and makes one optimiser
update (the gradient of the summed losses; only one width's graph is alive at a time)."""
from __future__ import annotations

import random

import torch.nn as nn
import torch.nn.functional as F

from models.scala import ScalaConfig, width_losses
from models.vit import upcast
from util.distributed import get_rank, print0
from util.misc import log_step
from util.train_loop import Loop, MidEpochSaves, OptimizerStep, TrainingEpoch, autocast_context, verify_update

WIDTH_NAMES = ("full", "r3", "r2", "s")


def train_one_epoch(model: nn.Module, teacher: nn.Module | None, loader, optim_step: OptimizerStep, epoch: int,
                    loop: Loop, saves: MidEpochSaves, scala: ScalaConfig, mixup_fn, smoothing: float,
                    num_classes: int, seed: int, log_writer=None) -> dict[str, float]:
    """The first ``scala.full_warm_epochs`` epochs train the largest width only; then every step runs
    [l, r3, r2, s] from stable sampling (each rank draws its own r3, r2, as the official seed + rank does).
    Gradients are all-reduced once per update: by the backward of the last width of its last micro-step."""
    model.train()
    full_only = epoch < scala.full_warm_epochs
    space = scala.width_space
    batches = TrainingEpoch(loader, optim_step.optimizer, epoch, loop, saves)
    logger = batches.logger
    params = [p for p in model.parameters() if p.requires_grad]
    for step, epoch_f, images, targets in batches:
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        elif smoothing > 0:
            targets = F.one_hot(targets, num_classes) * (1 - smoothing) + smoothing / num_classes
        # seeded per step, so that a run resumed anywhere draws the same widths
        rng = random.Random(f"scala-{seed}-{get_rank()}-{epoch}-{step}")
        ratios = [space.largest] if full_only else space.sample(rng)
        teacher_logits = None
        if teacher is not None:
            with autocast_context(loop.device, loop.amp):
                teacher_logits = teacher(images).float()
        losses = width_losses(model, images, targets, ratios, teacher_logits, scala.transfer_type,
                              scala.ce_coefficient, scala.distillation_alpha)
        update = optim_step.is_update_step(step)
        values = {}
        for j, name in enumerate(WIDTH_NAMES[:len(ratios)]):
            with optim_step.sync_context(model, update and j == len(ratios) - 1):
                with autocast_context(loop.device, loop.amp):
                    _, loss = next(losses)  # forward of this width (the previous graph is already freed)
                batches.check(loss, step)
                optim_step.backward(loss)
            values[f"loss_{name}"] = loss.detach()
        grad_norm = optim_step.update(params) if update else None
        total = sum(values.values())
        lr = optim_step.optimizer.param_groups[0]["lr"]
        logger.update(loss=total, lr=lr, grad_norm=grad_norm, n=images.shape[0], **values)
        if not full_only:
            logger.update(r3=ratios[1], r2=ratios[2])
        if grad_norm is not None:
            log_step(log_writer, epoch_f, loss=total, lr=lr)
    with autocast_context(loop.device, loop.amp):
        verify_update(model, lambda m: F.cross_entropy(upcast(m(images, space.largest)), targets), epoch)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()
