"""SAIM: stochastic autoregressive image modelling with two-stream attention (Qi et al., AAAI 2023;
spec /work/shared/specs/saim.md).

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

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from models.masks import permutation_two_stream_masks
from models.registry import TINY_CPU_BUDGET, matching_preset, register_converter, register_pretrain
from models.vit import Block, VisionTransformer
from util.args import str2bool

NORM_PIX_EPS = 1e-6  # added to the (unbiased) per-patch variance inside the sqrt, as the official loss
HEAD_TYPES = ("linear", "mlp")
LOSS_TYPES = ("l2", "l1", "mse")  # 'mse' = 'l2', the spelling XTRA's --loss_type uses (the flag is shared)


def gaussian_kernel2d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised [k, k] Gaussian centred on pixel (k-1)//2: the outer product of the 1-D kernel."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    return torch.outer(k1, k1).float()


class GaussianBlur(nn.Module):
    """Depthwise Gaussian blur with ZERO padding (the official ``GaussianConv2d``): borders are pulled toward 0,
    the dataset-mean colour in normalised space. The kernel is rebuilt from (kernel_size, sigma), so it is a
    non-persistent buffer; the official ``gaussian_blur.weight`` is dropped by the converter."""

    def __init__(self, kernel_size: int, sigma: float, channels: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            # even kernels change the image size (the official code then fails in patchify, spec §8)
            raise ValueError(f"gaussian_kernel_size must be odd and positive, got {kernel_size}")
        if sigma <= 0:
            raise ValueError(f"gaussian_sigma must be positive, got {sigma}")
        self.register_buffer("weight", gaussian_kernel2d(kernel_size, sigma).expand(channels, 1, -1, -1).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2, groups=x.shape[1])


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches in raster order, each flattened as (row, col, channel) (MAE)."""
    B, C, H, W = imgs.shape
    h, w = H // patch_size, W // patch_size
    x = imgs.reshape(B, C, h, patch_size, w, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch_size**2 * C)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    B, L, _ = x.shape
    side = int(L**0.5)
    x = x.reshape(B, side, side, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, side * patch_size, side * patch_size)


