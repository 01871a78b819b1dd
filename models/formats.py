"""Checkpoint formats: what a checkpoint says about the model it holds, and official files through their converters.

Every checkpoint this project writes holds, besides the training state of ``util.checkpoint``: ``model`` (state
dict), ``vit_config`` (the arguments that rebuild the ViT encoder/classifier), ``vit_prefix`` (where the ViT's
keys sit inside ``model``: ``'encoder.'`` for pretraining models, ``''`` for classifiers), ``encoder_mask`` (the
mask the encoder keeps downstream, a plain dict), ``model_name`` and, for registered models, ``model_config`` (the
method's settings). Files of other codebases (official XTRA / SAIM / D-iGPT / Scala / MAE checkpoints, plain timm
or DeiT ViTs) are brought to that form by :func:`normalize_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing

import torch
import torch.nn as nn

from models.converters import CONVERTERS
from models.masks import EncoderMask
from models.registry import METHODS, MODELS
from models.vit import VisionTransformer, resize_pos_embed
from util.checkpoint import load_file
from util.distributed import print0
from util.errors import UserError
from util.settings import coerce

WRAPPER_PREFIXES = ("module.", "_forward_module.", "_orig_mod.", "model.")  # DDP, Lightning, compile, DeepSpeed
STATE_DICT_KEYS = ("model", "state_dict", "module")  # this project / MAE / DeiT, Lightning, DeepSpeed


def raw_state_dict(ckpt: dict) -> dict:
    """The tensors of a checkpoint file: under the first of ``model`` / ``state_dict`` / ``module`` that holds a
    dict, else the file itself."""
    for key in STATE_DICT_KEYS:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
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


def official_state_dict(ckpt: dict) -> dict:
    return strip_wrapper_prefixes(dict(raw_state_dict(ckpt)))


# Architecture names of the ViT family: (width, attention heads). Official files record a name (MAE / DeiT / SAIM /
# D-iGPT / Scala ``args.model``, XTRA's ``enc_arch`` hyper-parameter) whose size word fixes the head count.
ARCH_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16),
              "giant": (1408, 16)}


def file_records(ckpt: dict) -> dict:
    """What a checkpoint file records besides its tensors, as one flat dict: Lightning ``hyper_parameters`` and
    MAE/DeiT-style ``args`` (an argparse.Namespace or a dict)."""
    out: dict = {}
    for key in ("hyper_parameters", "args"):
        value = ckpt.get(key)
        if value is not None and not isinstance(value, dict):
            value = vars(value)
        out.update(value or {})
    return out


def recorded_heads(records: dict, width: int) -> int | None:
    """The encoder's head count as the file records it: an explicit ``num_heads`` / ``enc_num_heads``, else the
    size word of its model name when that size has this width."""
    explicit = records.get("enc_num_heads", records.get("num_heads"))
    if isinstance(explicit, int):
        return explicit
    for key in ("enc_arch", "model", "arch"):
        name = records.get(key)
        if isinstance(name, str):
            sizes = [ARCH_SIZES[w] for w in re.split(r"[^a-z]+", name.lower()) if w in ARCH_SIZES]
            if sizes and sizes[0][0] == width:
                return sizes[0][1]
    return None


def encoder_num_heads(width: int, records: dict, given: int | None, what: str) -> int:
    """The one rule for the head count of a checkpoint's encoder (shapes do not show it): what the file records,
    else ``--num_heads``; both, when they disagree, or neither is an error."""
    found = recorded_heads(records, width)
    if given is not None and found is not None and given != found:
        raise UserError(f"{what} records {found} attention heads for its {width}-wide encoder, but --num_heads "
                        f"is {given}")
    heads = given if given is not None else found
    if heads is None:
        raise UserError(f"{what} does not record how many attention heads its {width}-wide encoder has (no model "
                        "name or hyper-parameters in the file): give --num_heads")
    if width % heads:
        raise UserError(f"{heads} attention heads do not divide the {width}-wide encoder of {what}")
    return heads


def vit_shapes(sd: dict) -> dict:
    """What the tensor shapes of a timm-layout ViT state dict (fused ``attn.qkv``; cls and dist tokens optional)
    tell about its architecture: img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio, qkv_bias."""
    dim, in_chans, _, patch = sd["patch_embed.proj.weight"].shape
    n_patch = sd["pos_embed"].shape[1] - int("cls_token" in sd) - int("dist_token" in sd)
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise UserError(f"pos_embed holds {n_patch} patch positions, not a square grid")
    return {"img_size": side * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": dim,
            "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, "qkv_bias": "blocks.0.attn.qkv.bias" in sd}


def infer_vit_config(sd: dict) -> dict | None:
    """Architecture of a timm/MAE/DeiT-layout ViT state dict (fused ``attn.qkv``) except its head count, or None if
    it is not one (distilled layouts with a dist token are not plain ViTs: Scala rebuilds those itself)."""
    needed = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed")
    if "dist_token" in sd or any(k not in sd for k in needed):
        return None
    shapes = vit_shapes(sd)
    has_cls = "cls_token" in sd
    head = sd.get("head.weight")
    return {**shapes, "class_token": has_cls, "pos_embed": "learn", "norm_eps": 1e-6,
            "num_classes": head.shape[0] if head is not None and head.ndim == 2 else 0,
            "global_pool": "avg" if "fc_norm.weight" in sd or not has_cls else "token",
            "fc_norm": "fc_norm.weight" in sd}


def plain_config(config) -> dict:
    """A settings dataclass as plain values (weights_only-safe)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def encoder_record(vit: VisionTransformer, prefix: str, mask: EncoderMask | None) -> dict:
    """What a checkpoint says about the encoder it holds (saved next to the weights)."""
    return {"vit_config": dict(vit.config), "vit_prefix": prefix,
            "encoder_mask": mask.to_dict() if mask is not None else None}


