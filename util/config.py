"""What the settings are: the groups shared by the entry scripts (each flag declared here once), the settings that
belong to one invocation rather than to the run, and how a run's settings resolve.

A run's settings are resolved once at start, in this order of precedence: the dataclass defaults (the official
recipe) < the method's recipe < the preset < the checkpoint being resumed < the command line. The result is a
read-only :class:`util.settings.Settings`; functions take explicit parameters and never write into it. The
machinery (flags from dataclasses, layers, provenance) is ``util.settings``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from util.checkpoint import resume_path
from util.distributed import is_main_process, launch_world_size
from util.lr_sched import Schedule
from util.settings import (
    Group,
    Layers,
    Settings,
    SettingsError,
    SettingsParser,
    command_line_layers,
    preparse,
    print_resolved,
    resolve,
    setting,
)


@dataclass(frozen=True)
class Resolved:
    """A command line, resolved: the run's settings, the checkpoint it continues (normalised; None for a fresh run)
    and that checkpoint's path."""

    settings: Settings
    checkpoint: dict | None
    path: str


def resolve_run(argv: Sequence[str], load_checkpoint: Callable[..., dict],
                parser_for: Callable[[dict, dict | None, str], tuple[SettingsParser, Layers]],
                choose: dict[str, type] | None = None) -> Resolved:
    """A training script's command line, resolved in one call, before anything is built:

    1. the checkpoint the run continues: --resume, else --output_dir's last one under --auto_resume, read with
       ``load_checkpoint(path, num_heads, weights=False)`` (a sharded one's tensors stay on disk);
    2. the settings named in ``choose`` (name -> type), which pick the script's parser (--model, --probe) or the
       files it reads first (--finetune): the command line's, else the resumed run's; one that contradicts the
       resumed run's is refused (an output directory holds one run);
    3. ``parser_for(chosen, checkpoint, its path)``: the script's parser and the layers under the checkpoint's (the
       recipe, the preset, what a --finetune checkpoint fixes);
    4. those layers, the checkpoint's stored settings (minus those of the invocation, RUN_LOCAL), what the command
       line implies, and the command line, each value with its source (--print_config).
    A converted official checkpoint may not record every setting its model needs (``unrecorded``): those must come
    from the command line."""
    given = preparse(argv, **{"resume": str, "output_dir": str, "auto_resume": bool, "num_heads": int,
                              **(choose or {})})
    run = RunSettings()
    path = resume_path(given["resume"] or run.resume,
                       run.output_dir if given["output_dir"] is None else given["output_dir"],
                       run.auto_resume if given["auto_resume"] is None else given["auto_resume"])
    ckpt = load_checkpoint(path, given["num_heads"], weights=False) if path else None
    stored = (ckpt or {}).get("args") or {}
    unrecorded = (ckpt or {}).get("unrecorded", [])
    missing = [name for name, value in preparse(argv, **dict.fromkeys(unrecorded, str)).items() if value is None]
    if missing:  # an official file: settings its shapes do not show and it does not record
        raise SettingsError(f"{path} does not record {', '.join(missing)}: give --{' --'.join(missing)}")
    chosen = {}
    for name in choose or {}:
        if stored.get(name) is not None and given[name] is not None and given[name] != stored[name]:
            raise SettingsError(f"{path} is a checkpoint of {stored[name]}, not {given[name]} (--{name}): use "
                                "another --output_dir or --auto_resume false")
        chosen[name] = given[name] if given[name] is not None else stored.get(name)
    parser, layers = parser_for(chosen, ckpt, path)
    settings = resolve(parser.groups, [*layers, checkpoint_layer(stored), *command_line_layers(argv, parser)])
    return Resolved(settings, ckpt, path)


