"""How a method plugs in, and the contract its pretraining model keeps with main_pretrain.py.

A method file declares a settings dataclass (fields = flags, defaults = the official recipe), a model class built
from one instance of it, its training recipe (defaults of the shared optimisation/data settings) and named
presets, then calls :func:`register_method` once. ``models/__init__.py`` imports every method file: adding a
method is one new file plus one import line there (docs/adding_a_method.md walks through models/mae.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn

from models.masks import EncoderMask
from models.vit import VisionTransformer, vit_config
from util.config import AugmentSettings, KnnSettings, MixupSettings, OnlineProbeSettings, shared_names
from util.errors import UserError


class PretrainingModel(nn.Module):
    """What main_pretrain.py and engine_pretrain.py rely on; every pretraining method subclasses it.

    * ``__init__(config)``: built from the method's settings dataclass and nothing else.
    * ``forward(imgs) -> (loss, metrics)``: the loss to minimise and named 0-d metrics (detached), which the
      engine logs to the progress line, ``log.txt`` (``train_<name>``) and tensorboard next to the loss.
    * ``encoder``: the :class:`VisionTransformer` that fine-tuning and probing keep.
    * ``encoder_mask``: the attention mask the encoder keeps downstream (``models.masks.EncoderMask``), or None
      for bidirectional use.
    * ``no_weight_decay()``: parameter names exempt from weight decay besides 1-D parameters and biases.
    * ``visualize(imgs)``: named image panels [B, 3, H, W] in normalised image space, for ``--visualize_every``.
    * ``check_settings(config, fsdp)``: refuse settings that cannot train (e.g. D-iGPT without a teacher), or
      cannot train sharded (``fsdp``), before anything is built or written.
    * ``transformer_blocks()``: the blocks that FSDP shards one by one and ``--grad_ckpt`` recomputes; each must run
      through its own ``forward`` (a hook or a checkpointed forward sees nothing of a block whose layers are
      called directly). The default: the elements of every ModuleList whose name ends in ``blocks``.
    * ``shard_units()``: large modules outside the blocks that FSDP shards on their own (each run through its own
      ``forward``), so that they are gathered only while they run, not with the root for the whole step. Default:
      none.
    """

    encoder: VisionTransformer
    encoder_mask: EncoderMask | None = None

    @classmethod
    def check_settings(cls, config, fsdp: bool = False) -> None:
        """Raise ValueError (one line) if a training run cannot start with ``config`` (sharded: ``fsdp``)."""

    def transformer_blocks(self) -> list[nn.Module]:
        """The elements of every ModuleList named ``*blocks`` (an encoder's, a decoder's, SAIM's ``query_blocks``),
        in module order, once each (a list shared by two names counts once)."""
        seen: dict[int, nn.Module] = {}
        for name, module in self.named_modules():
            if isinstance(module, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
                for blk in module:
                    seen.setdefault(id(blk), blk)
        return list(seen.values())

    def shard_units(self) -> list[nn.Module]:
        return []

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no visualisation")


@dataclass(frozen=True)
class Preset:
    """A named set of overrides: of the method's settings and of the shared training settings."""

    description: str
    settings: dict = field(default_factory=dict)
    global_batch: int | None = None  # images per optimiser update of the preset's own recipe; None: the method's


@dataclass(frozen=True)
class Method:
    key: str                                   # "xtra": also a model name (the official recipe, no preset)
    name: str                                  # "XTRA", for messages and docs
    kind: Literal["pretrain", "slimmable"]     # the entry script that trains it
    model_class: Callable[..., nn.Module]      # model_class(config)
    config_class: type                         # frozen dataclass: fields are flags, defaults the official recipe
    recipe: dict = field(default_factory=dict)  # defaults of the shared training settings
    presets: dict[str, Preset] = field(default_factory=dict)
    global_batch: int | None = None  # the official recipe's images per optimiser update, over all GPUs
    # A method that trains from a frozen teacher (its ``teacher`` setting) gives (config, path) -> the settings
    # overrides of a randomly initialised teacher of the right shape, written to ``path``: what benchmarks and
    # tests run it with when no trained teacher is at hand.
    stand_in_teacher: Callable[..., dict] | None = None
    # The memory table's models (benchmarks/memory.py): the B/16 and the H/14 size as (preset, overrides); without
    # an H/14 preset, the B/16 preset widened to H/14 by overrides (``VIT_H14``; shown with a trailing ``*``).
    memory_sizes: tuple[tuple[str, dict], ...] = ()

    def config_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_class)}

    @property
    def needs_teacher(self) -> bool:
        return self.stand_in_teacher is not None


