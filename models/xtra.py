"""XTRA: block-causal autoregressive image model ("Sample- and Parameter-Efficient Auto-Regressive Image Models",
Amrani et al., CVPR 2025; official code github.com/elad-amrani/xtra).

The image is cut into k×k-patch blocks. Encoder and predictor run under the block-causal mask (a token sees
its own block and every earlier block in raster order); the predictor outputs of each block are concatenated
channel-major and one shared MLP head per prediction distance predicts the normalised pixels of block b+1+i
from block b. ``block_size=1`` is the plain causal ablation (per-patch targets, nothing concatenated).

Module names follow the official checkpoints (``proj.mlp.0``, ``predictor.blocks.j``, ``aim_proj.i.mlp.2``),
so converting one is the prefix rename ``enc.`` -> ``encoder.``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.converters import Converted, recorded, register_converter
from models.formats import vit_shapes
from models.masks import BlockCausal, block_causal_mask
from models.pixels import norm_pix, norm_pix_stats
from models.registry import TINY_CPU_BUDGET, Method, Preset, PretrainingModel, register_method
from models.vit import Block, EncoderConfig, VisionTransformer, _init_linear_and_norm, resize_pos_embed, upcast
from util.errors import UserError
from util.settings import setting


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
        pos = resize_pos_embed(self.pos_embed, x.shape[1], num_prefix_tokens=0)
        if token_perm is not None:  # permuted tokens keep their true positions
            pos = pos[:, token_perm]
        x = x + pos
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return self.norm(x)


def create_random_permutations(grid_size: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-random AR orders of the official code: one block order per block, drawn as in its rejection
    sampler: ``torch.randperm(nb)`` from a generator seeded ``seed``, redrawn until the order shares no prefix with
    an order already kept, i.e. until its first block is new. The same seed gives the official tables (torch's CPU
    randperm stream), e.g. [[0, 1, 3, 2], [3, 2, 0, 1], [2, 1, 0, 3], [1, 0, 2, 3]] for 2×2 blocks and seed 0.

    Returns ``token_perms [nb, G²]`` (position p of the permuted raster holds original token
    ``token_perms[i, p]``: the raster scan of the image whose blocks were moved into slot order) and
    ``block_perms [nb, nb]``. Deliberate deviation: the official code calls ``torch.manual_seed(seed)`` here and
    so reseeds the global RNG while building the model; a local generator with the same seed draws the same
    orders and leaves the global RNG alone.
    """
    nbs = grid_size // block_size
    nb, k = nbs * nbs, block_size
    with torch.device("cpu"):  # data, not weights: also when the model is built under a meta/cuda device context
        g = torch.Generator().manual_seed(seed)
        rows: list[torch.Tensor] = []
        while len(rows) < nb:
            order = torch.randperm(nb, generator=g)
            if all(int(order[0]) != int(row[0]) for row in rows):
                rows.append(order)
        block_perms = torch.stack(rows)
        tokens_of_block = torch.arange(grid_size ** 2).view(nbs, k, nbs, k).permute(0, 2, 1, 3).reshape(nb, k, k)
        slots = tokens_of_block[block_perms].view(nb, nbs, nbs, k, k)  # [perm, slot row, slot col, r, c]
        token_perms = slots.permute(0, 1, 3, 2, 4).reshape(nb, grid_size ** 2)
    return token_perms, block_perms


