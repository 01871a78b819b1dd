"""Frozen-backbone probing: --probe linear (MAE: non-affine BN + Linear, LARS), --probe attentive (XTRA/AIM:
non-affine BN over tokens, learned queries, bias-free k/v, Linear; AdamW) or --probe knn (DINO's weighted kNN vote
on the pooled features; nothing trained). --lrs trains one head per learning rate on one frozen forward; --suite
runs every benchmark of a manifest and writes a table (docs/evaluation.md).

    python main_linprobe.py --finetune out/xtra/checkpoint-last.pth --dataset digits --probe attentive
    python main_linprobe.py --finetune out/xtra/checkpoint-last.pth --dataset digits --probe attentive --lrs 1e-4,1e-3
    python main_linprobe.py --finetune out/xtra/checkpoint-last.pth --dataset digits --probe knn
    python main_linprobe.py --suite configs/xtra_15.json --data_root $DATA --finetune xtra_h14.pth --output_dir out/s
    python main_linprobe.py --probe attentive --help      # the flags of that probe, with their real defaults
"""
from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
from timm.optim import Lars

import models
from engine_finetune import evaluate_heads, per_head, train_one_epoch
from engine_monitors import Features, dataset_features, knn_accuracies, with_transform
from models.formats import encoder_record, load_checkpoint, load_encoder_weights
from models.masks import BlockCausal, EncoderMask, encoder_mask_from_dict
from models.probes import AttentivePoolingHead, HeadSweep, LinearHead, Probe, default_pool
from models.registry import setting_owners
from models.vit import VisionTransformer
from util.config import (
    SHARED_GROUPS,
    AugmentSettings,
    DataSettings,
    KnnVoteSettings,
    OptimSettings,
    RunSettings,
    print_settings,
    resolve_run,
)
from util.datasets import build_loader, eval_transform, supervised_datasets
from util.distributed import cleanup_distributed, is_main_process, launch_world_size, print0, shared_process_group
from util.errors import UserError, run_cli
from util.metrics import log_epoch, make_log_writer
from util.run import (
    EpochResult,
    TrainingRun,
    evaluate_only,
    finish_run,
    finished,
    output_lock,
    start_output,
    start_process,
    write_json_line,
)
from util.settings import (
    Group,
    Layers,
    Settings,
    SettingsError,
    SettingsParser,
    preparse,
    print_resolved,
    setting,
    take_flags,
)
from util.suite import Benchmark, flag_words, load_manifest, run_result, write_summary
from util.train_loop import adamw

assert models  # importing the package registers the official-checkpoint converters


@dataclass(frozen=True)
class ProbeSettings:
    finetune: str = setting("", "checkpoint with the pretrained encoder (required)")
    num_heads: int | None = setting(None, "attention heads of a checkpoint that does not record them (official "
                                          "files); none: what it records")
    probe: Literal["linear", "attentive", "knn"] = setting("linear", "which probe")
    optimizer: Literal["lars", "adamw", "sgd"] = setting(
        "lars", "lars (MAE's linear probe), adamw (XTRA's probes; --betas), sgd with momentum 0.9 (SAIM's)")
    lrs: str = setting("", "an lr sweep: absolute peak lrs separated by commas (e.g. 1e-4,3e-4,1e-3), one head each, "
                           "all trained on the same batches and one frozen forward, each as a run at that --lr; '': "
                           "one head at --lr / --blr")
    nb_classes: int | None = setting(None, "classifier outputs; none: the dataset's number of classes")
    input_size: int = setting(224, "image side (default: the checkpoint's resolution)")
    n_last_blocks: int = setting(1, "average the outputs of the last N blocks")
    final_norm: bool = setting(False, "apply the encoder's final LayerNorm to the features (MAE linprobe: true)")
    eval: bool = setting(False, "evaluate --resume probe weights and exit")
    dist_eval: bool = setting(True, "shard validation exactly across ranks (off: every rank evaluates all)")

    def __post_init__(self) -> None:
        if self.n_last_blocks < 1:
            raise ValueError(f"--n_last_blocks must be at least 1, got {self.n_last_blocks}")
        self.learning_rates()

    def learning_rates(self) -> tuple[float, ...]:
        """--lrs as numbers; () for one probe."""
        if not self.lrs:
            return ()
        try:
            lrs = tuple(float(word) for word in self.lrs.split(","))
        except ValueError:
            lrs = ()
        if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs) or len(set(lrs)) < len(lrs):
            raise ValueError(f"--lrs takes distinct positive learning rates separated by commas (e.g. 1e-4,3e-4), "
                             f"got {self.lrs!r}")
        return lrs


