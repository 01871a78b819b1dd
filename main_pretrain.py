"""Pretraining (XTRA, SAIM, D-iGPT, MAE and any registered method): settings -> data -> model -> AdamW -> epochs.

    python main_pretrain.py --model xtra_vit_tiny --dataset digits --epochs 5 --output_dir out/xtra_tiny
    python main_pretrain.py --model saim_vit_tiny --help      # that model's settings, with their real defaults
    torchrun --nproc_per_node 8 main_pretrain.py --model xtra_vit_base_patch16 --data_path /imagenet ...

``--model`` picks a registered model (a preset, or a method's key for its official defaults). The command line
then accepts that method's settings and the shared ones only. Settings resolve once: the method's recipe, the
preset, the checkpoint being resumed, the command line (later wins); ``--print_config`` shows them and exits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from timm.optim import param_groups_weight_decay

import models
from engine_monitors import Monitors, encoder_features, with_transform
from engine_pretrain import train_one_epoch
from models.formats import encoder_record, load_checkpoint, plain_config
from models.registry import lookup, model_names, official_global_batch, setting_owners
from util.checkpoint import is_due
from util.config import (
    PARALLEL_GROUP,
    SHARED_GROUPS,
    KnnSettings,
    OnlineProbeSettings,
    OptimSettings,
    print_settings,
    resolve_run,
)
from util.datasets import build_dataset, build_loader, build_transform
from util.distributed import is_main_process, launch_world_size, print0
from util.errors import run_cli
from util.images import first_images, panels_image, save_panels
from util.parallel import full_state_dict, parallelize
from util.rng import forked_rng
from util.run import EpochResult, TrainingRun, start_process
from util.settings import Group, Layers, Settings, SettingsParser, setting
from util.train_loop import adamw

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
    run = resolve_run(argv, load_checkpoint, lambda chosen, ckpt, path: settings_parser(chosen["model"] or
                                                                                        PretrainSettings.model),
                      choose={"model": str})
    s = run.settings
    method, _ = lookup(s.model, "pretrain")
    method.model_class.check_settings(s.of(method.config_class), s.fsdp)
    return s, run.checkpoint, run.path


def main(argv: Sequence[str]) -> None:
    s, ckpt, ckpt_path = resolve_settings(argv)
    method, preset = lookup(s.model, "pretrain")
    print_settings(s, f"main_pretrain.py --model {s.model} ({method.name}: {preset.description})",
                   official_global_batch(s.model))
    if s.print_config:
        return
    config = s.of(method.config_class)
    dist_info = start_process(s, process_group=s.fsdp, trains=True)
    device = dist_info.device

    model = method.model_class(config).to(device)
    # before the optimiser sees the parameters
    print0(parallelize(model, dist_info, s.fsdp, s.grad_ckpt, s.amp, s.compile))
    transform = build_transform(config.input_size, True, s.crop_scale, s.crop_ratio, decode=s.decode)
    dataset = build_dataset(s.dataset, "train", transform, config.input_size, s.data_path, s.synthetic_size)
    loader = build_loader(dataset, s.batch_size, s.num_workers, is_train=True, seed=s.seed,
                          pin_memory=s.pin_mem and device.type == "cuda")
    print0(f"model {s.model}: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M parameters")
    optimizer = adamw(param_groups_weight_decay(model, s.weight_decay, no_weight_decay_list=model.no_weight_decay()),
                      lr=s.of(OptimSettings).peak_lr(launch_world_size()), betas=tuple(s.betas))
    monitors = None
    if Monitors.wanted(s.of(KnnSettings), s.of(OnlineProbeSettings)):  # on fixed training and validation images
        evaluation = build_transform(config.input_size, is_train=False, decode=s.decode)
        monitors = Monitors(s.of(KnnSettings), s.of(OnlineProbeSettings), encoder_features(model, s.amp, device),
                            with_transform(dataset, evaluation),
                            build_dataset(s.dataset, "val", evaluation, config.input_size, s.data_path,
                                          s.synthetic_size), len(dataset.classes), s.batch_size, s.num_workers)
    online_probe = monitors.online_probe if monitors else None
    run = TrainingRun(s, dist_info, model, optimizer, ckpt, ckpt_path,
                      describe=lambda: {**encoder_record(model.encoder, "encoder.", model.encoder_mask),
                                        "model_name": s.model, "model_config": plain_config(model.config)},
                      states={"online_probe": online_probe} if online_probe else {})

    def end_of_epoch(epoch: int, averages: dict) -> EpochResult:
        monitored = monitors.epoch_end(epoch) if monitors else {}
        files = {"encoder.pth": {"model": full_state_dict(model, "encoder."),
                                 **encoder_record(model.encoder, "", model.encoder_mask)}} \
            if s.save_encoder and is_due(epoch, s.epochs, s.save_freq) else {}
        if s.visualize_every and s.output_dir and (epoch + 1) % s.visualize_every == 0:
            # every rank runs it (a sharded forward is collective), on its own RNG stream: resuming stays exact
            model.eval()
            with forked_rng():
                panels = model.visualize(first_images(dataset, 8, device))
            model.train()
            if is_main_process():
                title = f"{s.model}, epoch {epoch}"
                save_panels(panels, os.path.join(s.output_dir, f"vis-{epoch}.png"), title)
                if run.log_writer is not None:
                    run.log_writer.add_image("visualize/panels", panels_image(panels, title), epoch, dataformats="HWC")
        return EpochResult(record=monitored, files=files,
                           scalars={f"monitor/{name}": value for name, value in monitored.items()})

    run.fit(loader, len(dataset), lambda net, epoch: train_one_epoch(net, epoch, online_probe), end_of_epoch)


if __name__ == "__main__":
    run_cli(main)
