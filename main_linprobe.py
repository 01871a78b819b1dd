"""Frozen-backbone probing: --probe linear (MAE: non-affine BN + Linear, LARS) or --probe attentive
(XTRA/AIM: non-affine BN over tokens, learned queries, bias-free k/v, Linear; AdamW).

    python main_linprobe.py --finetune out/xtra/checkpoint-last.pth --dataset digits --probe attentive
    python main_linprobe.py --probe attentive --help      # the flags of that probe, with their real defaults
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from timm.optim import Lars

import models
from engine_finetune import evaluate, train_one_epoch
from models.formats import encoder_record, load_checkpoint, load_encoder_weights
from models.masks import BlockCausal, EncoderMask, encoder_mask_from_dict
from models.probes import AttentivePoolingHead, LinearHead, Probe, default_pool
from models.registry import setting_owners
from models.vit import VisionTransformer
from util.config import SHARED_GROUPS, AugmentSettings, DataSettings, OptimSettings, print_settings, resolve_run
from util.datasets import build_loader, supervised_datasets
from util.distributed import launch_world_size, print0
from util.errors import UserError, run_cli
from util.run import EpochResult, TrainingRun, evaluate_only, start_process
from util.settings import Group, Layers, Settings, SettingsError, SettingsParser, setting
from util.train_loop import adamw

assert models  # importing the package registers the official-checkpoint converters


@dataclass(frozen=True)
class ProbeSettings:
    finetune: str = setting("", "checkpoint with the pretrained encoder (required)")
    num_heads: int | None = setting(None, "attention heads of a checkpoint that does not record them (official "
                                          "files); none: what it records")
    probe: Literal["linear", "attentive"] = setting("linear", "which probe")
    optimizer: Literal["lars", "adamw", "sgd"] = setting(
        "lars", "lars (MAE's linear probe), adamw (XTRA's probes; --betas), sgd with momentum 0.9 (SAIM's)")
    nb_classes: int | None = setting(None, "classifier outputs; none: the dataset's number of classes")
    input_size: int = setting(224, "image side (default: the checkpoint's resolution)")
    n_last_blocks: int = setting(1, "average the outputs of the last N blocks")
    final_norm: bool = setting(False, "apply the encoder's final LayerNorm to the features (MAE linprobe: true)")
    eval: bool = setting(False, "evaluate --resume probe weights and exit")
    dist_eval: bool = setting(True, "shard validation exactly across ranks (off: every rank evaluates all)")

    def __post_init__(self) -> None:
        if self.n_last_blocks < 1:
            raise ValueError(f"--n_last_blocks must be at least 1, got {self.n_last_blocks}")


@dataclass(frozen=True)
class LinearProbeSettings:
    pool: Literal["token", "avg"] | None = setting(None, "pooling of the features; none: the encoder's own "
                                                         "global_pool (cls token if it has one, else the mean)")


@dataclass(frozen=True)
class AttentiveProbeSettings:
    probe_heads: int | None = setting(None, "attention heads of the probe; none: the backbone's (XTRA used 16)")
    num_queries: int = setting(1, "learned queries, averaged after attention (XTRA: 1)")
    probe_mask: Literal["pretrained", "none", "block_causal"] = setting(
        "pretrained", "backbone attention mask at probe time; pretrained: the one the checkpoint records (XTRA "
                      "keeps its block-causal mask)")
    probe_block_size: int | None = setting(None, "k of --probe_mask block_causal; none: the checkpoint's")


# MAE's linear probe (LARS, blr 0.1, wd 0, 90 epochs) and XTRA's attentive probe (AdamW β (0.9, 0.95), wd 0.1,
# 100 epochs, warmup 10 from lr/10, cosine to 1e-5, clip 3; blr 6.25e-5 = lr 1e-3 at batch 4096).
RECIPE_GLOBAL_BATCH = {"linear": 16384,  # MAE's FINETUNE.md: 32 GPUs × 512
                       "attentive": 4096}  # XTRA's probe configs: 4 GPUs × 1024
RECIPES = {
    "linear": dict(batch_size=512, epochs=90, blr=0.1, min_lr=0.0, warmup_epochs=10, warmup_lr=0.0,
                   weight_decay=0.0, n_last_blocks=1, optimizer="lars", betas=(0.9, 0.95)),
    "attentive": dict(batch_size=1024, epochs=100, blr=6.25e-5, min_lr=1e-5, warmup_epochs=10, warmup_lr=None,
                      weight_decay=0.1, clip_grad=3.0, n_last_blocks=6, optimizer="adamw", betas=(0.9, 0.95)),
}
PROBE_GROUPS = {"linear": [Group("linear probe", LinearProbeSettings)],
                "attentive": [Group("attentive probe", AttentiveProbeSettings),
                              Group("attentive-probe augmentation (timm recipe, as XTRA)", AugmentSettings)]}


def probe_flag_owner(flag: str) -> list[str]:
    """For the error on a flag of the other probe: '--probe attentive' etc."""
    owners = [f"--probe {kind}" for kind, groups in PROBE_GROUPS.items() for g in groups if flag in g.names()]
    return owners or setting_owners(flag)


def resolve_settings(argv: Sequence[str]) -> tuple[Settings, dict | None, dict | None, str]:
    """Settings, the encoder checkpoint (--finetune), the probe checkpoint being resumed and its path."""
    init: dict | None = None

    def parser_for(chosen: dict, ckpt: dict | None, path: str) -> tuple[SettingsParser, Layers]:
        nonlocal init
        init = load_checkpoint(chosen["finetune"], chosen["num_heads"]) if chosen["finetune"] else None
        if init is None and ckpt is not None and ckpt.get("vit_prefix") == "backbone.":
            init = ckpt  # an official probe file holds its encoder
        probe = chosen["probe"] or ProbeSettings.probe
        if probe not in RECIPES:
            raise SettingsError(f"--probe must be one of {', '.join(RECIPES)}, got {probe!r}")
        return settings_parser(probe, {"input_size": init["vit_config"]["img_size"]} if init else {})

    run = resolve_run(argv, load_checkpoint, parser_for, choose={"finetune": str, "num_heads": int, "probe": str})
    if init is None and not run.settings.print_config:
        raise SettingsError("give --finetune: the checkpoint whose encoder is probed")
    return run.settings, init, run.checkpoint, run.path


def settings_parser(probe: str, from_checkpoint: dict | None = None) -> tuple[SettingsParser, Layers]:
    """The command line of ``--probe probe`` and the layers under it: the probe's recipe, then what the
    checkpoint's encoder fixes."""
    groups = [Group("probing", ProbeSettings), *PROBE_GROUPS[probe], *SHARED_GROUPS]
    layers = [("recipe", RECIPES[probe]), ("checkpoint encoder", from_checkpoint or {})]
    return SettingsParser("main_linprobe.py", __doc__.split("\n")[0], groups, layers, subject=f"--probe {probe}",
                          owner_of=probe_flag_owner, help_command=f"main_linprobe.py --probe {probe} --help"), layers


