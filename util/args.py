"""Flags shared by every entry script (one copy), grouped like MAE's parsers."""
from __future__ import annotations

import argparse

import torch


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=None, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation micro-steps per update")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    g.add_argument("--blr", type=float, default=None, help="base lr: lr = blr × effective batch / 256")
    g.add_argument("--min_lr", type=float, default=None, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=None, help="linear warmup length (epochs)")
    g.add_argument("--warmup_lr", type=float, default=None, help="lr at the start of warmup")
    g.add_argument("--weight_decay", type=float, default=None)
    g.add_argument("--clip_grad", type=float, default=None, help="max gradient norm (off when unset)")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16" if torch.cuda.is_available() else "off",
                   help="mixed precision (GradScaler only for fp16); default bf16 on CUDA, off on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=["imagefolder", "digits", "synthetic"], default="imagefolder",
                   help="imagefolder: --data_path/{train,val}; digits: scikit-learn's 8×8 digits upsampled "
                        "(offline); synthetic: random tensors (throughput)")
    g.add_argument("--data_path", default="", help="ImageFolder root with train/ and val/")
    g.add_argument("--input_size", type=int, default=None, help="image side in pixels")
    g.add_argument("--crop_scale", type=float, nargs=2, default=None,
                   help="RandomResizedCrop area range (default: the method's recipe, else 0.08 1)")
    g.add_argument("--crop_ratio", type=float, nargs=2, default=None, help="RandomResizedCrop aspect range")
    g.add_argument("--crop_pct", type=float, default=None, help="eval centre-crop fraction (timm default 0.875)")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--pin_mem", type=str2bool, default=True)
    g.add_argument("--synthetic_size", type=int, default=1024, help="images per split of --dataset synthetic")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, args.json ('' = none)")
    g.add_argument("--log_dir", default=None, help="tensorboard dir (default: output_dir; '' = off)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="", help="checkpoint to continue from (model, optimizer, epoch, RNG)")
    g.add_argument("--auto_resume", type=str2bool, default=True,
                   help="continue from output_dir/checkpoint-last.pth when it exists")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--save_freq", type=int, default=20, help="also keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--keep_last", type=int, default=0, help="keep only the K newest numbered checkpoints (0 = all)")
    g.add_argument("--print_freq", type=int, default=20)
    g.add_argument("--dist_url", default="env://")
    return parser


def fill_defaults(args: argparse.Namespace, defaults: dict) -> None:
    """Set every flag that is still None from ``defaults`` (a method's recipe or a script's defaults)."""
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.log_dir is None:
        args.log_dir = args.output_dir
