"""Typed settings: every flag is declared once, as a field of a frozen dataclass (type, default, help).

A run's settings are resolved once at start, in this order of precedence: the dataclass defaults (the official
recipe) < the method's recipe < the preset < the checkpoint being resumed < the command line. The result is a
read-only :class:`Settings`; functions take explicit parameters and never write into it.

* :func:`setting` declares a field with its help text.
* :class:`SettingsParser` turns groups of such dataclasses into an ``argparse`` parser whose ``--help`` shows the
  real defaults, refuses unknown flags with one line that names them (and the method they belong to, if any),
  and returns only what the command line set.
* :func:`resolve` merges the layers, validates each group (``__post_init__``) and records where each value came
  from, for :meth:`Settings.table`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from util.lr_sched import Schedule


class SettingsError(ValueError):
    """A setting that cannot be used; the message is the one ``error:`` line the user sees."""


def setting(default: Any, help: str) -> Any:  # noqa: A002  (argparse's word)
    """A dataclass field with its help text (tuples and other defaults are copied per instance)."""
    return dataclasses.field(default=default, metadata={"help": help})


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def field_help(cls: type, name: str) -> str:
    """Help text of a field, looked up through the base classes (a subclass may redeclare only the default)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _value_parser(tp: Any) -> tuple[Callable[[str], Any], dict]:
    """(function that parses one command-line word, extra argparse kwargs) for a field type."""
    tp, optional = _unwrap_optional(tp)
    extra: dict = {}
    origin = typing.get_origin(tp)
    if tp is bool:
        parse: Callable[[str], Any] = str2bool
        extra = dict(nargs="?", const=True, metavar="{true,false}")
    elif origin is Literal:
        choices = typing.get_args(tp)
        parse, extra = type(choices[0]), dict(choices=choices)
    elif origin is tuple:
        items = typing.get_args(tp)
        parse = items[0]
        extra = dict(nargs="+" if items[-1] is Ellipsis else len(items))
    elif tp in (int, float, str):
        parse = tp
    else:
        raise TypeError(f"unsupported setting type {tp!r}")
    if optional:  # 'none' on the command line gives None (e.g. --clip_grad none turns a recipe's clipping off)
        inner = parse

        def parse(word: str, inner=inner):
            return None if word.lower() == "none" else inner(word)

        parse.__name__ = getattr(inner, "__name__", "value")
    return parse, extra


def coerce(value: Any, tp: Any) -> Any:
    """A stored value (JSON / checkpoint: lists where tuples were) as the field's type."""
    tp, _ = _unwrap_optional(tp)
    if value is not None and typing.get_origin(tp) is tuple:
        return tuple(value)
    return value


@dataclass(frozen=True)
class Group:
    """One dataclass of settings, shown under ``title`` in ``--help``."""

    title: str
    cls: type

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.cls)]

    def default(self, name: str) -> Any:
        f = self.cls.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


Layers = Sequence[tuple[str, dict]]  # (where the values come from, {setting: value}), lowest precedence first


def layered_defaults(groups: Sequence[Group], layers: Layers) -> tuple[dict[str, Any], dict[str, str]]:
    """Every setting's value after applying ``layers`` over the dataclass defaults, and where each came from.
    Keys that no group declares are skipped (a checkpoint also stores other scripts' settings)."""
    values, sources = {}, {}
    for g in groups:
        hints = typing.get_type_hints(g.cls)
        for n in g.names():
            values[n], sources[n] = g.default(n), "default"
            for layer, given in layers:
                if n in given:
                    values[n], sources[n] = coerce(given[n], hints[n]), layer
    return values, sources


