"""The input pipeline: images/s of reading + decoding + the pretraining augmentation per loader worker, from an
ImageFolder and from tar shards of the same JPEGs, for each way of decoding (--decode pil, fast, gpu), and the
workers per GPU that each method's step rate needs.

    python -m benchmarks.input_pipeline                                   # 2000 JPEGs under /tmp, 1 and 2 workers
    python -m benchmarks.input_pipeline --repeats 3                       # the fastest of 3 passes per row
    python -m benchmarks.input_pipeline --dirs /tmp /mnt/nfs/$USER --images 5000 --workers 1 4 8 --json rates.json
    python -m benchmarks.input_pipeline --models xtra_vit_base_patch16 mae_vit_base_patch16 --device cuda

The images are synthetic JPEGs of ImageNet's typical size (500 × 375, quality 90: smooth colour fields plus
noise, about 70 KB each), written as an ImageFolder of 10 classes into each of ``--dirs`` and converted there
with ``python -m util.make_shards``. A pass reads the training split once through a DataLoader (batch 64) with
the pretraining transform (RandomResizedCrop 224, scale 0.2-1, bicubic, flip; uint8 out: the normalisation
happens on the training device and is not counted); with --decode gpu the pass also decodes and crops each batch
on the GPU in this process. The file cache is dropped first when this process may (root), else the numbers include
warm-cache reads. ``--json PATH`` writes the rates as a list of {source, under, decode, workers, img_s}. The step
rates come from ``benchmarks.throughput`` (one training step of each model on ``--device``): a method that trains
at S img/s per GPU needs ceil(S / r) workers per GPU of r img/s each. With CUDA, ``torchvision.io.decode_jpeg``
on the GPU is measured alone too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import models
from benchmarks.throughput import bench_pretrain
from util.config import Decode
from util.datasets import build_dataset, build_loader, build_transform
from util.decoding import EncodedBatch

assert models  # importing the package registers every method
ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(root: Path, n: int) -> None:
    """``n`` synthetic 500 × 375 JPEGs in train/ (and a few in val/), 10 classes, the same for a given n."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 20)):
        for i in range(count):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:06d}.jpg"
            if path.exists():
                continue
            coarse = rng.uniform(0, 255, (6, 8, 3))
            field = np.array(Image.fromarray(coarse.astype(np.uint8)).resize((500, 375), Image.BICUBIC), float)
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)


def drop_file_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so that a pass reads from the device."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def images_per_second(data_path: Path, workers: int, images: int, decode: Decode = "pil") -> tuple[float, bool]:
    """One pass over the training split, decoded as ``decode`` says (gpu: each batch decoded and cropped on the GPU
    here): images/s, and whether it started from a cold file cache."""
    transform = build_transform(224, is_train=True, crop_scale=(0.2, 1.0), decode=decode)
    dataset = build_dataset("imagefolder", "train", transform, 224, str(data_path))
    loader = build_loader(dataset, min(64, images), workers, is_train=True, seed=0)
    (loader.dataset if hasattr(loader.dataset, "set_epoch") else loader.sampler).set_epoch(0)
    cold = drop_file_cache()
    start = time.perf_counter()
    seen = 0
    for batch, _ in loader:
        seen += len(batch.decode(torch.device("cuda")) if isinstance(batch, EncodedBatch) else batch)
    if decode == "gpu":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start), cold


def gpu_decode_rate(folder: Path, count: int = 256) -> float:
    """JPEGs/s of torchvision.io.decode_jpeg on the GPU, batched (the file bytes already in memory)."""
    from torchvision.io import decode_jpeg

    paths = sorted(folder.rglob("*.jpg"))[:count]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dirs", nargs="+", default=[tempfile.gettempdir()],
                        help="where the JPEGs and their shards go (one per filesystem to compare)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--samples_per_shard", type=int, default=100,
                        help="small enough that every worker has shards of its own")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode", nargs="+", choices=["pil", "fast", "gpu"],
                        default=["pil", "fast", "gpu"] if torch.cuda.is_available() else ["pil", "fast"])
    parser.add_argument("--repeats", type=int, default=1, help="passes per row, the fastest one kept (other load on "
                                                                   "the machine only slows a pass down)")
    parser.add_argument("--json", default="", help="also write the rates to this file")
    parser.add_argument("--models", nargs="*", default=["xtra_vit_base_patch16", "saim_vit_base_patch16",
                                                        "digpt_vit_base_patch16", "mae_vit_base_patch16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models' step rates are measured")
    parser.add_argument("--batch_size", type=int, default=8, help="of the step-rate measurement")
    args = parser.parse_args()
    if "gpu" in args.decode and not torch.cuda.is_available():
        parser.error("--decode gpu needs a CUDA device")
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {args.images} JPEGs of 500 × 375\n")
    print("| data | decode | under | workers | img/s | img/s per worker | × pil | cold cache |")
    print("|---|---|---|---|---|---|---|---|")
    per_worker, results = {}, []
    roots = [Path(base) / f"input_pipeline_{args.images}_{args.samples_per_shard}" for base in args.dirs]
    for base, root in zip(args.dirs, roots):
        make_jpegs(root / "folder", args.images)
        if not (root / "shards" / "train" / "index.json").is_file():
            subprocess.run([sys.executable, "-m", "util.make_shards", str(root / "folder"), str(root / "shards"),
                            "--samples_per_shard", str(args.samples_per_shard), "--workers", "2"], cwd=ROOT,
                           check=True, capture_output=True)
        for label, data in (("ImageFolder", root / "folder"), ("shards", root / "shards")):
            pil = {}
            for decode in args.decode:
                for workers in args.workers:
                    rate, cold = max(images_per_second(data, workers, args.images, decode)
                                     for _ in range(args.repeats))
                    if decode == "pil":
                        pil[workers] = rate
                    per_worker.setdefault((label, decode), []).append(rate / max(workers, 1))
                    results.append({"source": label, "under": str(base), "decode": decode, "workers": workers,
                                    "img_s": round(rate, 1)})
                    ratio = f"{rate / pil[workers]:.2f}" if workers in pil else "-"
                    print(f"| {label} | {decode} | {base} | {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} | "
                          f"{ratio} | {'yes' if cold else 'no'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if torch.cuda.is_available():
        print(f"\nGPU JPEG decoding (torchvision.io.decode_jpeg, {torch.cuda.get_device_name()}): "
              f"{gpu_decode_rate(roots[0] / 'folder'):.0f} img/s")
    else:
        print("\nGPU JPEG decoding: not measured (no CUDA device)")
    if not args.models:
        return
    step_args = argparse.Namespace(batch_size=args.batch_size, warmup=1, rounds=1, iters=2, amp="off",
                                   compile=False)
    device = torch.device(args.device)
    worst = {key: min(rates) for key, rates in per_worker.items()}
    print(f"\nworkers per GPU: a step rate on {args.device} (batch {args.batch_size}) over the slowest per-worker "
          "rate above\n")
    print("| model | step img/s | " + " | ".join(f"workers ({label}, {decode})" for label, decode in worst) + " |")
    print("|---|---|" + "---|" * len(worst))
    for name in args.models:
        rate = bench_pretrain(name, step_args, device)["method_img_s"]
        print(f"| {name} | {rate:.1f} | " + " | ".join(str(math.ceil(rate / r)) for r in worst.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
