"""Datasets (ImageFolder, WebDataset tar shards, the embedded digits, synthetic), transforms and loaders."""
from __future__ import annotations

import atexit
import itertools
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler now, before _kill_loader_workers
import os
import signal
import sys

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

from util.config import AugmentSettings, DataSettings, Decode, MixupSettings
from util.decoding import TensorCrop, collate, decode_for
from util.distributed import get_rank, get_world_size, print0
from util.errors import UserError
from util.rng import sample_seed, seeded_cpu_rng
from util.shards import INDEX, ShardSet, is_shard_split
from util.train_loop import STOP_SIGNALS

DIGITS_VAL_FRACTION = 0.2  # fixed split of scikit-learn's 1797 digits: 1438 train / 359 val


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8×8 handwritten digits (offline), upsampled to ``size`` and made RGB.

    Returns PIL images, so the same torchvision/timm transforms as for ImageFolder apply.
    """

    def __init__(self, split: str, size: int):
        from sklearn.datasets import load_digits  # lazy: only this dataset needs scikit-learn

        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        n_val = int(round(len(order) * DIGITS_VAL_FRACTION))
        idx = order[n_val:] if split == "train" else order[:n_val]
        pixels = (digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)
        self.images = [Image.fromarray(p).resize((size, size), Image.BICUBIC).convert("RGB") for p in pixels]
        self.targets = digits.target[idx].tolist()
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


class TransformedDataset(Dataset):
    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, target = self.base[i]
        return self.transform(img), target


class ImageFiles(ImageFolder):
    """ImageFolder that survives unreadable files (truncated, zero-byte, not an image).

    Each one is reported once with its path and flagged in ``unreadable``, a tensor shared with the DataLoader
    workers. In training it is replaced by the next readable image (index i+1, i+2, ...: deterministic, so a resumed
    run sees the same samples); in evaluation it comes back with target -1, which ``engine_finetune.evaluate``
    skips and counts. The training loop stops once more than ``--max_unreadable`` of the images are unreadable.
    A class folder may be empty: a split without images of some classes keeps every class's index."""

    def __init__(self, root: str, transform, train: bool):
        super().__init__(root, transform=transform, allow_empty=True)
        self.train = train
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __getitem__(self, i: int):
        n = len(self.samples)
        for k in range(n):
            j = (i + k) % n
            path, target = self.samples[j]
            try:
                with open(path, "rb") as f:
                    img = decode_for(self.transform, f.read())  # where truncated or foreign files fail
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated reads are OSErrors
                if not self.unreadable[j]:
                    self.unreadable[j] = 1
                    print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); "
                          f"{'replaced by the next readable one' if self.train else 'left out of the evaluation'}",
                          file=sys.stderr, flush=True)
                if not self.train:
                    return self.transform(Image.new("RGB", (8, 8))), -1
                continue
            return self.transform(img), target
        raise UserError(f"no readable image under {self.root}")

    def unreadable_paths(self) -> list[str]:
        return [self.samples[j][0] for j in self.unreadable.nonzero().flatten().tolist()]


class SyntheticDataset(Dataset):
    """Random normalised images and labels, generated on the fly from the index (for throughput runs)."""

    def __init__(self, size: int, input_size: int, num_classes: int = 10):
        self.size, self.input_size = size, input_size
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.input_size, self.input_size, generator=g), i % len(self.classes)


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, also for 0 bits kept: the black image Pillow < 13 returned (Pillow 13 raises).

    timm's increasing posterize keeps ``4 - int(4 * m / 10)`` bits, so a noisy magnitude clipped at 10 (e.g. the
    MAE/DeiT recipe ``rand-m9-mstd0.5-inc1``) asks for 0 bits; the plain posterize does so below m = 2.5."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked: 0 in each channel
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def with_safe_posterize(transform):
    """Point every posterize op of the timm auto-augment stages in ``transform`` at :func:`posterize_any_bits`."""
    for stage in getattr(transform, "transforms", [transform]):
        ops = list(getattr(stage, "ops", [])) + [op for sub in getattr(stage, "policy", []) for op in sub]
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits
    return transform


