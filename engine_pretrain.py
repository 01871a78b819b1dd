"""One pretraining epoch, shared by every pretraining method: the model returns its loss and named metrics
(models.registry.PretrainingModel), all of which are logged."""
from __future__ import annotations

import torch

from util.distributed import print0
from util.misc import log_step
from util.train_loop import Loop, MidEpochSaves, OptimizerStep, TrainingEpoch, autocast_context, verify_update


def train_one_epoch(model: torch.nn.Module, loader, optim_step: OptimizerStep, epoch: int, loop: Loop,
                    saves: MidEpochSaves, log_writer=None, online_probe=None) -> dict[str, float]:
    """One epoch; ``online_probe`` (engine_monitors.OnlineProbe) also takes a step on every batch's features."""
    model.train()
    batches = TrainingEpoch(loader, optim_step.optimizer, epoch, loop, saves)
    logger = batches.logger
    for step, epoch_f, images, targets in batches:
        update = optim_step.is_update_step(step)
        with optim_step.sync_context(model, update):
            with autocast_context(loop.device, loop.amp):
                loss, metrics = model(images)
            batches.check(loss, step)
            grad_norm = optim_step(loss, model.parameters(), step)
        lr = optim_step.optimizer.param_groups[0]["lr"]
        logger.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm, n=images.shape[0], **metrics)
        if grad_norm is not None:
            log_step(log_writer, epoch_f, train_loss=loss, lr=lr, grad_norm=grad_norm,
                     **{f"train_{k}": v for k, v in metrics.items()})
        if online_probe is not None:
            online_probe.step(images, targets)
    with autocast_context(loop.device, loop.amp):
        verify_update(model, lambda m: m(images)[0], epoch)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()
