"""What a mid-epoch checkpoint costs: gathering the training state and committing it, as a single file (one
process or DDP: rank 0 writes) and as a sharded DCP directory (--fsdp: one rank here), against one training step.

    python -m benchmarks.checkpoint_cost                                    # every method's tiny preset, CPU
    python -m benchmarks.checkpoint_cost --models xtra_vit_tiny mae_vit_tiny xtra_vit_small_patch16 \
        saim_vit_small_patch16                                              # the table of docs/performance.md
    python -m benchmarks.checkpoint_cost --models xtra_vit_small_patch16 --dir /checkpoint/$USER/bench --device cuda

Each model trains a few steps on random images (fused AdamW, so that the optimiser holds its moments), then the
state is committed ``--repeats`` times into ``--dir`` (a fresh directory under it: put it on the filesystem the run
writes to) and the median time is reported. Every rank of a run waits for a save: its share of the time between
two saves (``--save_every_minutes``, 30 by default) is what the run loses to it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

import models
from models.stand_ins import stand_in_model, tiny_model_names
from util.checkpoint import save_mid_epoch, training_state
from util.distributed import cleanup_distributed, init_distributed
from util.parallel import parallelize
from util.train_loop import adamw, clip_gradients, optimizer_step

assert models  # importing the package registers every method



def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    start = time.perf_counter()
    loss, _ = model(images)
    loss.backward()
    clip_gradients(list(model.parameters()), None, images.device)
    optimizer_step(optimizer)
    return time.perf_counter() - start


def measure(name: str, sharded: bool, batch_size: int, steps: int, repeats: int, root: str, device: str) -> dict:
    """Seconds of one step and of one mid-epoch save of ``name``, and the bytes the save wrote."""
    dist_info = init_distributed(device, process_group=sharded)
    try:
        model = stand_in_model(name).to(dist_info.device)
        parallelize(model, dist_info, sharded, False, "off")
        optimizer = adamw(model.parameters(), lr=1e-4)
        images = torch.randn(batch_size, 3, model.config.input_size, model.config.input_size,
                             device=dist_info.device)
        step_s = statistics.median(_step(model, optimizer, images) for _ in range(steps))
        out = tempfile.mkdtemp(dir=root)
        position = {"epoch": 1, "images": batch_size, "meters": {}}
        times = []
        for repeat in range(repeats):
            start = time.perf_counter()
            state = training_state(model, 0, {"batch_size": batch_size}, optimizer, position=position)
            path = save_mid_epoch(state, out, repeat + 1)
            times.append(time.perf_counter() - start)
        size = (sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path)
                else os.path.getsize(path))
        shutil.rmtree(out)
        return {"params": sum(p.numel() for p in model.parameters()), "step_s": step_s,
                "save_s": statistics.median(times), "bytes": size}
    finally:
        cleanup_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=tiny_model_names("pretrain"))
    parser.add_argument("--batch_size", type=int, default=8, help="images of the timed step (the save does not "
                                                                   "depend on it)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every_minutes", type=float, default=30.0, help="the save interval of the last column")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"device {args.device}, {threads} threads; checkpoints written under {args.dir}; median of "
          f"{args.repeats} saves, {args.steps} steps of {args.batch_size} images\n")
    print(f"| model | params_M | format | on_disk_MB | save_s | step_s | save_per_step | "
          f"share_of_{format(args.every_minutes, 'g')}_min_% |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for sharded in (False, True):
            r = measure(name, sharded, args.batch_size, args.steps, args.repeats, args.dir, args.device)
            print(f"| {name} | {r['params'] / 1e6:.2f} | {'DCP, 1 rank' if sharded else 'single file'} | "
                  f"{r['bytes'] / 2**20:.1f} | {r['save_s']:.3f} | {r['step_s']:.3f} | "
                  f"{r['save_s'] / r['step_s']:.2f} | {100 * r['save_s'] / (60 * args.every_minutes):.3f} |",
                  flush=True)

if __name__ == "__main__":
    main()
