"""Checkpoints: plain dicts loaded with ``weights_only=True``, written atomically, resumable.

Every checkpoint this project writes holds: ``model`` (state dict), ``vit_config`` (kwargs that rebuild the
ViT encoder/classifier), ``vit_prefix`` (where the ViT's keys sit inside ``model``: ``'encoder.'`` for
pretraining models, ``''`` for classifiers), ``encoder_mask`` (the attention mask used in pretraining, for
probing), ``model_name``, ``epoch``, ``args`` (plain dict), and for training state ``optimizer``, ``scaler``,
``rng`` (one entry per rank), ``generators`` (states of the model's own generators) and ``extra`` (e.g. best
accuracy, EMA weights).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from models.registry import CONVERTERS, build_pretrain_model
from models.vit import VisionTransformer
from util.misc import get_rank, get_world_size, is_dist, is_main_process, print0, rng_state, set_rng_state

WRAPPER_PREFIXES = ("module.", "_forward_module.", "_orig_mod.", "model.")


def load_file(path: str) -> dict:
    """torch.load with weights_only=True and one clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # official MAE/DeiT/Scala files pickle their flags as an argparse.Namespace: allow that one class
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Remove DDP / Lightning / DeepSpeed / torch.compile prefixes shared by every key."""
    changed = True
    while changed and state_dict:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state_dict):
                state_dict = {k[len(p):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _raw_state_dict(ckpt: dict) -> dict:
    for key in ("model", "state_dict", "module"):  # ours/MAE, Lightning, DeepSpeed
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


# Head counts of the standard ViT widths (shapes do not tell the head count).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


def vit_shapes(sd: dict) -> dict:
    """What the tensor shapes of a timm-layout ViT state dict (fused ``attn.qkv``; cls and dist tokens optional)
    tell about its architecture: img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio, qkv_bias."""
    dim, in_chans, _, patch = sd["patch_embed.proj.weight"].shape
    n_patch = sd["pos_embed"].shape[1] - int("cls_token" in sd) - int("dist_token" in sd)
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise ValueError(f"pos_embed holds {n_patch} patch positions, not a square grid")
    return {"img_size": side * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": dim,
            "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, "qkv_bias": "blocks.0.attn.qkv.bias" in sd}


def infer_vit_config(sd: dict) -> dict | None:
    """Architecture of a timm/MAE/DeiT-layout ViT state dict (fused ``attn.qkv``), or None if it is not one
    (distilled layouts with a dist token are not plain ViTs: Scala rebuilds those itself)."""
    needed = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed")
    if "dist_token" in sd or any(k not in sd for k in needed):
        return None
    shapes = vit_shapes(sd)
    if shapes["embed_dim"] not in HEADS_BY_WIDTH:
        raise ValueError(f"cannot tell the head count of a {shapes['embed_dim']}-wide ViT from its weights")
    has_cls = "cls_token" in sd
    head = sd.get("head.weight")
    return {**shapes, "num_heads": HEADS_BY_WIDTH[shapes["embed_dim"]], "class_token": has_cls, "pos_embed": "learn",
            "norm_eps": 1e-6, "num_classes": head.shape[0] if head is not None and head.ndim == 2 else 0,
            "global_pool": "avg" if "fc_norm.weight" in sd or not has_cls else "token",
            "fc_norm": "fc_norm.weight" in sd}


def normalize_checkpoint(ckpt: dict, path: str = "") -> dict:
    """Return a checkpoint in this project's format. Official checkpoints go through their method's converter;
    a plain timm/MAE/DeiT ViT state dict is taken as it is, its architecture read from the tensor shapes."""
    if "vit_config" in ckpt:
        return ckpt
    sd = strip_wrapper_prefixes(dict(_raw_state_dict(ckpt)))
    converted = next(((name, *conv.convert(sd)) for name, conv in CONVERTERS.items() if conv.detect(sd)), None)
    if converted is None:
        config = infer_vit_config(sd)
        if config is None:
            raise ValueError(f"{path or 'checkpoint'}: not a checkpoint of this project, not a timm ViT, and no "
                             f"converter ({', '.join(CONVERTERS) or 'none registered'}) recognises its keys")
        return {"model": sd, "model_name": None, "converted_from": "timm", "epoch": -1, "vit_config": config,
                "vit_prefix": "", "encoder_mask": None}
    name, model_sd, preset = converted
    out = {"model": model_sd, "model_name": preset, "converted_from": name, "epoch": -1}
    if preset is not None:
        with torch.device("meta"):
            model = build_pretrain_model(preset, {})
        out.update(vit_config=dict(model.encoder.config), vit_prefix="encoder.",
                   encoder_mask=getattr(model, "encoder_mask", None))
    elif (config := infer_vit_config(model_sd)) is not None:  # e.g. an official fine-tuned classifier
        out.update(vit_config=config, vit_prefix="", encoder_mask=None)
    return out


def load_checkpoint(path: str) -> dict:
    return normalize_checkpoint(load_file(path), path)


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, then rename: a killed job never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _gather_rng_states() -> list[dict]:
    if not is_dist():
        return [rng_state()]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The model's own ``torch.Generator`` attributes (e.g. XTRA's order choice), by module path. Their states
    go into checkpoints next to the global RNG states, so that a resumed run continues their sequences."""
    return {f"{path}.{attr}" if path else attr: value for path, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Generator)}


