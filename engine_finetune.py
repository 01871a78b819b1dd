"""Supervised epoch and exact evaluation, shared by fine-tuning and probing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from util.misc import (
    Loop,
    OptimizerStep,
    all_reduce_sum,
    autocast_context,
    check_finite,
    epoch_batches,
    log_step,
    print0,
)


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader, optim_step: OptimizerStep,
                    epoch: int, loop: Loop, mixup_fn=None, model_ema=None, log_writer=None) -> dict[str, float]:
    model.train()
    logger, batches = epoch_batches(loader, optim_step.optimizer, epoch, loop)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, epoch_f, images, targets in batches:
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with optim_step.sync_context(model, optim_step.is_update_step(step)):
            with autocast_context(loop.device, loop.amp):
                loss = criterion(model(images), targets)
            check_finite(loss, epoch, step)
            grad_norm = optim_step(loss, params, step)
        if grad_norm is not None and model_ema is not None:
            model_ema.update(model)
        lr = max(g["lr"] for g in optim_step.optimizer.param_groups)  # the head's lr under layer decay
        logger.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm, n=images.shape[0])
        if grad_norm is not None:
            log_step(log_writer, epoch_f, loss=loss, lr=lr)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> dict[str, float]:
    """Top-1/top-5/loss summed over this rank's exact shard, then all-reduced: no sample counted twice."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               correct[:, 0].sum().double(), correct.any(1).sum().double(),
                               torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
    loss, top1, top5, n = all_reduce_sum(totals).tolist()
    stats = {"acc1": 100.0 * top1 / max(n, 1), "acc5": 100.0 * top5 / max(n, 1), "loss": loss / max(n, 1),
             "n": int(n)}
    print0(f"* Acc@1 {stats['acc1']:.3f}  Acc@5 {stats['acc5']:.3f}  loss {stats['loss']:.4f}  ({int(n)} images)")
    return stats
