"""End-to-end fine-tuning of any encoder this project writes (or a ViT from scratch): the MAE/DeiT recipe.

    python main_finetune.py --dataset digits --model vit_tiny_patch4 --input_size 32 --epochs 2
    python main_finetune.py --finetune out/xtra/checkpoint-last.pth --data_path /imagenet ...
    python main_finetune.py --eval --resume out/ft/checkpoint-best.pth --data_path /imagenet
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

import models
from engine_finetune import evaluate, train_one_epoch
from models.formats import (
    ARCH_KEYS,
    encoder_record,
    load_checkpoint,
    load_encoder_weights,
)
from models.registry import setting_owners
from models.vit import VIT_PRESETS, VisionTransformer, vit_config
from util.config import (
    PARALLEL_GROUP,
    SHARED_GROUPS,
    AugmentSettings,
    DataSettings,
    MixupSettings,
    OptimSettings,
    print_settings,
    resolve_run,
)
from util.datasets import build_loader, make_mixup, supervised_datasets
from util.distributed import launch_world_size, print0
from util.errors import UserError, run_cli
from util.parallel import parallelize
from util.run import EpochResult, TrainingRun, evaluate_only, start_process
from util.settings import Group, Layers, Settings, SettingsError, SettingsParser, setting
from util.train_loop import adamw

assert models  # importing the package registers the official-checkpoint converters

# The argparse defaults of MAE's main_finetune.py (none of its FINETUNE.md per-size recipes: ViT-B trains 100 epochs
# at blr 5e-4, layer decay 0.65; ViT-L/H 50 epochs at blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3).
RECIPE = dict(batch_size=64, epochs=50, blr=1e-3, min_lr=1e-6, warmup_epochs=5, warmup_lr=0.0, weight_decay=0.05)
RECIPE_GLOBAL_BATCH = 1024  # every FINETUNE.md recipe of MAE: 32 GPUs × 32 (ViT-H: 64 × 16)


@dataclass(frozen=True)
class FinetuneSettings:
    model: str | None = setting(None, "ViT preset (" + ", ".join(VIT_PRESETS) + "); none: the architecture "
                                      "stored in --finetune or --resume")
    finetune: str = setting("", "checkpoint whose encoder initialises the model (any of this project, official "
                                "XTRA / SAIM / D-iGPT / MAE files, timm / DeiT ViTs)")
    num_heads: int | None = setting(None, "attention heads of a checkpoint that does not record them (official "
                                          "files); none: what it records")
    nb_classes: int | None = setting(None, "classifier outputs; none: the dataset's number of classes")
    input_size: int = setting(224, "image side (default: the resolution of the --finetune / --resume checkpoint)")
    global_pool: Literal["avg", "token"] = setting("avg", "classifier input: mean of patch tokens + fc_norm, "
                                                          "or the cls token")
    drop_path: float = setting(0.1, "stochastic depth rate of the last block")
    layer_decay: float = setting(0.75, "layer-wise lr decay (1 = off)")
    model_ema: bool = setting(False, "keep an EMA of the weights (evaluated too; best is picked on either)")
    model_ema_decay: float = setting(0.9999, "EMA decay per update")
    eval: bool = setting(False, "evaluate --resume (or --finetune) weights and exit")
    dist_eval: bool = setting(True, "shard validation exactly across ranks (off: every rank evaluates all)")

    def __post_init__(self) -> None:
        if self.model is not None and self.model not in VIT_PRESETS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(sorted(VIT_PRESETS))}")
        if self.nb_classes is not None and self.nb_classes < 1:
            raise ValueError(f"--nb_classes must be positive, got {self.nb_classes}")


GROUPS = [Group("fine-tuning", FinetuneSettings), Group("augmentation", AugmentSettings),
          Group("mixup and label smoothing", MixupSettings), *SHARED_GROUPS, PARALLEL_GROUP]


def resolve_settings(argv: Sequence[str]) -> tuple[Settings, dict | None, dict | None, str]:
    """Settings, the --finetune checkpoint, the checkpoint being resumed and its path."""
    init: dict | None = None

    def parser_for(chosen: dict, ckpt: dict | None, path: str) -> tuple[SettingsParser, Layers]:
        nonlocal init
        if ckpt is not None and (ckpt.get("vit_prefix") != "" or not ckpt["vit_config"].get("num_classes")):
            raise SettingsError(f"{path} is not a classifier checkpoint (it holds a pretraining model or an "
                                "encoder); give it to --finetune instead")
        # a resumed run has its own weights
        init = load_checkpoint(chosen["finetune"], chosen["num_heads"]) if chosen["finetune"] and ckpt is None \
            else None
        source = ckpt or init
        return settings_parser({"input_size": source["vit_config"]["img_size"]} if source else {})

    run = resolve_run(argv, load_checkpoint, parser_for, choose={"finetune": str, "num_heads": int})
    s, ckpt, path = run.settings, run.checkpoint, run.path
    if s.fsdp and s.model_ema:
        raise SettingsError("--model_ema is not supported with --fsdp (the EMA copy would not be sharded)")
    return s, init, ckpt, path


def settings_parser(from_checkpoint: dict | None = None) -> tuple[SettingsParser, Layers]:
    """The command line and the layers under it: the recipe, then what the checkpoint's encoder fixes."""
    layers = [("recipe", RECIPE), ("checkpoint encoder", from_checkpoint or {})]
    return SettingsParser("main_finetune.py", __doc__.split("\n")[0], GROUPS, layers, owner_of=setting_owners), layers


