"""MAE: masked autoencoders ("Masked Autoencoders Are Scalable Vision Learners", He et al., CVPR 2022; official code
github.com/facebookresearch/mae), the baseline XTRA, SAIM and D-iGPT compare against.

Each image keeps a random 25 % of its patches (per-image uniform shuffle). The encoder (a ViT with cls token and
fixed sin-cos positions) sees only those; a light decoder (its own width, depth and sin-cos table) gets the encoded
tokens back in place, a shared learned mask token at every removed patch, and predicts every patch's pixels.
The loss is the MSE on the removed patches only, against targets normalised per patch (``norm_pix_loss``).

Module names follow the official model (``mask_token``, ``decoder_embed``, ``decoder_blocks.j``,
``decoder_norm``, ``decoder_pred``), so converting an official checkpoint only prefixes the encoder's keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.converters import Converted, recorded, register_converter
from models.formats import vit_shapes
from models.pixels import norm_pix, norm_pix_stats, patchify, unpatchify
from models.registry import TINY_CPU_BUDGET, Method, Preset, PretrainingModel, register_method
from models.vit import Block, EncoderConfig, VisionTransformer, sincos_pos_embed_2d
from util.settings import setting


@dataclass(frozen=True)
class MAEConfig(EncoderConfig):
    """MAE's settings. The defaults are the official ViT-B/16 (``mae_vit_base_patch16_dec512d8b``) with the
    PRETRAIN.md recipe: 224 px, 75 % of the patches masked, decoder 8 blocks of 512-d with 16 heads,
    normalised-pixel targets."""

    mask_ratio: float = setting(0.75, "fraction of the patches removed from the encoder's input")
    decoder_dim: int = setting(512, "decoder width")
    decoder_depth: int = setting(8, "decoder blocks")
    decoder_heads: int = setting(16, "decoder attention heads")
    norm_pix_loss: bool = setting(True, "normalise each target patch by its own mean and std")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if int(self.grid_size ** 2 * (1 - self.mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {self.grid_size ** 2}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")


class MAE(PretrainingModel):
    """``encoder`` on the visible patches + ``decoder_*`` over all positions; the encoder is used downstream
    bidirectionally with its cls token (``encoder_mask`` None)."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = VisionTransformer(**c.vit_kwargs(), class_token=True, pos_embed="sincos", global_pool="token",
                                         num_classes=0)
        self.patch_size, self.num_patches = c.patch_size, c.grid_size ** 2
        self.num_keep = int(self.num_patches * (1 - c.mask_ratio))  # as official: floor
        self.norm_pix_loss = c.norm_pix_loss
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(c.decoder_dim, c.grid_size, 1)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio, qkv_bias=True)
                                             for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(c.decoder_dim, 3 * c.patch_size ** 2)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: xavier-uniform Linears (zero bias; the patch conv as a matrix, which the encoder does),
        unit LayerNorms, cls and mask tokens N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # no_weight_decay() stays empty: the official optimiser decays the cls and mask tokens (only 1-D parameters
    # and biases are exempt; the frozen position tables have no gradient).

    def random_keep(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per image, a uniformly random order of its patches (argsort of iid uniforms, as official): the first
        ``num_keep`` entries are the visible patches."""
        return torch.rand(batch, self.num_patches, device=device).argsort(dim=1)

    def forward_with_outputs(self, imgs: torch.Tensor, shuffle: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, {'pred': [B, L, 3p²], 'target': [B, L, 3p²], 'mask': [B, L] (1 = removed)})``; ``shuffle``
        [B, L] fixes the per-image patch order (the first ``num_keep`` stay visible)."""
        size = self.encoder.patch_embed.img_size
        if imgs.dim() != 4 or imgs.shape[1] != 3 or tuple(imgs.shape[-2:]) != tuple(size):
            raise ValueError(f"MAE expects images [B, 3, {size[0]}, {size[1]}], got {tuple(imgs.shape)}")
        B, L, enc = imgs.shape[0], self.num_patches, self.encoder
        shuffle = self.random_keep(B, imgs.device) if shuffle is None else shuffle.to(imgs.device)
        restore = shuffle.argsort(dim=1)
        keep = shuffle[:, :self.num_keep]

        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        x, _ = enc.forward_blocks(torch.cat([cls, x], dim=1))
        x = self.decoder_embed(enc.norm(x))

        # every position in raster order: the encoded visible tokens in place, the mask token elsewhere
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - self.num_keep, -1)], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

        target = patchify(imgs, self.patch_size)
        mask = (restore >= self.num_keep).to(target.dtype)  # 1 where the patch was removed
        if self.norm_pix_loss:
            target = norm_pix(target)
        per_patch = (pred - target).square().mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, {"pred": pred, "target": target, "mask": mask}

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.forward_with_outputs(imgs)[0], {}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Panels in normalised image space: input, what the encoder sees (removed patches at the mean colour),
        the reconstruction (de-normalised with each true patch's mean and std), and the reconstruction with
        the visible patches pasted back."""
        _, out = self.forward_with_outputs(imgs)
        patches = patchify(imgs.float(), self.patch_size)
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean, std = norm_pix_stats(patches)
            pred = pred * std + mean
        mask = out["mask"][..., None].float()
        p = self.patch_size
        return {"input": imgs, "masked": unpatchify(patches * (1 - mask), p),
                "reconstruction": unpatchify(pred, p),
                "reconstruction_visible": unpatchify(pred * mask + patches * (1 - mask), p)}


# ---------------------------------------------------------------------------------------------------
# The official recipe (PRETRAIN.md): AdamW (0.9, 0.95), wd 0.05 (the cls and mask tokens included), blr 1.5e-4 at
# an effective batch of 4096 (64 GPUs × 64), 800 epochs with 40 warmup epochs, cosine to 0, RandomResizedCrop
# (scale 0.2-1, bicubic) + flip. The decoder (512-d, 8 blocks, 16 heads) is the same for B, L and H.
register_method(Method(
    key="mae", name="MAE", kind="pretrain", model_class=MAE, config_class=MAEConfig,
    recipe=dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), epochs=800, warmup_epochs=40, warmup_lr=0.0,
                min_lr=0.0, batch_size=64, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3)),
    presets={
        "mae_vit_tiny": Preset("CPU-sized MAE: 32 px, patch 4, 64-d encoder of 2 blocks, decoder 1 × 64-d",
                               dict(TINY_CPU_BUDGET, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_dim=64,
                                    decoder_depth=1, decoder_heads=4),
                               global_batch=TINY_CPU_BUDGET["batch_size"]),
        "mae_vit_base_patch16": Preset("MAE ViT-B/16 at 224 px; decoder 8 × 512-d"),
        "mae_vit_large_patch16": Preset("MAE ViT-L/16 at 224 px; decoder 8 × 512-d",
                                        dict(embed_dim=1024, depth=24, num_heads=16)),
        "mae_vit_huge_patch14": Preset("MAE ViT-H/14 at 224 px; decoder 8 × 512-d",
                                       dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)),
    },
    memory_sizes=(("mae_vit_base_patch16", {}), ("mae_vit_huge_patch14", {})),
    global_batch=4096,  # PRETRAIN.md of the official repository: 8 nodes × 8 GPUs × 64
))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: MAE-style files with the weights under ``model``. Full pretraining files (the visualisation
# weights, or MAE's own training checkpoints) hold the decoder too; the released ``mae_pretrain_vit_*.pth`` files
# hold the encoder alone, which is a plain timm ViT.
_DECODER_PARTS = ("mask_token", "decoder_")
OFFICIAL_MODELS = {f"mae_vit_{size}{suffix}" for size in ("base_patch16", "large_patch16", "huge_patch14")
                   for suffix in ("", "_dec512d8b")}


def detect_official(sd: dict, records: dict) -> bool:
    return "mask_token" in sd and "decoder_embed.weight" in sd and "cls_token" in sd


def convert_official(sd: dict, records: dict) -> Converted:
    """A full official MAE file -> a whole MAE model: the architecture from the shapes, the decoder's head count
    from the recorded model name (every official constructor, ``mae_vit_{base,large,huge}_*``, uses 16), the mask
    ratio and target normalisation from the recorded flags."""
    encoder = {k: v for k, v in sd.items() if not k.startswith(_DECODER_PARTS)}
    shapes = vit_shapes(encoder)
    settings = dict(input_size=shapes["img_size"], patch_size=shapes["patch_size"], embed_dim=shapes["embed_dim"],
                    depth=shapes["depth"], mlp_ratio=shapes["mlp_ratio"], decoder_dim=sd["mask_token"].shape[-1],
                    decoder_depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")))
    for name in ("mask_ratio", "norm_pix_loss"):
        if recorded(records, name) is not None:
            settings[name] = records[name]
    official_name = recorded(records, "model") in OFFICIAL_MODELS
    placeholders = {} if official_name else {"decoder_heads": 1}
    if official_name:
        settings["decoder_heads"] = 16
    out = {k if k.startswith(_DECODER_PARTS) else "encoder." + k: v for k, v in sd.items()}
    return Converted(out, "pretrain", settings, placeholders)


register_converter("mae", detect_official, convert_official)
