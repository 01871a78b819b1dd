"""The registry of official-checkpoint converters: each method file registers how to recognise its official files
and bring them to this project's layout (models.formats calls them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal


@dataclass
class Converted:
    """An official checkpoint in this project's layout.

    ``kind``: 'pretrain' (the method's whole pretraining model), 'encoder' (its encoder alone, VisionTransformer
    keys), 'classifier' (a ViT classifier, VisionTransformer keys), 'probe' (a probe of main_linprobe.py:
    ``backbone.*`` + ``head.*``) or 'slimmable' (Scala). ``settings``: the method's settings the file fixes (tensor
    shapes, recorded hyper-parameters); the encoder's head count is left to ``models.formats``. ``placeholders``:
    settings the whole model needs but the file does not fix (e.g. decoder head counts), with values that only
    serve to build it on the meta device; they must be given to rebuild the whole model. ``probe``: the probe
    settings of a probe file."""

    state_dict: dict
    kind: Literal["pretrain", "encoder", "classifier", "probe", "slimmable"]
    settings: dict = field(default_factory=dict)
    placeholders: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)


@dataclass
class Converter:
    detect: Callable[[dict, dict], bool]      # (prefix-stripped state dict, the file's records) -> is it this method's?
    convert: Callable[[dict, dict], Converted]


CONVERTERS: dict[str, Converter] = {}  # by method key


def register_converter(method_key: str, detect: Callable[[dict, dict], bool],
                       convert: Callable[[dict, dict], Converted]) -> None:
    CONVERTERS[method_key] = Converter(detect, convert)


def recorded(records: dict, *names: str):
    """The first of ``names`` the file records (hyper-parameters / args), else None."""
    return next((records[n] for n in names if records.get(n) is not None), None)
