"""SAIM: stochastic autoregressive image modelling with two-stream attention ("Exploring Stochastic Autoregressive
Image Modeling for Visual Representation", Qi et al., AAAI 2023; official code github.com/qiy20/SAIM).

Every image gets its own random generation order over its patches. The content stream (the encoder: a ViT with
cls token and fixed sin-cos positions) runs under a mask where a patch sees the patches generated before it and
itself. The query stream starts from the position embeddings alone; after every ``depth // query_depth`` content
blocks one query block cross-attends from it to the CURRENT content stream, seeing strictly earlier patches only,
so the prediction of a patch never depends on that patch. The cls token is visible to every token and sees only
itself. The query stream's final LayerNorm is the encoder's ``norm`` (official ``norm``), so a cls-token
classifier fine-tuned from SAIM starts from it, as in the official code. Targets: the input image blurred with a
fixed Gaussian kernel (zero padding), patchified and normalised per patch; L2 (or L1) over every patch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from models.converters import Converted, recorded, register_converter
from models.formats import vit_shapes
from models.masks import check_orders, permutation_two_stream_masks, random_orders
from models.pixels import norm_pix, norm_pix_stats, patchify, unpatchify
from models.registry import TINY_CPU_BUDGET, VIT_H14, Method, Preset, PretrainingModel, register_method
from models.vit import Block, EncoderConfig, VisionTransformer, take_carried_buffer, upcast
from util.errors import UserError
from util.settings import setting


def gaussian_kernel2d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised [k, k] Gaussian centred on pixel (k-1)//2: the outer product of the 1-D kernel."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    return torch.outer(k1, k1).float()


class GaussianBlur(nn.Module):
    """Depthwise Gaussian blur with ZERO padding (the official ``GaussianConv2d``): borders are pulled toward 0,
    the dataset-mean colour in normalised space. The kernel is rebuilt from (kernel_size, sigma), so it is a
    non-persistent buffer. A state dict that carries ``weight`` (a converted official file: the official code
    builds the kernel in float32, 1-4 ulp from ours) sets it exactly instead."""

    def __init__(self, kernel_size: int, sigma: float, channels: int = 3):
        super().__init__()
        self.register_buffer("weight", gaussian_kernel2d(kernel_size, sigma).expand(channels, 1, -1, -1).clone(),
                             persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        take_carried_buffer(self, "weight", state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2, groups=x.shape[1])


def _split_heads(x: torch.Tensor, num_heads: int, parts: int) -> torch.Tensor:
    """[B, N, parts*C] -> [parts, B, heads, N, C/heads]."""
    B, N, W = x.shape
    return x.reshape(B, N, parts, num_heads, W // parts // num_heads).permute(2, 0, 3, 1, 4)


def _finish_block(blk: Block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of ``Block.forward`` after the attention core: output projection, residual, MLP."""
    x = x + blk.drop_path(blk.attn.proj(attn_out))
    return x + blk.drop_path(blk.mlp(blk.norm2(x)))


