"""Training-step throughput of every pretraining method against its plain-ViT limit, in one process.

    python benchmarks/throughput.py                      # CPU: tiny and small presets
    python benchmarks/throughput.py --models xtra_vit_base_patch16 --batch_size 64 --amp bf16   # CUDA

"method": one full training step (forward + loss + backward + AdamW step) of the registered preset.
"limit": the same transformer blocks (recorded during a real forward: same widths, token counts, and
cross-attention contexts) replayed with no attention mask, forward + backward + AdamW step over their
parameters only — a plain ViT of the same encoder (+ decoder) dimensions. ratio = limit img/s ÷ method img/s.
"masked": the same replay with the method's attention masks; mask_cost = limit ÷ masked, so the rest of the
ratio is spent outside the transformer blocks (patch embedding, targets, heads, the loss, their optimizer step).
On CUDA the table adds MFU from FLOPs counted with torch.utils.flop_counter.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402,F401
from models.registry import PRETRAIN_MODELS, build_pretrain_model  # noqa: E402
from util.misc import autocast_context  # noqa: E402

PEAK_TFLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def record_block_calls(model: torch.nn.Module, imgs: torch.Tensor) -> list[tuple[torch.nn.Module, tuple, dict]]:
    """Every transformer block call of one forward, with its arguments (blocks = children of a ``*blocks``
    ModuleList)."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            for blk in module:
                handles.append(blk.register_forward_pre_hook(
                    lambda m, args, kwargs: calls.append((m, tuple(a.detach() for a in args),
                                                          {k: v.detach() if torch.is_tensor(v) else v
                                                           for k, v in kwargs.items()})), with_kwargs=True))
    with torch.no_grad():
        model(imgs)
    for h in handles:
        h.remove()
    return calls


def timed(step, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def random_teacher(model_name: str, path: str) -> str:
    """A randomly initialised classifier checkpoint as D-iGPT's teacher (its cost is part of the method's step)."""
    from models.vit import create_vit
    from util.checkpoint import save_atomic
    vit = create_vit(model_name, img_size=32, num_classes=10)
    save_atomic({"model": vit.state_dict(), "vit_config": dict(vit.config), "vit_prefix": ""}, path)
    return path


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    extra = {"teacher": random_teacher("vit_tiny_patch4", "/tmp/throughput_teacher.pth")} if "digpt" in name else {}
    model = build_pretrain_model(name, extra).to(device)
    img = model.encoder.patch_embed.img_size[0]
    imgs = torch.randn(args.batch_size, 3, img, img, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def method_step():
        with autocast_context(device, args.amp):
            loss, _ = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    calls = record_block_calls(model, imgs)
    blocks = list(dict.fromkeys(m for m, _, _ in calls))
    limit_opt = torch.optim.AdamW([p for b in blocks for p in b.parameters()], lr=1e-4)
    inputs = [(m, tuple(a.clone().requires_grad_(a.is_floating_point()) for a in a_), kw) for m, a_, kw in calls]

    def blocks_step(keep_mask: bool):
        with autocast_context(device, args.amp):
            out = sum(m(*a, **{k: v for k, v in kw.items() if keep_mask or k != "mask"}).float().mean()
                      for m, a, kw in inputs)
        out.backward()
        limit_opt.step()
        limit_opt.zero_grad(set_to_none=True)

    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    steps = (("method", method_step), ("limit", lambda: blocks_step(False)), ("masked", lambda: blocks_step(True)))
    for label, step in steps:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(step, args.iters, args.warmup, device)
        row[f"{label}_img_s"] = args.batch_size / sec
        row[f"{label}_mem_MB"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        if label == "method" and device.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                method_step()
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            row["mfu_%"] = 100 * fc.get_total_flops() / sec / peak if peak else float("nan")
    row["ratio"] = row["limit_img_s"] / row["method_img_s"]
    row["mask_cost"] = row["limit_img_s"] / row["masked_img_s"]  # the same blocks with their masks
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="presets (default: every *_tiny/_small preset)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.models or sorted(n for n in PRETRAIN_MODELS if n.endswith(("_tiny", "_small")))
    rows = [bench(n, args, device) for n in names]
    cols = ["model", "params_M", "method_img_s", "limit_img_s", "ratio", "masked_img_s", "mask_cost",
            "method_mem_MB", "limit_mem_MB"]
    cols += ["mfu_%"] if device.type == "cuda" else []
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), batch "
          f"{args.batch_size}, amp {args.amp}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
