"""XTRA: block-causal autoregressive image model (Amrani et al., CVPR 2025; spec /work/shared/specs/xtra.md).

The image is cut into k×k-patch blocks. Encoder and predictor run under the block-causal mask (a token sees
its own block and every earlier block in raster order); the predictor outputs of each block are concatenated
channel-major and one shared MLP head per prediction distance predicts the normalised pixels of block b+1+i
from block b. ``block_size=1`` is the plain causal ablation (per-patch targets, nothing concatenated).

Module names follow the official checkpoints (``proj.mlp.0``, ``predictor.blocks.j``, ``aim_proj.i.mlp.2``),
so converting one is the prefix rename ``enc.`` -> ``encoder.``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from models.masks import block_causal_mask
from models.registry import TINY_CPU_BUDGET, matching_preset, register_converter, register_pretrain
from models.vit import Block, VisionTransformer, _init_linear_and_norm
from util.args import str2bool

NORM_EPS = 1e-6  # eps of the per-block target normalisation, added to the variance inside the sqrt


class MLPHead(nn.Module):
    """Linear - GELU - Linear, as a ``Sequential`` named ``mlp`` so the keys match the official ``MLPHead``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, out_bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim, bias=out_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Predictor(nn.Module):
    """The decoder: own learned position embedding, pre-LN blocks under the encoder's mask, final LayerNorm."""

    def __init__(self, num_tokens: int, width: int, depth: int, num_heads: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, 4.0, qkv_bias=True, norm_eps=1e-6) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear_and_norm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, token_perm: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            side = int(round(x.shape[1] ** 0.5))
            pos = resample_abs_pos_embed(pos, (side, side), num_prefix_tokens=0)
        if token_perm is not None:  # permuted tokens keep their true positions
            pos = pos[:, token_perm]
        x = x + pos
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return self.norm(x)