def check_probe(s: Settings) -> None:
    """What the probe flags cannot combine with."""
    if s.probe == "knn" and (s.lrs or s.eval):
        raise ValueError("--probe knn trains nothing: no --lrs, no --eval")
    clash = [f"--{name}" for name in ("lr", "blr") if s.source(name) == "command line"]
    if s.lrs and clash:
        raise ValueError(f"--lrs gives every head its peak lr: drop {' and '.join(clash)}")


@dataclass(frozen=True)
class KnnProbeSettings(KnnVoteSettings):
    knn_ks: tuple[int, ...] = setting((10, 20, 100, 200), "neighbours that vote, each k reported (DINO's eval_knn: "
                                                          "10 20 100 200)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.knn_ks or min(self.knn_ks) < 1:
            raise ValueError(f"--knn_ks must be at least 1 each, got {' '.join(map(str, self.knn_ks))}")


@dataclass(frozen=True)
class SuiteSettings:
    suite: str = setting("", "a JSON manifest of benchmarks (docs/evaluation.md), probed one after another, each in "
                             "--output_dir/<name>, then suite.md and suite.json there; '': one run")
    data_root: str = setting("", "--suite: the folder holding each benchmark's folder (the manifest's path)")
    skip_missing: bool = setting(False, "--suite: run the benchmarks whose folder exists and name the others, "
                                        "instead of refusing to start")


@dataclass(frozen=True)
class LinearProbeSettings:
    pool: Literal["token", "avg"] | None = setting(None, "pooling of the features (linear and kNN probes); none: the "
                                                         "encoder's own global_pool (cls token if it has one, else "
                                                         "the mean)")


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
# The kNN probe (DINO's eval_knn: k 10, 20, 100, 200, T 0.07) reads the features the linear probe reads.
RECIPE_GLOBAL_BATCH = {"linear": 16384,  # MAE's FINETUNE.md: 32 GPUs × 512
                       "attentive": 4096}  # XTRA's probe configs: 4 GPUs × 1024
RECIPES = {
    "linear": dict(batch_size=512, epochs=90, blr=0.1, min_lr=0.0, warmup_epochs=10, warmup_lr=0.0,
                   weight_decay=0.0, n_last_blocks=1, optimizer="lars", betas=(0.9, 0.95)),
    "attentive": dict(batch_size=1024, epochs=100, blr=6.25e-5, min_lr=1e-5, warmup_epochs=10, warmup_lr=None,
                      weight_decay=0.1, clip_grad=3.0, n_last_blocks=6, optimizer="adamw", betas=(0.9, 0.95)),
    "knn": dict(batch_size=128, n_last_blocks=1),
}
POOLING = Group("pooling (linear and kNN probes)", LinearProbeSettings)
PROBE_GROUPS = {"linear": [POOLING],
                "attentive": [Group("attentive probe", AttentiveProbeSettings),
                              Group("attentive-probe augmentation (timm recipe, as XTRA)", AugmentSettings)],
                "knn": [Group("kNN probe (nothing trained: the training flags but --batch_size and --amp do not "
                              "apply)", KnnProbeSettings), POOLING]}
KNN_EPOCHS = 1  # what done.json of a kNN probe records: one pass


def probe_flag_owner(flag: str) -> list[str]:
    """For the error on a flag of the other probe: '--probe attentive' etc."""
    owners = [f"--probe {kind}" for kind, groups in PROBE_GROUPS.items() for g in groups if flag in g.names()]
    return owners or setting_owners(flag)


def resolve_settings(argv: Sequence[str], load: Callable[..., dict] = load_checkpoint
                     ) -> tuple[Settings, dict | None, dict | None, str]:
    """Settings, the encoder checkpoint (--finetune, read by ``load``), the probe checkpoint being resumed and its
    path."""
    init: dict | None = None

    def parser_for(chosen: dict, ckpt: dict | None, path: str) -> tuple[SettingsParser, Layers]:
        nonlocal init
        init = load(chosen["finetune"], chosen["num_heads"]) if chosen["finetune"] else None
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
    groups = [Group("probing", ProbeSettings, check=check_probe), *PROBE_GROUPS[probe],
              Group("suite of benchmarks", SuiteSettings), *SHARED_GROUPS]
    layers = [("recipe", RECIPES[probe]), ("checkpoint encoder", from_checkpoint or {})]
    return SettingsParser("main_linprobe.py", __doc__.split("\n")[0], groups, layers, subject=f"--probe {probe}",
                          owner_of=probe_flag_owner, help_command=f"main_linprobe.py --probe {probe} --help"), layers


def show_settings(s: Settings, header: str) -> None:
    """The resolved settings (rank 0), and for a probe that trains how its global batch and lr come about."""
    if s.probe == "knn":
        print_resolved(s, header)
    else:
        print_settings(s, header, RECIPE_GLOBAL_BATCH[s.probe])


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
    """The frozen backbone and the probe's head: one, one per --lrs (a HeadSweep, every head starting from the same
    weights), or, for the kNN probe, none (the probe's output is the pooled features)."""
    backbone = VisionTransformer(**{**init["vit_config"], "img_size": s.input_size, "num_classes": 0})
    load_encoder_weights(backbone, init)
    dim = backbone.embed_dim
    mask = encoder_mask_from_dict(init.get("encoder_mask"))
    if s.probe == "attentive":
        head = AttentivePoolingHead(dim, num_classes, s.probe_heads or backbone.num_heads, s.num_queries)
        pool, mask = None, probe_mask(s, mask)
    else:
        head = LinearHead(dim, num_classes) if s.probe == "linear" else nn.Identity()
        pool = s.pool or default_pool(backbone)  # how the encoder's features were meant to be pooled
    lrs = s.of(ProbeSettings).learning_rates()
    if lrs:
        head = HeadSweep(copy.deepcopy(head) for _ in lrs)
    built = mask.build(backbone.grid_size, backbone.num_prefix_tokens) if mask is not None else None
    return Probe(backbone, head, s.n_last_blocks, pool, s.final_norm, built), backbone


def probe_optimizer(s: Settings, head: nn.Module, lrs: Sequence[float], names: Sequence[str]
                    ) -> torch.optim.Optimizer:
    """The head's optimiser: weight decay (and LARS trust-ratio adaptation) only for weight matrices, not biases, as
    MAE's LARS. An lr sweep has these two groups for each head, the head a member (util.train_loop) with its own
    peak lr: its own schedule, clipping and divergence."""
    heads = list(zip(head, lrs, names)) if lrs else [(head, None, None)]
    groups = []
    for one, lr, name in heads:
        member = {"member": name, "peak_lr": lr} if name else {}
        groups += [{"params": [p for p in one.parameters() if p.ndim > 1], "always_adapt": True, **member},
                   {"params": [p for p in one.parameters() if p.ndim <= 1], "weight_decay": 0.0,
                    "always_adapt": False, **member}]
    lr = lrs[0] if lrs else s.of(OptimSettings).peak_lr(launch_world_size())  # the schedule sets it at each step
    if s.optimizer == "lars":
        return Lars(groups, lr=lr, momentum=0.9, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=s.weight_decay)
    return adamw(groups, lr=lr, betas=tuple(s.betas), weight_decay=s.weight_decay)


def sweep_result(tests: list[dict], lrs: Sequence[float], names: Sequence[str], diverged: list[str | None]
                 ) -> EpochResult:
    """An lr sweep's epoch: every head's top-1, top-5 and loss (``test_acc1/<head>`` ...) and where a head
    diverged (``diverged/<head>``); the best head that did not diverge gives ``test_acc1``, ``test_acc5``,
    ``test_lr`` and the score, and checkpoint-best.pth holds it alone."""
    best = max((i for i, where in enumerate(diverged) if where is None), key=lambda i: tests[i]["acc1"])
    record = {"test_acc1": tests[best]["acc1"], "test_acc5": tests[best]["acc5"], "test_lr": lrs[best],
              "test_n": tests[best]["n"], "test_unreadable": tests[best]["unreadable"],
              **{f"test_{k}/{name}": test[k] for name, test in zip(names, tests) for k in ("acc1", "acc5", "loss")},
              **{f"diverged/{name}": where for name, where in zip(names, diverged) if where}}
    return EpochResult(record=record, score=tests[best]["acc1"],
                       scalars={f"perf/test_{k}/{name}": test[k] for name, test in zip(names, tests)
                                for k in ("acc1", "acc5", "loss")},
                       best=functools.partial(best_head_checkpoint, index=best, lr=lrs[best]))


def best_head_checkpoint(state: dict, index: int, lr: float) -> dict:
    """A sweep's weights-only checkpoint as a single probe's: the backbone and head ``index`` (as ``head.``), with
    its lr as --lr: what --eval and the timm export read."""
    prefix = f"head.{index}."
    weights = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    weights.update({"head." + k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return {**state, "model": weights, "args": {**state["args"], "lr": lr, "lrs": ""}}


def knn_probe(s: Settings, model: Probe, bank, queries, num_classes: int, device: torch.device) -> None:
    """--probe knn: the probe's pooled features of every training image (the bank) and validation image (the
    queries), both under the evaluation transform, sharded over the ranks; DINO's weighted vote for each k of
    --knn_ks; one log.txt line (``test_acc1/k<k>``; the best k as ``test_acc1`` and ``test_k``) and done.json."""
    with output_lock(s.output_dir):
        if not start_output(s.output_dir, KNN_EPOCHS, 0, s.as_dict()):
            return
        features = Features(model, lambda net, images: net(images), model.backbone.embed_dim, s.amp, device)
        bank_feats, bank_labels = dataset_features(features, bank, s.batch_size, s.num_workers, device)
        query_feats, query_labels = dataset_features(features, queries, s.batch_size, s.num_workers, device)
        accs = knn_accuracies(bank_feats, bank_labels, query_feats, query_labels, num_classes, s.knn_ks,
                              s.knn_temperature)
        best = max(range(len(accs)), key=accs.__getitem__)
        print0(f"kNN top-1 ({len(bank_labels)} training images vote, {len(query_labels)} validation images, "
               f"T {s.knn_temperature}): " + ", ".join(f"k {k}: {a:.2f}%" for k, a in zip(s.knn_ks, accs)))
        write_json_line(s.output_dir, {"test_acc1": accs[best], "test_k": s.knn_ks[best], "test_n": len(query_labels),
                                       "train_n": len(bank_labels),
                                       **{f"test_acc1/k{k}": a for k, a in zip(s.knn_ks, accs)}, "epoch": 0})
        writer = make_log_writer(s.output_dir, s.log_dir)
        log_epoch(writer, 0, {f"perf/knn_acc1/k{k}": a for k, a in zip(s.knn_ks, accs)})
        if writer is not None:
            writer.close()
        finish_run(s.output_dir, KNN_EPOCHS)


def main(argv: Sequence[str]) -> None:
    if preparse(argv, suite=str)["suite"]:
        return run_suite(argv)
    probe_run(argv)


def probe_run(argv: Sequence[str], load: Callable[..., dict] = load_checkpoint) -> None:
    """One probe (or lr sweep, or kNN probe) from its command line to its results; ``load`` reads --finetune."""
    s, init, ckpt, ckpt_path = resolve_settings(argv, load)
    show_settings(s, f"main_linprobe.py --probe {s.probe}: resolved settings")
    lrs = s.of(ProbeSettings).learning_rates()
    if lrs:
        print0(f"lr sweep: {len(lrs)} heads at peak lrs {', '.join(map(repr, lrs))} (absolute; the lr above is "
               "not used)")
    if s.print_config:
        return
    if s.eval and ckpt is None:
        raise UserError("--eval needs --resume (a probe checkpoint)")
    dist_info = start_process(s, process_group=False, trains=not s.eval)
    device = dist_info.device

    augment = s.of(AugmentSettings) if s.probe == "attentive" else None  # the other probes: crop and flip only
    train_set, val_set = supervised_datasets(s.of(DataSettings), s.input_size, augment, not s.eval)
    if train_set is not None and list(train_set.classes) != list(val_set.classes):
        raise UserError(f"the training split has {len(train_set.classes)} classes and the validation split "
                        f"{len(val_set.classes)}, or other ones: their labels would not agree (give val/ a folder for "
                        "every class folder of train/, empty where it has no image)")
    num_classes = s.nb_classes or len((train_set or val_set).classes)
    model, backbone = build_probe(s, init, num_classes)
    model.to(device)
    if s.probe == "knn":
        bank = with_transform(train_set, eval_transform(s.of(DataSettings), s.input_size))
        knn_probe(s, model, bank, val_set, num_classes, device)
        return cleanup_distributed()
    pin = s.pin_mem and device.type == "cuda"
    val_loader = build_loader(val_set, s.batch_size, s.num_workers, is_train=False, pin_memory=pin,
                              shard_eval=s.dist_eval)

    names = [f"lr{lr!r}" for lr in lrs]  # each head's name in log.txt, TensorBoard and the optimiser's groups
    optimizer = probe_optimizer(s, model.head, lrs, names)
    printed = [f"{name}: " for name in names] or [""]
    if s.eval:
        return evaluate_only(ckpt, ckpt_path, model, lambda: evaluate_heads(model, val_loader, device, s.amp, printed))
    train_loader = build_loader(train_set, s.batch_size, s.num_workers, is_train=True, seed=s.seed, pin_memory=pin)
    criterion = per_head(torch.nn.CrossEntropyLoss()) if lrs else torch.nn.CrossEntropyLoss()
    print0(f"{s.probe} probe; backbone mask: {'on' if model.mask is not None else 'off'}")
    run = TrainingRun(s, dist_info, model, optimizer, ckpt, ckpt_path,
                      describe=lambda: {**encoder_record(backbone, "backbone.",
                                                         encoder_mask_from_dict(init.get("encoder_mask"))),
                                        "model_name": f"{s.probe}_probe"})

    def end_of_epoch(epoch: int, averages: dict) -> EpochResult:
        tests = evaluate_heads(model, val_loader, device, s.amp, printed)
        if lrs:
            diverged = [next(g.get("diverged") for g in optimizer.param_groups if g.get("member") == name)
                        for name in names]
            return sweep_result(tests, lrs, names, diverged)
        test = tests[0]
        return EpochResult(record={f"test_{k}": v for k, v in test.items()}, score=test["acc1"],
                           scalars={f"perf/test_{k}": test[k] for k in ("acc1", "acc5", "loss")})

    run.fit(train_loader, len(train_set), lambda net, epoch: train_one_epoch(net, criterion, epoch), end_of_epoch,
            classes=train_set.classes)


def run_suite(argv: Sequence[str]) -> None:
    """--suite: every benchmark of the manifest, one after another in this process (under torchrun in one process
    group), each an ordinary run in --output_dir/<name> whose command line is the manifest's settings followed by
    this command line; then suite.md and suite.json there. Before the first run: the manifest, every benchmark's
    settings and its folder are checked. A rerun skips the finished benchmarks and resumes the one that was
    running."""
    own, common = take_flags(argv, suite=str, data_root=str, skip_missing=bool, output_dir=str, log_dir=str)
    per_benchmark = [name for name, value in take_flags(common, probe=str, lrs=str, data_path=str, resume=str,
                                                        eval=bool)[0].items() if value is not None]
    if per_benchmark:
        raise SettingsError(f"--{', --'.join(per_benchmark)}: the manifest sets these for each benchmark, not the "
                            "--suite command line")
    output_dir = own["output_dir"] if own["output_dir"] is not None else RunSettings.output_dir
    if not output_dir:
        raise SettingsError("--suite needs an --output_dir (each benchmark runs in a folder of it)")
    log_dir, data_root = own["log_dir"], own["data_root"] or ""
    benchmarks = load_manifest(own["suite"])
    load = functools.lru_cache(maxsize=1)(load_checkpoint)  # the encoder is read once for every benchmark

    def argv_of(b: Benchmark) -> list[str]:
        # TensorBoard: none (default) in each benchmark's folder, '' off, else in a folder per benchmark
        logs = [] if log_dir in (None, "none") else ["--log_dir", os.path.join(log_dir, b.name) if log_dir else ""]
        return ["--probe", b.probe, *(["--lrs", ",".join(map(repr, b.lrs))] if b.lrs else []),
                "--data_path", os.path.join(data_root, b.path), "--output_dir", os.path.join(output_dir, b.name),
                *logs, *flag_words(b.settings), *common]

    resolved = []
    for b in benchmarks:
        try:  # the settings as the run will resolve them, without reading a checkpoint it may resume
            resolved.append(resolve_settings([*argv_of(b), "--auto_resume", "false"], load)[0])
        except UserError as e:
            raise SettingsError(f"{own['suite']}: benchmark {b.name}: {e}") from None
    if resolved[0].print_config:
        for b, s in zip(benchmarks, resolved):
            show_settings(s, f"suite {own['suite']}, benchmark {b.name} (--probe {s.probe}): resolved settings")
        return
    missing = {b.name: s.data_path for b, s in zip(benchmarks, resolved) if s.dataset == "imagefolder" and
               not all(os.path.isdir(os.path.join(s.data_path, split)) for split in ("train", "val"))}
    listed = ", ".join(f"{name} ({path})" for name, path in missing.items())
    if missing and not own["skip_missing"]:
        raise UserError(f"{own['suite']}: no train/ and val/ folders for {listed} (--data_root "
                        f"{data_root or 'not given'}); give --skip_missing to run the others", every_rank=True)
    if missing:
        print0(f"warning: skipping {len(missing)} benchmark(s) whose folder is missing: {listed}")
    first = resolved[0]
    with shared_process_group(first.device, first.dist_url, first.dist_timeout):
        rows = []
        for i, (b, s) in enumerate(zip(benchmarks, resolved)):
            if b.name in missing:
                continue
            out = os.path.join(output_dir, b.name)
            if finished(out, KNN_EPOCHS if s.probe == "knn" else s.epochs):
                print0(f"suite: {b.name} is finished ({out})")
            else:
                print0(f"suite: benchmark {i + 1} of {len(benchmarks)}, {b.name} (--probe {b.probe}) in {out}")
                probe_run(argv_of(b), load)
            rows.append({"name": b.name, "probe": b.probe, "average": b.average, **run_result(out)})
        if is_main_process():
            write_summary(output_dir, own["suite"], first.finetune, rows, list(missing))
        print0(f"suite: {len(rows)} benchmark(s) done; wrote {os.path.join(output_dir, 'suite.md')} and suite.json")


if __name__ == "__main__":
    run_cli(main)
