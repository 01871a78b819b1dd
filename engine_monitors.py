"""Whether a model learns while it trains: a weighted k-nearest-neighbour classifier on its pooled features, and an
online linear probe trained next to it.

kNN is DINO's evaluation (Caron et al., 2021, and its ``eval_knn.py``): L2-normalised features, the k training
images of highest cosine similarity vote for their class with weight exp(similarity / T); k = 20 and T = 0.07 by
default. The memory bank is a fixed subset of the training images under the evaluation transform; the queries are
(a fixed subset of) the validation set. The online probe is the linear probe's head (non-affine BatchNorm +
Linear) trained with its own AdamW on the detached features of every training batch, as solo-learn and lightly
train theirs. Neither changes training: the features come from a forward in eval mode, without gradients, on a
forked RNG, so the training losses are those of an unmonitored run and exact resume still holds.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import Dataset, Subset

from engine_finetune import shard_batches
from models.probes import LinearHead, default_pool, pooled_features
from models.vit import upcast
from util.config import KnnSettings, OnlineProbeSettings
from util.datasets import build_loader
from util.distributed import all_gather_rows, all_reduce, get_world_size, is_dist, is_sharded, print0
from util.errors import UserError
from util.rng import forked_rng
from util.shards import ShardSet
from util.train_loop import autocast_context


class Features:
    """``features(images)``: float32 features [B, D] of ``net`` in eval mode, without gradients, on a forked RNG
    (the training RNG streams are untouched), restoring its train mode after. ``pool`` maps the module and the
    images to the ``dim`` features. ``root``: the model ``net`` belongs to; when FSDP sharded it, the parameters it
    holds itself (outside the blocks: the patch embedding, the final norm) are gathered around the call, which
    bypasses the root's own forward (so the first call must follow a training step)."""

    def __init__(self, net: nn.Module, pool: Callable[[nn.Module, torch.Tensor], torch.Tensor], dim: int, amp: str,
                 device: torch.device, root: nn.Module | None = None):
        self.net, self.pool, self.dim, self.amp, self.device = net, pool, dim, amp, device
        self.root = root if root is not None else net

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        training = self.net.training
        self.net.eval()
        sharded_root = self.root if isinstance(self.root, FSDPModule) else None
        if sharded_root is not None:
            sharded_root.unshard()
        try:
            with forked_rng(), autocast_context(self.device, self.amp):
                feats = self.pool(self.net, images)
        finally:
            if sharded_root is not None:
                sharded_root.reshard()
            self.net.train(training)
        return upcast(feats).detach()


def encoder_features(model: nn.Module, amp: str, device: torch.device) -> Features:
    """A pretraining model's encoder pooled as the linear probe pools it by default (its last block, the probe's
    default pooling, the attention mask the encoder keeps: XTRA's block-causal one)."""
    encoder, mask = model.encoder, model.encoder_mask
    built = mask.build(encoder.grid_size, encoder.num_prefix_tokens, device) if mask is not None else None
    pool = default_pool(encoder)
    return Features(encoder, lambda net, x: pooled_features(net, x, built, pool), encoder.embed_dim, amp, device,
                    root=model)