def build_transform(input_size: int, is_train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
                    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), crop_pct: float | None = None,
                    augment: AugmentSettings | None = None, decode: Decode = DataSettings.decode):
    """Transforms through timm's create_transform, bicubic.

    Training: RandomResizedCrop(``crop_scale``, ``crop_ratio``) + flip, plus, with ``augment``, timm's supervised
    recipe (RandAugment, colour jitter when RandAugment is off, random erasing); without it, nothing else (the
    pretraining and MAE linear-probe pipelines). Evaluation: resize to input/crop_pct, centre crop.

    The transforms that end with the crop give uint8 pixels [3, H, W], which the training loop moves to the device
    and ImageNet-normalises there (util.images.device_images); timm's supervised recipe gives normalised float32,
    because its random erasing fills normalised pixels. ``decode`` 'fast' or 'gpu' wraps the crop-only transforms in
    their tensor twin (util.decoding.TensorCrop; 'gpu' decodes on the device in training, on the CPU in
    evaluation); timm's supervised recipe works on PIL images whatever ``decode``."""
    if is_train and augment is not None:
        aa = augment.aa if augment.aa not in ("", "none") else None
        return with_safe_posterize(create_transform(
            input_size, is_training=True, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
            color_jitter=augment.color_jitter, auto_augment=aa, interpolation="bicubic", re_prob=augment.reprob,
            re_mode=augment.remode, re_count=augment.recount, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD))
    if is_train:
        pil = create_transform(input_size, is_training=True, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                               color_jitter=None, interpolation="bicubic", use_prefetcher=True)
    else:
        pil = create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                               use_prefetcher=True)
    return pil if decode == "pil" else TensorCrop(pil, on_device=is_train and decode == "gpu")


def build_dataset(dataset: str, split: str, transform, input_size: int, data_path: str = "",
                  synthetic_size: int = 1024) -> Dataset:
    """``split`` is 'train' or 'val'. Errors (missing folders, empty dataset) come before any training; unreadable
    image files are handled while training (:class:`ImageFiles`)."""
    if dataset == "synthetic":
        return SyntheticDataset(synthetic_size, input_size)
    if dataset == "digits":
        return TransformedDataset(DigitsDataset(split, input_size), transform)
    root = os.path.join(data_path, split)
    if not data_path or not os.path.isdir(root):
        raise UserError(f"--data_path must contain a '{split}' folder (ImageFolder layout, or tar shards with "
                        f"{INDEX}); not found: {root or '(no --data_path given)'}")
    if is_shard_split(root):
        shards = ShardSet(root, transform, train=split == "train")
        print0(f"{split}: {len(shards)} images in {len(shards.shards)} shards, {len(shards.classes)} classes from "
               f"{root}")
        return shards
    images = ImageFiles(root, transform, train=split == "train")
    if len(images) == 0:
        raise UserError(f"no images found under {root}")
    print0(f"{split}: {len(images)} images, {len(images.classes)} classes from {root}")
    return images


def eval_transform(data: DataSettings, input_size: int):
    """The evaluation transform of ``data``'s settings (its --crop_pct and --decode): the validation split's, and
    that of the training images a kNN vote reads."""
    return build_transform(input_size, False, crop_pct=data.crop_pct, decode=data.decode)


def supervised_datasets(data: DataSettings, input_size: int, augment: AugmentSettings | None,
                        train: bool) -> tuple[Dataset | None, Dataset]:
    """(training split, validation split) of a supervised run: the training split only when ``train`` (not for
    evaluation alone), with the crop-and-flip transform plus, with ``augment``, timm's supervised recipe; the
    validation split with the evaluation transform."""
    def split(name: str, transform) -> Dataset:
        return build_dataset(data.dataset, name, transform, input_size, data.data_path, data.synthetic_size)

    train_set = split("train", build_transform(input_size, True, data.crop_scale, data.crop_ratio, augment=augment,
                                               decode=data.decode)) if train else None
    return train_set, split("val", eval_transform(data, input_size))