def normalize_checkpoint(ckpt: dict, path: str = "", num_heads: int | None = None) -> dict:
    """A checkpoint in this project's format. Official checkpoints go through their method's converter; a plain
    timm/MAE/DeiT ViT state dict is taken as it is. The architecture comes from the tensor shapes and what the
    file records; the encoder's head count follows :func:`encoder_num_heads` (``num_heads``: --num_heads).

    A converted whole pretraining model also gets ``model_name`` (the method), ``model_config`` (its settings)
    and ``args`` (the same settings, for resuming), and ``unrecorded``: settings it needs that the file does not
    fix, which a resumed run must be given."""
    if "vit_config" in ckpt:
        return ckpt
    what = path or "the checkpoint"
    records = file_records(ckpt)
    sd = official_state_dict(ckpt)
    found = next(((key, conv) for key, conv in CONVERTERS.items() if conv.detect(sd, records)), None)
    if found is None:
        config = infer_vit_config(sd)
        if config is None:
            raise UserError(f"{what}: not a checkpoint of this project, not a timm ViT, and no converter "
                            f"({', '.join(CONVERTERS) or 'none registered'}) recognises its keys")
        config["num_heads"] = encoder_num_heads(config["embed_dim"], records, num_heads, what)
        return {"model": sd, "model_name": None, "converted_from": "timm", "epoch": -1, "vit_config": config,
                "vit_prefix": "", "encoder_mask": None}
    key, converter = found
    c = converter.convert(sd, records)
    out = {"model": c.state_dict, "converted_from": key, "epoch": -1, "model_name": None}
    if c.kind == "classifier":
        config = infer_vit_config(c.state_dict)
        config["num_heads"] = encoder_num_heads(config["embed_dim"], records, num_heads, what)
        return {**out, "vit_config": config, "vit_prefix": "", "encoder_mask": None}
    method = METHODS[key]
    settings = {**c.settings, "num_heads": encoder_num_heads(c.settings["embed_dim"], records, num_heads, what)}
    settings_instance = method.config_class(**{**settings, **c.placeholders})
    with torch.device("meta"):
        model = method.model_class(settings_instance)
    config = {k: v for k, v in plain_config(settings_instance).items() if k not in c.placeholders}
    if c.kind == "slimmable":
        return {**out, **encoder_record(model, "", None), "model_name": key, "model_config": config,
                "args": {"model": records.get("model") if records.get("model") in MODELS else key, **config}}
    encoder, mask = model.encoder, model.encoder_mask
    if c.kind == "encoder":
        return {**out, **encoder_record(encoder, "", mask)}
    if c.kind == "probe":
        return {**out, **encoder_record(encoder, "backbone.", mask), "model_name": f"{c.probe['probe']}_probe",
                "args": dict(c.probe, input_size=config["input_size"])}
    return {**out, **encoder_record(encoder, "encoder.", mask), "model_name": key, "model_config": config,
            "unrecorded": sorted(c.placeholders), "args": {"model": key, **config}}