def patch_mean_std(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and sqrt(unbiased var + eps) over all channels together, as the official norm_pix_loss."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()


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
    attention core is shared, not the projections (spec §9: an XLNet-style shared K/V is impossible).
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


class SAIM(nn.Module):
    """SAIM pretraining model: ``encoder`` (content stream) + ``query_blocks`` + ``prediction_head``.

    ``forward(imgs, order=None) -> (loss, {'pred', 'target', 'order'})``; ``order`` [B, L] lists each image's
    patches in generation order (default: a uniformly random permutation per image, drawn on the device).
    ``fuse_streams`` runs each query block's attention in the same SDPA call as the next content block's
    (:func:`paired_blocks`); benchmarks/saim_attention.py compares the two.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, query_depth: int = 12, share_weight: bool = False,
                 prediction_head: str = "mlp", gaussian_kernel_size: int = 9, gaussian_sigma: float = 1.0,
                 norm_pix_loss: bool = True, loss_type: str = "l2", drop_path_rate: float = 0.0,
                 fuse_streams: bool = False):
        super().__init__()
        if not 1 <= query_depth <= depth or depth % query_depth:
            raise ValueError(f"query_depth must divide depth {depth} (1..{depth}), got {query_depth}")
        if prediction_head not in HEAD_TYPES:
            raise ValueError(f"prediction_head must be one of {HEAD_TYPES}, got {prediction_head!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if gaussian_kernel_size < 0:
            raise ValueError(f"gaussian_kernel_size must be >= 0 (0 = no blur), got {gaussian_kernel_size}")
        self.encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
                                         pos_embed="sincos", global_pool="token", num_classes=0,
                                         drop_path_rate=drop_path_rate)
        self.encoder_mask = None  # fine-tuned and probed bidirectionally, through the cls token
        self.patch_size, self.query_depth, self.share_weight = patch_size, query_depth, share_weight
        self.norm_pix_loss, self.loss_type, self.fuse_streams = norm_pix_loss, loss_type, fuse_streams
        if share_weight:
            # the same ModuleList (official): with query_depth < depth, query block k reuses content block k
            # although it runs after content block (k+1)*step - 1 (spec §8)
            self.query_blocks = self.encoder.blocks
        else:
            # query block k takes dpr[k], as official; explicit cpu so that building on the meta device works
            dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
            self.query_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[k])
                                               for k in range(query_depth)])
        out_dim = 3 * patch_size**2
        self.prediction_head = (Mlp(embed_dim, 4 * embed_dim, out_dim, act_layer=nn.GELU) if prediction_head == "mlp"
                                else nn.Linear(embed_dim, out_dim))
        self.gaussian_blur = (GaussianBlur(gaussian_kernel_size, gaussian_sigma) if gaussian_kernel_size
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

    def random_order(self, batch: int, device: torch.device) -> torch.Tensor:
        """One uniformly random permutation per image (argsort of iid uniforms, as official, without ties)."""
        return torch.rand(batch, self.encoder.patch_embed.num_patches, device=device).argsort(dim=1)

    def _check_input(self, imgs: torch.Tensor, order: torch.Tensor | None) -> None:
        size = self.encoder.patch_embed.img_size
        if imgs.dim() != 4 or imgs.shape[1] != 3 or tuple(imgs.shape[-2:]) != tuple(size):
            raise ValueError(f"SAIM expects images [B, 3, {size[0]}, {size[1]}], got {tuple(imgs.shape)}")
        if order is not None and tuple(order.shape) != (imgs.shape[0], self.encoder.patch_embed.num_patches):
            raise ValueError(f"order must be [batch, patches] = [{imgs.shape[0]}, "
                             f"{self.encoder.patch_embed.num_patches}], got {tuple(order.shape)}")

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
        """Blurred, patchified and (with norm_pix_loss) per-patch normalised image, in fp32 even under autocast
        (the official fp16 blur quantises the targets; nothing depends on that)."""
        with torch.autocast(imgs.device.type, enabled=False):
            t = patchify(self.gaussian_blur(imgs.float()), self.patch_size)
            if self.norm_pix_loss:
                mean, std = patch_mean_std(t)
                t = (t - mean) / std
        return t

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over every element of every patch (the first-generated patch included, as official)."""
        diff = pred.float() - target
        return diff.abs().mean() if self.loss_type == "l1" else diff.square().mean()

    def forward(self, imgs: torch.Tensor, order: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_input(imgs, order)
        order = self.random_order(imgs.shape[0], imgs.device) if order is None else order
        pred = self.forward_predictions(imgs, order)
        target = self.targets(imgs)
        return self.loss(pred, target), {"pred": pred, "target": target, "order": order}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Panels in normalised image space: input, blurred target, prediction (de-normalised with each target
        patch's mean and std when norm_pix_loss)."""
        _, out = self(imgs, order)
        blurred = self.gaussian_blur(imgs.float())
        pred = out["pred"].float()
        if self.norm_pix_loss:
            mean, std = patch_mean_std(patchify(blurred, self.patch_size))
            pred = pred * std + mean
        return {"input": imgs, "target": blurred, "prediction": unpatchify(pred, self.patch_size)}


# ---------------------------------------------------------------------------------------------------
# Presets. The README recipe (spec §5): AdamW (0.9, 0.95), wd 0.5 on every weight matrix and the cls token (the
# model defines no no_weight_decay, as official), blr 2e-4, warmup 30 of 800 epochs, cosine to 0, no clipping,
# RandomResizedCrop(scale 0.2-1, bicubic) + flip; 64 images × 32 GPUs = 2048 per step.
_RECIPE = dict(blr=2e-4, weight_decay=0.5, betas=(0.9, 0.95), min_lr=0.0, warmup_lr=0.0, crop_scale=(0.2, 1.0),
               crop_ratio=(3 / 4, 4 / 3), drop_path=0.0)
_DEFAULTS = dict(share_weight=False, prediction_head="mlp", gaussian_kernel_size=9,
                 gaussian_sigma=1.0, norm_pix_loss=True, loss_type="l2")
_ARCH = {
    # blur scaled down with the 4-px patches (9×9, sigma 1 would smear a quarter of every patch)
    "saim_vit_tiny": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, query_depth=2,
                          gaussian_kernel_size=3, gaussian_sigma=0.5),
    "saim_vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, query_depth=12),
    "saim_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, query_depth=12),
}


def build_saim(preset: str, img_size: int | None = None, query_depth: int | None = None,
               share_weight: bool | None = None, prediction_head: str | None = None,
               gaussian_kernel_size: int | None = None, gaussian_sigma: float | None = None,
               norm_pix_loss: bool | None = None, loss_type: str | None = None, drop_path_rate: float | None = None,
               fuse_streams: bool | None = None) -> SAIM:
    """A SAIM preset; every keyword that is not None (a main_pretrain.py flag) overrides it."""
    overrides = {k: v for k, v in locals().items() if k != "preset" and v is not None}
    return SAIM(**{**_DEFAULTS, **_ARCH[preset], **overrides})


_PRESETS = {  # (recipe, description)
    "saim_vit_tiny": (TINY_CPU_BUDGET,
                      "CPU-sized SAIM: 32 px, patch 4, width 64, 2 content + 2 query blocks, 3×3 blur (sigma 0.5)"),
    "saim_vit_small_patch16": (dict(input_size=224, batch_size=64, epochs=800, warmup_epochs=30),
                               "not an official preset: ViT-S/16 at 224 px, 12 query blocks, the base recipe"),
    "saim_vit_base_patch16": (dict(input_size=224, batch_size=64, epochs=800, warmup_epochs=30),
                              "the official saim_base with the README flags: ViT-B/16 at 224 px, 12 query blocks, "
                              "MLP head, 9×9 blur (sigma 1), norm_pix_loss, L2; 175,424,256 trainable parameters"),
}
for _name, (_recipe, _description) in _PRESETS.items():
    register_pretrain(_name, build_saim, dict(_RECIPE, **_recipe), _description)


def add_args(parser: argparse.ArgumentParser) -> None:
    """SAIM flags of main_pretrain.py (default None = the preset's value). Image size and drop-path come from the
    shared --input_size and --drop_path."""
    g = parser.add_argument_group("SAIM")
    g.add_argument("--query_depth", type=int, default=None, help="query blocks; must divide the encoder depth")
    g.add_argument("--share_weight", type=str2bool, default=None, help="query blocks reuse the content blocks")
    g.add_argument("--prediction_head", choices=HEAD_TYPES, default=None, help="pixel head on the query stream")
    g.add_argument("--gaussian_kernel_size", type=int, default=None, help="target blur kernel (odd; 0 = no blur)")
    g.add_argument("--gaussian_sigma", type=float, default=None, help="target blur sigma in pixels")
    g.add_argument("--norm_pix_loss", type=str2bool, default=None, help="per-patch normalised targets")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default=None, help="pixel loss (mse = l2)")
    g.add_argument("--fuse_streams", type=str2bool, default=None,
                   help="one attention call for each query block and the next content block (exact)")


# ---------------------------------------------------------------------------------------------------
# Official checkpoints (official_keys/saim.md): separate attn.q/k/v per block. Pretraining files hold
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


def detect_official(sd: dict) -> bool:
    return "blocks.0.attn.q.weight" in sd and "patch_embed.proj.weight" in sd and "cls_token" in sd


def convert_official(sd: dict) -> tuple[dict, str | None]:
    """Official state dict -> (ours, preset).

    * Pretraining checkpoint (has ``query_blocks``/``prediction_head``): our SAIM state dict (``encoder.*`` incl.
      ``encoder.norm`` = the query-stream norm, ``query_blocks.*``, ``prediction_head.*``) and the SAIM preset whose
      ENCODER matches. The Gaussian kernel is dropped (rebuilt from --gaussian_kernel_size/--gaussian_sigma). A
      LINEAR head or another query depth needs the matching flags to load the full model (the encoder loads as is).
    * Fine-tuned checkpoint (has ``head``): a classifier state dict for ``models.vit.VisionTransformer`` and preset
      None (no pretraining model fits); ``util.checkpoint`` reads its architecture from the shapes (global pool +
      fc_norm when it holds ``fc_norm.*``, else the cls token after ``norm``).
    """
    sd = _fuse_qkv(sd)
    if not any(k.startswith(("query_blocks.", "prediction_head.")) for k in sd):
        return sd, None
    out = {}
    for key, value in sd.items():
        if key == "gaussian_blur.weight":
            continue
        out[key if key.startswith(("query_blocks.", "prediction_head.")) else "encoder." + key] = value
    return out, matching_preset(build_saim, out, "encoder.")  # the ENCODER decides; other parts load strictly later


register_converter("saim", detect_official, convert_official)