class OneLineParser(argparse.ArgumentParser):
    """argparse, but every mistake is a SettingsError (one ``error:`` line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(message)


class SettingsParser:
    """The command line of one entry script (for one model): a flag per field of every group."""

    def __init__(self, prog: str, description: str, groups: Sequence[Group], base_layers: Layers = (),
                 subject: str = "", help_command: str = "", owner_of: Callable[[str], list[str]] = lambda name: []):
        """``base_layers``: the recipe and preset values, shown as the defaults in ``--help``; ``subject`` and
        ``help_command`` name what the flags configure and how to list them, for the error on a foreign flag."""
        self.prog, self.groups, self.subject, self.owner_of = prog, list(groups), subject or prog, owner_of
        self.help_command = help_command or f"{prog} --help"
        seen: dict[str, str] = {}
        for g in self.groups:
            for name in g.names():
                if name in seen:  # one home per flag: two groups may not declare the same setting
                    raise TypeError(f"setting {name!r} is declared by both {seen[name]} and {g.cls.__name__}")
                seen[name] = g.cls.__name__
        self.defaults, _ = layered_defaults(self.groups, base_layers)
        self.parser = self._build(description, self.defaults)  # --help shows the resolved defaults
        self._given_parser = self._build(description, None)     # parses what the command line gives, nothing else

    def _build(self, description: str, defaults: dict | None) -> OneLineParser:
        parser = OneLineParser(prog=self.prog, description=description, allow_abbrev=False,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for g in self.groups:
            hints = typing.get_type_hints(g.cls)
            arg_group = parser.add_argument_group(g.title)
            for f in dataclasses.fields(g.cls):
                parse, extra = _value_parser(hints[f.name])
                default = defaults[f.name] if defaults is not None else argparse.SUPPRESS
                arg_group.add_argument(f"--{f.name}", type=parse, default=default,
                                       help=field_help(g.cls, f.name) or " ", **extra)
        return parser

    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names()]

    def format_help(self) -> str:
        return self.parser.format_help()

    def parse(self, argv: Sequence[str]) -> dict:
        """The settings the command line gives explicitly ({} for none). ``-h`` prints the help and exits 0."""
        if any(a in ("-h", "--help") for a in argv):
            self.parser.print_help()
            raise SystemExit(0)
        given, rest = self._given_parser.parse_known_args(list(argv))
        if rest:
            raise SettingsError(self.unknown_message(rest))
        return vars(given)

    def unknown_message(self, rest: list[str]) -> str:
        flags = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
        if not flags:
            return f"unexpected argument(s) {' '.join(rest)} (every setting is a --flag)"
        described = []
        for flag in flags:
            owners = self.owner_of(flag.lstrip("-"))
            described.append(f"{flag} (a setting of {' and '.join(owners)})" if owners else flag)
        verb = "is not a setting" if len(flags) == 1 else "are not settings"
        return f"{', '.join(described)} {verb} of {self.subject}; see {self.help_command}"


class Settings:
    """The resolved settings of a run: one frozen dataclass instance per group, read as flat attributes.

    ``settings.epochs`` reads a value, ``settings.of(XTRAConfig)`` returns a group's typed instance; nothing can be
    assigned (``AttributeError``)."""

    __slots__ = ("_groups", "_sources")

    def __init__(self, groups: dict[type, Any], sources: dict[str, str]):
        object.__setattr__(self, "_groups", dict(groups))
        object.__setattr__(self, "_sources", dict(sources))

    def __getattr__(self, name: str) -> Any:
        """A setting, or a method of the group that declares it (e.g. ``schedule``)."""
        for instance in self._groups.values():
            if name in instance.__dataclass_fields__:
                return getattr(instance, name)
        for instance in self._groups.values():
            if not name.startswith("_") and hasattr(instance, name):
                return getattr(instance, name)
        raise AttributeError(f"no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only once resolved (tried to set {name!r})")

    def of(self, cls: type) -> Any:
        return self._groups[cls]

    def as_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as stored in args.json and in checkpoints."""
        out: dict[str, Any] = {}
        for instance in self._groups.values():
            out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(instance).items()})
        return out

    def source(self, name: str) -> str:
        return self._sources.get(name, "default")

    def table(self) -> str:
        """One line per setting: name, value and where it came from (unless it is the dataclass default)."""
        values = self.as_dict()
        width = max(map(len, values))
        lines = []
        for name, value in values.items():
            src = self.source(name)
            lines.append(f"  {name:<{width}} = {value!r}" + (f"   [{src}]" if src != "default" else ""))
        return "\n".join(lines)


