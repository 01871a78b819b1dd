"""Frozen-backbone probing: --probe linear (MAE: non-affine BN + Linear, LARS) or --probe attentive
(XTRA/AIM: non-affine BN over tokens, one learned query, bias-free k/v, Linear; AdamW).

    python main_linprobe.py --finetune out/xtra/checkpoint-last.pth --dataset digits --probe attentive
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn

from engine_finetune import evaluate, train_one_epoch
from models.masks import block_causal_mask
from models.vit import VisionTransformer
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

# MAE linear probe (LARS, blr 0.1, wd 0, 90 epochs) and XTRA attentive probe (AdamW β (0.9, 0.95), wd 0.1,
# 100 epochs, warmup 10 from lr/10, cosine to 1e-5, clip 3; blr 6.25e-5 = lr 1e-3 at batch 4096).
PROBE_DEFAULTS = {
    "linear": dict(batch_size=512, epochs=90, blr=0.1, min_lr=0.0, warmup_epochs=10, warmup_lr=0.0,
                   weight_decay=0.0, n_last_blocks=1),
    "attentive": dict(batch_size=1024, epochs=100, blr=6.25e-5, min_lr=1e-5, warmup_epochs=10, warmup_lr=None,
                      weight_decay=0.1, clip_grad=3.0, n_last_blocks=6),
}


class AttentivePoolingHead(nn.Module):
    """Non-affine BatchNorm over tokens, one learned query (no q projection), bias-free k/v projections,
    multi-head SDPA, heads concatenated (no output projection), Linear classifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe heads {num_heads} do not divide the feature width {dim}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        x = self.bn(tokens.transpose(1, 2)).transpose(1, 2)
        h, d = self.num_heads, C // self.num_heads
        q = self.query.expand(B, -1, -1).reshape(B, 1, h, d).transpose(1, 2)
        k = self.k(x).reshape(B, N, h, d).transpose(1, 2)
        v = self.v(x).reshape(B, N, h, d).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)
        return self.linear(pooled)


class LinearHead(nn.Module):
    """MAE linear probe: mean of the (pooled) features, non-affine BatchNorm, Linear (init std 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(feats))


class Probe(nn.Module):
    """Frozen backbone (always in eval mode, run without gradients) + a trainable head.

    Features: the average of the last ``n_last_blocks`` block outputs before the final norm (XTRA/AIM), or after
    it with ``final_norm``; the linear probe pools them (cls token or mean over patch tokens)."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module, n_last_blocks: int, pool: str | None,
                 final_norm: bool, mask: torch.Tensor | None):
        super().__init__()
        self.backbone, self.head = backbone.requires_grad_(False), head
        self.n_last_blocks, self.pool, self.final_norm = n_last_blocks, pool, final_norm
        self.register_buffer("mask", mask, persistent=False)

    def train(self, mode: bool = True) -> Probe:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            layers = self.backbone.get_intermediate_layers(x, self.n_last_blocks, mask=self.mask)
            feats = torch.stack(layers).mean(0)
            if self.final_norm:
                feats = self.backbone.norm(feats)
            if self.pool == "token":
                feats = feats[:, 0]
            elif self.pool == "avg":
                feats = feats[:, self.backbone.num_prefix_tokens:].mean(1)
        return self.head(feats.float())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Frozen-backbone probing", add_help=False)
    parser.add_argument("--finetune", required=True, help="checkpoint with the pretrained encoder")
    parser.add_argument("--probe", choices=["linear", "attentive"], default="linear")
    parser.add_argument("--optimizer", choices=["lars", "adamw", "sgd"], default=None,
                        help="default: lars for --probe linear (MAE), adamw for attentive; XTRA's linear probe "
                             "used AdamW β (0.9, 0.95), SAIM's SGD with momentum 0.9")
    parser.add_argument("--nb_classes", type=int, default=None, help="default: number of dataset classes")
    parser.add_argument("--n_last_blocks", type=int, default=None,
                        help="average the outputs of the last N blocks (default 1 linear, 6 attentive)")
    parser.add_argument("--final_norm", type=str2bool, default=False,
                        help="apply the encoder's final LayerNorm to the features (MAE linprobe: true)")
    parser.add_argument("--pool", choices=["token", "avg"], default=None,
                        help="linear probe pooling (default: the encoder's own global_pool)")
    parser.add_argument("--probe_heads", type=int, default=None,
                        help="attentive probe heads (default: the backbone's head count; XTRA used 16)")
    parser.add_argument("--probe_mask", choices=["none", "block_causal"], default=None,
                        help="backbone attention mask at probe time (default: what the encoder was pretrained "
                             "with; XTRA keeps its block-causal mask)")
    parser.add_argument("--probe_block_size", type=int, default=None,
                        help="k of the block-causal mask (default: from the checkpoint)")
    parser.add_argument("--eval", action="store_true", help="evaluate --resume probe weights and exit")
    parser.add_argument("--dist_eval", type=str2bool, default=True, help="exact sharded validation")
    g = parser.add_argument_group("attentive-probe augmentation (timm recipe, as XTRA)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1")
    g.add_argument("--color_jitter", type=float, default=None)
    g.add_argument("--reprob", type=float, default=0.25)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    return add_common_args(parser)


