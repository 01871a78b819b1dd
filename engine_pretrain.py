"""One pretraining epoch, shared by every autoregressive method (the model returns its own loss)."""
from __future__ import annotations

import argparse

import torch

from util.misc import OptimizerStep, autocast_context, check_finite, epoch_batches, log_step, print0


def train_one_epoch(model: torch.nn.Module, loader, optim_step: OptimizerStep, device: torch.device, epoch: int,
                    args: argparse.Namespace, log_writer=None) -> dict[str, float]:
    model.train()
    logger, batches = epoch_batches(loader, optim_step.optimizer, device, epoch, args)
    for step, epoch_f, images, _ in batches:
        with optim_step.sync_context(model, step):
            with autocast_context(device, args.amp):
                loss, _ = model(images)
            check_finite(loss, epoch, step)
            grad_norm = optim_step(loss, model.parameters(), step)
        lr = optim_step.optimizer.param_groups[0]["lr"]
        logger.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm, n=images.shape[0])
        if grad_norm is not None:
            log_step(log_writer, epoch_f, train_loss=loss, lr=lr, grad_norm=grad_norm)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()