def build_classifier(s: Settings, num_classes: int, init: dict | None, ckpt: dict | None) -> VisionTransformer:
    """The classifier a resumed checkpoint holds, else the architecture of --model or --finetune (they must
    agree) with this run's classifier settings."""
    if ckpt is not None:
        cfg = dict(ckpt["vit_config"])
        return VisionTransformer(**{**cfg, "img_size": s.input_size, "drop_path_rate": s.drop_path})
    arch = {k: v for k, v in (init or {}).get("vit_config", {}).items() if k in ARCH_KEYS + ("class_token",
                                                                                          "norm_eps")}
    if s.model:
        preset = vit_config(s.model)
        clash = {k: (v, arch[k]) for k, v in preset.items() if k in arch and arch[k] != v}
        if clash:
            raise UserError(f"--model {s.model} does not match the checkpoint's encoder: {clash}")
        arch = {**arch, **preset}
    if not arch:
        raise UserError("give --model (a ViT preset) or --finetune (a checkpoint that stores its architecture)")
    if s.global_pool == "token" and not arch.get("class_token", True):
        raise UserError("--global_pool token needs a cls token, and this encoder has none; use --global_pool avg")
    # fine-tuning trains the position table (MAE, SAIM), initialised from the checkpoint
    return VisionTransformer(**arch, pos_embed="learn", img_size=s.input_size, num_classes=num_classes,
                             global_pool=s.global_pool, fc_norm=s.global_pool == "avg", drop_path_rate=s.drop_path)


def main(argv: Sequence[str]) -> None:
    s, init, ckpt, ckpt_path = resolve_settings(argv)
    print_settings(s, "main_finetune.py: resolved settings", RECIPE_GLOBAL_BATCH)
    if s.print_config:
        return
    if s.eval and ckpt is None and init is None:
        raise UserError("--eval needs --resume (or --finetune) weights")
    dist_info = start_process(s, process_group=s.fsdp and not s.eval, trains=not s.eval)
    device = dist_info.device

    train_set, val_set = supervised_datasets(s.of(DataSettings), s.input_size, s.of(AugmentSettings), not s.eval)
    num_classes = s.nb_classes or len((train_set or val_set).classes)
    model = build_classifier(s, num_classes, init, ckpt)
    if ckpt is None and init is not None:
        load_encoder_weights(model, init)
        if not s.eval:
            model.reset_classifier(num_classes, head_init_std=2e-5)
    model.to(device)
    pin = s.pin_mem and device.type == "cuda"
    val_loader = build_loader(val_set, s.batch_size, s.num_workers, is_train=False, pin_memory=pin,
                              shard_eval=s.dist_eval)
    if s.eval:
        return evaluate_only(ckpt, ckpt_path, model, lambda: evaluate(model, val_loader, device, s.amp))
    train_loader = build_loader(train_set, s.batch_size, s.num_workers, is_train=True, seed=s.seed, pin_memory=pin)
    mixup_fn = make_mixup(s.of(MixupSettings), num_classes)
    criterion = (SoftTargetCrossEntropy() if mixup_fn is not None else
                 LabelSmoothingCrossEntropy(s.smoothing) if s.smoothing > 0 else torch.nn.CrossEntropyLoss())

    # before the optimiser sees the parameters
    print0(parallelize(model, dist_info, s.fsdp, s.grad_ckpt, s.amp, s.compile))
    groups = param_groups_layer_decay(model, s.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=s.layer_decay)
    optimizer = adamw(groups, lr=s.of(OptimSettings).peak_lr(launch_world_size()), betas=tuple(s.betas))
    model_ema = ModelEmaV3(model, decay=s.model_ema_decay) if s.model_ema else None
    run = TrainingRun(s, dist_info, model, optimizer, ckpt, ckpt_path,
                      describe=lambda: {**encoder_record(model, "", None), "model_name": s.model},
                      states={"model_ema": model_ema.module} if model_ema else {})

    def end_of_epoch(epoch: int, averages: dict) -> EpochResult:
        """Top-1 of the model and of its EMA; the better one picks checkpoint-best.pth."""
        test = evaluate(model, val_loader, device, s.amp)
        record = {f"test_{k}": v for k, v in test.items()}
        score = test["acc1"]
        if model_ema is not None:
            ema = evaluate(model_ema.module, val_loader, device, s.amp)
            record.update({f"test_ema_{k}": v for k, v in ema.items()})
            score = max(score, ema["acc1"])
        return EpochResult(record=record, score=score,
                           scalars={f"perf/test_{k}": test[k] for k in ("acc1", "acc5", "loss")})

    run.fit(train_loader, len(train_set),
            lambda net, epoch: train_one_epoch(net, criterion, epoch, mixup_fn, model_ema), end_of_epoch,
            classes=train_set.classes)


if __name__ == "__main__":
    run_cli(main)