def load_checkpoint(path: str, num_heads: int | None = None, weights: bool = True) -> dict:
    """A checkpoint file (this project's or an official one) in this project's format; ``num_heads``: the
    encoder's head count for files that do not record it (--num_heads). ``weights`` False: a sharded checkpoint's
    tensors stay on disk (a resumed run reads them shard by shard)."""
    return normalize_checkpoint(load_file(path, weights), path, num_heads)


def vit_state_dict(ckpt: dict) -> dict:
    """The ViT's keys of a normalised checkpoint, prefix removed."""
    prefix = ckpt.get("vit_prefix", "")
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


ARCH_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "qkv_bias", "in_chans")
# What a model may lack from the encoder it is initialised from; these keep their fresh initialisation (a final
# norm too: D-iGPT's encoder has none, its fc_norm is never trained).
FRESH_KEYS = ("head.", "head_dist.", "fc_norm.", "norm.", "cls_token", "dist_token")


def load_encoder_weights(model: VisionTransformer, ckpt: dict) -> dict[str, list[str]]:
    """Initialise ``model`` (a ViT classifier or Scala's slimmable ViT) from the encoder of a normalised
    checkpoint (MAE ``--finetune`` semantics).

    The architectures must agree. The position table's patch rows are resampled to the model's grid; its prefix
    rows are copied where both have the token (cls first, then dist) and are zero otherwise, so a token the
    encoder lacks (the dist token; the cls token of XTRA encoders) starts with only its fresh learned vector.
    A classifier head of another shape is dropped; a final norm becomes the ``fc_norm`` of a global-pool model.
    Anything missing besides heads, the final norms and prefix tokens is an error. Returns the missing and
    unexpected keys (also printed)."""
    cfg = ckpt["vit_config"]
    clash = {k: (cfg[k], model.config[k]) for k in ARCH_KEYS if k in cfg and cfg[k] != model.config[k]}
    if clash:
        raise UserError(f"the checkpoint's encoder differs from the model (checkpoint, model): {clash}")
    sd = vit_state_dict(ckpt)
    own = model.state_dict()
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        n_src = int(cfg.get("class_token", True)) + int("dist_token" in sd)
        patches = resize_pos_embed(pos, model.patch_embed.num_patches, n_src)[:, n_src:]
        prefix = pos.new_zeros(1, model.num_prefix_tokens, pos.shape[-1])
        n_copy = min(n_src, model.num_prefix_tokens)
        prefix[:, :n_copy] = pos[:, :n_copy]
        sd["pos_embed"] = torch.cat([prefix, patches], dim=1)
    for k in [k for k in sd if k.startswith(("head.", "head_dist."))]:
        if k not in own or sd[k].shape != own[k].shape:
            del sd[k]
    if "norm.weight" in sd and "norm.weight" not in own:  # global-pool classifier: norm -> fc_norm init
        sd.pop("norm.weight"), sd.pop("norm.bias")
    result = model.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith(FRESH_KEYS)]
    if bad:
        raise UserError(f"checkpoint does not fit the model: missing {sorted(bad)[:8]}"
                        f"{' ...' if len(bad) > 8 else ''} (architecture differs?)")
    print0(f"loaded encoder weights: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return {"missing": result.missing_keys, "unexpected": result.unexpected_keys}


def load_vit(path: str, num_heads: int | None = None, **overrides) -> tuple[VisionTransformer, dict]:
    """Rebuild the ViT stored in any checkpoint (ours or an official one with a converter), with ctor
    ``overrides`` (num_classes, global_pool, img_size, drop_path_rate, ...), and load its weights."""
    ckpt = load_checkpoint(path, num_heads)
    vit = VisionTransformer(**{**ckpt["vit_config"], **overrides})
    load_encoder_weights(vit, ckpt)
    return vit, ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """The registered model a checkpoint of this project holds, rebuilt from its recorded settings (weights
    not loaded)."""
    name, stored = ckpt.get("model_name"), ckpt.get("model_config")
    if name not in MODELS or stored is None:
        raise UserError(f"the checkpoint does not record a registered model (model_name {name!r})")
    if ckpt.get("unrecorded"):
        raise UserError(f"the checkpoint does not record {', '.join(ckpt['unrecorded'])} of its {name} model")
    method = MODELS[name][0]
    hints = typing.get_type_hints(method.config_class)
    return method.model_class(method.config_class(**{k: coerce(v, hints[k]) for k, v in stored.items()
                                                     if k in hints}))
