"""Pretraining (XTRA, SAIM, D-iGPT, MAE and any registered method): settings -> data -> model -> AdamW -> epochs.

    python main_pretrain.py --model xtra_vit_tiny --dataset digits --epochs 5 --output_dir out/xtra_tiny
    python main_pretrain.py --model saim_vit_tiny --help      # that model's settings, with their real defaults
    torchrun --nproc_per_node 8 main_pretrain.py --model xtra_vit_base_patch16 --data_path /imagenet ...

``--model`` picks a registered model (a preset, or a method's key for its official defaults). The command line
then accepts that method's settings and the shared ones only. Settings resolve once: the method's recipe, the
preset, the checkpoint being resumed, the command line (later wins); ``--print_config`` shows them and exits.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Sequence

from timm.optim import param_groups_weight_decay

import models
from engine_monitors import Monitors, encoder_features, with_transform
from engine_pretrain import train_one_epoch
from models.formats import encoder_record, plain_config, resumed_checkpoint
from models.registry import lookup, model_names, official_global_batch, setting_owners
from util.cli import run_cli
from util.config import (
    PARALLEL_GROUP,
    SHARED_GROUPS,
    KnnSettings,
    OnlineProbeSettings,
    OptimSettings,
    print_settings,
    resolve_run,
    resumed_model,
)
from util.datasets import build_dataset, build_loader, build_transform
from util.distributed import cleanup_distributed, init_distributed, is_main_process, launch_world_size, print0
from util.images import first_images, panels_image, save_panels
from util.misc import forked_rng, log_epoch, make_log_writer, seed_everything
from util.parallel import full_state_dict, parallelize, wrap_model
from util.settings import Group, Layers, Settings, SettingsError, SettingsParser, preparse, setting
from util.train_loop import MidEpochSaves, Trainer, adamw, configure_kernels
from util.train_state import (
    check_shared_output,
    commit_epoch,
    finish_run,
    is_due,
    resume,
    start_output,
    training_state,
)

assert models  # importing the package registers every method


@dataclass(frozen=True)
class PretrainSettings:
    model: str = setting("xtra_vit_tiny", "registered model: " + ", ".join(model_names("pretrain")))
    visualize_every: int = setting(0, "every N epochs a labelled figure of inputs / targets / predictions: "
                                      "vis-<epoch>.png and TensorBoard's visualize/panels (0 = off)")
    save_encoder: bool = setting(
        True, "also write encoder.pth next to each numbered checkpoint: a dict of model (the encoder's weights, "
        "timm key names), vit_config, vit_prefix and encoder_mask, as --finetune, the probes and --teacher read "
        "it (a plain timm state dict: python -m models.convert --export_timm)")


def settings_parser(model: str) -> tuple[SettingsParser, Layers]:
    """The command line of ``--model model`` and the layers under it (the method's recipe, the preset)."""
    method, preset = lookup(model, "pretrain")
    layers = [("recipe", method.recipe), ("preset", {**preset.settings, "model": model})]
    groups = [Group("pretraining", PretrainSettings), Group(f"{method.name} (model settings)", method.config_class),
              *SHARED_GROUPS, Group("kNN monitor", KnnSettings), Group("online probe", OnlineProbeSettings),
              PARALLEL_GROUP]
    return SettingsParser("main_pretrain.py", __doc__.split("\n")[0], groups, layers,
                          subject=f"{model} ({method.name})", owner_of=setting_owners,
                          help_command=f"main_pretrain.py --model {model} --help"), layers


def resolve_settings(argv: Sequence[str]) -> tuple[Settings, dict | None, str]:
    """The run's settings, and the checkpoint it resumes (with its path) if any."""
    ckpt, path = resumed_checkpoint(argv)
    stored = (ckpt or {}).get("args") or {}
    model = resumed_model(argv, stored, path, PretrainSettings.model)
    unrecorded = (ckpt or {}).get("unrecorded", [])
    given = preparse(argv, **{name: str for name in unrecorded})
    missing = [name for name in unrecorded if given[name] is None]
    if missing:  # an official file: settings its shapes do not show and it does not record
        raise SettingsError(f"{path} does not record {', '.join(missing)}: give --{' --'.join(missing)}")
    parser, layers = settings_parser(model)
    settings = resolve_run(argv, parser, layers, stored)
    method, _ = lookup(model, "pretrain")
    method.model_class.check_settings(settings.of(method.config_class), settings.fsdp)
    return settings, ckpt, path


def main(argv: Sequence[str]) -> None:
    s, ckpt, ckpt_path = resolve_settings(argv)
    method, preset = lookup(s.model, "pretrain")
    print_settings(s, f"main_pretrain.py --model {s.model} ({method.name}: {preset.description})",
                   official_global_batch(s.model))
    if s.print_config:
        return
    config = s.of(method.config_class)
    dist_info = init_distributed(s.device, s.dist_url, process_group=s.fsdp, timeout_minutes=s.dist_timeout)
    configure_kernels(dist_info.device, s.tf32, s.deterministic)
    check_shared_output(s.output_dir)
    seed_everything(s.seed)

    model = method.model_class(config).to(dist_info.device)
    # before the optimiser sees the parameters
    print0(parallelize(model, dist_info, s.fsdp, s.grad_ckpt, s.amp, s.compile))
    transform = build_transform(config.input_size, True, s.crop_scale, s.crop_ratio, decode=s.decode)
    dataset = build_dataset(s.dataset, "train", transform, config.input_size, s.data_path, s.synthetic_size)
    loader = build_loader(dataset, s.batch_size, s.num_workers, is_train=True, seed=s.seed,
                          pin_memory=s.pin_mem and dist_info.device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model {s.model}: {n_params / 1e6:.2f}M trainable parameters "
           f"(encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M)")
    optimizer = adamw(param_groups_weight_decay(model, s.weight_decay, no_weight_decay_list=model.no_weight_decay()),
                      lr=s.of(OptimSettings).peak_lr(launch_world_size()), betas=tuple(s.betas))
    monitors = None
    if Monitors.wanted(s.of(KnnSettings), s.of(OnlineProbeSettings)):  # on fixed training and validation images
        evaluation = build_transform(config.input_size, is_train=False, decode=s.decode)
        monitors = Monitors(s.of(KnnSettings), s.of(OnlineProbeSettings),
                            encoder_features(model, s.amp, dist_info.device),
                            with_transform(dataset, evaluation),
                            build_dataset(s.dataset, "val", evaluation, config.input_size, s.data_path,
                                          s.synthetic_size), len(dataset.classes), s.batch_size, s.num_workers)
    online_probe = monitors.online_probe if monitors else None
    start_at, extra = resume(ckpt, ckpt_path, model, optimizer)
    if online_probe is not None and "online_probe" in extra:
        online_probe.load_state_dict(extra["online_probe"])
    if not start_output(s.output_dir, s.epochs, start_at.epoch, s.as_dict()):  # validated: the first write
        return cleanup_distributed()
    log_writer = make_log_writer(s.output_dir, s.log_dir)
    trainer = Trainer(model, optimizer, s.of(OptimSettings), dist_info.device, s.print_freq,
                      int(s.max_unreadable * len(dataset)), log_writer, (ckpt or {}).get("scaler"))

    def state_after(epoch: int, position: dict | None = None) -> dict:
        """The checkpoint after ``epoch`` (with ``position``: inside the next one); a collective."""
        extra = {"online_probe": online_probe.state_dict()} if online_probe else {}
        return {**training_state(model, epoch, s.as_dict(), optimizer, trainer.state_dict(), extra, position),
                **encoder_record(model.encoder, "encoder.", model.encoder_mask),
                "model_name": s.model, "model_config": plain_config(model.config)}

    model_ddp = wrap_model(model, dist_info, s.compile)
    print0(f"start training for {s.epochs} epochs from epoch {start_at.epoch}")
    start = time.time()
    with MidEpochSaves(s.save_every_minutes, s.output_dir, start_at, state_after) as saves:
        for epoch in range(start_at.epoch, s.epochs):
            stats = train_one_epoch(model_ddp, trainer.epoch(loader, epoch, saves), online_probe)
            monitored = monitors.epoch_end(epoch) if monitors else {}
            files = {"encoder.pth": {"model": full_state_dict(model, "encoder."),
                                     **encoder_record(model.encoder, "", model.encoder_mask)}} \
                if s.save_encoder and is_due(epoch, s.epochs, s.save_freq) else {}
            record = {**{f"train_{k}": v for k, v in stats.items()}, **monitored, "epoch": epoch,
                      "n_parameters": n_params}
            commit_epoch(s.output_dir, epoch, record, state_after(epoch), s.epochs, s.save_freq, s.keep_last, files)
            log_epoch(log_writer, epoch, {f"monitor/{name}": value for name, value in monitored.items()})
            if s.visualize_every and s.output_dir and (epoch + 1) % s.visualize_every == 0:
                # every rank runs it (a sharded forward is collective), on its own RNG stream: resuming stays exact
                model.eval()
                with forked_rng():
                    panels = model.visualize(first_images(dataset, 8, dist_info.device))
                if is_main_process():
                    title = f"{s.model}, epoch {epoch}"
                    save_panels(panels, os.path.join(s.output_dir, f"vis-{epoch}.png"), title)
                    if log_writer is not None:
                        log_writer.add_image("visualize/panels", panels_image(panels, title), epoch, dataformats="HWC")
                model.train()
    finish_run(s.output_dir, s.epochs)
    if log_writer is not None:
        log_writer.close()
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
