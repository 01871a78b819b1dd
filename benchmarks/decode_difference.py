"""How far --decode fast's pixels are from --decode pil's, crop for crop (the same seeds give the same boxes and
flips, so what differs is decode_jpeg's decoding and torchvision's resampling against PIL's).

    python -m benchmarks.decode_difference                # 2000 training crops of 224 px
    python -m benchmarks.decode_difference --crops 200 --sizes 224 32

The images are scikit-learn's two sample photographs (640 × 427 JPEGs, installed with scikit-learn). Training: the
pretraining transform's crops (RandomResizedCrop, scale 0.08-1, bicubic, flip) seeded 0, 1, ... alternately from
the two photos; evaluation: both photos resized to input / 0.875 and centre-cropped. Each row counts the uint8
values of all the crops by their absolute difference between the two paths.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import sklearn.datasets
import torch

from util.datasets import build_transform
from util.decoding import read_pil
from util.rng import seeded_cpu_rng


def photos() -> list[bytes]:
    """The JPEG files of scikit-learn's sample images."""
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [open(path, "rb").read() for path in sorted(glob.glob(os.path.join(folder, "*.jpg")))]


def difference_counts(size: int, train: bool, crops: int) -> np.ndarray:
    """How many uint8 values of ``crops`` crops differ by 0, 1, ..., 255 between --decode fast and pil."""
    pil, fast = (build_transform(size, train, decode=decode) for decode in ("pil", "fast"))
    images = photos()
    counts = np.zeros(256, dtype=np.int64)
    for seed in range(crops):
        data = images[seed % len(images)]
        with seeded_cpu_rng(seed):
            expected = pil(read_pil(data))
        with seeded_cpu_rng(seed):
            ours = fast(fast.decode(data))
        counts += np.bincount((ours.int() - expected.int()).abs().flatten().numpy(), minlength=256)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=2000, help="training crops per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}\n")
    print("| crops | size | values | equal % | off by 1 % | off by 2+ % | max | mean |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for label, train, crops in (("training", True, args.crops), ("evaluation", False, len(photos()))):
            counts = difference_counts(size, train, crops)
            total = counts.sum()
            print(f"| {crops} {label} | {size} | {total} | {100 * counts[0] / total:.3f} | "
                  f"{100 * counts[1] / total:.3f} | {100 * counts[2:].sum() / total:.4f} | "
                  f"{np.flatnonzero(counts).max()} | {(counts * np.arange(256)).sum() / total:.4f} |", flush=True)


if __name__ == "__main__":
    main()
