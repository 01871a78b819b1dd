"""Supervised epoch and exact evaluation, shared by fine-tuning and probing."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from models.vit import upcast
from util.distributed import all_reduce, is_dist, is_sharded, print0, reduced_values
from util.images import device_images
from util.train_loop import TrainingEpoch, autocast_context


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, epoch: TrainingEpoch, mixup_fn=None,
                    model_ema=None) -> dict[str, float]:
    """One supervised epoch (fine-tuning, probes); ``model_ema`` (timm's ModelEmaV3) follows every update."""
    model.train()
    for batch in epoch:
        images, targets = mixup_fn(batch.images, batch.targets) if mixup_fn is not None else \
            (batch.images, batch.targets)
        with epoch.gradient_sync(model, batch.update):
            with epoch.autocast():
                loss = criterion(model(images), targets)
            epoch.backward(loss)
        if epoch.step(loss=loss) and model_ema is not None:
            model_ema.update(model)
        epoch.save_if_agreed()
    return epoch.end(model, lambda m: criterion(m(images), targets))


def shard_batches(loader, device: torch.device, collective: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's exact shard of ``loader`` (util.datasets.ShardSampler) on ``device``. With ``collective`` (a
    sharded model: its every forward is collective), as many batches as the longest shard of any rank: the extra
    ones repeat one image with targets None, to be run and not counted."""
    steps = len(loader)
    if collective and is_dist():
        steps = int(reduced_values([steps], "max")[0])
    batches, images = iter(loader), None
    for step in range(steps):
        if step < len(loader):
            images, targets = next(batches)
            yield device_images(images, device), targets.to(device, non_blocking=True)
        else:  # this rank's shard is done
            if images is None:  # no batch at all on this rank
                images = loader.dataset[0][0][None]
            yield device_images(images[:1], device), None


def per_head(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``criterion`` applied to each head's logits of an lr sweep ([heads, B, C]): the losses [heads], each the one
    that head alone would have."""
    return lambda logits, targets: torch.stack([criterion(head_logits, targets) for head_logits in logits])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> dict[str, float]:
    """Top-1/top-5/loss summed over this rank's exact shard, then all-reduced: no sample counted twice. Images
    that could not be read (target -1, see util.datasets.ImageFiles) are left out and counted."""
    return evaluate_heads(model, loader, device, amp)[0]


@torch.no_grad()
def evaluate_heads(model: torch.nn.Module, loader, device: torch.device, amp: str = "off",
                   names: Sequence[str] = ("",)) -> list[dict[str, float]]:
    """:func:`evaluate` of every head of a model whose logits are [heads, B, C] (an lr sweep, ``names`` naming its
    heads in the printed lines) in one pass over the data; a model with logits [B, C] is one head."""
    model.eval()
    totals = torch.zeros(len(names), 5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, unreadable
    for images, targets in shard_batches(loader, device, is_sharded(model)):
        with autocast_context(device, amp):
            logits = model(images)
        if targets is None:
            continue
        readable = targets >= 0
        targets = targets[readable]
        for h, head_logits in enumerate(logits if logits.ndim == 3 else logits[None]):
            head_logits = upcast(head_logits)[readable]
            top5 = head_logits.topk(min(5, head_logits.shape[1]), dim=1).indices
            correct = top5 == targets[:, None]
            totals[h] += torch.stack([F.cross_entropy(head_logits, targets, reduction="sum").double(),
                                      correct[:, 0].sum().double(), correct.any(1).sum().double(),
                                      readable.sum().double(), (~readable).sum().double()])
    results = []
    for name, (loss, top1, top5, n, unreadable) in zip(names, all_reduce(totals).tolist()):
        stats = {"acc1": 100.0 * top1 / max(n, 1), "acc5": 100.0 * top5 / max(n, 1), "loss": loss / max(n, 1),
                 "n": int(n), "unreadable": int(unreadable)}
        skipped = f", {int(unreadable)} unreadable left out" if unreadable else ""
        print0(f"* {name}Acc@1 {stats['acc1']:.3f}  Acc@5 {stats['acc5']:.3f}  loss {stats['loss']:.4f}  "
               f"({int(n)} images{skipped})")
        results.append(stats)
    return results
