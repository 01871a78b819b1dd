"""One pretraining epoch, shared by every autoregressive method (the model returns its own loss)."""
from __future__ import annotations

import argparse

import torch

from util.lr_sched import adjust_learning_rate
from util.misc import MetricLogger, OptimizerStep, SmoothedValue, autocast_context, check_finite, log_step, print0


def train_one_epoch(model: torch.nn.Module, loader, optim_step: OptimizerStep, device: torch.device, epoch: int,
                    args: argparse.Namespace, log_writer=None) -> dict[str, float]:
    model.train()
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
    # A trailing incomplete accumulation group would leak its gradients into the next epoch: skip it.
    steps = len(loader) // args.accum_iter * args.accum_iter
    batches = logger.log_every(loader, args.print_freq, f"Epoch [{epoch}]", args.batch_size)
    for step, (images, _) in enumerate(batches):
        if step >= steps:
            break
        if step % args.accum_iter == 0:
            lr = adjust_learning_rate(optim_step.optimizer, epoch + step / steps, args)
        images = images.to(device, non_blocking=True)
        with optim_step.sync_context(model, step):
            with autocast_context(device, args.amp):
                loss, _ = model(images)
            check_finite(loss, epoch, step)
            grad_norm = optim_step(loss, model.parameters(), step)
        logger.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm, n=images.shape[0])
        if grad_norm is not None:
            log_step(log_writer, epoch + step / steps, train_loss=loss, lr=lr, grad_norm=grad_norm)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()