def probe_mask(s: Settings, stored: EncoderMask | None) -> EncoderMask | None:
    """The mask the backbone keeps at probe time: --probe_mask, else what the checkpoint records."""
    if s.probe_mask == "pretrained":
        return stored
    if s.probe_mask == "none":
        return None
    k = s.probe_block_size or (stored.block_size if isinstance(stored, BlockCausal) else None)
    if not k:
        raise UserError("--probe_mask block_causal needs --probe_block_size (the checkpoint does not say)")
    return BlockCausal(k)


def build_probe(s: Settings, init: dict, num_classes: int) -> tuple[Probe, VisionTransformer]:
    backbone = VisionTransformer(**{**init["vit_config"], "img_size": s.input_size, "num_classes": 0})
    load_encoder_weights(backbone, init)
    dim = backbone.embed_dim
    mask = encoder_mask_from_dict(init.get("encoder_mask"))
    if s.probe == "attentive":
        head = AttentivePoolingHead(dim, num_classes, s.probe_heads or backbone.num_heads, s.num_queries)
        pool, mask = None, probe_mask(s, mask)
    else:
        head = LinearHead(dim, num_classes)
        pool = s.pool or default_pool(backbone)  # how the encoder's features were meant to be pooled
    built = mask.build(backbone.grid_size, backbone.num_prefix_tokens) if mask is not None else None
    return Probe(backbone, head, s.n_last_blocks, pool, s.final_norm, built), backbone


def main(argv: Sequence[str]) -> None:
    s, init, ckpt, ckpt_path = resolve_settings(argv)
    print_settings(s, f"main_linprobe.py --probe {s.probe}: resolved settings", RECIPE_GLOBAL_BATCH[s.probe])
    if s.print_config:
        return
    if s.eval and ckpt is None:
        raise UserError("--eval needs --resume (a probe checkpoint)")
    dist_info = start_process(s, process_group=False, trains=not s.eval)
    device = dist_info.device

    augment = s.of(AugmentSettings) if s.probe == "attentive" else None  # the linear probe: crop and flip only
    train_set, val_set = supervised_datasets(s.of(DataSettings), s.input_size, augment, not s.eval)
    num_classes = s.nb_classes or len((train_set or val_set).classes)
    model, backbone = build_probe(s, init, num_classes)
    model.to(device)
    pin = s.pin_mem and device.type == "cuda"
    val_loader = build_loader(val_set, s.batch_size, s.num_workers, is_train=False, pin_memory=pin,
                              shard_eval=s.dist_eval)

    lr = s.of(OptimSettings).peak_lr(launch_world_size())
    head = model.head
    # weight decay (and LARS trust-ratio adaptation) only for weight matrices, not biases, as MAE's LARS
    groups = [{"params": [p for p in head.parameters() if p.ndim > 1], "always_adapt": True},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
    if s.optimizer == "lars":
        optimizer = Lars(groups, lr=lr, momentum=0.9, weight_decay=s.weight_decay)
    elif s.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=s.weight_decay)
    else:
        optimizer = adamw(groups, lr=lr, betas=tuple(s.betas), weight_decay=s.weight_decay)
    if s.eval:
        return evaluate_only(ckpt, ckpt_path, model, lambda: evaluate(model, val_loader, device, s.amp))
    train_loader = build_loader(train_set, s.batch_size, s.num_workers, is_train=True, seed=s.seed, pin_memory=pin)
    criterion = torch.nn.CrossEntropyLoss()
    print0(f"{s.probe} probe; backbone mask: {'on' if model.mask is not None else 'off'}")
    run = TrainingRun(s, dist_info, model, optimizer, ckpt, ckpt_path,
                      describe=lambda: {**encoder_record(backbone, "backbone.",
                                                         encoder_mask_from_dict(init.get("encoder_mask"))),
                                        "model_name": f"{s.probe}_probe"})

    def end_of_epoch(epoch: int, averages: dict) -> EpochResult:
        test = evaluate(model, val_loader, device, s.amp)
        return EpochResult(record={f"test_{k}": v for k, v in test.items()}, score=test["acc1"],
                           scalars={f"perf/test_{k}": test[k] for k in ("acc1", "acc5", "loss")})

    run.fit(train_loader, len(train_set), lambda net, epoch: train_one_epoch(net, criterion, epoch), end_of_epoch,
            classes=train_set.classes)


if __name__ == "__main__":
    run_cli(main)