def create_random_permutations(grid_size: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-random AR orders (spec §5): one block order per block, every order starting with a different
    block (the official rejection sampling only enforces that), the rest of each order uniform.

    Returns ``token_perms [nb, G²]`` (position p of the permuted raster holds original token
    ``token_perms[i, p]``: the raster scan of the image whose blocks were moved into slot order) and
    ``block_perms [nb, nb]``. Deliberate deviation: the official code calls ``torch.manual_seed(seed)`` here and
    so reseeds the global RNG while building the model; a local generator leaves the global RNG alone.
    """
    nbs = grid_size // block_size
    nb, k = nbs * nbs, block_size
    with torch.device("cpu"):  # data, not weights: also when the model is built under a meta/cuda device context
        g = torch.Generator().manual_seed(seed)
        rows = []
        for first in torch.randperm(nb, generator=g).tolist():
            rest = torch.tensor([b for b in range(nb) if b != first], dtype=torch.long)
            rows.append(torch.cat([torch.tensor([first]), rest[torch.randperm(nb - 1, generator=g)]]))
        block_perms = torch.stack(rows)
        tokens_of_block = torch.arange(grid_size ** 2).view(nbs, k, nbs, k).permute(0, 2, 1, 3).reshape(nb, k, k)
        slots = tokens_of_block[block_perms].view(nb, nbs, nbs, k, k)  # [perm, slot row, slot col, r, c]
        token_perms = slots.permute(0, 1, 3, 2, 4).reshape(nb, grid_size ** 2)
    return token_perms, block_perms


def block_mean_std(t: torch.Tensor, eps: float = NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sqrt(unbiased var + eps) of each block over all of its values (channels pooled): [..., 1]."""
    return t.mean(-1, keepdim=True), (t.var(-1, keepdim=True) + eps).sqrt()


def normalize_blocks(t: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """XTRA's norm_pix target: per block, not per patch (spec §4)."""
    mean, std = block_mean_std(t, eps)
    return (t - mean) / std


class XTRA(nn.Module):
    """Block-causal ViT encoder + ``proj`` MLP + predictor + ``num_pred_heads`` next-block pixel heads."""

    def __init__(self, img_size: int = 256, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, block_size: int = 4, num_pred_heads: int = 1, predictor_depth: int = 8,
                 predictor_width: int = 768, predictor_heads: int = 6, proj_hidden: int = 4096,
                 head_hidden: int = 6144, loss_type: str = "mse", norm_pix_loss: bool = True,
                 pseudo_random: bool = False, perm_seed: int = 0, drop_path_rate: float = 0.0):
        super().__init__()
        for name, v in dict(img_size=img_size, patch_size=patch_size, block_size=block_size,
                            num_pred_heads=num_pred_heads, predictor_depth=predictor_depth,
                            predictor_width=predictor_width, predictor_heads=predictor_heads,
                            proj_hidden=proj_hidden, head_hidden=head_hidden).items():
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = img_size // patch_size
        if grid % block_size:
            # the official mask silently merges blocks here (spec §9.6)
            raise ValueError(f"patch grid {grid} (img {img_size} / patch {patch_size}) is not divisible by "
                             f"block_size {block_size}")
        num_blocks = (grid // block_size) ** 2
        if num_pred_heads > num_blocks - 1:
            raise ValueError(f"num_pred_heads {num_pred_heads} leaves head {num_pred_heads - 1} without targets: "
                             f"only {num_blocks} blocks")
        if predictor_width % predictor_heads:
            raise ValueError(f"predictor_width {predictor_width} is not divisible by predictor_heads {predictor_heads}")
        if loss_type not in ("mse", "l1"):
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")

        self.grid_size, self.block_size, self.num_blocks = grid, block_size, num_blocks
        self.crop_size = patch_size * block_size  # block side in pixels
        self.loss_type, self.norm_pix_loss, self.pseudo_random = loss_type, norm_pix_loss, pseudo_random
        self.encoder_mask = {"type": "block_causal", "block_size": block_size}

        self.encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                         num_heads=num_heads, class_token=False, pos_embed="learn",
                                         global_pool="avg", num_classes=0, drop_path_rate=drop_path_rate,
                                         norm_eps=1e-6)
        conv = self.encoder.patch_embed.proj  # XTRA's patch-embed init (spec §6), not MAE's xavier
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        self.proj = MLPHead(embed_dim, proj_hidden, predictor_width, out_bias=False)
        self.predictor = Predictor(grid * grid, predictor_width, predictor_depth, predictor_heads)
        self.aim_proj = nn.ModuleList([
            MLPHead(predictor_width * block_size ** 2, head_hidden, 3 * self.crop_size ** 2, out_bias=True)
            for _ in range(num_pred_heads)])
        for m in (self.proj, self.aim_proj):
            m.apply(_init_linear_and_norm)

        if pseudo_random:
            token_perms, block_perms = create_random_permutations(grid, block_size, perm_seed)
            # not persistent: rebuilt from perm_seed, so official checkpoints load strictly
            self.register_buffer("token_perms", token_perms, persistent=False)
            self.register_buffer("block_perms", block_perms, persistent=False)
            # Picks the order of each training step. Seeded alike on every rank, so all ranks use the same order
            # in a step (as in the official code, where Lightning seeds every rank's global RNG alike); the
            # global RNG, which main_pretrain seeds per rank, stays untouched. Not checkpointed: after a resume
            # the sequence restarts, which keeps it uniform.
            self.perm_generator = torch.Generator(device="cpu").manual_seed(perm_seed)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The official optimiser decays pos_embed and the patch conv too (spec §9.9); only 1-D params and biases
        # are exempt, which param_groups_weight_decay does by itself.
        return set()

    # ---- layout helpers ------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, nb, 3, c, c]: blocks in raster order over the block grid, each (C, y, x)."""
        B, C, H, W = imgs.shape
        c = self.crop_size
        x = imgs.reshape(B, C, H // c, c, W // c, c).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // c) * (W // c), C, c, c)

    def unpatchify(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``; accepts blocks flattened to [B, nb, 3c²] too."""
        B, nb, c = blocks.shape[0], blocks.shape[1], self.crop_size
        side = int(round(nb ** 0.5))
        x = blocks.reshape(B, side, side, 3, c, c).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, 3, side * c, side * c)

    def concat_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """[B, G², D] -> [B, nb, D·k²], channel-major: ``vec_b[d·k² + r·k + c]`` = channel d of the token at
        (r, c) inside block b (the official layout, which the released head weights need; spec §3)."""
        B, N, D = z.shape
        k = self.block_size
        nbs = int(round(N ** 0.5)) // k
        z = z.reshape(B, nbs, k, nbs, k, D).permute(0, 1, 3, 5, 2, 4)  # [B, block row, block col, D, r, c]
        return z.reshape(B, nbs * nbs, D * k * k)

    def _check_input(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or imgs.shape[1] != 3 or imgs.shape[2] != imgs.shape[3]:
            raise ValueError(f"XTRA expects square RGB images [B, 3, S, S], got {tuple(imgs.shape)}")
        if imgs.shape[-1] % self.crop_size:
            raise ValueError(f"image side {imgs.shape[-1]} is not a multiple of the block side {self.crop_size} px")
        if self.pseudo_random and imgs.shape[-1] // self.encoder.patch_size != self.grid_size:
            raise ValueError("pseudo-random orders are defined for the training resolution only")

    def _choose_perm(self, perm_index: int | None) -> int | None:
        if not self.pseudo_random:
            if perm_index is not None:
                raise ValueError("perm_index needs a model built with pseudo_random=True")
            return None
        if perm_index is None:  # eval always uses order 0, as the official validation does
            perm_index = int(torch.randint(self.num_blocks, (1,), generator=self.perm_generator, device="cpu")) \
                if self.training else 0
        if not 0 <= perm_index < self.num_blocks:
            raise ValueError(f"perm_index {perm_index} out of range [0, {self.num_blocks})")
        return perm_index

    # ---- model -------------------------------------------------------------------------------------
    def predict(self, imgs: torch.Tensor, perm_index: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions of every head at every block position, the target blocks and the block order.

        Returns ``preds [B, heads, nb, 3c²]`` (position s of head i predicts the block at position s+1+i),
        ``target [B, nb, 3, c, c]`` (un-normalised pixels) and ``block_order [nb]`` (the raster block index at
        each position; ``arange`` unless pseudo-random), all in the sequence order of this step."""
        self._check_input(imgs)
        idx = self._choose_perm(perm_index)
        grid = imgs.shape[-1] // self.encoder.patch_size
        mask = block_causal_mask(grid, self.block_size, device=imgs.device)
        target = self.patchify(imgs)
        x = self.encoder.embed(imgs)
        token_perm = None
        if idx is None:
            order = torch.arange(target.shape[1], device=imgs.device)
        else:  # the raster mask on the permuted sequence = block-causal attention in the permuted order
            token_perm, order = self.token_perms[idx], self.block_perms[idx]
            x, target = x[:, token_perm], target[:, order]
        x, _ = self.encoder.forward_blocks(x, mask=mask)
        z = self.predictor(self.proj(self.encoder.norm(x)), mask, token_perm)
        e = self.concat_blocks(z)
        return torch.stack([head(e) for head in self.aim_proj], dim=1), target, order

    def prediction_loss(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over heads of MSE/L1(head i at positions [:-1-i], target at [1+i:]); ``target`` is [B, nb, n]."""
        fn = F.mse_loss if self.loss_type == "mse" else F.l1_loss
        nb = target.shape[1]
        losses = [fn(preds[:, i, : nb - 1 - i].float(), target[:, 1 + i:]) for i in range(preds.shape[1])]
        return torch.stack(losses).mean()

    def forward(self, imgs: torch.Tensor, perm_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """``(loss, {'pred': [B, heads, nb, 3c²], 'target': [B, nb, 3c²] normalised, 'block_order': [nb]})``.
        ``perm_index`` picks a pseudo-random order explicitly (tests)."""
        preds, target, order = self.predict(imgs, perm_index)
        t = target.flatten(2).float()
        if self.norm_pix_loss:
            t = normalize_blocks(t)
        return self.prediction_loss(preds, t), {"pred": preds, "target": t, "block_order": order}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """'input', 'target' (the image: targets are its pixels) and 'prediction': every block predicted by
        head 0 from the blocks before it, de-normalised with the true block's own mean and std as the official
        visualiser does. The first block of the order has no prediction and shows the input block."""
        preds, target, order = self.predict(imgs)
        t = target.flatten(2).float()
        pred = preds[:, 0].float()
        if self.norm_pix_loss:
            mean, std = block_mean_std(t)
            pred = pred * std.roll(-1, 1) + mean.roll(-1, 1)  # position s predicts the block at s+1
        seq = torch.cat([t[:, :1], pred[:, :-1]], dim=1)
        raster = torch.empty_like(seq)
        raster[:, order] = seq
        return {"input": imgs, "target": imgs, "prediction": self.unpatchify(raster).to(imgs.dtype)}


# ---------------------------------------------------------------------------------------------------
# Presets. Recipe: spec §6 (AdamW, absolute lr 1e-3 without batch scaling, warmup from 1e-4, cosine to 1e-6).
_RECIPE = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_lr=1e-4, min_lr=1e-6, clip_grad=1.0,
               crop_scale=(0.3, 1.0), crop_ratio=(0.75, 1.5))
_ARCH = {
    "xtra_vit_tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, block_size=2,
                          predictor_depth=1, predictor_width=64, predictor_heads=4, proj_hidden=128, head_hidden=256),
    "xtra_vit_small_patch16": dict(img_size=256, patch_size=16, embed_dim=384, depth=12, num_heads=6, block_size=4,
                                   predictor_depth=8, predictor_width=384, predictor_heads=6, proj_hidden=1536,
                                   head_hidden=3072, drop_path_rate=0.1),
    "xtra_vit_base_patch16": dict(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, block_size=4,
                                  predictor_depth=8, predictor_width=768, predictor_heads=6, proj_hidden=4096,
                                  head_hidden=6144, drop_path_rate=0.1),
    "xtra_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, block_size=4,
                                  predictor_depth=8, predictor_width=640, predictor_heads=8, proj_hidden=5120,
                                  head_hidden=9408, drop_path_rate=0.2),
}


def build_xtra(preset: str, img_size: int | None = None, block_size: int | None = None,
               num_pred_heads: int | None = None, predictor_depth: int | None = None,
               predictor_width: int | None = None, predictor_heads: int | None = None, proj_hidden: int | None = None,
               head_hidden: int | None = None, loss_type: str | None = None, norm_pix_loss: bool | None = None,
               pseudo_random: bool | None = None, perm_seed: int | None = None,
               drop_path_rate: float | None = None) -> XTRA:
    """An XTRA preset; every keyword that is not None (a main_pretrain.py flag) overrides it."""
    overrides = {k: v for k, v in locals().items() if k != "preset" and v is not None}
    return XTRA(**{**_ARCH[preset], **overrides})


# (recipe, description). The released B/16 run (spec §9.1): 800 epochs, warmup 15, drop-path 0.1, 29 images ×
# 72 GPUs = 2088 (the shipped yaml says 1600 / 40 / 0.2 on 96 GPUs). The lr is absolute: set --lr for another
# global batch. IN-21k H/14 run: 100 epochs, warmup 3, drop-path 0.2, 29 × 72 GPUs.
_PRESETS = {
    "xtra_vit_tiny": (dict(TINY_CPU_BUDGET, drop_path=0.0),
                      "CPU-sized XTRA (32 px, patch 4, 4×4 blocks of 2×2 patches): pretrains on the digits in seconds"),
    "xtra_vit_small_patch16": (dict(input_size=256, epochs=800, warmup_epochs=15, batch_size=29, drop_path=0.1),
                               "not an official preset: ViT-S/16 at 256 px with the B/16 recipe, predictor 8×384"),
    "xtra_vit_base_patch16": (dict(input_size=256, epochs=800, warmup_epochs=15, batch_size=29, drop_path=0.1),
                              "ViT-B/16 at 256 px, 4×4 blocks of 64 px; predictor 8×768 (6 heads); "
                              "head 12288 -> 6144 -> 12288"),
    "xtra_vit_huge_patch14": (dict(input_size=224, epochs=100, warmup_epochs=3, batch_size=29, drop_path=0.2),
                              "ViT-H/14 at 224 px, 4×4 blocks of 56 px; proj 1280 -> 5120 -> 640; predictor 8×640 "
                              "(8 heads); head 10240 -> 9408 -> 9408"),
}
for _name, (_recipe, _description) in _PRESETS.items():
    register_pretrain(_name, build_xtra, dict(_RECIPE, **_recipe), _description)


def add_args(parser: argparse.ArgumentParser) -> None:
    """XTRA flags of main_pretrain.py (default None = the preset's value). Image size and drop-path come from
    the shared --input_size and --drop_path."""
    g = parser.add_argument_group("XTRA")
    g.add_argument("--block_size", type=int, default=None, help="block side k in patches (1 = plain causal)")
    g.add_argument("--num_pred_heads", type=int, default=None, help="heads; head i predicts block b+1+i from b")
    g.add_argument("--predictor_depth", type=int, default=None, help="predictor blocks")
    g.add_argument("--predictor_width", type=int, default=None, help="predictor width (= proj output)")
    g.add_argument("--predictor_heads", type=int, default=None, help="predictor attention heads")
    g.add_argument("--proj_hidden", type=int, default=None, help="hidden width of the encoder->predictor MLP")
    g.add_argument("--head_hidden", type=int, default=None, help="hidden width of each pixel head")
    g.add_argument("--loss_type", choices=["mse", "l1"], default=None, help="pixel loss (l1 = the L1 ablation)")
    g.add_argument("--norm_pix_loss", type=str2bool, default=None, help="per-block normalised targets")
    g.add_argument("--pseudo_random", type=str2bool, default=None,
                   help="train on one of nb block orders per step (distinct first blocks); eval uses order 0")
    g.add_argument("--perm_seed", type=int, default=None, help="seed of the pseudo-random orders and their choice")


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: Lightning (B/16, under 'state_dict') or DeepSpeed (H/14, under 'module'); the caller
# strips wrapper prefixes. Keys are ours already except the encoder prefix (official_keys/xtra.md).
_OFFICIAL_PARTS = ("proj.", "predictor.", "aim_proj.")


def detect_official(sd: dict) -> bool:
    return "enc.pos_embed" in sd and "enc.patch_embed.proj.weight" in sd


def convert_official(sd: dict) -> tuple[dict, str | None]:
    """Official state dict -> (our XTRA state dict, matching preset or None). Probe checkpoints (no proj /
    predictor / aim_proj) give the encoder alone; keys of the official probe heads are dropped."""
    out = {"encoder." + k[4:]: v for k, v in sd.items() if k.startswith("enc.")}
    out.update({k: v for k, v in sd.items() if k.startswith(_OFFICIAL_PARTS)})
    encoder_only = not any(k.startswith(_OFFICIAL_PARTS) for k in out)
    return out, matching_preset(build_xtra, out, "encoder." if encoder_only else "")


register_converter("xtra", detect_official, convert_official)