def resolve(groups: Sequence[Group], layers: Layers) -> Settings:
    """Merge ``layers`` over the dataclass defaults (later layers win) and build each group, whose
    ``__post_init__`` validates; its ValueError becomes a SettingsError."""
    values, sources = layered_defaults(groups, layers)
    instances = {}
    for g in groups:
        try:
            instances[g.cls] = g.cls(**{n: values[n] for n in g.names()})
        except ValueError as e:
            raise SettingsError(str(e)) from None
    if ParallelSettings in instances and OptimSettings in instances:
        try:
            instances[ParallelSettings].check(instances[OptimSettings])
        except ValueError as e:
            raise SettingsError(str(e)) from None
    return Settings(instances, sources)


def peek(argv: Sequence[str], name: str, default: Any = None) -> Any:
    """The raw value of ``--name`` on the command line (last occurrence, ``--name value`` or ``--name=value``; a
    bare boolean flag gives True), before the full parser exists: it decides which parser to build."""
    value = default
    for i, word in enumerate(argv):
        if word == f"--{name}":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = True if nxt is None or nxt.startswith("--") else nxt
        elif word.startswith(f"--{name}="):
            value = word.split("=", 1)[1]
    if isinstance(value, str) and isinstance(default, bool):
        try:
            return str2bool(value)
        except argparse.ArgumentTypeError as e:
            raise SettingsError(f"--{name}: {e}") from None
    return value


def peek_int(argv: Sequence[str], name: str) -> int | None:
    """``--name`` as an integer (None when absent), for settings needed before the parser exists."""
    value = peek(argv, name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"argument --{name}: invalid int value: {value!r}") from None


def resumed_model(argv: Sequence[str], stored: dict, path: str, default: str) -> str:
    """``--model``, else the model of the run being resumed from ``path`` (``stored``: its settings), else
    ``default``. A ``--model`` other than the resumed run's is refused."""
    model = peek(argv, "model")
    if stored.get("model") and model and model != stored["model"]:
        raise SettingsError(f"{path} is a checkpoint of {stored['model']}, not {model}: use another --output_dir "
                            "or --auto_resume false")
    return model or stored.get("model") or default


def resolve_run(argv: Sequence[str], parser: SettingsParser, base_layers: Layers, stored: dict | None) -> Settings:
    """A run's settings: the parser's groups, ``base_layers`` (recipe, preset), the settings a resumed checkpoint
    stored (``stored``, minus RUN_LOCAL), then the command line. An explicit --blr beats an absolute lr from any
    earlier layer."""
    given = parser.parse(argv)
    if "blr" in given and "lr" not in given and "lr" in parser.names():
        given["lr"] = None
    return resolve(parser.groups, [*base_layers, checkpoint_layer(stored), ("command line", given)])


def is_main_launch() -> bool:
    """Rank 0 of a torchrun launch, or a plain process (the process group does not exist yet at resolution)."""
    return os.environ.get("RANK", "0") == "0"