def probe_mask(args: argparse.Namespace, ckpt: dict, backbone: VisionTransformer) -> torch.Tensor | None:
    stored = ckpt.get("encoder_mask") or {}
    kind = args.probe_mask or ("block_causal" if stored.get("type") == "block_causal" else "none")
    if kind == "none":
        return None
    k = args.probe_block_size or stored.get("block_size")
    if not k:
        raise ValueError("--probe_mask block_causal needs --probe_block_size (the checkpoint does not say)")
    if backbone.num_prefix_tokens:
        raise ValueError("--probe_mask block_causal is defined for encoders without a cls token (XTRA)")
    return block_causal_mask(backbone.grid_size, k)


def main(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.finetune)  # bad path / corrupt file -> error before any work
    defaults = dict(PROBE_DEFAULTS[args.probe], input_size=ckpt["vit_config"].get("img_size", 224))
    fill_defaults(args, defaults)
    init_distributed_mode(args)
    device = torch.device(args.device)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    seed_everything(args.seed)

    kind = "finetune" if args.probe == "attentive" else "linprobe"
    train_set = build_dataset(args, "train", build_transform(args, is_train=True, kind=kind))
    val_set = build_dataset(args, "val", build_transform(args, is_train=False, kind=kind))
    num_classes = args.nb_classes or len(train_set.classes)
    backbone = VisionTransformer(**{**ckpt["vit_config"], "img_size": args.input_size, "num_classes": 0})
    load_vit_weights(backbone, ckpt)
    dim = backbone.embed_dim
    if args.probe == "attentive":
        head, pool = AttentivePoolingHead(dim, num_classes, args.probe_heads or backbone.num_heads), None
    else:
        head = LinearHead(dim, num_classes)
        stored_pool = ckpt["vit_config"].get("global_pool")  # how the encoder's features were meant to be pooled
        pool = args.pool or (stored_pool if stored_pool in ("token", "avg") else
                             "token" if backbone.num_prefix_tokens else "avg")
    model = Probe(backbone, head, args.n_last_blocks, pool, args.final_norm, probe_mask(args, ckpt, backbone))
    model.to(device)
    args.model = f"{args.probe}_probe"
    write_args(args)
    train_loader = build_loader(train_set, args, is_train=True)
    val_loader = build_loader(val_set, args, is_train=False, shard_eval=args.dist_eval)

    effective_lr(args)
    if args.warmup_lr is None:  # XTRA's attentive probe warms up from lr/10
        args.warmup_lr = args.lr / 10
    # weight decay (and LARS trust-ratio adaptation) only for weight matrices, not biases, as MAE's LARS
    groups = [{"params": [p for p in head.parameters() if p.ndim > 1], "always_adapt": True},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
    optimizer_name = args.optimizer or ("lars" if args.probe == "linear" else "adamw")
    if optimizer_name == "lars":
        optimizer = Lars(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = adamw(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    optim_step = OptimizerStep(optimizer, args.amp, args.accum_iter, args.clip_grad, args.device)
    extra = resume(args, model, None if args.eval else optimizer, optim_step)
    if args.eval:
        if not args.resume:
            raise ValueError("--eval needs --resume (a probe checkpoint)")
        evaluate(model, val_loader, device, args.amp)
        cleanup_distributed()
        return

    model_ddp = wrap_model(model, args)
    log_writer = make_log_writer(args)
    criterion = torch.nn.CrossEntropyLoss()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{args.probe} probe: {n_params} trainable parameters; mask: {'on' if model.mask is not None else 'off'}")
    best = extra.get("best_acc1", 0.0)
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model_ddp, criterion, train_loader, optim_step, device, epoch, args,
                                      log_writer=log_writer)
        test_stats = evaluate(model, val_loader, device, args.amp)
        best = max(best, test_stats["acc1"])
        save_checkpoint(args, epoch, model, optimizer, optim_step, vit=backbone, vit_prefix="backbone.",
                        extra={"best_acc1": best})
        print0(f"accuracy on {test_stats['n']} val images: {test_stats['acc1']:.2f}%  (best {best:.2f}%)")
        write_json_line(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                          **{f"test_{k}": v for k, v in test_stats.items()},
                                          "epoch": epoch, "n_parameters": n_params})
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}; best acc1 {best:.2f}%")
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
