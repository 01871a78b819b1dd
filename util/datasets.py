"""Datasets (ImageFolder, the embedded digits, synthetic), transforms and loaders."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

from util.misc import get_rank, get_world_size, print0

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


def build_transform(args: argparse.Namespace, is_train: bool, kind: str):
    """Transforms through timm's create_transform.

    kind='pretrain': RandomResizedCrop(--crop_scale, --crop_ratio, bicubic) + flip, no colour jitter.
    kind='finetune': timm's training recipe (RandAugment --aa, --color_jitter, random erasing --reprob).
    kind='linprobe': RandomResizedCrop + flip only (MAE linear probe).
    Evaluation: resize to input/crop_pct, centre crop, bicubic.
    """
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    scale = tuple(args.crop_scale or (0.08, 1.0))
    ratio = tuple(args.crop_ratio or (3 / 4, 4 / 3))
    if not is_train:
        return create_transform(args.input_size, is_training=False, interpolation="bicubic",
                                crop_pct=args.crop_pct, mean=mean, std=std)
    if kind == "finetune":
        return with_safe_posterize(create_transform(
            args.input_size, is_training=True, scale=scale, ratio=ratio, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa not in (None, "", "none") else None, interpolation="bicubic",
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=mean, std=std))
    return create_transform(args.input_size, is_training=True, scale=scale, ratio=ratio, color_jitter=None,
                            interpolation="bicubic", mean=mean, std=std)


def build_dataset(args: argparse.Namespace, split: str, transform) -> Dataset:
    """``split`` is 'train' or 'val'. Errors (missing folders, empty dataset) come before any training."""
    if args.dataset == "synthetic":
        return SyntheticDataset(args.synthetic_size, args.input_size)
    if args.dataset == "digits":
        return TransformedDataset(DigitsDataset(split, args.input_size), transform)
    root = os.path.join(args.data_path, split)
    if not args.data_path or not os.path.isdir(root):
        raise FileNotFoundError(f"--data_path must contain a '{split}' folder (ImageFolder layout); "
                                f"not found: {root or '(no --data_path given)'}")
    dataset = ImageFolder(root, transform=transform)
    if len(dataset) == 0:
        raise ValueError(f"no images found under {root}")
    if split == "train" and args.output_dir and get_rank() == 0:
        with open(os.path.join(args.output_dir, "classes.json"), "w") as f:
            json.dump(dataset.classes, f)
    print0(f"{split}: {len(dataset)} images, {len(dataset.classes)} classes from {root}")
    return dataset


class ShardSampler(Sampler):
    """Exact distributed evaluation: rank r takes indices r, r+W, ... with no padding (no sample counted twice)."""

    def __init__(self, n: int):
        self.indices = list(range(get_rank(), n, get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset: Dataset, args: argparse.Namespace, is_train: bool, shard_eval: bool = True) -> DataLoader:
    """Training: a DistributedSampler even in a single process (its shuffle is seeded by --seed and the epoch,
    which makes resumed runs see the same order). Evaluation: exact shards, or the full set on each rank."""
    if is_train:
        sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                     seed=args.seed, drop_last=True)
        if len(sampler) < args.batch_size:
            raise ValueError(f"{len(dataset)} training images are fewer than one batch of {args.batch_size} "
                             f"per process × {get_world_size()} processes")
    else:
        sampler = ShardSampler(len(dataset)) if shard_eval else range(len(dataset))
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and str(args.device).startswith("cuda"), drop_last=is_train,
                      persistent_workers=False)
