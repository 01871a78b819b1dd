"""End-to-end fine-tuning of any encoder this project writes (or a ViT from scratch): the MAE/DeiT recipe.

    python main_finetune.py --dataset digits --model vit_tiny_patch4 --input_size 32 --epochs 2
    python main_finetune.py --finetune out/xtra/checkpoint-last.pth --data_path /imagenet ...
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from engine_finetune import evaluate, train_one_epoch
from models.vit import VisionTransformer, vit_config
from util.args import add_common_args, fill_defaults, str2bool
from util.checkpoint import load_checkpoint, load_vit_weights, resume, save_checkpoint
from util.datasets import build_dataset, build_loader, build_transform
from util.misc import (
    OptimizerStep,
    adamw,
    cleanup_distributed,
    effective_lr,
    init_distributed_mode,
    make_log_writer,
    print0,
    run_cli,
    seed_everything,
    wrap_model,
    write_args,
    write_json_line,
)

FINETUNE_DEFAULTS = dict(batch_size=64, epochs=50, blr=1e-3, min_lr=1e-6, warmup_epochs=5, warmup_lr=0.0,
                         weight_decay=0.05, input_size=224, drop_path=0.1)
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "pos_embed",
             "norm_eps", "in_chans")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ViT fine-tuning", add_help=False)
    parser.add_argument("--model", default=None,
                        help="ViT preset (e.g. vit_base_patch16); default: the architecture stored in --finetune")
    parser.add_argument("--finetune", default="", help="checkpoint whose encoder initialises the model")
    parser.add_argument("--nb_classes", type=int, default=None, help="default: number of dataset classes")
    parser.add_argument("--global_pool", choices=["avg", "token"], default=None,
                        help="classifier input: mean of patch tokens + fc_norm (default) or the cls token")
    parser.add_argument("--drop_path", type=float, default=None)
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (1 = off)")
    g = parser.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy ('none' = off)")
    g.add_argument("--color_jitter", type=float, default=None, help="only used when --aa is off")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (recipe: 0.8)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (recipe: 1.0)")
    g.add_argument("--cutmix_minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--model_ema", action="store_true", help="keep an EMA of the weights (evaluated too)")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="evaluate --resume (or --finetune) weights and exit")
    g.add_argument("--dist_eval", type=str2bool, default=True,
                   help="shard validation exactly across ranks (off: every rank evaluates the full set)")
    return add_common_args(parser)


def build_classifier(args: argparse.Namespace, num_classes: int, ckpt: dict | None) -> VisionTransformer:
    """Architecture from --model or from the checkpoint (they must agree), then the classifier settings."""
    arch = {k: v for k, v in (ckpt or {}).get("vit_config", {}).items() if k in ARCH_KEYS}
    if args.model:
        preset = vit_config(args.model)
        clash = {k: (v, arch[k]) for k, v in preset.items() if k in arch and arch[k] != v}
        if clash:
            raise ValueError(f"--model {args.model} does not match the checkpoint's encoder: {clash}")
        arch = {**arch, **preset}
    if not arch:
        raise ValueError("give --model (a ViT preset) or --finetune (a checkpoint that stores its architecture)")
    arch["pos_embed"] = "learn"  # fine-tuning trains the position table (MAE, SAIM), initialised from the checkpoint
    global_pool = args.global_pool or "avg"
    if global_pool == "token" and not arch.get("class_token", True):
        raise ValueError("--global_pool token needs a cls token, and this encoder has none; use --global_pool avg")
    return VisionTransformer(**arch, img_size=args.input_size, num_classes=num_classes, global_pool=global_pool,
                             fc_norm=global_pool == "avg", drop_path_rate=args.drop_path)


def main(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.finetune) if args.finetune else None  # bad path -> error before any work
    # the input size defaults to the pretraining resolution of the checkpoint
    fill_defaults(args, {**FINETUNE_DEFAULTS, **({"input_size": ckpt["vit_config"]["img_size"]} if ckpt else {})})
    init_distributed_mode(args)
    device = torch.device(args.device)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed)

    train_set = build_dataset(args, "train", build_transform(args, is_train=True, kind="finetune"))
    val_set = build_dataset(args, "val", build_transform(args, is_train=False, kind="finetune"))
    num_classes = args.nb_classes or len(train_set.classes)
    model = build_classifier(args, num_classes, ckpt)
    if ckpt is not None and not args.eval:
        load_vit_weights(model, ckpt)
        model.reset_classifier(num_classes, head_init_std=2e-5)
    model.to(device)
    write_args(args)
    train_loader = build_loader(train_set, args, is_train=True)
    val_loader = build_loader(val_set, args, is_train=False, shard_eval=args.dist_eval)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    criterion = (SoftTargetCrossEntropy() if mixup_fn is not None else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss())

    effective_lr(args)
    groups = param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=args.layer_decay)
    optimizer = adamw(groups, lr=args.lr)
    optim_step = OptimizerStep(optimizer, args.amp, args.accum_iter, args.clip_grad, args.device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    extra = resume(args, model, None if args.eval else optimizer, optim_step)
    if model_ema is not None and "model_ema" in extra:
        model_ema.module.load_state_dict(extra["model_ema"])

    if args.eval:
        if not (args.resume or args.finetune):
            raise ValueError("--eval needs --resume (or --finetune) weights")
        if ckpt is not None and not args.resume:
            load_vit_weights(model, ckpt)
        evaluate(model, val_loader, device, args.amp)
        cleanup_distributed()
        return

    model_ddp = wrap_model(model, args)
    log_writer = make_log_writer(args)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{n_params / 1e6:.2f}M trainable parameters; start training for {args.epochs} epochs")
    best = extra.get("best_acc1", 0.0)
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model_ddp, criterion, train_loader, optim_step, device, epoch, args,
                                      mixup_fn, model_ema, log_writer)
        test_stats = evaluate(model, val_loader, device, args.amp)
        record = {**{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()}}
        acc = test_stats["acc1"]
        if model_ema is not None:
            ema_stats = evaluate(model_ema.module, val_loader, device, args.amp)
            record.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
            acc = max(acc, ema_stats["acc1"])
        improved = acc > best
        best = max(best, acc)
        extra = {"best_acc1": best, **({"model_ema": model_ema.module.state_dict()} if model_ema else {})}
        save_checkpoint(args, epoch, model, optimizer, optim_step, extra=extra)
        if improved:
            save_checkpoint(args, epoch, model, None, vit=model, extra=extra, name="checkpoint-best.pth")
        print0(f"accuracy on {test_stats['n']} val images: {test_stats['acc1']:.2f}%  (best {best:.2f}%)")
        if log_writer is not None:
            for k in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"perf/test_{k}", test_stats[k], epoch)
        write_json_line(args.output_dir, {**record, "epoch": epoch, "n_parameters": n_params})
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}; best acc1 {best:.2f}%")
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
