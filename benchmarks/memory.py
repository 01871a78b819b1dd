"""Per-GPU memory of DDP against FSDP2 (--fsdp), and what activation checkpointing (--grad_ckpt) saves.

    python -m benchmarks.memory                      # both tables (the measured one launches torchrun, 2 ranks)
    python -m benchmarks.memory --skip_measured      # the counted table only (seconds)
    python -m benchmarks.memory --measure xtra_vit_base_patch16 --batch_size 32 --device cuda   # on GPUs

Counted (meta device, nothing allocated): bytes per GPU of fp32 parameters + gradients + AdamW's two moments for
the B/16 and H/14 models of every method, under DDP (a full copy on every GPU) and FSDP2 at 1, 8 and 64 GPUs.
FSDP2 splits each tensor along its first dimension into N padded chunks, which is what is counted. Not counted:
activations, DDP's gradient buckets (another gradient-sized buffer), the all-gathered blocks FSDP holds while
one runs, and D-iGPT's frozen teacher, which is replicated on every GPU under both (its size is given apart).
Each method file declares its two sizes (``Method.memory_sizes``); methods without an H/14 preset give their B/16
preset with the encoder made H/14 (``*``): 1280-d, 32 blocks, 16 heads, patch 14, 224 px (SAIM: 32 query blocks;
D-iGPT: taps 16, 21, 26, 32, 8×8-patch segments); their decoders stay as in the preset.

Measured (``--measure`` presets, default the small ones): two ranks on this machine, a few training steps of the
real model (engine-style: autocast, backward, clipping, fused AdamW) on random images. Per rank: the peak memory
above the process's footprint before the model was built (CPU: resident set, sampled every 2 ms; CUDA:
max_memory_allocated), and images/s of the two ranks together. Run with ``MALLOC_MMAP_THRESHOLD_=131072`` (the
default here) so that freed tensors go back to the system and the resident set follows the live tensors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import timm
import torch

import models
from models.registry import METHODS, create_model, model_names
from models.stand_ins import stand_in_teacher
from util.distributed import cleanup_distributed, init_distributed
from util.parallel import parallelize, wrap_model
from util.train_loop import adamw, autocast_context, clip_gradients, optimizer_step

assert models  # importing the package registers every method

# the small presets (ViT-S/16, DeiT-S/16) of every method that has one
MEASURED = sorted(n for n in [*model_names("pretrain"), *model_names("slimmable")] if n.endswith("_small_patch16"))
MODES = {"DDP": [], "FSDP": ["--fsdp"], "FSDP + grad_ckpt": ["--fsdp", "--grad_ckpt"]}
GPUS = (1, 8, 64)


def build(name: str, **overrides) -> torch.nn.Module:
    """A registered model by preset name (without a teacher unless ``overrides`` give one)."""
    kind = "slimmable" if name in model_names("slimmable") else "pretrain"
    return create_model(name, kind, **({"nb_classes": 1000} if kind == "slimmable" else {}), **overrides)


def bytes_per_gpu(model: torch.nn.Module, gpus: int | None) -> int:
    """fp32 parameters (all) + gradients and AdamW moments (trainable ones) on one GPU; ``gpus`` None: DDP."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        per_row = p.numel() // max(rows, 1)
        n = p.numel() if gpus is None else math.ceil(rows / gpus) * per_row
        total += n * (4 + (12 if p.requires_grad else 0))
    return total


def counted_table() -> str:
    with torch.device("meta"):
        teacher = sum(p.numel() for p in timm.create_model("vit_huge_patch14_clip_224", num_classes=0).parameters())
    lines = ["| method | model | params (trainable) | DDP | " + " | ".join(f"FSDP {n} GPU" for n in GPUS) + " |",
             "|---|---|---|---|" + "---|" * len(GPUS)]
    for method in METHODS.values():
        for name, overrides in method.memory_sizes:
            with torch.device("meta"):
                model = build(name, **overrides)
            params = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            cells = [bytes_per_gpu(model, None)] + [bytes_per_gpu(model, n) for n in GPUS]
            label = name + ("*" if overrides else "")  # the B/16 preset made H/14
            lines.append(f"| {method.key} | {label} | {params / 1e6:.0f}M ({trainable / 1e6:.0f}M) | " +
                         " | ".join(f"{c / 2**30:.2f} GiB" for c in cells) + " |")
    lines.append(f"\nD-iGPT's official teacher (OpenCLIP ViT-H/14 image tower, {teacher / 1e6:.0f}M parameters) adds "
                 f"{teacher * 4 / 2**30:.2f} GiB in fp32 to every GPU under DDP and FSDP alike (frozen, not sharded).")
    return "\n".join(lines)