def paired_blocks(content_blk: Block, h: torch.Tensor, query_blk: Block, g: torch.Tensor,
                  stacked_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``content_blk(h)`` and ``query_blk(g, context=h)`` with both attention cores in ONE
    scaled_dot_product_attention call, stacked along the batch. Both read the same h (content block i+1 and query
    block i both consume the output of content block i), so this is exact; the weights differ, so only the
    attention core is shared, not the projections (the two streams have their own k/v weights, so XLNet's shared
    keys and values do not apply).
    ``stacked_mask`` = cat([content_mask, query_mask]) along the batch."""
    C, nh = h.shape[-1], content_blk.attn.num_heads
    q_h, k_h, v_h = _split_heads(content_blk.attn.qkv(content_blk.norm1(h)), nh, 3)
    w_q, w_kv = query_blk.attn.qkv.weight.split([C, 2 * C])
    b_q, b_kv = query_blk.attn.qkv.bias.split([C, 2 * C])
    q_g = _split_heads(F.linear(query_blk.norm1(g), w_q, b_q), nh, 1)[0]
    k_g, v_g = _split_heads(F.linear(query_blk.norm1(h), w_kv, b_kv), nh, 2)
    out = F.scaled_dot_product_attention(torch.cat([q_h, q_g]), torch.cat([k_h, k_g]), torch.cat([v_h, v_g]),
                                         attn_mask=stacked_mask)
    o_h, o_g = out.transpose(1, 2).flatten(2).chunk(2)
    return _finish_block(content_blk, h, o_h), _finish_block(query_blk, g, o_g)


@dataclass(frozen=True)
class SAIMConfig(EncoderConfig):
    """SAIM's settings. The defaults are the official ``saim_base`` with the flags of its README: ViT-B/16 at 224 px,
    12 query blocks, MLP head, 9×9 target blur (sigma 1), per-patch normalised targets, L2 loss."""

    query_depth: int = setting(12, "query-stream blocks, one after every depth/query_depth content blocks (must "
                                   "divide depth)")
    share_weight: bool = setting(False, "query blocks reuse the content blocks' weights")
    prediction_head: Literal["mlp", "linear"] = setting("mlp", "pixel head on the query stream")
    gaussian_kernel_size: int = setting(9, "target blur kernel side (odd; 0 = no blur)")
    gaussian_sigma: float = setting(1.0, "target blur sigma in pixels")
    norm_pix_loss: bool = setting(True, "normalise each target patch by its own mean and std")
    loss_type: Literal["l2", "l1"] = setting("l2", "pixel loss")
    fuse_streams: bool = setting(False, "run each query block's attention in the same call as the next content "
                                        "block's (exact; benchmarks/saim_attention.py)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.query_depth <= self.depth or self.depth % self.query_depth:
            raise ValueError(f"query_depth must divide depth {self.depth} (1..{self.depth}), got {self.query_depth}")
        if self.prediction_head not in ("mlp", "linear"):
            raise ValueError(f"prediction_head must be 'mlp' or 'linear', got {self.prediction_head!r}")
        if self.loss_type not in ("l2", "l1"):
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {self.loss_type!r}")
        if self.gaussian_kernel_size < 0 or (self.gaussian_kernel_size and self.gaussian_kernel_size % 2 == 0):
            # even kernels change the image size (the official code then fails in patchify)
            raise ValueError(f"gaussian_kernel_size must be odd (or 0 = no blur), got {self.gaussian_kernel_size}")
        if self.gaussian_kernel_size and self.gaussian_sigma <= 0:
            raise ValueError(f"gaussian_sigma must be positive, got {self.gaussian_sigma}")


class SAIM(PretrainingModel):
    """SAIM pretraining model: ``encoder`` (content stream) + ``query_blocks`` + ``prediction_head``.

    ``forward_with_outputs(imgs, order=None) -> (loss, {'pred', 'target', 'order'})``; ``order`` [B, L] lists each
    image's patches in generation order (default: a uniformly random permutation per image, drawn on the device).
    ``fuse_streams`` runs each query block's attention in the same SDPA call as the next content block's
    (:func:`paired_blocks`); benchmarks/saim_attention.py compares the two.
    """

    def __init__(self, config: SAIMConfig):
        super().__init__()
        self.config = c = config
        # the encoder is fine-tuned and probed bidirectionally, through the cls token (encoder_mask None)
        self.encoder = VisionTransformer(**c.vit_kwargs(), qkv_bias=True, class_token=True, pos_embed="sincos",
                                         global_pool="token", num_classes=0)
        self.patch_size, self.query_depth, self.share_weight = c.patch_size, c.query_depth, c.share_weight
        self.norm_pix_loss, self.loss_type, self.fuse_streams = c.norm_pix_loss, c.loss_type, c.fuse_streams
        if c.share_weight:
            # the same ModuleList (official): with query_depth < depth, query block k reuses content block k
            # although it runs after content block (k+1)*step - 1
            self.query_blocks = self.encoder.blocks
        else:
            # query block k takes dpr[k], as official; explicit cpu so that building on the meta device works
            dpr = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()
            self.query_blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True,
                                                     drop_path=dpr[k]) for k in range(c.query_depth)])
        out_dim = 3 * c.patch_size**2
        self.prediction_head = (Mlp(c.embed_dim, 4 * c.embed_dim, out_dim, act_layer=nn.GELU)
                                if c.prediction_head == "mlp" else nn.Linear(c.embed_dim, out_dim))
        self.gaussian_blur = (GaussianBlur(c.gaussian_kernel_size, c.gaussian_sigma) if c.gaussian_kernel_size
                              else nn.Identity())
        self._init_weights()

    def _init_weights(self) -> None:
        """Official (MAE) init: xavier-uniform for every Linear with zero bias. The official q, k and v are
        separate Linears, so each third of our fused qkv is initialised on its own."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Block):
                for w in m.attn.qkv.weight.data.chunk(3):
                    nn.init.xavier_uniform_(w)

    def _check_input(self, imgs: torch.Tensor) -> None:
        size = self.encoder.patch_embed.img_size
        if imgs.dim() != 4 or imgs.shape[1] != 3 or tuple(imgs.shape[-2:]) != tuple(size):
            raise ValueError(f"SAIM expects images [B, 3, {size[0]}, {size[1]}], got {tuple(imgs.shape)}")

    @classmethod
    def check_settings(cls, config: SAIMConfig, fsdp: bool = False) -> None:
        if fsdp and config.fuse_streams:  # paired_blocks reads two blocks' weights outside their forward
            raise UserError("--fuse_streams cannot run with --fsdp (it calls the blocks' layers directly, where "
                            "FSDP gathers a block's weights only in its forward); use one of them")

    def forward_predictions(self, imgs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel predictions [B, L, 3*p*p] (raster order) for the given generation orders."""
        content_mask, query_mask = permutation_two_stream_masks(order)
        enc = self.encoder
        h = enc.embed(imgs)
        g = enc.pos_embed.expand(imgs.shape[0], -1, -1)  # position only; the cls row of the table is zero
        depth, step = len(enc.blocks), len(enc.blocks) // self.query_depth
        if self.fuse_streams:
            stacked_mask = torch.cat([content_mask, query_mask])
            h = enc.blocks[0](h, mask=content_mask)
            for i in range(1, depth):  # content block i and query block for layer i-1 both read h = h^(i)
                if i % step == 0:
                    h, g = paired_blocks(enc.blocks[i], h, self.query_blocks[i // step - 1], g, stacked_mask)
                else:
                    h = enc.blocks[i](h, mask=content_mask)
            g = self.query_blocks[self.query_depth - 1](g, mask=query_mask, context=h)
        else:
            for i, blk in enumerate(enc.blocks):
                h = blk(h, mask=content_mask)
                if (i + 1) % step == 0:  # the query block reads the content stream AFTER content block i
                    g = self.query_blocks[i // step](g, mask=query_mask, context=h)
        # the final content state is unused (no content-stream norm in pretraining, as official)
        return self.prediction_head(enc.norm(g))[:, 1:]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Blurred, patchified and (with norm_pix_loss) per-patch normalised image, in at least fp32 even under autocast
        (the official fp16 blur quantises the targets; nothing depends on that)."""
        with torch.autocast(imgs.device.type, enabled=False):
            t = patchify(self.gaussian_blur(upcast(imgs)), self.patch_size)
            if self.norm_pix_loss:
                t = norm_pix(t)
        return t

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over every element of every patch (the first-generated patch included, as official)."""
        diff = upcast(pred) - target
        return diff.abs().mean() if self.loss_type == "l1" else diff.square().mean()

    def forward_with_outputs(self, imgs: torch.Tensor, order: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_input(imgs)
        B, L = imgs.shape[0], self.encoder.patch_embed.num_patches
        order = random_orders(B, L, imgs.device) if order is None else check_orders(order, B, L).to(imgs.device)
        pred = self.forward_predictions(imgs, order)
        target = self.targets(imgs)
        return self.loss(pred, target), {"pred": pred, "target": target, "order": order}

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.forward_with_outputs(imgs)[0], {}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Panels in normalised image space: input, blurred target, prediction (de-normalised with each target
        patch's mean and std when norm_pix_loss)."""
        _, out = self.forward_with_outputs(imgs, order)
        blurred = self.gaussian_blur(imgs.float())
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean, std = norm_pix_stats(patchify(blurred, self.patch_size))
            pred = pred * std + mean
        return {"input": imgs, "target": blurred, "prediction": unpatchify(pred, self.patch_size)}


# ---------------------------------------------------------------------------------------------------
# The official README recipe: AdamW (0.9, 0.95), wd 0.5 on every weight matrix and the cls token (the model
# defines no no_weight_decay, as official), blr 2e-4, warmup 30 of 800 epochs, cosine to 0, no clipping,
# RandomResizedCrop(scale 0.2-1, bicubic) + flip; 64 images × 32 GPUs = 2048 per step.
register_method(Method(
    key="saim", name="SAIM", kind="pretrain", model_class=SAIM, config_class=SAIMConfig,
    recipe=dict(blr=2e-4, weight_decay=0.5, betas=(0.9, 0.95), min_lr=0.0, warmup_lr=0.0, crop_scale=(0.2, 1.0),
                crop_ratio=(3 / 4, 4 / 3), batch_size=64, epochs=800, warmup_epochs=30),
    presets={
        # blur scaled down with the 4-px patches (9×9, sigma 1 would smear a quarter of every patch)
        "saim_vit_tiny": Preset(
            "CPU-sized SAIM: 32 px, patch 4, width 64, 2 content + 2 query blocks, 3×3 blur (sigma 0.5)",
            dict(TINY_CPU_BUDGET, patch_size=4, embed_dim=64, depth=2, num_heads=4, query_depth=2,
                 gaussian_kernel_size=3, gaussian_sigma=0.5), global_batch=TINY_CPU_BUDGET["batch_size"]),
        "saim_vit_small_patch16": Preset(
            "not an official preset: ViT-S/16 at 224 px, 12 query blocks, the base recipe",
            dict(embed_dim=384, num_heads=6)),
        "saim_vit_base_patch16": Preset(
            "the official saim_base with the README flags: ViT-B/16 at 224 px, 12 query blocks, MLP head, 9×9 blur "
            "(sigma 1), norm_pix_loss, L2; 175,424,256 trainable parameters"),
    },
    memory_sizes=(("saim_vit_base_patch16", {}), ("saim_vit_base_patch16", dict(VIT_H14, query_depth=32))),
    global_batch=2048,  # the official README's pretraining: 32 GPUs × 64
))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: separate attn.q/k/v per block. Pretraining files hold
# blocks / query_blocks / norm / prediction_head / gaussian_blur; fine-tuned files are timm ViT classifiers with
# the same blocks and head (+ fc_norm instead of norm with global pooling).
def _fuse_qkv(sd: dict) -> dict:
    """Concatenate every ``<block>.attn.{q,k,v}.{weight,bias}`` into ``<block>.attn.qkv.*``, rows q, k, v."""
    out = {}
    for key, value in sd.items():
        if ".attn.k." in key or ".attn.v." in key:
            continue
        if ".attn.q." in key:
            base, kind = key.split(".attn.q.")
            out[f"{base}.attn.qkv.{kind}"] = torch.cat([sd[f"{base}.attn.{p}.{kind}"] for p in "qkv"])
        else:
            out[key] = value
    return out


def detect_official(sd: dict, records: dict) -> bool:
    return "blocks.0.attn.q.weight" in sd and "patch_embed.proj.weight" in sd and "cls_token" in sd


def _sigma_of(kernel: torch.Tensor) -> float:
    """The sigma of a stored normalised Gaussian kernel [C, 1, k, k]: its 1-D factor is the row sums, and two
    neighbouring values around the centre differ by exp(-1 / (2 sigma²)). Checked by rebuilding the kernel."""
    k1 = kernel[0, 0].double().sum(dim=1)
    c = (k1.numel() - 1) // 2
    sigma = round(math.sqrt(-1 / (2 * math.log(float(k1[c + 1] / k1[c])))), 6)  # the file holds float32 values
    if not torch.allclose(gaussian_kernel2d(k1.numel(), sigma), kernel[0, 0].float(), atol=1e-6):
        raise UserError("the official gaussian_blur.weight is not a normalised Gaussian kernel")
    return sigma


def convert_official(sd: dict, records: dict) -> Converted:
    """An official file -> a whole SAIM model, or (fine-tuned files, with no query stream) a ViT classifier.

    Pretraining files: ``encoder.*`` (incl. ``encoder.norm`` = the query-stream norm), ``query_blocks.*``,
    ``prediction_head.*``; the architecture from the shapes (query depth, head type, blur kernel size and its sigma,
    which the stored kernel determines), the rest from the recorded flags (share_weight, norm_pix_loss). The stored
    kernel itself is kept as ``gaussian_blur.weight``, which the model loads instead of its computed one
    (:class:`GaussianBlur`), so targets equal the official ones bit for bit. Fine-tuned files
    are timm ViT classifiers (global pool + fc_norm when they hold ``fc_norm.*``, else the cls token after
    ``norm``)."""
    sd = _fuse_qkv(sd)
    if not any(k.startswith(("query_blocks.", "prediction_head.")) for k in sd):
        return Converted(sd, "classifier")
    encoder = {k: v for k, v in sd.items() if not k.startswith(("query_blocks.", "prediction_head.", "gaussian_"))}
    shapes = vit_shapes(encoder)
    share = bool(recorded(records, "share_weight"))
    query_blocks = {int(k.split(".")[1]) for k in sd if k.startswith("query_blocks.")}
    settings = dict(input_size=shapes["img_size"], patch_size=shapes["patch_size"], embed_dim=shapes["embed_dim"],
                    depth=shapes["depth"], mlp_ratio=shapes["mlp_ratio"], share_weight=share,
                    query_depth=int(recorded(records, "query_depth") or len(query_blocks) or shapes["depth"]),
                    prediction_head="mlp" if "prediction_head.fc1.weight" in sd else "linear",
                    gaussian_kernel_size=sd["gaussian_blur.weight"].shape[-1] if "gaussian_blur.weight" in sd else 0)
    if recorded(records, "norm_pix_loss") is not None:
        settings["norm_pix_loss"] = bool(records["norm_pix_loss"])
    if settings["gaussian_kernel_size"]:
        settings["gaussian_sigma"] = float(recorded(records, "gaussian_sigma") or _sigma_of(sd["gaussian_blur.weight"]))
    out = {("" if k.startswith(("query_blocks.", "prediction_head.")) else "encoder.") + k: v
           for k, v in sd.items() if k != "gaussian_blur.weight"}
    kernel = sd.get("gaussian_blur.weight")
    if kernel is not None and kernel.shape == (3, 1, kernel.shape[-1], kernel.shape[-1]):  # the model's shape
        out["gaussian_blur.weight"] = kernel
    return Converted(out, "pretrain", settings)


register_converter("saim", detect_official, convert_official)
