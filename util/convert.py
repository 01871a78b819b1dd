"""Convert official checkpoints to this project's format, or export an encoder as a plain timm ViT state dict.

    python -m util.convert --from xtra  xtra_b16.ckpt  xtra_b16.pth     # official -> ours (loads everywhere)
    python -m util.convert --export_timm out/checkpoint-last.pth encoder_timm.pth

The exported file holds only tensors with timm's key names; load it with
``VisionTransformer(**kwargs).load_state_dict(torch.load(f))`` using the kwargs it prints. Output files are
written atomically and never over an existing file unless --force.
"""
from __future__ import annotations

import argparse
import os

import models  # noqa: F401  (registers the converters)
from models.registry import CONVERTERS
from models.vit import timm_kwargs
from util.checkpoint import (
    load_checkpoint,
    load_file,
    normalize_checkpoint,
    save_atomic,
    strip_wrapper_prefixes,
    vit_state_dict,
)
from util.misc import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("checkpoint conversion", add_help=False)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from", dest="source", choices=sorted(CONVERTERS) or None,
                      help="official checkpoint of this method -> this project's format")
    mode.add_argument("--export_timm", action="store_true", help="encoder of any checkpoint -> timm state dict")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return parser


def main(args: argparse.Namespace) -> None:
    if os.path.exists(args.output) and not args.force:
        raise ValueError(f"{args.output} exists (use --force to overwrite)")
    if args.source:
        raw = load_file(args.input)
        conv = CONVERTERS[args.source]
        sd = strip_wrapper_prefixes(dict(raw.get("state_dict", raw.get("module", raw.get("model", raw)))))
        if not conv.detect(sd):
            raise ValueError(f"{args.input} does not look like an official {args.source} checkpoint")
        ckpt = normalize_checkpoint(raw, args.input)
        save_atomic(ckpt, args.output)
        print(f"wrote {args.output}: preset {ckpt.get('model_name')}, {len(ckpt['model'])} tensors")
    else:
        ckpt = load_checkpoint(args.input)
        save_atomic(vit_state_dict(ckpt), args.output)
        print(f"wrote {args.output}; build it with timm.models.vision_transformer.VisionTransformer("
              f"**{timm_kwargs(ckpt['vit_config'])})")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
