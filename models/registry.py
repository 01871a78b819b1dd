"""Registries that connect the method files to the entry scripts.

* Pretraining presets: ``register_pretrain(name, builder, recipe)``. Each method has one builder
  ``builder(preset_name, **flags)``; its keyword arguments are also command-line flags of ``main_pretrain.py``
  (added by the method's ``add_args``, default ``None`` = the preset's value), and ``build_pretrain_model``
  passes every such flag that is set.
* Official-checkpoint converters: ``register_converter(name, detect, convert)``; ``convert`` maps an
  official state dict to this project's pretraining-model state dict and returns the preset it fits.
"""
from __future__ import annotations

import argparse
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class PretrainEntry:
    builder: Callable[..., nn.Module]  # the method's builder with the preset name bound: keyword arguments only
    recipe: dict = field(default_factory=dict)  # defaults of main_pretrain flags for this method
    description: str = ""


PRETRAIN_MODELS: dict[str, PretrainEntry] = {}

# The tiny presets' recipe override: one CPU budget for every method on the digits (benchmarks/learning_evidence.py:
# the methods' own blr rule gives 20× smaller lrs than XTRA's absolute 1e-3 at batch 64, and their 30-40 warmup
# epochs would cover a whole CPU run).
TINY_CPU_BUDGET = dict(input_size=32, batch_size=64, epochs=30, warmup_epochs=3, lr=1e-3)


def register_pretrain(name: str, builder: Callable[..., nn.Module], recipe: dict, description: str = "") -> None:
    PRETRAIN_MODELS[name] = PretrainEntry(functools.partial(builder, name), dict(recipe), description)


def pretrain_entry(name: str) -> PretrainEntry:
    if name not in PRETRAIN_MODELS:
        raise ValueError(f"unknown pretraining model {name!r}; known: {', '.join(sorted(PRETRAIN_MODELS))}")
    return PRETRAIN_MODELS[name]


def build_pretrain_model(name: str, args: argparse.Namespace | dict) -> nn.Module:
    """Build a registered preset, overriding its keyword arguments with the matching flags that are set."""
    builder = pretrain_entry(name).builder
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    params = inspect.signature(builder).parameters
    return builder(**{k: v for k, v in values.items() if k in params and v is not None})


def matching_preset(builder: Callable[..., nn.Module], state_dict: dict, prefix: str = "") -> str | None:
    """The preset registered with ``builder`` whose tensors under ``prefix`` have exactly the names and shapes of
    ``state_dict``'s tensors under ``prefix`` (each preset built on the meta device), else None. Attention head
    counts do not show in shapes: the preset's are assumed."""
    wanted = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix)}
    for name, entry in PRETRAIN_MODELS.items():
        if entry.builder.func is builder:
            with torch.device("meta"):
                model = entry.builder()
            if {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)} == wanted:
                return name
    return None


@dataclass
class Converter:
    detect: Callable[[dict], bool]          # does this (prefix-stripped) state dict come from that method?
    convert: Callable[[dict], tuple[dict, str]]  # official state dict -> (our state dict, preset name)


CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str, detect: Callable[[dict], bool], convert: Callable[[dict], tuple[dict, str]]) -> None:
    CONVERTERS[name] = Converter(detect, convert)
