"""Training and validation images read from WebDataset tar shards (written by ``python -m util.make_shards``).

A split directory holds ``shard-NNNNNN.tar`` files and ``index.json``: the class names and, per shard, its name and
sample count. Each sample is ``<index>.<ext>`` (the source image's bytes, as they were) and ``<index>.cls`` (the
label), ``<index>`` being the sample's number in the split (nine digits). Every shard the index names must lie
inside the split directory, symbolic links resolved. The tars are read sequentially with the ``webdataset``
library's tar iterators and shuffle buffer.

One training epoch: the shards in an order seeded by (seed, epoch), their samples concatenated into one sequence;
rank r of W takes the r-th of W equal contiguous ranges of it (N // W samples each, as DistributedSampler's
drop_last); within a rank, loader worker w takes a contiguous part of whole batches and passes it through a shuffle
buffer seeded by (seed, epoch, rank, w). Each sample is augmented with python, NumPy and torch seeded by (seed,
epoch, index), as the ImageFolder path does. So every rank takes the same number of steps, every sample is used at
most once per epoch, and a run resumed in the middle of an epoch (same ranks and workers) sees the batches an
uninterrupted run would: each worker replays its part up to where it stopped, reading but not decoding. Validation:
rank r reads the r-th of W contiguous ranges in index order, all of them together exactly the split.

Unreadable data follows ImageFiles' policy: an image that does not decode, or the samples a truncated or missing
shard could not give, are flagged in ``unreadable`` (shared with the workers) and named once on stderr; in training
such a sample is replaced by the previous readable one of the same stream (the next one if there is none yet), in
evaluation it comes back with label -1.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from util.decoding import decode_for
from util.errors import UserError
from util.paths import inside
from util.rng import sample_seed, seeded_cpu_rng

INDEX = "index.json"
SHUFFLE_BUFFER = 1000  # samples per worker (~110 MB of ImageNet JPEGs): mixes a shard's consecutive samples


def is_shard_split(root: str) -> bool:
    return os.path.isfile(os.path.join(root, INDEX))


class ShardSet:
    """A split of tar shards: ``len`` (samples), ``classes``, ``transform``, ``unreadable`` (a flag per sample,
    shared with loader workers). :meth:`stream` gives the IterableDataset one rank reads."""

    def __init__(self, root: str, transform, train: bool):
        path = os.path.join(root, INDEX)
        try:
            with open(path) as f:
                index = json.load(f)
            self.classes = list(index["classes"])
            entries = [(str(s["name"]), int(s["samples"])) for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read shard index {path}: {type(e).__name__}: {e}", every_rank=True) from None
        self.shards = [(inside(root, name, f"shard {name!r} listed in {path}"), n) for name, n in entries]
        missing = [p for p, _ in self.shards if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{len(missing)} shard(s) listed in {path} are missing, e.g. {missing[0]}", every_rank=True)
        self.root, self.transform, self.train = root, transform, train
        self.starts = [0]
        for _, n in self.shards:
            self.starts.append(self.starts[-1] + n)
        self.unreadable = torch.zeros(self.starts[-1], dtype=torch.uint8).share_memory_()
        self.limit = self.starts[-1]  # the images read: all of them, or the first ones of a prefix

    def __len__(self) -> int:
        return self.limit

    def prefix(self, n: int) -> ShardSet:
        """The first ``n`` samples (in index order) as a set of their own (the kNN memory bank)."""
        copied = copy.copy(self)
        copied.limit = min(n, len(self))
        return copied

    def unreadable_paths(self) -> list[str]:
        return [self.name_of(i) for i in self.unreadable.nonzero().flatten().tolist()]

    def name_of(self, index: int) -> str:
        k = next(k for k in range(len(self.shards)) if self.starts[k + 1] > index)
        return f"{self.shards[k][0]}:{index:09d}"

    def stream(self, batch_size: int, seed: int, rank: int, world: int) -> ShardStream:
        return ShardStream(self, batch_size, seed, rank, world)

    # --- reading -------------------------------------------------------------------------------------
    def samples(self, order: list[int], first: int, last: int) -> Iterator[tuple[int, bytes | None, int]]:
        """(index, image bytes or None if unreadable, label) of positions [first, last) of the sequence that
        concatenates the shards in ``order``; skipped samples are read but not kept."""
        position = 0
        for k in order:
            path, count = self.shards[k]
            if position + count <= first:
                position += count
                continue
            if position >= last:
                return
            begin, end = max(first - position, 0), min(last - position, count)
            yield from self._shard_samples(k, begin, end)
            position += count

    def _shard_samples(self, k: int, begin: int, end: int) -> Iterator[tuple[int, bytes | None, int]]:
        """Samples [begin, end) of shard ``k`` in its order; those a torn or missing file cannot give come as
        unreadable (None)."""
        path = self.shards[k][0]
        failures: list[Exception] = []

        def record(e: Exception) -> bool:
            failures.append(e)
            return False  # stop this shard: what follows a torn record cannot be trusted

        read = 0  # samples of the shard read so far
        try:
            with open(path, "rb") as f:
                members = tar_file_expander([{"url": path, "stream": f}], handler=record, eof_value=None)
                for sample in group_by_keys(members, handler=record):
                    if read >= end:
                        break
                    if read >= begin:
                        image = next((v for key, v in sample.items() if not key.startswith("__") and key != "cls"),
                                     None)
                        yield self.starts[k] + read, image, int(sample["cls"]) if "cls" in sample else -1
                    read += 1
        except OSError as e:  # the file went away, or cannot be read
            failures.append(e)
        for i in range(max(read, begin), end):  # what a torn or missing file did not give
            yield self.starts[k] + i, None, -1
        if failures or read < end:
            print(f"warning: shard {path} gave {read} of its samples ({type(failures[0]).__name__}: {failures[0]})"
                  if failures else f"warning: shard {path} gave {read} of its samples", file=sys.stderr, flush=True)

    def __getitem__(self, index: int):
        """One sample (its shard read up to it): the visualised images, a padding forward."""
        ((i, image, label),) = self.samples(list(range(len(self.shards))), index, index + 1)
        decoded = self.decode(i, image)
        return (decoded, label) if decoded is not None else (self.transform(Image.new("RGB", (8, 8))), -1)

    def decode(self, index: int, image: bytes | None):
        """The transformed image, or None (flagged and named once) when it does not decode."""
        if image is not None:
            try:
                return self.transform(decode_for(self.transform, image))
            except (OSError, ValueError):  # PIL's UnidentifiedImageError and truncated data are OSErrors
                pass
        if not self.unreadable[index]:
            self.unreadable[index] = 1
            print(f"warning: unreadable image {self.name_of(index)}; "
                  f"{'replaced by the previous readable one' if self.train else 'left out of the evaluation'}",
                  file=sys.stderr, flush=True)
        return None


def _worker_parts(batches: int, workers: int) -> list[int]:
    """Batches of each loader worker: as equal as possible, the first ones one more. The loader takes one batch from
    each worker in turn, so the rank's batch j comes from worker j % workers."""
    return [batches // workers + (w < batches % workers) for w in range(workers)]


class ShardStream(IterableDataset):
    """What one rank reads of a :class:`ShardSet` (see the module's docstring): in training ``num_samples`` samples
    per epoch (``set_epoch(epoch, start)``: ``start`` of them already used, a whole number of batches), in
    evaluation its exact share."""

    def __init__(self, split: ShardSet, batch_size: int, seed: int, rank: int, world: int):
        self.split, self.batch_size, self.seed, self.rank, self.world = split, batch_size, seed, rank, world
        n = len(split)
        if split.train:
            self.num_samples = n // world
            self.first = rank * self.num_samples
        else:
            self.first, self.num_samples = rank * n // world, (rank + 1) * n // world - rank * n // world
        # (epoch, start) in memory shared with the loader's workers, which outlive an epoch (persistent_workers)
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.unreadable = split.unreadable
        self.classes = split.classes

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.position[0], self.position[1] = epoch, start

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @property
    def start(self) -> int:
        return int(self.position[1])

    def unreadable_paths(self) -> list[str]:
        return self.split.unreadable_paths()

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size * self.batch_size if self.split.train else self.num_samples) \
            - self.start

    def __getitem__(self, i: int):
        """A sample of the split by its index (evaluation pads a sharded model's forwards with one)."""
        return self.split[i]

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        train, B = self.split.train, self.batch_size
        batches = (self.num_samples // B) if train else math.ceil(self.num_samples / B)
        done = self.start // B
        # a loader restarted after `done` batches starts its round at worker 0, which must take batch `done`
        role = (worker + done) % workers
        parts = _worker_parts(batches, workers)
        first = self.first + B * sum(parts[:role])
        last = min(first + B * parts[role], self.first + self.num_samples)
        order = list(range(len(self.split.shards)))
        if train:
            random.Random(f"shards-{self.seed}-{self.epoch}").shuffle(order)
        samples = self.split.samples(order, first, last)
        if train:
            rng = random.Random(f"buffer-{self.seed}-{self.epoch}-{self.rank}-{role}")
            samples = shuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)(samples)
        used = len(range(role, done, workers)) * B  # this worker's batches among the done ones
        previous, pending = None, 0
        for i, (index, image, label) in enumerate(samples):
            if i < used:
                continue
            with seeded_cpu_rng(sample_seed(self.seed, self.epoch, index)) if train else contextlib.nullcontext():
                decoded = self.split.decode(index, image)
            if decoded is None and not train:
                yield self.split.transform(Image.new("RGB", (8, 8))), -1
            elif decoded is None:
                if previous is None:
                    pending += 1  # before any readable one: the next readable one stands in
                else:
                    yield previous
            else:
                previous = (decoded, label)
                for _ in range(pending + 1):
                    yield previous
                pending = 0