# ---------------------------------------------------------------------------------------------------
# Settings shared by the entry scripts (each declared here once)
@dataclass(frozen=True)
class OptimSettings:
    batch_size: int = setting(64, "per-process batch size")
    epochs: int = setting(100, "training epochs")
    accum_iter: int = setting(1, "gradient accumulation micro-steps per optimiser update")
    global_batch: int | None = setting(None, "images per optimiser update over all ranks; sets accum_iter = "
                                             "global_batch / (ranks × batch_size) at start; none: --accum_iter")
    lr: float | None = setting(None, "absolute peak lr; none: blr × global batch / 256")
    blr: float = setting(1e-3, "base lr, scaled by the global batch (batch_size × accum_iter × ranks) / 256")
    min_lr: float = setting(0.0, "floor of the half-cycle cosine")
    warmup_epochs: float = setting(5.0, "linear warmup length in epochs")
    warmup_lr: float | None = setting(0.0, "lr at the start of warmup; none: a tenth of the peak lr")
    weight_decay: float = setting(0.05, "AdamW weight decay (1-D parameters and biases are exempt)")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = setting(None, "max gradient norm; none: no clipping (the norm is logged either way)")
    amp: Literal["auto", "bf16", "fp16", "off"] = setting(
        "auto", "mixed precision (a GradScaler only for fp16); auto: bf16 on CUDA, off elsewhere")
    tf32: bool = setting(True, "CUDA: float32 matmuls and convolutions in TF32 (10-bit mantissa, the tensor cores); "
                               "false: IEEE float32. No effect on the CPU")
    compile: bool = setting(False, "torch.compile the model")

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "accum_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"--global_batch must be at least 1 (or none), got {self.global_batch}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("lr", "blr", "min_lr", "weight_decay"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name} must be >= 0, got {v}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip_grad must be positive (or none), got {self.clip_grad}")

    @staticmethod
    def implied(given: dict) -> tuple[str, dict]:
        """An explicit --blr beats an absolute lr from any earlier layer (recipe, preset, checkpoint)."""
        return "--blr on the command line", ({"lr": None} if "blr" in given and "lr" not in given else {})

    def peak_lr(self, world_size: int) -> float:
        """--lr, or the MAE rule blr × batch_size × accum_iter × world_size / 256."""
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter * world_size / 256

    def schedule(self, world_size: int, lr: float | None = None) -> Schedule:
        """The run's lr schedule; ``lr``: another peak (a head of an lr sweep) under the same warmup rule and floor."""
        lr = self.peak_lr(world_size) if lr is None else lr
        return Schedule(lr=lr, min_lr=self.min_lr, warmup_lr=lr / 10 if self.warmup_lr is None else self.warmup_lr,
                        warmup_epochs=self.warmup_epochs, epochs=self.epochs)

    def describe_batch(self, world_size: int, official: int | None) -> str:
        """The run's global batch and lr, and how they compare with the recipe's ``official`` global batch."""
        per_step = self.batch_size * world_size  # one micro-step of every rank
        batch = per_step * self.accum_iter
        how = "absolute" if self.lr is not None else f"blr {self.blr:.3e} × {batch} / 256"
        text = (f"global batch {batch} = {self.batch_size} per rank × accum_iter {self.accum_iter} × {world_size} "
                f"ranks; lr {self.peak_lr(world_size):.3e} ({how})")
        if official is not None and batch != official:
            text += (f"\nnote: the recipe's global batch is {official}, this run's is {batch}; " +
                     ("the lr is absolute and was not rescaled (give --lr to change it)" if self.lr is not None else
                      "the lr follows the global batch (blr rule)") +
                     (f"; --global_batch {official} sets accum_iter {official // per_step} to match it"
                      if official % per_step == 0 else
                      f"; no accum_iter reaches it at {self.batch_size} per rank × {world_size} ranks"))
        return text


Decode = Literal["fast", "pil", "gpu"]


@dataclass(frozen=True)
class DataSettings:
    dataset: Literal["imagefolder", "digits", "synthetic"] = setting(
        "imagefolder", "imagefolder: --data_path/{train,val}; digits: scikit-learn's 8×8 digits upsampled "
                       "(offline); synthetic: random tensors (throughput)")
    data_path: str = setting("", "ImageFolder root with train/ and val/")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    crop_pct: float | None = setting(None, "evaluation centre-crop fraction; none: timm's 0.875")
    decode: Decode = setting(
        "fast", "how the crop-only transforms (pretraining, evaluation, the linear probe, kNN) read images. fast: "
                "JPEGs decoded by torchvision's decode_jpeg and cropped as uint8 tensors in the loader workers; gpu: "
                "training JPEGs decoded and cropped on the GPU, a batch at a time; pil: PIL decoding and transforms. "
                "The same crops on all three; other formats, CMYK JPEGs and the digits go through PIL")
    num_workers: int = setting(4, "data-loading worker processes")
    pin_mem: bool = setting(True, "pin host memory (CUDA only)")
    synthetic_size: int = setting(1024, "images per split of --dataset synthetic")
    max_unreadable: float = setting(0.01, "fraction of the training images that may be unreadable (each is "
                                          "logged and replaced by the next readable one) before the run stops; "
                                          "0 = stop at the first")

    def __post_init__(self) -> None:
        if not 0 <= self.max_unreadable <= 1:
            raise ValueError(f"--max_unreadable is a fraction in [0, 1], got {self.max_unreadable}")


