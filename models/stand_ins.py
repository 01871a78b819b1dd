"""What tests and benchmarks run a model with when nothing trained is at hand: the CPU-sized presets, and a random
teacher of the right shape for a method that needs one."""
from __future__ import annotations

import os
import tempfile

import torch.nn as nn

from models.registry import MODELS, create_model, model_config, model_names


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
