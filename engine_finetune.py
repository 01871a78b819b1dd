"""Supervised epoch and exact evaluation, shared by fine-tuning and probing."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from models.vit import upcast
from util.distributed import all_reduce_max, all_reduce_sum, is_dist, is_sharded, print0
from util.misc import log_step
from util.train_loop import Loop, MidEpochSaves, OptimizerStep, TrainingEpoch, autocast_context, verify_update


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader, optim_step: OptimizerStep,
                    epoch: int, loop: Loop, saves: MidEpochSaves, mixup_fn=None, model_ema=None,
                    log_writer=None) -> dict[str, float]:
    model.train()
    batches = TrainingEpoch(loader, optim_step.optimizer, epoch, loop, saves)
    logger = batches.logger
    params = [p for p in model.parameters() if p.requires_grad]
    for step, epoch_f, images, targets in batches:
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with optim_step.sync_context(model, optim_step.is_update_step(step)):
            with autocast_context(loop.device, loop.amp):
                loss = criterion(model(images), targets)
            batches.check(loss, step)
            grad_norm = optim_step(loss, params, step)
        if grad_norm is not None and model_ema is not None:
            model_ema.update(model)
        lr = max(g["lr"] for g in optim_step.optimizer.param_groups)  # the head's lr under layer decay
        logger.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm, n=images.shape[0])
        if grad_norm is not None:
            log_step(log_writer, epoch_f, loss=loss, lr=lr)
    with autocast_context(loop.device, loop.amp):
        verify_update(model, lambda m: criterion(m(images), targets), epoch)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()


def shard_batches(loader, device: torch.device, collective: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's exact shard of ``loader`` (util.datasets.ShardSampler) on ``device``. With ``collective`` (a
    sharded model: its every forward is collective), as many batches as the longest shard of any rank: the extra
    ones repeat one image with targets None, to be run and not counted."""
    steps = len(loader)
    if collective and is_dist():
        steps = int(all_reduce_max(torch.tensor([steps], device=device)).item())
    batches, images = iter(loader), None
    for step in range(steps):
        if step < len(loader):
            images, targets = next(batches)
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        else:  # this rank's shard is done
            if images is None:  # no batch at all on this rank
                images = loader.dataset[0][0][None].to(device)
            yield images[:1], None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> dict[str, float]:
    """Top-1/top-5/loss summed over this rank's exact shard, then all-reduced: no sample counted twice. Images
    that could not be read (target -1, see util.datasets.ImageFiles) are left out and counted."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, unreadable
    for images, targets in shard_batches(loader, device, is_sharded(model)):
        with autocast_context(device, amp):
            logits = model(images)
        if targets is None:
            continue
        readable = targets >= 0
        logits, targets = upcast(logits)[readable], targets[readable]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               correct[:, 0].sum().double(), correct.any(1).sum().double(),
                               readable.sum().double(), (~readable).sum().double()])
    loss, top1, top5, n, unreadable = all_reduce_sum(totals).tolist()
    stats = {"acc1": 100.0 * top1 / max(n, 1), "acc5": 100.0 * top5 / max(n, 1), "loss": loss / max(n, 1),
             "n": int(n), "unreadable": int(unreadable)}
    skipped = f", {int(unreadable)} unreadable left out" if unreadable else ""
    print0(f"* Acc@1 {stats['acc1']:.3f}  Acc@5 {stats['acc5']:.3f}  loss {stats['loss']:.4f}  ({int(n)} images"
           f"{skipped})")
    return stats
