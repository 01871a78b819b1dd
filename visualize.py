"""PNG grids of what a pretraining model sees and predicts, and cls-token attention maps of any ViT encoder.

    python visualize.py --checkpoint out/xtra/checkpoint-last.pth --dataset digits --output xtra.png
    python visualize.py --checkpoint out/saim_ft/checkpoint-best.pth --attn_maps --dataset digits --output attn.png

Panels come from the model's own ``visualize(imgs)`` (XTRA: input / target / predicted next blocks
de-normalised with each target block's mean and std, as the official visualiser does; SAIM: input / blurred
target / prediction). Rows are images, columns are panels.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image

import models  # noqa: F401  (registers the pretraining presets)
from models.registry import build_pretrain_model
from models.vit import VisionTransformer
from util.checkpoint import load_checkpoint, vit_state_dict
from util.datasets import build_dataset, build_transform
from util.misc import run_cli


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def first_images(dataset, n: int, device: torch.device) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)


@torch.no_grad()
def save_panels(model: torch.nn.Module, dataset, device: torch.device, path: str, n: int = 8) -> None:
    """One row per image, one column per panel of ``model.visualize``."""
    was_training = model.training
    model.eval()
    panels = model.visualize(first_images(dataset, n, device))
    model.train(was_training)
    rows = torch.stack([unnormalize(p.float()) for p in panels.values()], dim=1).flatten(0, 1)
    save_image(make_grid(rows, nrow=len(panels), padding=2, pad_value=1.0), path)
    print(f"wrote {path} (columns: {', '.join(panels)})")


@torch.no_grad()
def cls_attention_maps(vit: VisionTransformer, imgs: torch.Tensor) -> torch.Tensor:
    """Attention of the cls token to every patch in the last block, averaged over heads: [B, 1, G, G]."""
    if vit.cls_token is None:
        raise ValueError("attention maps need an encoder with a cls token")
    last = vit.blocks[-1]
    h = vit.get_intermediate_layers(imgs, [len(vit.blocks) - 2])[0] if len(vit.blocks) > 1 else vit.embed(imgs)
    B, N, C = h.shape
    qkv = last.attn.qkv(last.norm1(h)).reshape(B, N, 3, last.attn.num_heads, C // last.attn.num_heads)
    q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # [B, heads, 1, N]
    maps = attn.mean(1)[:, 0, vit.num_prefix_tokens:]
    return maps.reshape(B, 1, vit.grid_size, vit.grid_size)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("visualisation", add_help=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", default="vis.png")
    parser.add_argument("--attn_maps", action="store_true", help="cls-token attention maps of the encoder")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--dataset", choices=["imagefolder", "digits", "synthetic"], default="imagefolder")
    parser.add_argument("--data_path", default="")
    parser.add_argument("--split", choices=["train", "val"], default="val")
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    args.input_size = ckpt["vit_config"]["img_size"]
    args.crop_pct, args.crop_scale, args.crop_ratio, args.synthetic_size, args.output_dir = None, None, None, 64, ""
    dataset = build_dataset(args, args.split, build_transform(args, is_train=False, kind="pretrain"))
    if args.attn_maps:
        vit = VisionTransformer(**ckpt["vit_config"]).to(device).eval()
        vit.load_state_dict(vit_state_dict(ckpt))
        imgs = first_images(dataset, args.num_images, device)
        maps = F.interpolate(cls_attention_maps(vit, imgs), size=imgs.shape[-2:], mode="nearest")
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        rows = torch.stack([unnormalize(imgs), maps.expand(-1, 3, -1, -1)], dim=1).flatten(0, 1)
        save_image(make_grid(rows, nrow=2, padding=2, pad_value=1.0), args.output)
        print(f"wrote {args.output} (columns: input, cls attention)")
        return
    if ckpt.get("vit_prefix") != "encoder.":
        raise ValueError(f"{args.checkpoint} is not a pretraining checkpoint; use --attn_maps for classifiers")
    model = build_pretrain_model(ckpt["model_name"], {**ckpt.get("args", {}), "img_size": args.input_size})
    model.load_state_dict(ckpt["model"])
    save_panels(model.to(device), dataset, device, args.output, args.num_images)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
