"""One pretraining epoch, shared by every pretraining method: the model returns its loss and named metrics
(models.registry.PretrainingModel), all of which are logged."""
from __future__ import annotations

import torch

from util.train_loop import TrainingEpoch


def train_one_epoch(model: torch.nn.Module, epoch: TrainingEpoch, online_probe=None) -> dict[str, float]:
    """One epoch; ``online_probe`` (engine_monitors.OnlineProbe) also takes a step on every batch's features."""
    model.train()
    for batch in epoch:
        with epoch.gradient_sync(model, batch.update):
            with epoch.autocast():
                loss, metrics = model(batch.images)
            epoch.backward(loss)
        epoch.step(loss=loss, **metrics)
        if online_probe is not None:
            online_probe.step(batch.images, batch.targets)
        epoch.save_if_agreed()
    return epoch.end(model, lambda m: m(batch.images)[0])