# The tiny presets' training budget: one CPU budget for every method on the digits (benchmarks/learning_evidence.py:
# the methods' own blr rule gives 20× smaller lrs than XTRA's absolute 1e-3 at batch 64, and their 30-40 warmup
# epochs would cover a whole CPU run). The kNN monitor stays off: on the digits it would cost a third of an epoch's
# time (--knn_every 1 turns it on).
TINY_CPU_BUDGET = dict(input_size=32, batch_size=64, epochs=30, warmup_epochs=3, lr=1e-3, knn_every=0)
# The encoder of a B/16 preset made ViT-H/14, for the memory table of a method without an H/14 preset.
VIT_H14 = dict(vit_config("vit_huge_patch14"), input_size=224)

METHODS: dict[str, Method] = {}
MODELS: dict[str, tuple[Method, Preset]] = {}  # model name -> (method, preset)


def _training_names() -> set[str]:
    return shared_names() | {f.name for cls in (AugmentSettings, MixupSettings, KnnSettings, OnlineProbeSettings)
                             for f in dataclasses.fields(cls)}


def register_method(method: Method) -> None:
    """Register a method and its presets; a recipe or preset naming an unknown setting fails at import time."""
    known = method.config_names() | _training_names()
    for where, values in [("recipe", method.recipe)] + [(n, p.settings) for n, p in method.presets.items()]:
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"{method.name} {where}: unknown settings {sorted(unknown)}")
    METHODS[method.key] = method
    MODELS[method.key] = (method, Preset(f"{method.name} with its official defaults"))
    for name, preset in method.presets.items():
        if name in MODELS:
            raise TypeError(f"model name {name!r} registered twice")
        MODELS[name] = (method, preset)


def model_names(kind: str) -> list[str]:
    return sorted(n for n, (m, _) in MODELS.items() if m.kind == kind)


def lookup(name: str, kind: str) -> tuple[Method, Preset]:
    if name not in MODELS or MODELS[name][0].kind != kind:
        raise UserError(f"unknown {kind} model {name!r}; known: {', '.join(model_names(kind))}")
    return MODELS[name]


def official_global_batch(name: str) -> int | None:
    """The global batch the recipe of model ``name`` was defined with (its preset's, else its method's)."""
    method, preset = MODELS[name]
    return preset.global_batch or method.global_batch


def split_settings(method: Method, values: dict) -> tuple[dict, dict]:
    """(the method's own settings, the training settings) of a preset or recipe."""
    own = method.config_names()
    return {k: v for k, v in values.items() if k in own}, {k: v for k, v in values.items() if k not in own}


def model_config(name: str, kind: str = "pretrain", **overrides):
    """The settings dataclass of a model name with ``overrides``; an unknown keyword is a ValueError that names
    it (as timm's create_model refuses unknown arguments)."""
    method, preset = lookup(name, kind)
    unknown = set(overrides) - method.config_names()
    if unknown:
        raise ValueError(f"{sorted(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of "
                         f"{name} ({method.name}); its settings: {', '.join(sorted(method.config_names()))}")
    own, _ = split_settings(method, preset.settings)
    return method.config_class(**{**own, **overrides})


def create_model(name: str, kind: str = "pretrain", **overrides) -> nn.Module:
    """Build a registered model: its preset's settings with ``overrides`` (see :func:`model_config`)."""
    return lookup(name, kind)[0].model_class(model_config(name, kind, **overrides))


def setting_owners(flag: str) -> list[str]:
    """Names of the methods whose settings include ``flag`` (for the error on a foreign flag)."""
    return sorted({m.name for m in METHODS.values() if flag in m.config_names()})