def print_resolved(settings: Settings, header: str) -> None:
    if is_main_launch():
        print(f"{header}\n{settings.table()}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Settings shared by the entry scripts (each declared here once)
@dataclass(frozen=True)
class OptimSettings:
    batch_size: int = setting(64, "per-process batch size")
    epochs: int = setting(100, "training epochs")
    accum_iter: int = setting(1, "gradient accumulation micro-steps per optimiser update")
    lr: float | None = setting(None, "absolute peak lr; none: blr × effective batch / 256")
    blr: float = setting(1e-3, "base lr, scaled by the effective batch (batch_size × accum_iter × ranks) / 256")
    min_lr: float = setting(0.0, "floor of the half-cycle cosine")
    warmup_epochs: float = setting(5.0, "linear warmup length in epochs")
    warmup_lr: float | None = setting(0.0, "lr at the start of warmup; none: a tenth of the peak lr")
    weight_decay: float = setting(0.05, "AdamW weight decay (1-D parameters and biases are exempt)")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = setting(None, "max gradient norm; none: no clipping (the norm is logged either way)")
    amp: Literal["auto", "bf16", "fp16", "off"] = setting(
        "auto", "mixed precision (a GradScaler only for fp16); auto: bf16 on CUDA, off elsewhere")
    compile: bool = setting(False, "torch.compile the model")

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "accum_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("lr", "blr", "min_lr", "weight_decay"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name} must be >= 0, got {v}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip_grad must be positive (or none), got {self.clip_grad}")

    def peak_lr(self, world_size: int) -> float:
        """--lr, or the MAE rule blr × batch_size × accum_iter × world_size / 256."""
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter * world_size / 256

    def schedule(self, world_size: int) -> Schedule:
        lr = self.peak_lr(world_size)
        return Schedule(lr=lr, min_lr=self.min_lr, warmup_lr=lr / 10 if self.warmup_lr is None else self.warmup_lr,
                        warmup_epochs=self.warmup_epochs, epochs=self.epochs)

    def describe_lr(self, world_size: int) -> str:
        batch = self.batch_size * self.accum_iter * world_size
        how = ("absolute" if self.lr is not None else
               f"blr {self.blr:.3e} × effective batch {batch} / 256")
        return (f"lr {self.peak_lr(world_size):.3e} ({how}; effective batch {batch} = {self.batch_size} × accum "
                f"{self.accum_iter} × {world_size} ranks)")


@dataclass(frozen=True)
class DataSettings:
    dataset: Literal["imagefolder", "digits", "synthetic"] = setting(
        "imagefolder", "imagefolder: --data_path/{train,val}; digits: scikit-learn's 8×8 digits upsampled "
                       "(offline); synthetic: random tensors (throughput)")
    data_path: str = setting("", "ImageFolder root with train/ and val/")
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    crop_pct: float | None = setting(None, "evaluation centre-crop fraction; none: timm's 0.875")
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
    print_freq: int = setting(20, "progress line every N steps")
    dist_url: str = setting("env://", "process-group initialisation URL")
    print_config: bool = setting(False, "print the resolved settings and exit without touching data or output_dir")

    def __post_init__(self) -> None:
        for name in ("save_freq", "print_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.keep_last < 0:
            raise ValueError(f"--keep_last must be >= 0, got {self.keep_last}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available here (use --device cpu or auto)")
        for name in ("output_dir", "log_dir"):
            check_writable_dir(getattr(self, name), f"--{name}")


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

    def check(self, optim: OptimSettings) -> None:
        if self.fsdp and optim.compile:
            raise ValueError("--fsdp with --compile is not supported here; use one of them")
        if self.fsdp and optim.amp == "fp16":
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


SHARED_GROUPS = (Group("optimisation", OptimSettings), Group("data", DataSettings), Group("run", RunSettings))
PARALLEL_GROUP = Group("memory and sharding", ParallelSettings)  # the scripts that train a whole model

# Settings that describe this invocation, not the run: never taken from a resumed checkpoint.
RUN_LOCAL = frozenset({"output_dir", "log_dir", "device", "resume", "auto_resume", "num_workers", "pin_mem",
                       "print_freq", "dist_url", "print_config", "eval", "fsdp", "grad_ckpt"})


def checkpoint_layer(stored: dict | None) -> tuple[str, dict]:
    """The settings a resumed checkpoint stored, minus those that belong to this invocation (RUN_LOCAL)."""
    return "checkpoint", {k: v for k, v in (stored or {}).items() if k not in RUN_LOCAL}


def shared_names() -> set[str]:
    return {n for g in SHARED_GROUPS for n in g.names()}