@dataclass(frozen=True)
class RunSettings:
    output_dir: str = setting("./output_dir", "checkpoints, log.txt and args.json ('' = write nothing)")
    log_dir: str | None = setting(None, "tensorboard directory; none: output_dir; '' = off")
    device: str = setting("auto", "cpu, cuda or auto (cuda when available)")
    seed: int = setting(0, "random seed (each rank adds its rank)")
    resume: str = setting("", "checkpoint to continue from (model, optimiser, epoch, RNG, settings)")
    auto_resume: bool = setting(True, "continue from output_dir's last checkpoint when there is one: "
                                       "checkpoint-last.pth, or checkpoint-last.json of a sharded (--fsdp) run "
                                       "(the newer if both exist)")
    save_freq: int = setting(20, "also keep checkpoint-<epoch>.pth every N epochs (and at the last epoch)")
    keep_last: int = setting(0, "keep only the K newest numbered checkpoints (0 = all)")
    save_every_minutes: float = setting(30.0, "also commit a resumable checkpoint inside an epoch once M minutes "
                                              "have passed since the last commit (it replaces the previous one; 0 = "
                                              "at epoch ends only)")
    print_freq: int = setting(20, "progress line every N steps")
    dist_url: str = setting("env://", "process-group initialisation URL")
    dist_timeout: float = setting(30.0, "minutes a collective waits for the other ranks (a hung or dead rank) before "
                                        "the run fails")
    deterministic: bool = setting(False, "deterministic kernels (torch.use_deterministic_algorithms, cuDNN "
                                         "deterministic and not benchmarking, a fixed cuBLAS workspace): what an exact "
                                         "resume on a GPU needs; slower")
    print_config: bool = setting(False, "print the resolved settings and exit without touching data or output_dir")

    def __post_init__(self) -> None:
        for name in ("save_freq", "print_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.keep_last < 0:
            raise ValueError(f"--keep_last must be >= 0, got {self.keep_last}")
        if self.save_every_minutes < 0:
            raise ValueError(f"--save_every_minutes must be >= 0, got {self.save_every_minutes}")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist_timeout must be > 0 minutes, got {self.dist_timeout}")


@dataclass(frozen=True)
class KnnVoteSettings:
    """DINO's weighted kNN vote (engine_monitors.knn_accuracies): the kNN monitor's and main_linprobe.py's
    --probe knn."""

    knn_temperature: float = setting(0.07, "temperature T of the votes' weights exp(similarity / T) (DINO: 0.07)")

    def __post_init__(self) -> None:
        if self.knn_temperature <= 0:
            raise ValueError(f"--knn_temperature must be > 0, got {self.knn_temperature}")


@dataclass(frozen=True)
class KnnSettings(KnnVoteSettings):
    """The kNN monitor of a training run (engine_monitors.py)."""

    knn_every: int = setting(1, "kNN top-1 on the validation images every N epochs, logged as knn_acc1 (0 = off)")
    knn_k: int = setting(20, "neighbours that vote (DINO: 20)")
    knn_train_images: int = setting(10000, "memory bank: at most this many training images (a fixed subset, "
                                           "evaluation transform)")
    knn_val_images: int = setting(10000, "queries: at most this many validation images (a fixed subset)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("knn_every", "knn_train_images", "knn_val_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.knn_k < 1:
            raise ValueError(f"--knn_k must be >= 1, got {self.knn_k}")


@dataclass(frozen=True)
class OnlineProbeSettings:
    """The online linear probe of a pretraining run (engine_monitors.py)."""

    online_probe: bool = setting(False, "train a linear probe on the detached features of every training batch, "
                                        "logged as online_probe_acc1 on the validation images each epoch")
    online_probe_lr: float = setting(1e-3, "AdamW learning rate of the online probe (no weight decay)")

    def __post_init__(self) -> None:
        if self.online_probe_lr <= 0:
            raise ValueError(f"--online_probe_lr must be > 0, got {self.online_probe_lr}")


def derive_accum_iter(settings: Settings) -> tuple[str, dict]:
    """--global_batch N: the accum_iter that makes N images per update with --batch_size on the launched ranks."""
    optim = settings.of(OptimSettings)
    if optim.global_batch is None:
        return "--global_batch", {}
    world = launch_world_size()
    per_step = optim.batch_size * world
    if optim.global_batch % per_step:
        below = optim.global_batch // per_step * per_step
        nearest = " and ".join(str(v) for v in (below, below + per_step) if v > 0)
        raise ValueError(f"--global_batch {optim.global_batch} is not a multiple of {optim.batch_size} per rank × "
                         f"{world} ranks = {per_step}: the nearest valid values are {nearest} (or change --batch_size)")
    accum = optim.global_batch // per_step
    if settings.source("accum_iter") == "command line" and optim.accum_iter != accum:
        raise ValueError(f"--accum_iter {optim.accum_iter} contradicts --global_batch {optim.global_batch} (which "
                         f"needs accum_iter {accum} at {optim.batch_size} per rank × {world} ranks): give one of them")
    return "--global_batch", {"accum_iter": accum}


def print_settings(settings: Settings, header: str, official_global_batch: int | None) -> None:
    """The resolved settings, then how the global batch and lr come about (on the first process of a launch)."""
    print_resolved(settings, header)
    if is_main_process():
        print(settings.of(OptimSettings).describe_batch(launch_world_size(), official_global_batch), flush=True)


def check_run_environment(settings: Settings) -> None:
    """What this machine must offer the run: the device, and output directories it may create or write into."""
    run = settings.of(RunSettings)
    if run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {run.device}: CUDA is not available here (use --device cpu or auto)")
    if settings.of(DataSettings).decode == "gpu" and (run.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("--decode gpu decodes on the run's GPU, and this run has none (use --decode fast)")
    for name in ("output_dir", "log_dir"):
        check_writable_dir(getattr(run, name), f"--{name}")


@dataclass(frozen=True)
class AugmentSettings:
    """timm's supervised training augmentation (fine-tuning, Scala, the attentive probe)."""

    aa: str = setting("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('none' = off)")
    color_jitter: float | None = setting(None, "colour jitter strength, used only when --aa is off; none: no jitter")
    reprob: float = setting(0.25, "random-erasing probability")
    remode: Literal["pixel", "rand", "const"] = setting("pixel", "random-erasing fill")
    recount: int = setting(1, "random-erasing boxes per image")


@dataclass(frozen=True)
class MixupSettings:
    smoothing: float = setting(0.1, "label smoothing")
    mixup: float = setting(0.0, "mixup alpha (recipe: 0.8)")
    cutmix: float = setting(0.0, "cutmix alpha (recipe: 1.0)")
    cutmix_minmax: tuple[float, float] | None = setting(None, "cutmix box-size range (overrides --cutmix); none: "
                                                              "from --cutmix")
    mixup_prob: float = setting(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: Literal["batch", "pair", "elem"] = setting("batch", "how mixing parameters are drawn")

    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class ParallelSettings:
    """How training spreads over the ranks and trades compute for memory (docs/training.md, "Memory")."""

    fsdp: bool = setting(False, "shard parameters, gradients and optimiser state over the ranks (FSDP2) instead of "
                                "a full copy on each (DDP); checkpoints become sharded directories")
    grad_ckpt: bool = setting(False, "activation checkpointing: each transformer block recomputes its activations "
                                     "in the backward pass instead of storing them")


def check_parallel(settings: Settings) -> None:
    """What sharding cannot be combined with."""
    parallel, optim = settings.of(ParallelSettings), settings.of(OptimSettings)
    if parallel.fsdp and optim.amp == "fp16":
        raise ValueError("--fsdp supports --amp bf16, auto or off (fp16 needs a gradient scaler for sharded "
                         "gradients, which this project does not use)")


def check_writable_dir(path: str | None, what: str) -> None:
    """A directory this run may create or write into (checked before anything is written; '' / None: none)."""
    if not path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {existing} is not writable")


SHARED_GROUPS = (Group("optimisation", OptimSettings, implied=OptimSettings.implied,
                       derive=derive_accum_iter),
                 Group("data", DataSettings), Group("run", RunSettings, check=check_run_environment))
# the scripts that train a whole model
PARALLEL_GROUP = Group("memory and sharding", ParallelSettings, check=check_parallel)

# Settings that describe this invocation, not the run: never taken from a resumed checkpoint.
RUN_LOCAL = frozenset({"output_dir", "log_dir", "device", "resume", "auto_resume", "num_workers", "pin_mem",
                       "print_freq", "dist_url", "dist_timeout", "deterministic", "print_config", "eval", "fsdp",
                       "grad_ckpt", "save_every_minutes"})


def checkpoint_layer(stored: dict | None) -> tuple[str, dict]:
    """The settings a resumed checkpoint stored, minus those that belong to this invocation (RUN_LOCAL). A checkpoint
    without --decode read its images with PIL: it resumes on that path."""
    values = {k: v for k, v in (stored or {}).items() if k not in RUN_LOCAL}
    return "checkpoint", {"decode": "pil", **values} if stored else values


def shared_names() -> set[str]:
    return {n for g in SHARED_GROUPS for n in g.names()}
