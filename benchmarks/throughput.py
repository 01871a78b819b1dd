"""Training-step throughput of every pretraining method, and of Scala at each width, against its plain-ViT limit.

    python -m benchmarks.throughput                                   # CPU: every tiny preset, slimmable at 4 widths
    python -m benchmarks.throughput --models xtra_vit_small_patch16 --batch_size 16
    python -m benchmarks.throughput --compile                         # + compiled and FlexAttention columns
    python -m benchmarks.throughput --models xtra_vit_base_patch16 scala_deit_base_patch16 --amp bf16 --compile

"method": one full training step (forward + loss + backward + AdamW step) of the registered preset.
"limit": the same transformer blocks (recorded during a real forward: same widths, token counts, and
cross-attention contexts) replayed with no attention mask, forward + backward + AdamW step over their
parameters only — a plain ViT of the same encoder (+ decoder) dimensions. ratio = limit img/s ÷ method img/s.
"masked": the same replay with the method's boolean masks through SDPA; mask_cost = limit ÷ masked, so the rest
of the ratio is spent outside the transformer blocks (patch embedding, targets, heads, the loss, their optimizer
step). With --compile: the method step and the masked replay under torch.compile, and the masked replay with
the masks as FlexAttention BlockMasks (compiled; FlexAttention has no backward on CPU, so that column is CUDA
only). On CUDA the table adds peak memory and MFU from FLOPs counted with torch.utils.flop_counter.

Slimmable rows (Scala, ``<preset>@r``): the sub-network at width ratio r (forward of the sliced model in train
mode, CE on both heads, backward, AdamW over the whole model) against the standalone timm distilled DeiT of that
width, which the sub-network equals; ``<preset> (4-width step)``: one Scala training step (widths 1, 0.75, 0.5, 0.25,
their losses, one AdamW step) against training the four standalone DeiTs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import timm.models.deit as timm_deit
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
from models.masks import to_block_mask
from models.registry import create_model, model_names
from models.scala import SlimmableViT, width_losses
from models.stand_ins import stand_in_model, tiny_model_names
from util.train_loop import adamw, autocast_context

assert models  # importing the package registers every method
PRETRAIN_MODELS, SLIMMABLE_MODELS = model_names("pretrain"), model_names("slimmable")

PEAK_TFLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16
SLIMMABLE_RATIOS = (0.25, 0.5, 0.75, 1.0)


def record_block_calls(model: torch.nn.Module, imgs: torch.Tensor) -> list[tuple[torch.nn.Module, tuple, dict]]:
    """Every transformer block call of one forward, with its arguments (blocks = the model's
    ``transformer_blocks()``)."""
    calls, handles = [], []
    for blk in model.transformer_blocks():
        handles.append(blk.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((m, tuple(a.detach() for a in args),
                                                  {k: v.detach() if torch.is_tensor(v) else v
                                                   for k, v in kwargs.items()})), with_kwargs=True))
    with torch.no_grad():
        model(imgs)
    for h in handles:
        h.remove()
    return calls


def train_step(forward: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(steps: dict[str, Callable[[], None]], args: argparse.Namespace, device: torch.device) -> dict:
    """images/s (and peak MB on CUDA) of each step: ``args.warmup`` untimed calls each (these include any
    compilation), then ``args.rounds`` rounds that time ``args.iters`` calls of every step in turn; the best round
    counts, so that load from other processes on a shared machine hits all steps alike and inflates none."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    mem = dict.fromkeys(steps, float("nan"))
    for _ in range(args.rounds):
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                mem[label] = torch.cuda.max_memory_allocated() / 2**20
            best[label] = min(best[label], (time.perf_counter() - start) / args.iters)
    return {**{f"{k}_img_s": args.batch_size / v for k, v in best.items()},
            **{f"{k}_mem_MB": v for k, v in mem.items()}}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call (matrix products, convolutions and attention, as torch.utils.flop_counter counts them)."""
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def peak_flops(gpu_name: str) -> float | None:
    """The bf16 peak FLOP/s of a GPU by its name (PEAK_TFLOPS), None for one not listed."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)


def mfu(flops: int, img_s: float, args: argparse.Namespace, device: torch.device) -> float:
    """Model FLOPs utilisation (%) on a known CUDA device, else NaN."""
    if device.type != "cuda":
        return float("nan")
    peak = peak_flops(torch.cuda.get_device_name())
    return 100 * flops * img_s / args.batch_size / peak if peak else float("nan")


