"""Labelled figures of what a pretraining model sees and predicts, and cls-token attention maps of any ViT encoder.

    python visualize.py --checkpoint out/xtra/checkpoint-last.pth --dataset digits --output xtra.png
    python visualize.py --checkpoint out/saim_ft/checkpoint-best.pth --attn_maps --dataset digits --output attn.png

Panels come from the model's own ``visualize(imgs)`` (XTRA: input / target / predicted next blocks
de-normalised with each target block's mean and std, as the official visualiser does; SAIM: input / blurred
target / prediction). Rows are images, columns are titled panels, drawn pixel for pixel (small images enlarged);
attention maps are overlaid on their image.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

import models
from models.formats import load_checkpoint, model_from_checkpoint, vit_state_dict
from models.vit import VisionTransformer
from util.datasets import build_dataset, build_transform
from util.errors import UserError, run_cli
from util.images import first_images, save_panels
from util.settings import Group, SettingsParser, resolve, setting

assert models  # importing the package registers the methods


@dataclass(frozen=True)
class VisualizeSettings:
    checkpoint: str = setting("", "checkpoint of this project (a pretraining model, or any ViT with --attn_maps)")
    output: str = setting("vis.png", "PNG file to write")
    attn_maps: bool = setting(False, "cls-token attention maps of the encoder instead of the model's panels")
    num_images: int = setting(8, "images (rows)")
    dataset: Literal["imagefolder", "digits", "synthetic"] = setting("imagefolder", "as for training")
    data_path: str = setting("", "ImageFolder root with train/ and val/")
    split: Literal["train", "val"] = setting("val", "which split the images come from")
    device: str = setting("cpu", "cpu or cuda")


@torch.no_grad()
def cls_attention_maps(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """Attention of the cls token to every patch in the last block, averaged over heads: [B, 1, G, G]."""
    if vit.cls_token is None:
        raise UserError("attention maps need an encoder with a cls token")
    last = vit.blocks[-1]
    h = vit.get_intermediate_layers(imgs, [len(vit.blocks) - 2])[0] if len(vit.blocks) > 1 else vit.embed(imgs)
    B, N, C = h.shape
    qkv = last.attn.qkv(last.norm1(h)).reshape(B, N, 3, last.attn.num_heads, C // last.attn.num_heads)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # [B, heads, 1, N]
    maps = attn.mean(1)[:, 0, vit.num_prefix_tokens:]
    return maps.reshape(B, 1, vit.grid_size, vit.grid_size)


def settings_parser() -> SettingsParser:
    return SettingsParser("visualize.py", __doc__.split("\n")[0], [Group("visualisation", VisualizeSettings)])


def main(argv: Sequence[str]) -> None:
    parser = settings_parser()
    s = resolve(parser.groups, [("command line", parser.parse(argv))])
    if not s.checkpoint:
        raise UserError("give --checkpoint")
    ckpt = load_checkpoint(s.checkpoint)
    device = torch.device(s.device)
    input_size = ckpt["vit_config"]["img_size"]
    dataset = build_dataset(s.dataset, s.split, build_transform(input_size, is_train=False), input_size, s.data_path,
                            synthetic_size=64)
    imgs = first_images(dataset, s.num_images, device)
    # the figure's title: the registered model (or the file) and the last finished epoch the checkpoint records
    name = ckpt.get("model_name") or os.path.basename(s.checkpoint)
    name += f", epoch {ckpt['epoch']}" if isinstance(ckpt.get("epoch"), int) and ckpt["epoch"] >= 0 else ""
    if s.attn_maps:
        vit = VisionTransformer(**ckpt["vit_config"]).to(device).eval()
        vit.load_state_dict(vit_state_dict(ckpt))
        maps = cls_attention_maps(vit, imgs)
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        save_panels({"input": imgs, "cls attention": imgs}, s.output, name,
                    overlays={"cls attention": maps})
        return
    if ckpt.get("vit_prefix") != "encoder.":
        raise UserError(f"{s.checkpoint} is not a pretraining checkpoint; use --attn_maps for classifiers")
    model = model_from_checkpoint(ckpt)
    model.load_state_dict(ckpt["model"])
    save_panels(model.to(device).eval().visualize(imgs), s.output, name)


if __name__ == "__main__":
    run_cli(main)