@torch.no_grad()
def dataset_features(features: Features, dataset: Dataset, batch_size: int, num_workers: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of every readable image of ``dataset``, computed in exact shards across the
    ranks and gathered on every rank (in rank order, not in dataset order)."""
    loader = build_loader(dataset, batch_size, num_workers, is_train=False)
    feats, labels = [], []
    for images, targets in shard_batches(loader, device, is_sharded(features.net)):
        f = features(images)
        if targets is not None:
            readable = targets >= 0  # an unreadable validation image comes with label -1 (ImageFiles)
            feats.append(f[readable])
            labels.append(targets[readable])
    feats = torch.cat(feats) if feats else torch.zeros(0, features.dim, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    # every rank's rows in rank order, the labels as one more column of the features
    rows = all_gather_rows(torch.cat([feats, labels[:, None].to(feats.dtype)], 1))
    return rows[:, :-1], rows[:, -1].long()


@torch.no_grad()
def knn_accuracies(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                   num_classes: int, ks: Sequence[int], temperature: float, chunk: int = 512) -> list[float]:
    """Top-1 accuracy (%) of DINO's weighted kNN vote for each k of ``ks``: cosine similarity, the k nearest bank
    images vote for their class with weight exp(similarity / ``temperature``). One similarity search for all of
    them (the largest k's neighbours, of which each k takes the nearest)."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    ks = [min(k, len(bank)) for k in ks]
    correct = [0] * len(ks)
    for start in range(0, len(queries), chunk):
        similarity, nearest = (queries[start:start + chunk] @ bank.T).topk(max(ks), dim=1)
        weights, labels = (similarity / temperature).exp(), bank_labels[nearest]
        for i, k in enumerate(ks):
            votes = torch.zeros(len(nearest), num_classes, device=bank.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            correct[i] += int((votes.argmax(1) == query_labels[start:start + chunk]).sum())
    return [100.0 * c / max(len(queries), 1) for c in correct]


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int, temperature: float, chunk: int = 512) -> float:
    """:func:`knn_accuracies` for one ``k``."""
    return knn_accuracies(bank, bank_labels, queries, query_labels, num_classes, [k], temperature, chunk)[0]


class OnlineProbe:
    """The linear probe's head trained next to the model on the detached features of every training batch, with
    its own AdamW. The ranks average its gradients and BatchNorm statistics after every step, so every rank holds
    the same head (and a checkpoint holds all of it)."""

    def __init__(self, features: Features, num_classes: int, lr: float):
        self.features = features
        with forked_rng():  # its initialisation must not move the training RNG
            self.head = LinearHead(features.dim, num_classes).to(features.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        feats = self.features(images)
        self.head.train()
        loss = F.cross_entropy(self.head(feats), labels)
        self.optimizer.zero_grad()
        loss.backward()
        if is_dist():
            self._average_over_ranks()
        self.optimizer.step()

    def _average_over_ranks(self) -> None:
        tensors = [p.grad for p in self.head.parameters()] + [self.head.bn.running_mean, self.head.bn.running_var]
        flat = all_reduce(torch.cat([t.flatten() for t in tensors])) / get_world_size()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def top1(self, feats: torch.Tensor, labels: torch.Tensor, train_feats: torch.Tensor) -> float:
        """Top-1 (%) on ``feats``, with the BatchNorm statistics of ``train_feats`` (the current model's features of
        the fixed training images: the running statistics lag behind a model that still changes fast)."""
        bn = self.head.bn
        bn.running_mean.copy_(train_feats.mean(0))
        bn.running_var.copy_(train_feats.var(0))
        self.head.eval()
        return 100.0 * float((self.head(feats).argmax(1) == labels).float().mean()) if len(labels) else 0.0

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def fixed_subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """At most ``n`` images of ``dataset``, the same ones in every run (a seeded choice, in index order; of tar
    shards, read in sequence, the first ``n``)."""
    if n >= len(dataset):
        return dataset
    if isinstance(dataset, ShardSet):
        return dataset.prefix(n)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, chosen.tolist())


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (the same files, listed once) read for evaluation: with ``transform``, and an
    unreadable image left out rather than replaced (ImageFiles, tar shards)."""
    copied = copy.copy(dataset)
    if hasattr(copied, "transform"):
        copied.transform = transform
    if hasattr(copied, "train"):
        copied.train = False
    return copied


class Monitors:
    """What a training script calls: ``online_probe`` (or None) for the engine's steps, and ``epoch_end(epoch)``
    for the record of a finished epoch (``knn_acc1`` on a monitored epoch, ``online_probe_acc1`` every epoch).
    ``bank`` and ``queries``: the training and validation images under the evaluation transform."""

    def __init__(self, knn: KnnSettings, probe: OnlineProbeSettings | None, features: Features, bank: Dataset,
                 queries: Dataset, num_classes: int, batch_size: int, num_workers: int):
        if num_classes < 2:
            raise UserError(f"the kNN monitor and the online probe need labelled images; the training images have "
                            f"{num_classes} class (turn them off: --knn_every 0, and no --online_probe)")
        self.knn, self.features, self.num_classes = knn, features, num_classes
        self.bank = fixed_subset(bank, knn.knn_train_images)
        self.queries = fixed_subset(queries, knn.knn_val_images)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.online_probe = OnlineProbe(features, num_classes, probe.online_probe_lr) \
            if probe is not None and probe.online_probe else None
        print0(f"monitors: kNN {'every ' + str(knn.knn_every) + ' epoch(s)' if knn.knn_every else 'off'} "
               f"({len(self.bank)} training images, {len(self.queries)} validation images, k {knn.knn_k}, "
               f"T {knn.knn_temperature}); online probe {'on' if self.online_probe else 'off'}")

    @staticmethod
    def wanted(knn: KnnSettings, probe: OnlineProbeSettings | None = None) -> bool:
        return knn.knn_every > 0 or (probe is not None and probe.online_probe)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        knn_due = self.knn.knn_every > 0 and (epoch + 1) % self.knn.knn_every == 0
        if not (knn_due or self.online_probe):
            return {}
        device = self.features.device
        queries, query_labels = dataset_features(self.features, self.queries, self.batch_size, self.num_workers,
                                                 device)
        bank, bank_labels = dataset_features(self.features, self.bank, self.batch_size, self.num_workers, device)
        record = {}
        if knn_due:
            record["knn_acc1"] = knn_top1(bank, bank_labels, queries, query_labels, self.num_classes,
                                          self.knn.knn_k, self.knn.knn_temperature)
        if self.online_probe is not None:
            record["online_probe_acc1"] = self.online_probe.top1(queries, query_labels, bank)
        print0(f"monitors after epoch {epoch}: " + ", ".join(f"{k} {v:.2f}%" for k, v in record.items()))
        return record
