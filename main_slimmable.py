"""Scala: supervised training of a slimmable ViT (DeiT recipe + the Scala step), evaluation at any width, export.

    python main_slimmable.py --model scala_vit_tiny --dataset digits --input_size 32 --teacher teacher.pth
    torchrun --nproc_per_node 4 main_slimmable.py --model scala_deit_small_patch16 --data_path /imagenet \\
        --teacher deit_small_patch16_224 --teacher_weights deit_small_patch16_224-cd65a155.pth      # see run.sh
    python main_slimmable.py --eval --resume out/checkpoint-last.pth --eval_ratios all             # one table

One iteration after the full-width warm-up epochs: stable sampling draws [l, r3, r2, s] (each rank its own r3,
r2); the full width learns the labels and the external teacher (DeiT hard distillation), each smaller width the
next larger one's detached dist logits (progressive transfer, or the full width with --transfer_type US) plus
--ce_coefficient × CE against the (mixup) labels; one optimizer step over the summed losses.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import param_groups_weight_decay

from engine_finetune import evaluate
from models.scala import (
    SCALA_PRESETS,
    SlimmableViT,
    create_scala,
    load_encoder,
    ratio_grid,
    sample_ratios,
    width_losses,
)
from models.teacher import load_teacher
from util.args import add_common_args, fill_defaults, str2bool
from util.checkpoint import load_checkpoint, resume, resume_path, save_atomic, save_checkpoint
from util.datasets import build_dataset, build_loader, build_transform
from util.misc import (
    OptimizerStep,
    adamw,
    autocast_context,
    check_finite,
    cleanup_distributed,
    effective_lr,
    epoch_batches,
    get_rank,
    init_distributed_mode,
    is_main_process,
    log_step,
    make_log_writer,
    print0,
    run_cli,
    seed_everything,
    wrap_model,
    write_args,
    write_json_line,
)

# Scala-S recipe (spec §5; run.sh sets Scala-B). The official lr·batch/512 rule becomes blr = lr/2 here
# (lr = blr·batch/256): 2e-3 at batch 1024 -> peak 4e-3.
SLIM_DEFAULTS = dict(batch_size=256, epochs=100, blr=1e-3, min_lr=1e-5, warmup_epochs=3, warmup_lr=1e-6,
                     weight_decay=0.05, input_size=224, drop_path=0.1, crop_pct=0.875)
# Width settings, read from a checkpoint's args when not given (the official eval.sh forgets --smallest_ratio).
WIDTH_DEFAULTS = dict(smallest_ratio=0.25, largest_ratio=1.0, granularity=0.0625)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Scala slimmable ViT", add_help=False)
    parser.add_argument("--model", default="scala_deit_small_patch16", help=f"one of: {', '.join(SCALA_PRESETS)}")
    parser.add_argument("--nb_classes", type=int, default=None, help="default: number of dataset classes")
    parser.add_argument("--drop_path", type=float, default=None)
    parser.add_argument("--init_from", default="", help="checkpoint whose encoder initialises the model "
                        "(XTRA/SAIM/D-iGPT pretraining, a fine-tuned classifier; official ones via converters)")
    g = parser.add_argument_group("Scala")
    g.add_argument("--smallest_ratio", type=float, default=None, help="s (default 0.25)")
    g.add_argument("--largest_ratio", type=float, default=None, help="l (default 1.0)")
    g.add_argument("--granularity", type=float, default=None, help="ε: widths s, s+ε, ..., l (default 1/16: X=13)")
    g.add_argument("--full_warm_epochs", type=int, default=10, help="epochs that train the full width only")
    g.add_argument("--transfer_type", choices=["progressive", "US"], default="progressive",
                   help="teacher of each sub-network: the next larger width, or the full width (US-Net)")
    g.add_argument("--ce_coefficient", type=float, default=1.0, help="noisy calibration: weight of the label CE")
    g.add_argument("--distillation_alpha", type=float, default=0.5, help="full width: weight of the teacher CE")
    g.add_argument("--teacher", default="", help="frozen classifier: a checkpoint of this project or a timm name "
                   "(+ --teacher_weights); none: the full width's dist head learns the labels")
    g.add_argument("--teacher_weights", default=None, help="local weights file for a timm --teacher")
    g.add_argument("--literal_end_ratios", type=str2bool, default=True,
                   help="official quirk: tokens/pos/final norm/heads take the first channels only at r = 0.25 and 1 "
                        "(matters only for s != 0.25 or l != 1; keep on for official checkpoints)")
    g = parser.add_argument_group("augmentation (DeiT)")
    g.add_argument("--aa", default="rand-m1-mstd0.5-inc1", help="timm RandAugment policy ('none' = off)")
    g.add_argument("--color_jitter", type=float, default=None, help="only used when --aa is off")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    g = parser.add_argument_group("evaluation and export")
    g.add_argument("--eval", action="store_true", help="evaluate --resume weights at --eval_ratios and exit")
    g.add_argument("--eval_ratios", nargs="+", default=["all"],
                   help="'all' (the trained grid) or ratios; used by --eval and the end-of-training table")
    g.add_argument("--throughput_iters", type=int, default=10, help="timed forward passes per ratio for images/s")
    g.add_argument("--export", default="", help="with --eval: write the sub-network at --export_ratio to this "
                   "file (plain timm DeiT state dict) and its build settings to <file>.json")
    g.add_argument("--export_ratio", type=float, default=None)
    return add_common_args(parser)


class AtRatio(nn.Module):
    """The slimmable model at one fixed width, for code that calls ``model(images)``."""

    def __init__(self, model: nn.Module, ratio: float):
        super().__init__()
        self.model, self.ratio = model, ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.ratio)


def train_one_epoch(model: nn.Module, teacher: nn.Module | None, loader, optim_step: OptimizerStep,
                    device: torch.device, epoch: int, args: argparse.Namespace, mixup_fn, num_classes: int,
                    log_writer=None) -> dict[str, float]:
    """One epoch of Scala steps. Every width is one micro-step of ``optim_step`` (its accumulation count is
    widths × --accum_iter), so only the last width of an update synchronises DDP gradients and steps."""
    model.train()
    full_only = epoch < args.full_warm_epochs
    n_widths = 1 if full_only else 4
    optim_step.accum_iter = n_widths * args.accum_iter
    # per-rank draws (as the official seed + rank), re-seeded per epoch so that a resumed run draws the same
    rng = random.Random(f"scala-{args.seed}-{get_rank()}-{epoch}")
    logger, batches = epoch_batches(loader, optim_step.optimizer, device, epoch, args)
    params = [p for p in model.parameters() if p.requires_grad]
    names = ["full", "r3", "r2", "s"]
    for step, epoch_f, images, targets in batches:
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        elif args.smoothing > 0:
            targets = F.one_hot(targets, num_classes) * (1 - args.smoothing) + args.smoothing / num_classes
        ratios = [args.largest_ratio] if full_only else sample_ratios(rng, args.smallest_ratio, args.largest_ratio,
                                                                      args.granularity)
        teacher_logits = None
        if teacher is not None:
            with autocast_context(device, args.amp):
                teacher_logits = teacher(images).float()
        losses = width_losses(model, images, targets, ratios, teacher_logits, args.transfer_type,
                              args.ce_coefficient, args.distillation_alpha)
        values = {}
        for j, name in enumerate(names[:n_widths]):
            micro = step * n_widths + j
            with optim_step.sync_context(model, micro):
                with autocast_context(device, args.amp):
                    _, loss = next(losses)  # forward of this width (the previous graph is already freed)
                check_finite(loss, epoch, step)
                # OptimizerStep divides by its accumulation count; undo the widths part: the step is the SUM
                grad_norm = optim_step(loss * n_widths, params, micro)
            values[f"loss_{name}"] = loss.detach()
        total = sum(values.values())
        lr = optim_step.optimizer.param_groups[0]["lr"]
        logger.update(loss=total, lr=lr, grad_norm=grad_norm, n=images.shape[0], **values)
        if not full_only:
            logger.update(r3=ratios[1], r2=ratios[2])
        if grad_norm is not None:
            log_step(log_writer, epoch_f, loss=total, lr=lr)
    logger.synchronize_between_processes()
    print0(f"Epoch [{epoch}] averaged stats: {logger}")
    return logger.averages()


@torch.no_grad()
def images_per_second(model: SlimmableViT, ratio: float, batch_size: int, img_size: int, device: torch.device,
                      amp: str, iters: int) -> float:
    """Inference throughput of one process on a fixed random batch (2 untimed warm-up passes)."""
    model.eval()
    x = torch.randn(batch_size, model.in_chans, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast_context(device, amp):
        for i in range(iters + 2):
            if i == 2:
                sync()
                start = time.perf_counter()
            model(x, ratio)
    sync()
    return batch_size * iters / (time.perf_counter() - start)


def evaluate_ratios(model: SlimmableViT, ratios: list[float], loader, device: torch.device,
                    args: argparse.Namespace) -> list[dict]:
    """Top-1 (exact, all ranks), parameters, GFLOPs and images/s per ratio; prints one table on rank 0."""
    rows = []
    for r in ratios:
        stats = evaluate(AtRatio(model, r), loader, device, args.amp)
        rows.append(dict(ratio=r, width=model.widths(r)[0], params=model.num_params(r),
                         gflops=model.flops(r, args.input_size) / 1e9, acc1=stats["acc1"], acc5=stats["acc5"],
                         n=stats["n"], img_s=images_per_second(model, r, args.batch_size, args.input_size, device,
                                                                args.amp, args.throughput_iters)))
    lines = [f"{'ratio':>8} {'width':>6} {'params':>12} {'GFLOPs':>9} {'top-1':>7} {'img/s':>10}"]
    lines += [f"{w['ratio']:>8.5g} {w['width']:>6d} {w['params']:>12,d} {w['gflops']:>9.4f} {w['acc1']:>7.2f} "
              f"{w['img_s']:>10.1f}" for w in rows]
    print0(f"Scala {args.model} on {rows[0]['n']} val images (img/s: one process, batch {args.batch_size}, "
           f"{args.input_size}px, {device.type}):\n" + "\n".join(lines))
    return rows


def parse_ratios(values: list[str], args: argparse.Namespace, model: SlimmableViT) -> list[float]:
    ratios = (ratio_grid(args.smallest_ratio, args.largest_ratio, args.granularity) if values == ["all"]
              else [float(v) for v in values])
    for r in ratios:
        model.widths(r)  # invalid ratio -> ValueError before any evaluation
    return ratios


def main(args: argparse.Namespace) -> None:
    fill_defaults(args, SLIM_DEFAULTS)
    if args.model not in SCALA_PRESETS:
        raise ValueError(f"unknown Scala model {args.model!r}; known: {', '.join(SCALA_PRESETS)}")
    path = resume_path(args)
    resume_ckpt = load_checkpoint(path) if path else None  # also: bad path -> error before work
    ckpt_args = (resume_ckpt.get("args") or {}) if resume_ckpt else {}
    fill_defaults(args, {k: ckpt_args.get(k, v) for k, v in WIDTH_DEFAULTS.items()})
    ratio_grid(args.smallest_ratio, args.largest_ratio, args.granularity)  # invalid grid -> ValueError now
    init_ckpt = load_checkpoint(args.init_from) if args.init_from else None
    if args.eval and not path:
        raise ValueError("--eval needs --resume weights (a checkpoint of this script or an official Scala one)")
    if args.export and (not args.eval or args.export_ratio is None):
        raise ValueError("--export needs --eval and --export_ratio")
    teacher = load_teacher(args.teacher, args.teacher_weights) if args.teacher and not args.eval else None
    init_distributed_mode(args)
    device = torch.device(args.device)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed)

    val_set = build_dataset(args, "val", build_transform(args, is_train=False, kind="finetune"))
    train_set = None if args.eval else build_dataset(args, "train", build_transform(args, True, kind="finetune"))
    num_classes = args.nb_classes or len((train_set or val_set).classes)
    if teacher is not None and teacher.num_classes != num_classes:
        raise ValueError(f"teacher predicts {teacher.num_classes} classes, the data has {num_classes}")
    model = create_scala(args.model, num_classes=num_classes, img_size=args.input_size,
                         drop_path_rate=args.drop_path, smallest_ratio=args.smallest_ratio,
                         largest_ratio=args.largest_ratio, literal_end_ratios=args.literal_end_ratios)
    eval_ratios = parse_ratios(args.eval_ratios, args, model)
    if args.export:
        model.widths(args.export_ratio)
    if init_ckpt is not None:
        report = load_encoder(model, init_ckpt)
        print0(f"initialised from {args.init_from}: missing {report['missing']}, unexpected {report['unexpected']}")
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    write_args(args)
    val_loader = build_loader(val_set, args, is_train=False)

    effective_lr(args)
    optimizer = adamw(param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay()),
                      lr=args.lr)
    optim_step = OptimizerStep(optimizer, args.amp, args.accum_iter, args.clip_grad, args.device)
    extra = resume(args, model, None if args.eval else optimizer, optim_step, resume_ckpt)

    if args.eval:
        evaluate_ratios(model, eval_ratios, val_loader, device, args)
        if args.export and is_main_process():
            export(model, args.export_ratio, args.export)
        cleanup_distributed()
        return

    train_loader = build_loader(train_set, args, is_train=True)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=num_classes)
    model_ddp = wrap_model(model, args)
    log_writer = make_log_writer(args)
    print0(f"{args.model}: {model.num_params(args.largest_ratio) / 1e6:.2f}M parameters at r={args.largest_ratio}; "
           f"widths {ratio_grid(args.smallest_ratio, args.largest_ratio, args.granularity)}; "
           f"teacher {args.teacher or 'none'}; {args.epochs} epochs ({args.full_warm_epochs} full-width only)")
    best = extra.get("best_acc1", 0.0)
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model_ddp, teacher, train_loader, optim_step, device, epoch, args, mixup_fn,
                                      num_classes, log_writer)
        test_stats = evaluate(AtRatio(model, args.largest_ratio), val_loader, device, args.amp)
        improved = test_stats["acc1"] > best  # official: best checkpoint on the full width only
        best = max(best, test_stats["acc1"])
        extra = {"best_acc1": best, "scala_config": dict(model.scala_config)}
        save_checkpoint(args, epoch, model, optimizer, optim_step, extra=extra)
        if improved:
            save_checkpoint(args, epoch, model, None, extra=extra, name="checkpoint-best.pth")
        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1_full", test_stats["acc1"], epoch)
        write_json_line(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                          **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch})
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}; best full-width acc1 {best:.2f}%")
    if args.start_epoch < args.epochs:
        write_json_line(args.output_dir, {"eval_table": evaluate_ratios(model, eval_ratios, val_loader, device, args)})
    cleanup_distributed()


def export(model: SlimmableViT, ratio: float, path: str) -> None:
    """Write the sub-network's plain state dict and, next to it, what a standalone ViT needs to match it."""
    sd, meta = model.export(ratio)
    save_atomic({k: v.cpu() for k, v in sd.items()}, path)
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    timm_class = "VisionTransformerDistilled" if meta["distilled"] else "VisionTransformer"
    print0(f"exported r={ratio} to {path}: build timm's {timm_class}(embed_dim={meta['embed_dim']}, "
           f"num_heads={meta['num_heads']}, mlp_ratio={meta['mlp_ratio']}, LayerNorm eps {meta['norm_eps']}) "
           f"and set every block's attn.scale = {meta['attn_scale']} with attn.fused_attn = False")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
