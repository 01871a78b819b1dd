"""SAIM's two streams: one stacked attention call per layer vs two separate calls.

    python -m benchmarks.saim_attention                   # CPU, tiny and small presets
    python -m benchmarks.saim_attention --device cuda --batch_size 64 --configs base

Content block i+1 and query block i both read the output of content block i, so their attention cores can run
as ONE scaled_dot_product_attention call with the two batches stacked (``--fuse_streams true``, exact).
"core": the attention cores alone (SDPA ×2 vs cat + SDPA on 2B). "train step": forward + loss + backward of the
whole model. Times are medians in ms; ratio = separate ÷ stacked (> 1: stacking is faster).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import models
from models.masks import permutation_two_stream_masks, random_orders
from models.registry import model_config
from models.saim import SAIM, SAIMConfig

assert models  # importing the package registers every method
CONFIGS = {"tiny": "saim_vit_tiny", "small": "saim_vit_small_patch16", "base": "saim_vit_base_patch16"}


def median_ms(fns: list, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Median time of each function; the functions alternate within every round so that load from other
    processes hits them alike."""
    times = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, t in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def bench_core(cfg: SAIMConfig, batch: int, iters: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Only the attention cores of one content/query block pair (all tensors precomputed)."""
    n = cfg.grid_size ** 2
    heads, dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    m_h, m_g = permutation_two_stream_masks(order)
    m_hg = torch.cat([m_h, m_g])  # built once per forward in the model
    q_h, k_h, v_h, q_g, k_g, v_g = torch.randn(6, batch, heads, n + 1, dim, device=device).unbind(0)

    def separate():
        F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=m_h)
        F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=m_g)

    def stacked():  # the cats of q, k, v are part of the price
        F.scaled_dot_product_attention(torch.cat([q_h, q_g]), torch.cat([k_h, k_g]), torch.cat([v_h, v_g]),
                                       attn_mask=m_hg)

    with torch.no_grad():
        return tuple(median_ms([separate, stacked], iters, warmup, device))


def bench_step(cfg: SAIMConfig, batch: int, iters: int, warmup: int, device: torch.device, amp: bool
               ) -> tuple[float, float]:
    torch.manual_seed(0)
    model = SAIM(cfg).to(device)
    imgs = torch.randn(batch, 3, cfg.input_size, cfg.input_size, device=device)
    order = random_orders(batch, cfg.grid_size ** 2, device)

    def step(fuse: bool):
        model.fuse_streams = fuse
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = model.forward_with_outputs(imgs, order)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return tuple(median_ms([lambda: step(False), lambda: step(True)], iters, warmup, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, nargs="+", default=None,
                        help="one per config (default: tiny 64, small 8, base 64)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the train step")
    args = parser.parse_args()
    defaults = {"tiny": 64, "small": 8, "base": 64}
    batches = args.batch_size or [defaults[c] for c in args.configs]
    if len(batches) != len(args.configs):
        parser.error("give one --batch_size per config")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; medians of {args.iters} runs\n")
    print("| config | batch | tokens | part | separate (ms) | stacked (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for cfg_name, batch in zip(args.configs, batches):
        cfg = model_config(CONFIGS[cfg_name])
        tokens = cfg.grid_size ** 2 + 1
        rows = [("core", bench_core(cfg, batch, args.iters, args.warmup, device)),
                ("train step", bench_step(cfg, batch, args.iters, args.warmup, device, args.amp))]
        for part, (sep, stk) in rows:
            print(f"| {cfg_name} | {batch} | {tokens} | {part} | {sep:.2f} | {stk:.2f} | {sep / stk:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