def save_checkpoint(args: argparse.Namespace, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    optim_step=None, vit: VisionTransformer | None = None, vit_prefix: str = "",
                    extra: dict | None = None, name: str = "checkpoint-last.pth") -> None:
    """Save on rank 0 (every rank must call it: RNG states are gathered). Writes ``name`` and, every
    ``--save_freq`` epochs and at the last epoch, ``checkpoint-<epoch>.pth``; prunes to ``--keep_last``."""
    rng = _gather_rng_states()
    if not args.output_dir or not is_main_process():
        return
    vit = vit if vit is not None else getattr(model, "encoder", model)
    state = {
        "model": model.state_dict(), "vit_config": dict(vit.config), "vit_prefix": vit_prefix,
        "encoder_mask": getattr(model, "encoder_mask", None), "model_name": args.model, "epoch": epoch,
        "args": plain_args(args),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": optim_step.state_dict() if optim_step is not None else {},
        "rng": rng, "generators": {k: g.get_state() for k, g in module_generators(model).items()},
        "extra": extra or {},
    }
    save_atomic(state, os.path.join(args.output_dir, name))
    if name == "checkpoint-last.pth" and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
        save_atomic(state, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
        if args.keep_last > 0:
            found = [(re.search(r"checkpoint-(\d+)\.pth$", p), p)
                     for p in glob.glob(os.path.join(args.output_dir, "checkpoint-*.pth"))]
            numbered = sorted((int(m.group(1)), p) for m, p in found if m)
            for _, old in numbered[: -args.keep_last]:
                os.remove(old)


def plain_args(args: argparse.Namespace) -> dict:
    """The flags as a dict of plain values, so that the checkpoint loads with weights_only=True."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def resume_path(args: argparse.Namespace) -> str:
    if args.resume:
        return args.resume
    last = os.path.join(args.output_dir, "checkpoint-last.pth") if args.output_dir else ""
    return last if args.auto_resume and last and os.path.isfile(last) else ""


def resume(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           optim_step=None, ckpt: dict | None = None) -> dict:
    """Continue from --resume or output_dir/checkpoint-last.pth (``ckpt``: that file, if the caller has already
    loaded it): model (strict), optimizer, scaler, start epoch, the model's own generators and this rank's RNG
    state. Returns the checkpoint's ``extra`` dict ({} if nothing loaded)."""
    path = resume_path(args)
    if not path:
        return {}
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
        if optim_step is not None:
            optim_step.load_state_dict(ckpt.get("scaler") or {})
    args.start_epoch = ckpt["epoch"] + 1
    for name, generator in module_generators(model).items():
        if name in ckpt.get("generators", {}):
            generator.set_state(ckpt["generators"][name])
    rng = ckpt.get("rng") or []
    if len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        print0(f"warning: checkpoint has RNG states for {len(rng)} ranks, running {get_world_size()}; not restored")
    print0(f"resumed from {path} (epoch {ckpt['epoch']}), continuing at epoch {args.start_epoch}")
    return ckpt.get("extra", {})


def vit_state_dict(ckpt: dict) -> dict:
    """The ViT's keys of a normalised checkpoint, prefix removed."""
    prefix = ckpt.get("vit_prefix", "")
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def load_vit_weights(vit: VisionTransformer, ckpt: dict) -> None:
    """Initialise ``vit`` from a checkpoint's encoder (MAE ``--finetune`` semantics): drop a head whose shape
    differs, resample position embeddings to the new grid, load non-strictly, and refuse anything missing
    other than the classifier head / fc_norm."""
    sd = vit_state_dict(ckpt)
    own = vit.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            del sd[k]
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        if sd["pos_embed"].shape[1] - vit.num_prefix_tokens <= 0:
            raise ValueError("checkpoint pos_embed does not fit this model's prefix tokens")
        side = vit.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (side, side),
                                                 num_prefix_tokens=vit.num_prefix_tokens)
    if "norm.weight" in sd and "norm.weight" not in own:  # global-pool classifier: norm -> fc_norm init
        sd.pop("norm.weight"), sd.pop("norm.bias")
    result = vit.load_state_dict(sd, strict=False)
    allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    bad = set(result.missing_keys) - allowed
    if bad:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(bad)[:8]}"
                         f"{' ...' if len(bad) > 8 else ''} (architecture differs?)")
    print0(f"loaded encoder weights: missing {result.missing_keys}, unexpected {result.unexpected_keys}")


def load_vit(path: str, **overrides) -> tuple[VisionTransformer, dict]:
    """Rebuild the ViT stored in any checkpoint (ours or an official one with a converter), with ctor
    ``overrides`` (num_classes, global_pool, img_size, drop_path_rate, ...), and load its weights."""
    ckpt = load_checkpoint(path)
    if "vit_config" not in ckpt:
        raise ValueError(f"{path}: converted checkpoint does not say which encoder it holds")
    vit = VisionTransformer(**{**ckpt["vit_config"], **overrides})
    load_vit_weights(vit, ckpt)
    return vit, ckpt
