"""Scala: supervised training of a slimmable ViT (DeiT recipe + the Scala step), evaluation at any width, export.

    python main_slimmable.py --model scala_vit_tiny --dataset digits --teacher teacher.pth
    torchrun --nproc_per_node 4 main_slimmable.py --model scala_deit_small_patch16 --data_path /imagenet \\
        --teacher deit_small_patch16_224 --teacher_weights deit_small_patch16_224-cd65a155.pth      # see run.sh
    python main_slimmable.py --eval --resume out/checkpoint-last.pth --eval_ratios all             # one table

One iteration after the full-width warm-up epochs (engine_slimmable.py): stable sampling draws [l, r3, r2, s]
(each rank its own r3, r2); the full width learns the labels and the external teacher (DeiT hard distillation),
each smaller width the next larger one's detached dist logits (progressive transfer, or the full width with
--transfer_type US) plus --ce_coefficient × CE against the (mixup) labels; one optimizer step over the summed
losses.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

import models
from engine_finetune import evaluate
from engine_monitors import Features, Monitors, with_transform
from engine_slimmable import train_one_epoch
from models.formats import (
    encoder_record,
    load_checkpoint,
    load_encoder_weights,
    plain_config,
)
from models.registry import lookup, model_names, official_global_batch, setting_owners
from models.scala import ScalaConfig, SlimmableViT
from models.teacher import load_teacher
from util.checkpoint import save_atomic
from util.config import (
    PARALLEL_GROUP,
    SHARED_GROUPS,
    AugmentSettings,
    DataSettings,
    KnnSettings,
    MixupSettings,
    OptimSettings,
    print_settings,
    resolve_run,
)
from util.datasets import build_loader, eval_transform, make_mixup, supervised_datasets
from util.distributed import is_main_process, launch_world_size, print0
from util.errors import UserError, run_cli
from util.parallel import parallelize
from util.run import EpochResult, TrainingRun, evaluate_only, start_process
from util.settings import Group, Layers, Settings, SettingsError, SettingsParser, setting
from util.train_loop import adamw, autocast_context

assert models  # importing the package registers the presets


@dataclass(frozen=True)
class SlimmableSettings:
    model: str = setting("scala_deit_small_patch16", "Scala preset: " + ", ".join(model_names("slimmable")))
    init_from: str = setting("", "checkpoint whose encoder initialises the model (XTRA / SAIM / D-iGPT / MAE "
                                 "pretraining, a fine-tuned classifier; official files via their converters)")
    eval: bool = setting(False, "evaluate --resume weights at --eval_ratios and exit")
    eval_ratios: tuple[str, ...] = setting(("all",), "'all' (the trained grid) or ratios; for --eval and the "
                                                     "end-of-training table")
    throughput_iters: int = setting(10, "timed forward passes per ratio for images/s")
    export: str = setting("", "with --eval: write the sub-network at --export_ratio to this file (plain timm DeiT "
                              "state dict) and its build settings to <file>.json")
    export_ratio: float | None = setting(None, "the width ratio --export writes; none: no export")


class AtRatio(nn.Module):
    """The slimmable model at one fixed width, for code that calls ``model(images)``."""

    def __init__(self, model: nn.Module, ratio: float):
        super().__init__()
        self.model, self.ratio = model, ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.ratio)


def resolve_settings(argv: Sequence[str]) -> tuple[Settings, dict | None, str]:
    def parser_for(chosen: dict, ckpt: dict | None, path: str) -> tuple[SettingsParser, Layers]:
        if ckpt is not None and ckpt.get("model_name") is None:
            raise SettingsError(f"{path} is not a Scala checkpoint (it holds a plain ViT classifier; an official "
                                "non-distilled Scala file is recognised by the Scala model name its args record)")
        return settings_parser(chosen["model"] or SlimmableSettings.model)

    run = resolve_run(argv, load_checkpoint, parser_for, choose={"model": str})
    s, ckpt, path = run.settings, run.checkpoint, run.path
    if s.eval and ckpt is None:
        raise SettingsError("--eval needs --resume weights (a checkpoint of this script or an official Scala one)")
    if s.export and (not s.eval or s.export_ratio is None):
        raise SettingsError("--export needs --eval and --export_ratio")
    return s, ckpt, path


def settings_parser(model: str) -> tuple[SettingsParser, Layers]:
    """The command line of ``--model model`` and the layers under it (Scala's recipe, the preset)."""
    method, preset = lookup(model, "slimmable")
    groups = [Group("Scala run", SlimmableSettings), Group("Scala (model settings)", ScalaConfig),
              Group("augmentation (DeiT)", AugmentSettings), Group("mixup and label smoothing", MixupSettings),
              *SHARED_GROUPS, Group("kNN monitor", KnnSettings), PARALLEL_GROUP]
    layers = [("recipe", method.recipe), ("preset", {**preset.settings, "model": model})]
    return SettingsParser("main_slimmable.py", __doc__.split("\n")[0], groups, layers, subject=model,
                          owner_of=setting_owners, help_command=f"main_slimmable.py --model {model} --help"), layers


def evaluation_ratios(values: Sequence[str], model: SlimmableViT) -> list[float]:
    ratios = model.width_space.grid() if list(values) == ["all"] else [float(v) for v in values]
    for r in ratios:
        model.widths(r)  # invalid ratio -> ValueError before any evaluation
    return ratios


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


def evaluate_ratios(model: SlimmableViT, ratios: list[float], loader, device: torch.device, s: Settings) -> list[dict]:
    """Top-1 (exact, all ranks), parameters, GFLOPs and images/s per ratio; prints one table on rank 0."""
    rows = []
    for r in ratios:
        stats = evaluate(AtRatio(model, r), loader, device, s.amp)
        rows.append(dict(ratio=r, width=model.widths(r)[0], params=model.num_params(r),
                         gflops=model.flops(r, s.input_size) / 1e9, acc1=stats["acc1"], acc5=stats["acc5"],
                         n=stats["n"], img_s=images_per_second(model, r, s.batch_size, s.input_size, device, s.amp,
                                                                s.throughput_iters)))
    lines = [f"{'ratio':>8} {'width':>6} {'params':>12} {'GFLOPs':>9} {'top-1':>7} {'img/s':>10}"]
    lines += [f"{w['ratio']:>8.5g} {w['width']:>6d} {w['params']:>12,d} {w['gflops']:>9.4f} {w['acc1']:>7.2f} "
              f"{w['img_s']:>10.1f}" for w in rows]
    print0(f"Scala {s.model} on {rows[0]['n']} val images (img/s: one process, batch {s.batch_size}, "
           f"{s.input_size}px, {device.type}):\n" + "\n".join(lines))
    return rows


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


def main(argv: Sequence[str]) -> None:
    s, ckpt, ckpt_path = resolve_settings(argv)
    print_settings(s, f"main_slimmable.py --model {s.model}: resolved settings", official_global_batch(s.model))
    if s.print_config:
        return
    # the encoder to start from; a resumed run has its own weights
    init = load_checkpoint(s.init_from, s.num_heads if s.source("num_heads") == "command line" else None) \
        if s.init_from and ckpt is None else None
    teacher = load_teacher(s.teacher, s.teacher_weights or None) if s.teacher and not s.eval else None
    dist_info = start_process(s, process_group=s.fsdp and not s.eval, trains=not s.eval)
    device = dist_info.device

    train_set, val_set = supervised_datasets(s.of(DataSettings), s.input_size, s.of(AugmentSettings), not s.eval)
    num_classes = s.nb_classes or len((train_set or val_set).classes)
    if teacher is not None and teacher.num_classes != num_classes:
        raise UserError(f"teacher predicts {teacher.num_classes} classes, the data has {num_classes}")
    scala = dataclasses.replace(s.of(ScalaConfig), nb_classes=num_classes)
    model = SlimmableViT(scala)
    eval_ratios = evaluation_ratios(s.eval_ratios, model)
    if s.export:
        model.widths(s.export_ratio)
    if init is not None:
        load_encoder_weights(model, init)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    pin = s.pin_mem and device.type == "cuda"
    val_loader = build_loader(val_set, s.batch_size, s.num_workers, is_train=False, pin_memory=pin)

    if not s.eval:  # evaluation and export use the whole model on every rank; before the optimiser sees the weights
        print0(parallelize(model, dist_info, s.fsdp, s.grad_ckpt, s.amp, s.compile))
    optimizer = adamw(param_groups_weight_decay(model, s.weight_decay, no_weight_decay_list=model.no_weight_decay()),
                      lr=s.of(OptimSettings).peak_lr(launch_world_size()), betas=tuple(s.betas))
    if s.eval:
        def evaluate_and_export() -> None:
            evaluate_ratios(model, eval_ratios, val_loader, device, s)
            if s.export and is_main_process():
                export(model, s.export_ratio, s.export)

        return evaluate_only(ckpt, ckpt_path, model, evaluate_and_export)
    monitors = None
    if Monitors.wanted(s.of(KnnSettings)):  # the full width's cls token, on fixed training and validation images
        features = Features(model, lambda net, x: net.forward_features(x, s.largest_ratio)[:, 0],
                            model.widths(s.largest_ratio)[0], s.amp, device)
        monitors = Monitors(s.of(KnnSettings), None, features,
                            with_transform(train_set, eval_transform(s.of(DataSettings), s.input_size)),
                            val_set, num_classes, s.batch_size, s.num_workers)
    train_loader = build_loader(train_set, s.batch_size, s.num_workers, is_train=True, seed=s.seed, pin_memory=pin)
    mixup_fn = make_mixup(s.of(MixupSettings), num_classes)

    def soft_targets(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and their targets as distributions: mixup / cutmix (with label smoothing), or smoothed labels."""
        if mixup_fn is not None:
            return mixup_fn(images, labels)
        if s.smoothing > 0:
            return images, F.one_hot(labels, num_classes) * (1 - s.smoothing) + s.smoothing / num_classes
        return images, labels

    print0(f"{s.model}: {model.num_params(s.largest_ratio) / 1e6:.2f}M parameters at r={s.largest_ratio}; "
           f"widths {model.width_space.grid()}; teacher {s.teacher or 'none'}; {s.epochs} epochs "
           f"({s.full_warm_epochs} full-width only)")
    run = TrainingRun(s, dist_info, model, optimizer, ckpt, ckpt_path,
                      describe=lambda: {**encoder_record(model, "", None), "model_name": s.model,
                                        "model_config": plain_config(scala)})

    def end_of_epoch(epoch: int, averages: dict) -> EpochResult:
        """The full width's top-1 picks checkpoint-best.pth, as in the official code."""
        test = evaluate(AtRatio(model, s.largest_ratio), val_loader, device, s.amp)
        monitored = monitors.epoch_end(epoch) if monitors else {}
        return EpochResult(record={**{f"test_{k}": v for k, v in test.items()}, **monitored}, score=test["acc1"],
                           scalars={"perf/test_acc1_full": test["acc1"],
                                    **{f"monitor/{name}": value for name, value in monitored.items()}})

    run.fit(train_loader, len(train_set),
            lambda net, epoch: train_one_epoch(net, teacher, epoch, scala, soft_targets, s.seed), end_of_epoch,
            classes=train_set.classes,
            closing=lambda: {"eval_table": evaluate_ratios(model, eval_ratios, val_loader, device, s)})


if __name__ == "__main__":
    run_cli(main)
