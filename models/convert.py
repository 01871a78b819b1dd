"""Convert official checkpoints to this project's format, or export an encoder as a plain timm ViT state dict.

    python -m models.convert --from xtra  xtra_b16.ckpt  xtra_b16.pth     # official -> ours (loads everywhere)
    python -m models.convert --from mae  mae_custom.pth  mae.pth --num_heads 8   # a file that records no head count
    python -m models.convert --export_timm out/checkpoint-last.pth encoder_timm.pth
    python -m models.convert --consolidate out/checkpoint-last.json model.pth   # sharded (--fsdp) -> one file

The architecture is read from the file (tensor shapes and what it records); a head count it does not record comes
from --num_heads. The converted file is written only after it has been loaded back as this project loads it
(encoder, and the whole model when the file fixes all of its settings). The exported file holds only tensors with
timm's key names; load it with ``VisionTransformer(**kwargs).load_state_dict(torch.load(f))`` using the kwargs it
prints. Output files are written atomically and never over an existing file unless --force.
"""
from __future__ import annotations

import os
from typing import Sequence

import models
from models.converters import CONVERTERS
from models.formats import (
    file_records,
    load_checkpoint,
    model_from_checkpoint,
    normalize_checkpoint,
    official_state_dict,
    vit_state_dict,
)
from models.registry import MODELS
from models.vit import VisionTransformer, timm_kwargs
from util.checkpoint import consolidate, load_file, save_atomic, sharded_dir
from util.errors import UserError, run_cli
from util.settings import OneLineParser

assert models  # importing the package registers the converters


def get_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m models.convert", description=__doc__.split("\n")[0], allow_abbrev=False)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from", dest="source", choices=sorted(CONVERTERS),
                      help="official checkpoint of this method -> this project's format")
    mode.add_argument("--export_timm", action="store_true", help="encoder of any checkpoint -> timm state dict")
    mode.add_argument("--consolidate", action="store_true",
                      help="sharded checkpoint of an --fsdp run (its .dcp directory or checkpoint-last.json) -> one "
                           "file with the whole model and the run's settings, without the optimiser state")
    parser.add_argument("input", help="file to read")
    parser.add_argument("output", help="file to write")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads of the encoder, for a file that does not record them")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return parser


def check_loadable(ckpt: dict) -> str:
    """Load a converted checkpoint as the entry scripts do (strictly); a ValueError says what does not fit.
    Returns what was loaded."""
    try:
        name = ckpt.get("model_name")
        if name in MODELS and MODELS[name][0].kind == "slimmable":  # a distilled Scala model is no plain ViT
            model_from_checkpoint(ckpt).load_state_dict(ckpt["model"], strict=True)
            return f"the whole {name} model"
        vit = VisionTransformer(**{**ckpt["vit_config"], "num_classes": ckpt["vit_config"].get("num_classes", 0)})
        vit.load_state_dict(vit_state_dict(ckpt), strict=True)
        loaded = f"the encoder ({vit.embed_dim}-wide, {len(vit.blocks)} blocks, {vit.num_heads} heads)"
        if ckpt.get("model_config") and not ckpt.get("unrecorded"):
            model_from_checkpoint(ckpt).load_state_dict(ckpt["model"], strict=True)
            loaded += f" and the whole {ckpt['model_name']} model"
    except (RuntimeError, TypeError, KeyError) as e:
        raise UserError(f"the converted checkpoint does not load: {' '.join(str(e).split())[:400]}") from None
    return loaded


def write_verified(ckpt: dict, output: str) -> str:
    """Write ``ckpt`` to ``output`` only once the written file loads back as the entry scripts read it."""
    tmp = f"{output}.tmp.{os.getpid()}"
    save_atomic(ckpt, tmp)
    try:
        loaded = check_loadable(load_checkpoint(tmp))
    except ValueError:
        os.remove(tmp)
        raise
    os.replace(tmp, output)
    return loaded


def main(argv: Sequence[str]) -> None:
    s = get_parser().parse_args(argv)
    if os.path.exists(s.output) and not s.force:
        raise UserError(f"{s.output} exists (use --force to overwrite)")
    if s.source:
        raw = load_file(s.input)
        if not CONVERTERS[s.source].detect(official_state_dict(raw), file_records(raw)):
            raise UserError(f"{s.input} does not look like an official {s.source} checkpoint")
        ckpt = normalize_checkpoint(raw, s.input, s.num_heads)
        check_loadable(ckpt)
        loaded = write_verified(ckpt, s.output)
        missing = ckpt.get("unrecorded") or []
        print(f"wrote {s.output}: {len(ckpt['model'])} tensors; loads {loaded}" +
              (f"; the file does not record {', '.join(missing)}: give them to main_pretrain.py --resume" if missing
               else ""))
    elif s.consolidate:
        if sharded_dir(s.input) is None:
            raise UserError(f"{s.input} is not a sharded checkpoint (a checkpoint-<epoch>.dcp directory or the "
                            "checkpoint-last.json that names one)")
        ckpt = consolidate(s.input)
        loaded = write_verified(ckpt, s.output)
        print(f"wrote {s.output}: epoch {ckpt['epoch']}, {len(ckpt['model'])} tensors; loads {loaded}")
    else:
        ckpt = load_checkpoint(s.input, s.num_heads)
        save_atomic(vit_state_dict(ckpt), s.output)
        print(f"wrote {s.output}; build it with timm.models.vision_transformer.VisionTransformer("
              f"**{timm_kwargs(ckpt['vit_config'])})")


if __name__ == "__main__":
    run_cli(main)