def make_mixup(mixup: MixupSettings, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when both are off."""
    if not mixup.enabled():
        return None
    return Mixup(mixup_alpha=mixup.mixup, cutmix_alpha=mixup.cutmix, cutmix_minmax=mixup.cutmix_minmax,
                 prob=mixup.mixup_prob, switch_prob=mixup.mixup_switch_prob, mode=mixup.mixup_mode,
                 label_smoothing=mixup.smoothing, num_classes=num_classes)


class SeededSamples(Dataset):
    """A training set whose keys are (index, seed): each sample is transformed with python, NumPy and torch seeded
    from ``seed`` (:func:`util.rng.seeded_cpu_rng`), whichever process loads it. ``unreadable`` and
    ``unreadable_paths`` are the underlying :class:`ImageFiles`' (None / [] for other sets)."""

    def __init__(self, base: Dataset):
        self.base = base
        self.classes = base.classes
        self.unreadable = getattr(base, "unreadable", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded_cpu_rng(seed):
            return self.base[index]

    def unreadable_paths(self) -> list[str]:
        return self.base.unreadable_paths() if self.unreadable is not None else []


class EpochSampler(DistributedSampler):
    """The training order: DistributedSampler's (a permutation seeded by ``seed`` and the epoch, split across ranks,
    the same global order for any number of ranks), started ``start`` samples into this rank's share, as keys
    (index, :func:`util.rng.sample_seed`) for :class:`SeededSamples`. Skipping the first s samples of each of W
    ranks skips the first s × W of the permutation: a mid-epoch resume sees exactly the samples it had not seen."""

    def __init__(self, dataset: Dataset, seed: int):
        super().__init__(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave the stop signals (SIGTERM, SIGUSR1, SIGINT) to the training process, which stops at a
    step boundary (a terminal's Ctrl-C or a scheduler's signal reaches the whole process group; a worker that died
    of it would break the loader first)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _kill_loader_workers() -> None:
    """At exit, kill the loader workers still alive (a loader that an uncaught exception's traceback keeps): they
    ignore SIGTERM, which multiprocessing's exit handler sends its daemonic children before it waits for them, so
    the process would otherwise never end. They hold nothing to save."""
    for worker in multiprocessing.active_children():
        if worker.daemon:
            worker.kill()


class ShardSampler(Sampler):
    """Exact distributed evaluation: rank r takes indices r, r+W, ... with no padding (no sample counted twice)."""

    def __init__(self, n: int):
        self.indices = list(range(get_rank(), n, get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, is_train: bool, seed: int = 0,
                 pin_memory: bool = False, shard_eval: bool = True) -> DataLoader:
    """Tar shards (util.shards): the rank's :class:`util.shards.ShardStream`. Otherwise, training: an
    :class:`EpochSampler` even in a single process, over :class:`SeededSamples` (the order is
    seeded by ``seed`` and the epoch, each sample's augmentation by (seed, epoch, index): a resumed run, even
    mid-epoch, sees what an uninterrupted one sees); the loader's own worker seeding draws from a generator of its
    own, not from the training RNG. Evaluation: exact shards, or the full set on each rank."""
    images = len(dataset)
    if isinstance(dataset, ShardSet):  # the stream reads this rank's share in its own order
        distributed = is_train or shard_eval
        dataset, sampler = dataset.stream(batch_size, seed, get_rank() if distributed else 0,
                                          get_world_size() if distributed else 1), None
        per_rank = dataset.num_samples
    elif is_train:
        sampler = EpochSampler(dataset, seed)
        per_rank = len(sampler)
        dataset = SeededSamples(dataset)
    else:
        sampler = ShardSampler(len(dataset)) if shard_eval else range(len(dataset))
    if is_train and per_rank < batch_size:
        raise UserError(f"{images} training images are fewer than one batch of {batch_size} "
                        f"per process × {get_world_size()} processes")
    # workers live as long as the loader (no start-up each epoch): the epoch reaches them through the sampler, or
    # through the shard stream's shared position
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=is_train, persistent_workers=num_workers > 0,
                      worker_init_fn=_ignore_stop_signals, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))