def pretrain_setup(name: str, args: argparse.Namespace, device: torch.device
                   ) -> tuple[torch.nn.Module, torch.Tensor, Callable[[torch.nn.Module], Callable[[], torch.Tensor]]]:
    """A pretraining preset's model (seed 0; a random teacher of the right shape if its method needs one), a batch
    of ``args.batch_size`` random images, and ``loss_of(net)``: the forward that gives the loss of ``net`` (the
    model, or the model compiled) on them under ``args.amp``."""
    torch.manual_seed(0)
    model = stand_in_model(name).to(device)
    img = model.encoder.patch_embed.img_size[0]
    imgs = torch.randn(args.batch_size, 3, img, img, device=device)

    def loss_of(net: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            with autocast_context(device, args.amp):
                return net(imgs)[0]
        return forward
    return model, imgs, loss_of


def bench_pretrain(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model, imgs, loss_of = pretrain_setup(name, args, device)
    calls = record_block_calls(model, imgs)
    blocks = list(dict.fromkeys(m for m, _, _ in calls))
    inputs = [(m, tuple(a.clone().requires_grad_(a.is_floating_point()) for a in a_), kw) for m, a_, kw in calls]

    def replay(mask: str) -> Callable[[], torch.Tensor]:
        """The recorded block calls with no mask ('none'), their boolean masks ('sdpa') or BlockMasks ('flex')."""
        block_masks: dict[int, object] = {}
        for _, _, kw in inputs:
            if mask == "flex" and torch.is_tensor(kw.get("mask")) and id(kw["mask"]) not in block_masks:
                block_masks[id(kw["mask"])] = to_block_mask(kw["mask"])

        def kwargs(kw: dict) -> dict:
            if mask == "none" or kw.get("mask") is None:
                return {k: v for k, v in kw.items() if k != "mask"}
            return {**kw, "mask": block_masks[id(kw["mask"])]} if mask == "flex" else kw

        def forward() -> torch.Tensor:
            with autocast_context(device, args.amp):
                return sum(m(*a, **kwargs(kw)).float().mean() for m, a, kw in inputs)
        return forward

    opt = adamw(model.parameters(), lr=1e-4)
    block_opt = adamw([p for b in blocks for p in b.parameters()], lr=1e-4)
    steps = {"method": train_step(loss_of(model), opt), "limit": train_step(replay("none"), block_opt),
             "masked": train_step(replay("sdpa"), block_opt)}
    if args.compile:
        steps["method_compiled"] = train_step(torch.compile(loss_of(model)), opt)
        steps["masked_compiled"] = train_step(torch.compile(replay("sdpa")), block_opt)
        if device.type == "cuda":  # FlexAttention has no backward on CPU
            steps["flex_compiled"] = train_step(torch.compile(replay("flex")), block_opt)
    return finish_row(name, model, steps, args, device)


def standalone_deit(model: SlimmableViT, ratio: float) -> torch.nn.Module:
    """The timm distilled DeiT that the sub-network at ``ratio`` equals (in train mode: cls and dist logits)."""
    width, hidden = model.widths(ratio)
    net = timm_deit.VisionTransformerDistilled(
        img_size=model.img_size, patch_size=model.patch_embed.patch_size[0], embed_dim=width, depth=len(model.blocks),
        num_heads=model.num_heads, mlp_ratio=hidden / width, num_classes=model.num_classes)
    net.set_distilled_training(True)
    return net.to(next(model.parameters()).device).train()


def slimmable_setup(name: str, ratio: float | None, args: argparse.Namespace, device: torch.device
                    ) -> tuple[SlimmableViT, list[float], Callable, Callable[[], torch.Tensor]]:
    """A slimmable preset's model (seed 0, train mode), the widths of its step, ``ce(net)`` (cross-entropy of both
    heads of ``net`` on a batch of ``args.batch_size`` random images and labels, under ``args.amp``) and the step's
    forward: the sub-network at ``ratio``, or with ``ratio=None`` one whole Scala step (widths 1, 0.75, 0.5, 0.25
    without a teacher; each width but the last backpropagated inside, the last one's loss returned)."""
    torch.manual_seed(0)
    model = create_model(name, "slimmable", nb_classes=1000).to(device).train()
    ratios = [ratio] if ratio is not None else [1.0, 0.75, 0.5, 0.25]
    imgs = torch.randn(args.batch_size, 3, model.img_size, model.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)

    def ce(net: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        with autocast_context(device, args.amp):
            cls_logits, dist_logits = net(imgs)
        return F.cross_entropy(cls_logits.float(), labels) + F.cross_entropy(dist_logits.float(), labels)

    def slimmable_forward() -> torch.Tensor:
        if ratio is not None:
            return ce(lambda x: model(x, ratio))
        losses = width_losses(model, imgs, labels, ratios)
        with autocast_context(device, args.amp):
            _, loss = next(losses)
        for _ in ratios[1:]:  # backpropagate each width before the next forward, as main_slimmable does
            loss.backward()
            with autocast_context(device, args.amp):
                _, loss = next(losses)
        return loss
    return model, ratios, ce, slimmable_forward


def method_forward(name: str, args: argparse.Namespace, device: torch.device
                   ) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """Any preset's model and the forward of one of its training steps (a slimmable preset: the whole Scala step),
    for :func:`train_step`."""
    if name in SLIMMABLE_MODELS:
        model, _, _, forward = slimmable_setup(name, None, args, device)
        return model, forward
    model, _, loss_of = pretrain_setup(name, args, device)
    return model, loss_of(model)


def bench_slimmable(name: str, ratio: float | None, args: argparse.Namespace, device: torch.device) -> dict:
    """Scala at one width (``ratio``) or, with ``ratio=None``, one whole Scala step: the four widths 1, 0.75, 0.5,
    0.25 with their losses (no teacher: its forward is the same extra work in both), each backpropagated, then
    one AdamW step; its limit trains the four standalone DeiTs of those widths."""
    model, ratios, ce, slimmable_forward = slimmable_setup(name, ratio, args, device)
    standalone = [standalone_deit(model, r) for r in ratios]

    def limit_forward() -> torch.Tensor:
        for net in standalone[:-1]:
            ce(net).backward()
        return ce(standalone[-1])

    opt = adamw(model.parameters(), lr=1e-4)
    steps = {"method": train_step(slimmable_forward, opt),
             "limit": train_step(limit_forward, adamw([p for n in standalone for p in n.parameters()], lr=1e-4))}
    if args.compile and ratio is not None:
        steps["method_compiled"] = train_step(torch.compile(slimmable_forward), opt)
    row = finish_row(f"{name}@{ratio:g}" if ratio is not None else f"{name} (4-width step)", model, steps, args,
                     device)
    row["params_M"] = model.num_params(ratio or 1.0) / 1e6
    return row


def finish_row(name: str, model: torch.nn.Module, steps: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Timings, FLOP ratio and MFU of one model's steps. flop_ratio = method FLOPs ÷ limit FLOPs: the ratio an
    implementation with no overhead beyond its arithmetic would reach."""
    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}
    row.update(measure(steps, args, device))
    method_flops = count_flops(steps["method"])
    row["flop_ratio"] = method_flops / count_flops(steps["limit"])
    row["ratio"] = row["limit_img_s"] / row["method_img_s"]
    row["mask_cost"] = row["limit_img_s"] / row["masked_img_s"] if "masked_img_s" in row else float("nan")
    row["mfu_%"] = mfu(method_flops, row["method_img_s"], args, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None,
                        help="pretraining or slimmable presets (default: every *_tiny preset)")
    parser.add_argument("--slimmable_ratios", type=float, nargs="+", default=SLIMMABLE_RATIOS,
                        help="widths of each slimmable preset's rows")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; the best counts")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    parser.add_argument("--compile", action="store_true", help="add torch.compile and FlexAttention columns")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.models or sorted([*tiny_model_names("pretrain"), *tiny_model_names("slimmable")])
    for n in names:
        if n not in PRETRAIN_MODELS and n not in SLIMMABLE_MODELS:
            parser.error(f"unknown preset {n!r}; known: {', '.join(sorted([*PRETRAIN_MODELS, *SLIMMABLE_MODELS]))}")
    rows = []
    for n in names:
        rows += [bench_slimmable(n, r, args, device) for r in [*args.slimmable_ratios, None]] \
            if n in SLIMMABLE_MODELS else [bench_pretrain(n, args, device)]
        print(f"done {n}", file=sys.stderr, flush=True)
    cols = ["model", "params_M", "method_img_s", "limit_img_s", "ratio", "flop_ratio", "masked_img_s", "mask_cost"]
    cols += ["method_compiled_img_s", "masked_compiled_img_s", "flex_compiled_img_s"] if args.compile else []
    cols += ["method_mem_MB", "limit_mem_MB", "mfu_%"] if device.type == "cuda" else []
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), batch "
          f"{args.batch_size}, amp {args.amp}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c, float("nan")) for c in cols]
        print("| " + " | ".join("–" if isinstance(v, float) and v != v else f"{v:.2f}" if isinstance(v, float)
                                else str(v) for v in cells) + " |")


if __name__ == "__main__":
    main()
