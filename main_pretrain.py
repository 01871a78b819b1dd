"""Autoregressive pretraining (XTRA, SAIM, D-iGPT): args -> data -> model -> AdamW -> epochs -> checkpoints.

    python main_pretrain.py --model xtra_vit_tiny --dataset digits --epochs 5 --output_dir out/xtra_tiny
    torchrun --nproc_per_node 8 main_pretrain.py --model xtra_vit_base_patch16 --data_path /imagenet ...

Recipe defaults (lr, schedule, augmentation) come from the chosen method's preset; any flag overrides them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
import types

import torch
from timm.optim import param_groups_weight_decay

import models
from engine_pretrain import train_one_epoch
from models.registry import PRETRAIN_MODELS, build_pretrain_model, pretrain_entry
from util.args import add_common_args, fill_defaults, str2bool
from util.checkpoint import resume, save_atomic, save_checkpoint
from util.datasets import build_dataset, build_loader, build_transform
from util.misc import (
    OptimizerStep,
    adamw,
    cleanup_distributed,
    effective_lr,
    init_distributed_mode,
    is_main_process,
    make_log_writer,
    print0,
    run_cli,
    seed_everything,
    wrap_model,
    write_args,
    write_json_line,
)

# Used where a method's recipe says nothing.
PRETRAIN_DEFAULTS = dict(batch_size=64, epochs=800, blr=1.5e-4, min_lr=0.0, warmup_epochs=40, warmup_lr=0.0,
                         weight_decay=0.05, betas=(0.9, 0.95), input_size=224, crop_scale=(0.2, 1.0),
                         crop_ratio=(3 / 4, 4 / 3), drop_path=0.0)
METHOD_MODULES = [m for m in vars(models).values() if isinstance(m, types.ModuleType) and hasattr(m, "add_args")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Autoregressive ViT pretraining", add_help=False, conflict_handler="resolve")
    for method in METHOD_MODULES:  # method-specific flags (default None = the preset's value)
        if hasattr(method, "add_args"):
            method.add_args(parser)
    parser.add_argument("--model", default="xtra_vit_tiny", help=f"one of: {', '.join(sorted(PRETRAIN_MODELS))}")
    parser.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate of the encoder")
    parser.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW betas")
    parser.add_argument("--visualize_every", type=int, default=0,
                        help="write a PNG of inputs/targets/predictions every N epochs (0 = off)")
    parser.add_argument("--save_encoder", type=str2bool, default=True,
                        help="also write encoder.pth: the encoder as a plain timm ViT state dict")
    return add_common_args(parser)


def main(args: argparse.Namespace) -> None:
    entry = pretrain_entry(args.model)  # unknown name -> clear error before any work
    recipe = dict(entry.recipe)
    if args.blr is not None:  # an explicit --blr beats a recipe's absolute lr
        recipe.pop("lr", None)
    fill_defaults(args, {**PRETRAIN_DEFAULTS, **recipe})
    init_distributed_mode(args)
    device = torch.device(args.device)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed)

    model = build_pretrain_model(args.model, {**vars(args), "img_size": args.input_size,
                                              "drop_path_rate": args.drop_path}).to(device)
    if hasattr(model, "teacher") and model.teacher is None:
        raise ValueError(f"{args.model} learns from a teacher's features: give --teacher (and --teacher_weights)")
    dataset = build_dataset(args, "train", build_transform(args, is_train=True, kind="pretrain"))
    loader = build_loader(dataset, args, is_train=True)
    write_args(args)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model {args.model}: {n_params / 1e6:.2f}M trainable parameters "
           f"(encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M); {entry.description}")

    effective_lr(args)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    optimizer = adamw(param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=skip), lr=args.lr,
                      betas=tuple(args.betas))
    optim_step = OptimizerStep(optimizer, args.amp, args.accum_iter, args.clip_grad, args.device)
    resume(args, model, optimizer, optim_step)

    model_ddp = wrap_model(model, args)
    log_writer = make_log_writer(args)

    print0(f"start training for {args.epochs} epochs from epoch {args.start_epoch}")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model_ddp, loader, optim_step, device, epoch, args, log_writer)
        save_checkpoint(args, epoch, model, optimizer, optim_step, vit_prefix="encoder.")
        if args.save_encoder and args.output_dir and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
            export_encoder(model, os.path.join(args.output_dir, "encoder.pth"))
        if args.visualize_every and (epoch + 1) % args.visualize_every == 0:
            from visualize import save_panels  # lazy: matplotlib-free PNG writer, only when asked
            save_panels(model, dataset, device, os.path.join(args.output_dir, f"vis-{epoch}.png"))
        write_json_line(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                                          "n_parameters": n_params})
    if log_writer is not None:
        log_writer.close()
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")
    cleanup_distributed()


def export_encoder(model: torch.nn.Module, path: str) -> None:
    """The pretrained encoder as a plain timm ``VisionTransformer`` state dict (plus its config)."""
    if is_main_process():
        save_atomic({"model": model.encoder.state_dict(), "vit_config": dict(model.encoder.config),
                     "vit_prefix": "", "encoder_mask": getattr(model, "encoder_mask", None)}, path)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
