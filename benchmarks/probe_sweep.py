"""What an lr sweep costs: a training epoch and a validation pass of N heads trained together on one frozen forward
(main_linprobe.py --lrs), against one head, for the linear and the attentive probe. N separate runs cost N times
the one head.

    python -m benchmarks.probe_sweep                     # ViT-S/16 at 256 px, 9 lrs, 4 steps of 32 images, CPU
    python -m benchmarks.probe_sweep --device cuda --batch_size 256 --steps 20

The encoder is the preset's (--model, default xtra_vit_small_patch16) at random initialisation, with its attention
mask (XTRA's block-causal one); the images are --dataset synthetic. Each configuration is main_linprobe.py itself,
run in this process for --epochs epochs, of which the first warms up and the fastest of the others counts (other
processes on the machine only slow an epoch down): its training epoch and its validation pass over as many images.
The probes use their recipes (the attentive probe: 6 blocks averaged, 6 heads, no augmentation of the synthetic
tensors), the heads XTRA's lr grid.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from typing import Iterator

import torch

import main_linprobe
import models
from models.registry import model_config
from models.stand_ins import random_init_checkpoint

assert models  # importing the package registers every method
GRID = [1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3, 8e-3, 1e-2, 1e-1]  # XTRA's probe lrs


@contextlib.contextmanager
def timed(names: list[str], seconds: dict[str, list[float]]) -> Iterator[None]:
    """main_linprobe's functions ``names`` timed while the block runs: each call's seconds appended to
    ``seconds[name]`` (a CUDA device is synchronised first)."""
    originals = {name: getattr(main_linprobe, name) for name in names}

    def timer(name: str):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = originals[name](*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            return result
        return call

    for name in names:
        setattr(main_linprobe, name, timer(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(main_linprobe, name, original)


def measure(encoder: str, probe: str, lrs: list[float], args: argparse.Namespace, out: str) -> tuple[float, float]:
    """(training epoch, validation pass) seconds of one run: the fastest after the first."""
    sweep = ["--lrs", ",".join(map(repr, lrs))] if len(lrs) > 1 else ["--lr", repr(lrs[0])]
    argv = ["--finetune", encoder, "--probe", probe, *sweep, "--dataset", "synthetic",
            "--synthetic_size", str(args.steps * args.batch_size), "--batch_size", str(args.batch_size),
            "--epochs", str(args.epochs), "--warmup_epochs", "0", "--optimizer", "adamw", "--device", args.device,
            "--amp", args.amp, "--num_workers", str(args.num_workers), "--print_freq", "100000", "--log_dir", "",
            "--save_freq", "100", "--output_dir", out, "--auto_resume", "false",
            *(["--aa", "none", "--reprob", "0"] if probe == "attentive" else [])]
    seconds: dict[str, list[float]] = {}
    with timed(["train_one_epoch", "evaluate_heads"], seconds), contextlib.redirect_stdout(io.StringIO()):
        main_linprobe.probe_run(argv)
    return min(seconds["train_one_epoch"][1:]), min(seconds["evaluate_heads"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xtra_vit_small_patch16", help="the preset whose encoder is probed")
    parser.add_argument("--heads", type=int, default=9, help="lrs of the sweep (the first of XTRA's grid)")
    parser.add_argument("--probes", nargs="+", default=["linear", "attentive"], choices=["linear", "attentive"])
    parser.add_argument("--steps", type=int, default=4, help="training steps per epoch (and validation batches)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="the first warms up; the fastest of the others counts")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", help="main_linprobe.py's --amp (auto: bf16 on CUDA)")
    args = parser.parse_args()
    if not 1 < args.heads <= len(GRID) or args.epochs < 2:
        parser.error(f"--heads must be 2 to {len(GRID)} and --epochs at least 2")
    with tempfile.TemporaryDirectory() as work:
        encoder = os.path.join(work, "encoder.pth")
        random_init_checkpoint(args.model, encoder, seed=0)
        rows = []
        for probe in args.probes:
            one = measure(encoder, probe, GRID[:1], args, os.path.join(work, f"{probe}-1"))
            many = measure(encoder, probe, GRID[:args.heads], args, os.path.join(work, f"{probe}-{args.heads}"))
            rows.append((probe, one, many))
    size = model_config(args.model, "pretrain").input_size
    print(f"\n{args.model} encoder (random init), {size} px, synthetic images; device {args.device}, "
          f"{torch.get_num_threads()} threads, --amp {args.amp}; {args.steps} steps of "
          f"{args.batch_size} per epoch, the fastest of epochs 2 to {args.epochs}\n")
    print(f"| probe | train s/epoch, 1 head | {args.heads} heads | ratio | validation s, 1 head | {args.heads} heads | "
          f"ratio |")
    print("|---|---|---|---|---|---|---|")
    for probe, (train1, val1), (train_n, val_n) in rows:
        print(f"| {probe} | {train1:.2f} | {train_n:.2f} | {train_n / train1:.2f} | {val1:.2f} | {val_n:.2f} | "
              f"{val_n / val1:.2f} |")
    print(f"\n{args.heads} separate runs: {args.heads}.00 × one head")


if __name__ == "__main__":
    main()