@dataclass(frozen=True)
class XTRAConfig(EncoderConfig):
    """XTRA's settings. The defaults are the released ViT-B/16 run of the official code
    (github.com/elad-amrani/xtra: 256 px, 4×4 blocks of 4×4 patches, predictor 8 × 768 with 6 heads, head
    12288 -> 6144 -> 12288, 800 epochs with drop-path 0.1)."""

    input_size: int = 256
    drop_path: float = 0.1
    block_size: int = setting(4, "block side k in patches (1 = plain causal)")
    num_pred_heads: int = setting(1, "prediction heads; head i predicts block b+1+i from block b")
    predictor_depth: int = setting(8, "predictor blocks")
    predictor_width: int = setting(768, "predictor width (= output width of the proj MLP)")
    predictor_heads: int = setting(6, "predictor attention heads")
    proj_hidden: int = setting(4096, "hidden width of the encoder-to-predictor MLP")
    head_hidden: int = setting(6144, "hidden width of each pixel head")
    loss_type: Literal["mse", "l1"] = setting("mse", "pixel loss (l1: the L1 ablation)")
    norm_pix_loss: bool = setting(True, "normalise each target block by its own mean and std")
    pseudo_random: bool = setting(False, "train on one of nb block orders per step (distinct first blocks); "
                                         "evaluation uses order 0")
    perm_seed: int = setting(0, "seed of the pseudo-random orders and of their choice")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_size", "num_pred_heads", "predictor_depth", "predictor_width", "predictor_heads",
                     "proj_hidden", "head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.loss_type not in ("mse", "l1"):  # the Literal is enforced by the parser only, not here
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {self.loss_type!r}")
        if self.grid_size % self.block_size:
            # the official mask silently gives two blocks the same id here
            raise ValueError(f"patch grid {self.grid_size} (input {self.input_size} / patch {self.patch_size}) is not "
                             f"divisible by block_size {self.block_size}")
        if self.num_pred_heads > self.num_blocks - 1:
            raise ValueError(f"num_pred_heads {self.num_pred_heads} leaves head {self.num_pred_heads - 1} without "
                             f"targets: only {self.num_blocks} blocks")
        if self.predictor_width % self.predictor_heads:
            raise ValueError(f"predictor_width {self.predictor_width} is not divisible by predictor_heads "
                             f"{self.predictor_heads}")

    @property
    def num_blocks(self) -> int:
        return (self.grid_size // self.block_size) ** 2


class XTRA(PretrainingModel):
    """Block-causal ViT encoder + ``proj`` MLP + predictor + ``num_pred_heads`` next-block pixel heads."""

    def __init__(self, config: XTRAConfig):
        super().__init__()
        self.config = config
        grid, block_size = config.grid_size, config.block_size
        self.grid_size, self.block_size, self.num_blocks = grid, block_size, config.num_blocks
        self.crop_size = config.patch_size * block_size  # block side in pixels
        self.loss_type, self.norm_pix_loss, self.pseudo_random = config.loss_type, config.norm_pix_loss, \
            config.pseudo_random
        self.encoder_mask = BlockCausal(block_size)

        self.encoder = VisionTransformer(**config.vit_kwargs(), class_token=False, pos_embed="learn",
                                         global_pool="avg", num_classes=0, norm_eps=1e-6)
        conv = self.encoder.patch_embed.proj  # XTRA's patch-embed init (kaiming, fan-in), not MAE's xavier
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        width = config.predictor_width
        self.proj = MLPHead(config.embed_dim, config.proj_hidden, width, out_bias=False)
        self.predictor = Predictor(grid * grid, width, config.predictor_depth, config.predictor_heads)
        self.aim_proj = nn.ModuleList([
            MLPHead(width * block_size ** 2, config.head_hidden, 3 * self.crop_size ** 2, out_bias=True)
            for _ in range(config.num_pred_heads)])
        for m in (self.proj, self.aim_proj):
            m.apply(_init_linear_and_norm)

        if config.pseudo_random:
            token_perms, block_perms = create_random_permutations(grid, block_size, config.perm_seed)
            # not persistent: rebuilt from perm_seed, so official checkpoints load strictly
            self.register_buffer("token_perms", token_perms, persistent=False)
            self.register_buffer("block_perms", block_perms, persistent=False)
            # Picks the order of each training step. Seeded alike on every rank, so all ranks use the same order
            # in a step (as in the official code, where Lightning seeds every rank's global RNG alike); the
            # global RNG, which main_pretrain seeds per rank, stays untouched. Its state is checkpointed with
            # the model's other generators, so a resumed run continues the same sequence of orders.
            self.perm_generator = torch.Generator(device="cpu").manual_seed(config.perm_seed)

    def shard_units(self) -> list[nn.Module]:
        """The encoder-to-predictor MLP and the pixel heads: 195M parameters at H/14 (a pixel head alone 185M, nine
        times an encoder block), sharded on their own under --fsdp."""
        return [self.proj, *self.aim_proj]

    # no_weight_decay() stays empty: the official optimiser decays pos_embed and the patch conv too; only 1-D
    # parameters and biases are exempt, which param_groups_weight_decay does by itself.

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
        (r, c) inside block b (the official layout, which the released head weights need)."""
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
        losses = [fn(upcast(preds[:, i, : nb - 1 - i]), target[:, 1 + i:]) for i in range(preds.shape[1])]
        return torch.stack(losses).mean()

    def forward_with_outputs(self, imgs: torch.Tensor, perm_index: int | None = None) -> tuple[torch.Tensor, dict]:
        """``(loss, {'pred': [B, heads, nb, 3c²], 'target': [B, nb, 3c²] normalised, 'block_order': [nb]})``.
        ``perm_index`` picks a pseudo-random order explicitly (tests)."""
        preds, target, order = self.predict(imgs, perm_index)
        t = upcast(target.flatten(2))
        if self.norm_pix_loss:
            t = norm_pix(t)  # per block (channels pooled), not per patch
        return self.prediction_loss(preds, t), {"pred": preds, "target": t, "block_order": order}

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.forward_with_outputs(imgs)[0], {}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """'input', 'target' (the image: targets are its pixels) and 'prediction': every block predicted by
        head 0 from the blocks before it, de-normalised with the true block's own mean and std as the official
        visualiser does. The first block of the order has no prediction and shows the input block."""
        preds, target, order = self.predict(imgs)
        t = target.flatten(2).float()
        pred = preds[:, 0].float()
        if self.norm_pix_loss:
            mean, std = norm_pix_stats(t)
            pred = pred * std.roll(-1, 1) + mean.roll(-1, 1)  # position s predicts the block at s+1
        seq = torch.cat([t[:, :1], pred[:, :-1]], dim=1)
        raster = torch.empty_like(seq)
        raster[:, order] = seq
        return {"input": imgs, "target": imgs, "prediction": self.unpatchify(raster).to(imgs.dtype)}


# ---------------------------------------------------------------------------------------------------
# The official recipe: AdamW (0.9, 0.95), wd 0.05 (pos_embed and the patch conv included), an absolute lr of 1e-3
# (no batch scaling: set --lr for another global batch), linear warmup from 1e-4, cosine to 1e-6, gradient norm
# clipped at 1, RandomResizedCrop(scale 0.3-1, ratio 0.75-1.5) + flip. The released B/16 checkpoint was trained
# 800 epochs with 15 warmup epochs on 72 GPUs × 29 images (the shipped yaml says 1600 / 40 / dpr 0.2 on 96);
# the IN-21k H/14 run 100 epochs, warmup 3, dpr 0.2, 72 × 29.
register_method(Method(
    key="xtra", name="XTRA", kind="pretrain", model_class=XTRA, config_class=XTRAConfig,
    recipe=dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_lr=1e-4, min_lr=1e-6, clip_grad=1.0,
                crop_scale=(0.3, 1.0), crop_ratio=(0.75, 1.5), epochs=800, warmup_epochs=15, batch_size=29),
    presets={
        "xtra_vit_tiny": Preset(
            "CPU-sized XTRA (32 px, patch 4, 4×4 blocks of 2×2 patches): pretrains on the digits in seconds",
            dict(TINY_CPU_BUDGET, patch_size=4, embed_dim=64, depth=2, num_heads=4, block_size=2,
                 predictor_depth=1, predictor_width=64, predictor_heads=4, proj_hidden=128, head_hidden=256,
                 drop_path=0.0), global_batch=TINY_CPU_BUDGET["batch_size"]),
        "xtra_vit_small_patch16": Preset(
            "not an official preset: ViT-S/16 at 256 px with the B/16 recipe, predictor 8×384",
            dict(embed_dim=384, num_heads=6, predictor_width=384, proj_hidden=1536, head_hidden=3072)),
        "xtra_vit_base_patch16": Preset(
            "ViT-B/16 at 256 px, 4×4 blocks of 64 px; predictor 8×768 (6 heads); head 12288 -> 6144 -> 12288"),
        "xtra_vit_huge_patch14": Preset(
            "ViT-H/14 at 224 px, 4×4 blocks of 56 px; proj 1280 -> 5120 -> 640; predictor 8×640 (8 heads); "
            "head 10240 -> 9408 -> 9408",
            dict(input_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, predictor_width=640,
                 predictor_heads=8, proj_hidden=5120, head_hidden=9408, drop_path=0.2, epochs=100,
                 warmup_epochs=3)),
    },
    memory_sizes=(("xtra_vit_base_patch16", {}), ("xtra_vit_huge_patch14", {})),
    # the released B/16 and H/14 runs: 72 GPUs × 29 (the configs of the official repository; "bs2k" in the B/16
    # checkpoint's name); the lr is absolute, so another global batch keeps lr 1e-3 unless --lr says otherwise
    global_batch=2088,
))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: Lightning (B/16, under 'state_dict', with the flattened yaml settings as hyper-parameters:
# enc_arch, enc_block_size, predictor_num_heads, aim_*, cls_*, attentive_pooling_*) or DeepSpeed (H/14, under
# 'module'); the caller strips wrapper prefixes. Keys are ours except the encoder prefix ``enc.``. Probe files
# hold the encoder and the probe head ``classifier.*`` (attentive: k, v, cls_token (the queries), bn, linear;
# linear: BatchNorm + Linear as ``classifier.0`` / ``classifier.1``).
_PRETRAIN_PARTS = ("proj.", "predictor.", "aim_proj.")


def detect_official(sd: dict, records: dict) -> bool:
    return "enc.pos_embed" in sd and "enc.patch_embed.proj.weight" in sd


def _probe(sd: dict, records: dict) -> tuple[dict, dict]:
    """The official probe head -> (our ``head.*`` keys, main_linprobe settings)."""
    head = {k[len("classifier."):]: v for k, v in sd.items() if k.startswith("classifier.")}
    common = dict(n_last_blocks=int(recorded(records, "cls_n_last_blocks") or 1),
                  final_norm=bool(recorded(records, "cls_norm_enc_output")))
    if "k.weight" in head:  # attentive pooling
        if "linear.weight" not in head:
            raise UserError("official XTRA attentive probe with an output BatchNorm: not supported")
        heads = recorded(records, "attentive_pooling_num_heads")
        if heads is None:
            raise UserError("the official XTRA probe file does not record attentive_pooling_num_heads")
        ours = {"head.query": head["cls_token"], "head.k.weight": head["k.weight"], "head.v.weight": head["v.weight"],
                "head.linear.weight": head["linear.weight"], "head.linear.bias": head["linear.bias"],
                **{f"head.bn.{k[3:]}": v for k, v in head.items() if k.startswith("bn.")}}
        return ours, dict(common, probe="attentive", probe_heads=int(heads), num_queries=head["cls_token"].shape[1])
    if "1.weight" not in head:  # the linear probe without the output BatchNorm is not this project's head
        raise UserError("official XTRA linear probe without its BatchNorm (cls_out_bn false): not supported")
    ours = {"head.linear.weight": head["1.weight"], "head.linear.bias": head["1.bias"],
            **{f"head.bn.{k[2:]}": v for k, v in head.items() if k.startswith("0.")}}
    return ours, dict(common, probe="linear", pool="avg")


def convert_official(sd: dict, records: dict) -> Converted:
    """An official file -> a whole XTRA model, its encoder alone, or (probe files) a probe of main_linprobe.py.
    Architecture from the shapes (the block size from the pixel heads when present); the predictor's head count,
    the block size of an encoder-only file and the loss settings from the recorded hyper-parameters."""
    encoder = {k[4:]: v for k, v in sd.items() if k.startswith("enc.")}
    shapes = vit_shapes(encoder)
    settings = dict(input_size=shapes["img_size"], patch_size=shapes["patch_size"], embed_dim=shapes["embed_dim"],
                    depth=shapes["depth"], mlp_ratio=shapes["mlp_ratio"], norm_pix_loss=True)
    for ours, name in (("block_size", "enc_block_size"), ("pseudo_random", "aim_pseudo_random"),
                       ("norm_pix_loss", "aim_norm_pix_loss"), ("predictor_heads", "predictor_num_heads")):
        if recorded(records, name) is not None:
            settings[ours] = recorded(records, name)
    if recorded(records, "aim_l1_loss"):
        settings["loss_type"] = "l1"
    if recorded(records, "enc_is_block_causal") is False:  # the plain causal ablation
        settings["block_size"] = 1
    if not any(k.startswith(_PRETRAIN_PARTS) for k in sd):
        if "block_size" not in settings:
            raise UserError("an official XTRA encoder file that does not record its block size (enc_block_size) "
                            "cannot be probed with its block-causal mask")
        grid = settings["input_size"] // settings["patch_size"]
        placeholders = {"predictor_heads": 1, "num_pred_heads": 1} if grid // settings["block_size"] > 1 else {}
        if any(k.startswith("classifier.") for k in sd):
            head, probe = _probe(sd, records)
            return Converted({**{"backbone." + k: v for k, v in encoder.items()}, **head}, "probe", settings,
                             {"predictor_heads": 1, **placeholders}, probe)
        return Converted(encoder, "encoder", settings, {"predictor_heads": 1, **placeholders})
    width = sd["predictor.pos_embed"].shape[-1]
    first = sd["aim_proj.0.mlp.0.weight"]
    settings.update(predictor_width=width, proj_hidden=sd["proj.mlp.0.weight"].shape[0],
                    predictor_depth=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("predictor.blocks.")),
                    num_pred_heads=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("aim_proj.")),
                    head_hidden=first.shape[0], block_size=math.isqrt(first.shape[1] // width))
    out = {"encoder." + k: v for k, v in encoder.items()}
    out.update({k: v for k, v in sd.items() if k.startswith(_PRETRAIN_PARTS)})
    return Converted(out, "pretrain", settings, {} if "predictor_heads" in settings else {"predictor_heads": 1})


register_converter("xtra", detect_official, convert_official)