class PeakSampler:
    """Peak resident set size of this process above ``base``, sampled every 2 ms in a thread."""

    def __init__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.rss()) - self.base


def worker(args: argparse.Namespace) -> None:
    """One rank of a measured run: the model, a few steps, then this rank's numbers as ``rank<r>.json`` in
    ``--results`` (a file per rank: lines that several ranks print into one pipe can merge)."""
    dist_info = init_distributed(args.device, process_group=args.fsdp)
    device = dist_info.device
    torch.manual_seed(0)
    sampler = PeakSampler() if device.type == "cpu" else None
    model = build(args.model, **json.loads(args.overrides)).to(device)
    parallelize(model, dist_info, args.fsdp, args.grad_ckpt, args.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-4)
    net = wrap_model(model, dist_info)
    img = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else model.encoder.patch_embed.img_size[0]
    imgs = torch.randn(args.batch_size, 3, img, img, device=device)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)
    slimmable = args.model in model_names("slimmable")
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        with autocast_context(device, args.amp):
            if slimmable:
                cls, dist = net(imgs)
                loss = torch.nn.functional.cross_entropy(cls.float(), targets) + \
                    torch.nn.functional.cross_entropy(dist.float(), targets)
            else:
                loss = net(imgs)[0]
        loss.backward()
        clip_gradients(params, 1.0, device)
        optimizer_step(optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step allocates the optimiser state and warms up
            times.append(time.perf_counter() - start)
    peak = sampler.stop() if sampler else torch.cuda.max_memory_allocated()
    result = {"rank": dist_info.rank, "peak_MB": peak / 2**20,
              "img_s": args.batch_size * dist_info.world_size / (sum(times) / len(times))}
    path = os.path.join(args.results, f"rank{dist_info.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)  # the parent never reads half a file
    cleanup_distributed()


def measure(name: str, flags: list[str], args: argparse.Namespace) -> list[dict]:
    """One torchrun launch of ``args.nproc`` workers; every rank's numbers, in rank order."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "benchmarks.memory", "--worker", "--model", name, "--batch_size", str(args.batch_size),
           "--steps", str(args.steps), "--amp", args.amp, "--device", args.device, "--overrides", args.overrides,
           *flags]
    with tempfile.TemporaryDirectory() as results:
        proc = subprocess.run([*cmd, "--results", results], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {name} {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
        rows = []
        for rank in range(args.nproc):
            with open(os.path.join(results, f"rank{rank}.json")) as f:
                rows.append(json.load(f))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="*", default=list(MEASURED), help="presets to measure with 2 ranks")
    parser.add_argument("--skip_measured", action="store_true")
    parser.add_argument("--batch_size", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16", "off"], default="off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)  # the model's settings (JSON)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad_ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)  # the worker's output directory
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print("Counted: fp32 parameters + gradients + AdamW state per GPU\n")
    print(counted_table())
    if args.skip_measured:
        return
    print(f"\nMeasured: {args.nproc} ranks on {args.device}, batch {args.batch_size} per rank, amp {args.amp}, "
           f"{args.steps} steps; per-rank peak above the start-up footprint (MB) and img/s of all ranks\n")
    print("| model | " + " | ".join(f"{m} peak MB | {m} img/s" for m in MODES) + " |")
    print("|---|" + "---|---|" * len(MODES))
    for name in args.measure:
        # a method's teacher: a random one of the right shape (its forward is what costs)
        args.overrides = json.dumps(stand_in_teacher(name, "/tmp/memory_teacher.pth"))
        cells = []
        for flags in MODES.values():
            rows = measure(name, flags, args)
            cells += [f"{max(r['peak_MB'] for r in rows):.0f}", f"{rows[0]['img_s']:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
