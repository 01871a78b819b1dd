"""Seeding and random states: each rank's seed, the states a checkpoint holds, forked and per-sample streams."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from util.distributed import get_rank


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; each rank gets seed + rank so augmentations differ across ranks."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cuda_in_use() -> bool:
    """Whether this process uses a GPU (CUDA initialised): only then does it have CUDA states to save or fork."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def rng_state() -> dict:
    """RNG states as tensors and plain values only, so that checkpoints load with weights_only=True. Of CUDA, the
    generator of this process's device only (None when the process uses no GPU): a run resumed with another number
    of visible GPUs per process (8 per node, then one bound to each task) finds the one state it needs."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if cuda_in_use() else None}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; a CUDA state goes to this process's current device (none is restored into a
    process that uses no GPU, or from a run that used none)."""
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and cuda_in_use():
        torch.cuda.set_rng_state(state["cuda"])


def _to_tuple(x):
    """Python's random state is nested tuples; weights_only loading returns lists where tuples were."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def forked_rng():
    """A context whose random draws (CPU and the current CUDA device) leave the training RNG streams untouched."""
    devices = [torch.cuda.current_device()] if cuda_in_use() else []
    return torch.random.fork_rng(devices=devices)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation in one epoch: a function of (seed, epoch, index) only, so that
    a run resumed anywhere, with any number of loader workers, augments every image as an uninterrupted run does."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Python, NumPy and torch's CPU RNG seeded with ``seed`` inside, and given back their states after: in the main
    process (--num_workers 0) the training RNG streams stay untouched. The CUDA generators are not touched."""
    saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.default_generator.set_state(saved[2])
