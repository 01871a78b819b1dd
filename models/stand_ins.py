"""What tests and benchmarks run a model with when nothing trained is at hand: the CPU-sized presets, a random
teacher of the right shape for a method that needs one, and a randomly initialised checkpoint."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from models.formats import encoder_record, plain_config
from models.registry import MODELS, create_model, model_config, model_names
from util.checkpoint import save_atomic


def tiny_model_names(kind: str) -> list[str]:
    """The CPU-sized presets (``<key>_vit_tiny``) of ``kind``: what the tests and the benchmarks run by default."""
    return [n for n in model_names(kind) if n.endswith("_tiny")]


def stand_in_teacher(name: str, path: str) -> dict:
    """The settings overrides that run model ``name`` with a random teacher of the right shape (written to
    ``path``) if its method needs a teacher, else none."""
    method, _ = MODELS[name]
    return method.stand_in_teacher(model_config(name, method.kind), path) if method.needs_teacher else {}


def stand_in_model(name: str, kind: str = "pretrain") -> nn.Module:
    """Registered model ``name`` as its preset builds it, with a random teacher (in the temporary directory) where
    its method needs one: what a benchmark times."""
    return create_model(name, kind, **stand_in_teacher(name, os.path.join(tempfile.gettempdir(),
                                                                          f"{name}-stand-in-teacher.pth")))


def random_init_checkpoint(name: str, path: str, seed: int, **overrides) -> None:
    """A pretraining checkpoint of registered model ``name`` (its preset with ``overrides``) as initialised under
    torch's seed ``seed``, nothing trained (epoch -1): the record main_pretrain.py writes, which every script that
    takes an encoder reads."""
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    save_atomic({"model": model.state_dict(), **encoder_record(model.encoder, "encoder.", model.encoder_mask),
                 "model_name": name, "model_config": plain_config(model.config), "epoch": -1}, path)
