"""Scala: a slimmable ViT whose every width ratio r in [s, l] is a narrower ViT sliced out of one set of weights
("Slicing Vision Transformer for Flexible Inference", Zhang et al., NeurIPS 2024; official code
github.com/BeSpontaneous/Scala-pytorch).

The model keeps the full-size parameters of the shared backbone (timm DeiT key layout, plus ``dist_token`` and
``head_dist`` for the distilled variant) and, for ``model(x, r)``, slices them on the fly:

* embed width d = int(r·D), MLP hidden int(r·4D); the fused qkv matrix gives ONE contiguous block of 3d rows
  (so the sub-network's q/k/v are not the first d rows of the full q, k and v: official checkpoints need this);
* the number of heads is fixed, the head dim is sliced, and the attention scale stays (D/h)^-0.5;
* every LayerNorm normalises over the d active channels with eps 1e-5 (the official forward calls
  ``F.layer_norm`` without eps, so 1e-5 is what released checkpoints were trained with, also at r = 1);
* classifier biases are shared by all widths;
* "isolated activation": r = s and r = l take the FIRST d channels of every axis, every other r the LAST d.

The direction of the tokens, position embedding, final norm and heads of the official distilled model is
decided by the literal ratios 0.25 / 1.0 instead of s / l (a bug of the official ``forward_features``);
``literal_end_ratios=True`` reproduces it, which matters only when s != 0.25 or l != 1 and is needed for
checkpoints trained that way.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.converters import Converted, recorded, register_converter
from models.formats import vit_shapes
from models.registry import VIT_H14, Method, Preset, register_method
from models.vit import Block, EncoderConfig, VisionTransformer, resize_pos_embed
from util.errors import UserError
from util.settings import setting


@dataclass(frozen=True)
class WidthSpace:
    """Scala's width space: the smallest and largest ratios s and l and the granularity ε of the trained grid
    s, s+ε, ..., l (X = (l - s)/ε + 1 widths). s and l must be multiples of ε (the official sampler draws
    multiples of ε)."""

    smallest: float = 0.25
    largest: float = 1.0
    granularity: float = 1 / 16

    def __post_init__(self) -> None:
        if not 0 < self.smallest <= self.largest <= 1:
            raise ValueError(f"need 0 < smallest_ratio <= largest_ratio <= 1, got {self.smallest}, {self.largest}")
        self.steps()

    def steps(self) -> tuple[int, int]:
        """s/ε and l/ε as integers."""
        if self.granularity <= 0:
            raise ValueError(f"granularity must be positive, got {self.granularity}")
        a, b = self.smallest / self.granularity, self.largest / self.granularity
        if abs(a - round(a)) > 1e-9 or abs(b - round(b)) > 1e-9:
            raise ValueError(f"smallest {self.smallest} and largest {self.largest} must be multiples of granularity "
                             f"{self.granularity}")
        return round(a), round(b)

    def grid(self) -> list[float]:
        """The X trained widths [s, s+ε, ..., l]. Middle values are ε·k, the very floats the sampler draws (exact
        for binary fractions), and the ends are s and l themselves."""
        a, b = self.steps()
        return [self.smallest] + [self.granularity * k for k in range(a + 1, b)] + ([self.largest] if b > a else [])

    def sample(self, rng: random.Random) -> list[float]:
        """Stable sampling for one iteration: [l, r3, r2, s] with r3 uniform on the upper stratum
        [ε·floor(m/ε), l-ε] and r2 uniform on the lower one [s+ε, ε·floor(m/ε)-ε], m = (s+l)/2 (the official
        draws, in the same order: given the same ``random.Random`` state they give the same ratios).

        X = 4 widths (e.g. ε = 1/4): the official lower stratum is empty and ``randint`` crashes; here both
        interior widths run every iteration, [l, l-ε, s+ε, s] (no randomness). Fewer than 4 widths: ValueError.
        """
        a, b = self.steps()
        if b - a < 3:
            raise ValueError(f"stable sampling needs at least 4 widths, the grid {self.smallest}..{self.largest} "
                             f"step {self.granularity} has {b - a + 1}")
        if b - a == 3:
            return [self.largest, self.granularity * (b - 1), self.granularity * (a + 1), self.smallest]
        mid = (a + b) // 2  # floor(m / ε)
        r3 = self.granularity * rng.randint(mid, b - 1)
        r2 = self.granularity * rng.randint(a + 1, mid - 1)
        return [self.largest, r3, r2, self.smallest]


@dataclass(frozen=True)
class ScalaConfig(EncoderConfig):
    """Scala's settings. The defaults are the official Scala-S: a distilled DeiT-S (224 px, patch 16, 384-d, 12
    blocks, 6 heads, drop-path 0.1) trained on the 13 widths 0.25, 0.3125, ..., 1 with a DeiT-S teacher."""

    embed_dim: int = 384
    num_heads: int = 6
    drop_path: float = 0.1
    nb_classes: int | None = setting(None, "classes of the classifier; none: the dataset's")
    distilled: bool = setting(True, "DeiT's distillation token and head (the official Scala model)")
    smallest_ratio: float = setting(0.25, "s: the smallest trained width ratio")
    largest_ratio: float = setting(1.0, "l: the largest trained width ratio")
    granularity: float = setting(0.0625, "ε: trained widths s, s+ε, ..., l (1/16: X = 13)")
    literal_end_ratios: bool = setting(
        True, "official quirk: tokens / position embedding / final norm / heads take the first channels only at "
              "r = 0.25 and 1 (matters only for s != 0.25 or l != 1; keep on for official checkpoints)")
    full_warm_epochs: int = setting(10, "epochs that train the full width only")
    transfer_type: Literal["progressive", "US"] = setting(
        "progressive", "teacher of each sub-network: the next larger width, or the full width (US-Net)")
    ce_coefficient: float = setting(1.0, "noisy calibration: weight of the label cross-entropy of sub-networks")
    distillation_alpha: float = setting(0.5, "full width: weight of the teacher cross-entropy")
    teacher: str = setting("", "frozen classifier: a checkpoint of this project or a timm name (+ "
                               "--teacher_weights); none: the full width's dist head learns the labels")
    teacher_weights: str = setting("", "local weights file for a timm --teacher (nothing is downloaded)")

    def __post_init__(self) -> None:
        super().__post_init__()
        space = self.width_space  # s, l, ε valid
        for r in (space.smallest, space.largest):
            _active_width(r, self.embed_dim, self.num_heads)  # both ends must be valid widths
        if self.nb_classes is not None and self.nb_classes < 1:
            raise ValueError(f"nb_classes must be positive, got {self.nb_classes}")
        if self.teacher_weights and not self.teacher:
            raise ValueError("--teacher_weights given without --teacher")

    @property
    def width_space(self) -> WidthSpace:
        return WidthSpace(self.smallest_ratio, self.largest_ratio, self.granularity)


# How each parameter is sliced: {axis: active size} with sizes 'd' (embed width), '3d' (the
# contiguous fused-qkv block) and 'h' (MLP hidden), and which direction rule applies: 'body' (patch embed and
# blocks, decided by s/l) or 'ends' (tokens, position embedding, final norm and heads; see literal_end_ratios).
_TOP_SLICES: dict[str, tuple[str, dict[int, str]]] = {
    "cls_token": ("ends", {2: "d"}), "dist_token": ("ends", {2: "d"}), "pos_embed": ("ends", {2: "d"}),
    "patch_embed.proj.weight": ("body", {0: "d"}), "patch_embed.proj.bias": ("body", {0: "d"}),
    "norm.weight": ("ends", {0: "d"}), "norm.bias": ("ends", {0: "d"}),
    "head.weight": ("ends", {1: "d"}), "head.bias": ("ends", {}),  # biases shared by every width
    "head_dist.weight": ("ends", {1: "d"}), "head_dist.bias": ("ends", {}),
}
_BLOCK_SLICES: dict[str, dict[int, str]] = {
    "norm1.weight": {0: "d"}, "norm1.bias": {0: "d"}, "norm2.weight": {0: "d"}, "norm2.bias": {0: "d"},
    "attn.qkv.weight": {0: "3d", 1: "d"}, "attn.qkv.bias": {0: "3d"},
    "attn.proj.weight": {0: "d", 1: "d"}, "attn.proj.bias": {0: "d"},
    "mlp.fc1.weight": {0: "h", 1: "d"}, "mlp.fc1.bias": {0: "h"},
    "mlp.fc2.weight": {0: "d", 1: "h"}, "mlp.fc2.bias": {0: "d"},
}


NORM_EPS = 1e-5  # the official forward calls F.layer_norm without eps: released checkpoints were trained with 1e-5


@dataclass(frozen=True)
class Width:
    """One sub-network's slice: embed width d, MLP hidden width, and whether the blocks take the first channels."""

    d: int
    hidden: int
    first: bool

    def sizes(self) -> dict[str, int]:
        return {"d": self.d, "3d": 3 * self.d, "h": self.hidden}


def narrow(p: torch.Tensor, axes: dict[int, str], sizes: dict[str, int], first: bool) -> torch.Tensor:
    """A view of ``p`` with each listed axis cut to its active size, from the start or from the end."""
    for axis, unit in axes.items():
        n = sizes[unit]
        p = p.narrow(axis, 0 if first else p.shape[axis] - n, n)
    return p


class SlimmableBlock(Block):
    """The ViT block; given a ``width``, it runs the sub-network's slice of its own weights (heads fixed, head dim
    d/h: the contiguous 3d-row block of the fused qkv is split into its own q | k | v thirds; the attention scale
    stays that of the full head dim). Computing inside the block's own forward keeps per-block hooks working
    (FSDP2 gathers a block's weights when the block is called; activation checkpointing wraps that call)."""

    attn_scale: float = 1.0  # set by SlimmableViT: (D/h)^-0.5 of the full width

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                width: Width | None = None) -> torch.Tensor:
        if width is None:
            return super().forward(x, mask=mask, context=context)
        sizes = width.sizes()
        p = {name: narrow(t, _BLOCK_SLICES[name], sizes, width.first) for name, t in self.named_parameters()}
        B, N, d = x.shape
        h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], self.norm1.eps)
        qkv = F.linear(h, p["attn.qkv.weight"], p.get("attn.qkv.bias"))
        heads = self.attn.num_heads
        q, k, v = qkv.reshape(B, N, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.attn_scale)
        a = F.linear(a.transpose(1, 2).reshape(B, N, d), p["attn.proj.weight"], p["attn.proj.bias"])
        x = x + self.drop_path(a)
        h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], self.norm2.eps)
        h = self.mlp.act(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
        return x + self.drop_path(F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"]))


class SlimmableViT(VisionTransformer):
    """Scala's slimmable DeiT (distilled by default). ``forward(x, ratio)``: in train mode the distilled model
    returns ``(cls_logits, dist_logits)``, in eval mode their mean; the plain model returns the cls logits.
    ``transformer_blocks()`` (of the ViT) are the sliced blocks, each slicing its weights inside its own forward,
    so FSDP and ``--grad_ckpt`` wrap them as they do a plain ViT's."""

    def __init__(self, config: ScalaConfig):
        if config.nb_classes is None:
            raise ValueError("a slimmable classifier needs its number of classes (nb_classes)")
        super().__init__(**config.vit_kwargs(), in_chans=3, num_classes=config.nb_classes, qkv_bias=True,
                         class_token=True, pos_embed="learn", global_pool="token", fc_norm=False, norm_eps=NORM_EPS,
                         block=SlimmableBlock)
        self.scala_config = config  # everything needed to rebuild it (self.config stays the plain-ViT part)
        self.width_space = config.width_space
        self.img_size = config.input_size
        self.in_chans = 3
        self.num_classes = config.nb_classes
        self.mlp_hidden = self.blocks[0].mlp.fc1.out_features
        self.norm_eps = NORM_EPS
        self.distilled = distilled = config.distilled
        self.smallest_ratio, self.largest_ratio = config.smallest_ratio, config.largest_ratio
        self.literal_end_ratios = config.literal_end_ratios and distilled  # the plain official model uses s/l
        self.attn_scale = (config.embed_dim // config.num_heads) ** -0.5  # fixed at the FULL head dim for every r
        for blk in self.blocks:
            blk.attn_scale = self.attn_scale
        self.num_prefix_tokens = 2 if distilled else 1
        embed_dim, num_classes = config.embed_dim, config.nb_classes
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, embed_dim))
            self.head_dist = nn.Linear(embed_dim, num_classes)
            for p in (self.dist_token, self.pos_embed, self.head_dist.weight):
                trunc_normal_(p, std=0.02)
            nn.init.zeros_(self.head_dist.bias)
        # Official init (timm DeiT): cls token N(0, 1e-6), PyTorch's default init for the patch-embed conv.
        nn.init.normal_(self.cls_token, std=1e-6)
        self.patch_embed.proj.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|^pos_embed|^patch_embed|^dist_token",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    # -- widths and slicing ----------------------------------------------------------------------------
    def widths(self, ratio: float) -> tuple[int, int]:
        """(embed width d, MLP hidden) at ``ratio``; ValueError for a ratio outside [s, l] or whose width is not
        divisible by the (fixed) number of heads."""
        if not self.smallest_ratio <= ratio <= self.largest_ratio:
            raise ValueError(f"ratio {ratio} is outside [{self.smallest_ratio}, {self.largest_ratio}]")
        return _active_width(ratio, self.embed_dim, self.num_heads), int(ratio * self.mlp_hidden)

    def takes_first(self, ratio: float, ends: bool = False) -> bool:
        """Isolated activation: the smallest and largest ratios slice the first channels, the others the last.
        Exact float comparison, as the official code (0.25000001 counts as an intermediate ratio)."""
        if ends and self.literal_end_ratios:
            return ratio in (0.25, 1.0)  # official DistilledVisionTransformer_scala hard-codes these
        return ratio in (self.smallest_ratio, self.largest_ratio)

    def width(self, ratio: float) -> Width:
        d, hidden = self.widths(ratio)
        return Width(d, hidden, self.takes_first(ratio))

    def sliced_parameters(self, ratio: float, blocks: bool = True) -> dict[str, torch.Tensor]:
        """Views of every parameter at ``ratio`` (the sub-network's weights; gradients reach the full tensors);
        ``blocks=False``: those outside the blocks only."""
        w = self.width(ratio)
        sizes, ends_first = w.sizes(), self.takes_first(ratio, ends=True)
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("blocks."):
                if blocks:
                    out[name] = narrow(p, _BLOCK_SLICES[name.split(".", 2)[2]], sizes, w.first)
            else:
                group, axes = _TOP_SLICES[name]
                out[name] = narrow(p, axes, sizes, w.first if group == "body" else ends_first)
        return out

    def num_params(self, ratio: float) -> int:
        return sum(t.numel() for t in self.sliced_parameters(ratio).values())

    def flops(self, ratio: float, img_size: int | None = None) -> int:
        """Analytic count in fvcore's convention (the tool of the official repo): one per multiply-add of conv,
        linear and matmul, 5 per LayerNorm element; softmax, GELU, additions and biases are free."""
        d, hidden = self.widths(ratio)
        n_patch = ((img_size or self.img_size) // self.patch_size) ** 2
        n = n_patch + self.num_prefix_tokens
        block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden + 2 * 5 * n * d
        heads = (2 if self.distilled else 1) * d * self.num_classes
        return len(self.blocks) * block + n_patch * d * self.in_chans * self.patch_size ** 2 + 5 * n * d + heads

    def export(self, ratio: float) -> tuple[dict[str, torch.Tensor], dict]:
        """The sub-network at ``ratio`` as a standalone state dict (timm ``VisionTransformerDistilled`` keys, or
        ``VisionTransformer`` / models.vit keys for the plain model) and what a standalone ViT needs to
        reproduce it: embed_dim, num_heads (unchanged), mlp_ratio, LayerNorm eps 1e-5 and the attention
        scale (D/h)^-0.5, which differs from a standalone ViT's default (d/h)^-0.5 whenever ratio < 1."""
        sd = {k: v.detach().clone() for k, v in self.sliced_parameters(ratio).items()}
        d, hidden = self.widths(ratio)
        meta = dict(ratio=ratio, embed_dim=d, num_heads=self.num_heads, depth=len(self.blocks),
                    mlp_ratio=hidden / d, patch_size=self.patch_size, img_size=self.img_size,
                    in_chans=self.in_chans, num_classes=self.num_classes, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                    distilled=self.distilled, attn_scale=self.attn_scale, norm_eps=self.norm_eps)
        return sd, meta

    # -- forward -----------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of patch size {self.patch_size}")
        x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2)
        pos = resize_pos_embed(p["pos_embed"], x.shape[1], self.num_prefix_tokens)
        prefix = [p["cls_token"]] + ([p["dist_token"]] if self.distilled else [])
        return torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + pos

    def _features(self, x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, width = self.sliced_parameters(ratio, blocks=False), self.width(ratio)
        x = self._embed(x, p)
        for blk in self.blocks:
            x = blk(x, width=width)
        return F.layer_norm(x, (x.shape[-1],), p["norm.weight"], p["norm.bias"], self.norm_eps), p

    def embed(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """Prefix tokens + patch tokens + position embedding at ``ratio`` (the inherited ``forward_blocks`` /
        ``get_intermediate_layers`` run the unsliced blocks, so use them at ratio 1 only)."""
        return self._embed(x, self.sliced_parameters(ratio, blocks=False))

    def forward_features(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """Final-norm tokens [B, prefix + patches, d] of the sub-network at ``ratio``."""
        return self._features(x, ratio)[0]

    def forward(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, p = self._features(x, ratio)
        logits = F.linear(x[:, 0], p["head.weight"], p["head.bias"])
        if not self.distilled:
            return logits
        dist = F.linear(x[:, 1], p["head_dist.weight"], p["head_dist.bias"])
        return (logits, dist) if self.training else (logits + dist) / 2


def _active_width(ratio: float, embed_dim: int, num_heads: int) -> int:
    d = int(ratio * embed_dim)  # int() floors, as the official code
    if d == 0 or d % num_heads:
        raise ValueError(f"ratio {ratio} gives width {d}, not a positive multiple of the {num_heads} heads "
                         f"(valid ratios are multiples of {num_heads}/{embed_dim})")
    return d


# ---------------------------------------------------------------------------------------------------
# The official recipes (run.sh; trained on 4 GPUs): AdamW, wd 0.05, peak lr = lr × batch / 512 with lr 2e-3 at
# 4 × 256 for Scala-S (blr 1e-3 here, lr = blr × batch / 256) and 1e-3 at 4 × 128 for Scala-B (blr 5e-4);
# warmup from 1e-6, cosine to 1e-5; DeiT augmentation (RandAugment m1 / m4, mixup 0.8, cutmix 1, smoothing 0.1,
# random erasing 0.25); 100 epochs (S) / 300 (B), the first 10 at full width only.
register_method(Method(
    key="scala", name="Scala", kind="slimmable", model_class=SlimmableViT, config_class=ScalaConfig,
    recipe=dict(batch_size=256, epochs=100, blr=1e-3, min_lr=1e-5, warmup_epochs=3, warmup_lr=1e-6,
                weight_decay=0.05, crop_pct=0.875, aa="rand-m1-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
    presets={
        "scala_vit_tiny": Preset("CPU-sized Scala: 32 px, patch 4, 64-d, 2 blocks, 4 heads",
                                 dict(input_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                      knn_every=0),  # as the other tiny presets: no kNN monitor
                                 global_batch=256),  # one process of the recipe's 256
        "scala_deit_small_patch16": Preset("Scala-S: distilled DeiT-S/16 at 224 px, 13 widths 0.25..1"),
        "scala_deit_base_patch16": Preset(
            "Scala-B: distilled DeiT-B/16 at 224 px, 13 widths 0.25..1 (the official run.sh passes --discrete_ratio, "
            "which its own parser rejects; --granularity 0.0625 is what it meant)",
            dict(embed_dim=768, num_heads=12, batch_size=128, epochs=300, blr=5e-4, warmup_epochs=5,
                 aa="rand-m4-mstd0.5-inc1"), global_batch=512),  # the official Scala-B run: 4 GPUs × 128
    },
    memory_sizes=(("scala_deit_base_patch16", {}), ("scala_deit_base_patch16", VIT_H14)),
    global_batch=1024,  # the official Scala-S run (run.sh): 4 GPUs × 256
))


# ---------------------------------------------------------------------------------------------------
# Losses of one iteration
def width_losses(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, ratios: list[float],
                 teacher_logits: torch.Tensor | None = None, transfer: str = "progressive",
                 ce_coefficient: float = 1.0, distill_alpha: float = 0.5) -> Iterator[tuple[float, torch.Tensor]]:
    """Yield ``(ratio, loss)`` per width, widest first. The caller backpropagates each loss before asking for
    the next, so only one width's graph is alive at a time; the step's gradient is that of the sum.

    * ratios[0] (full width): (1-α)·CE(cls, targets) + α·CE(dist, argmax teacher) (DeiT hard distillation);
      without a teacher the dist head also learns the targets: ½·CE(cls, targets) + ½·CE(dist, targets).
    * every other width: KL_batchmean(softmax(t) ‖ log_softmax(dist)) + ce_coefficient·CE(cls, targets),
      where t is the detached dist logits of the previous (next larger) width (``progressive``) or of the
      full width (``US``).
    ``targets``: class indices or (mixup) probabilities. ``model`` may be DDP-wrapped; it must be distilled and
    in train mode.
    """
    if transfer not in ("progressive", "US"):
        raise ValueError(f"transfer must be 'progressive' or 'US', got {transfer!r}")
    full = previous = None
    for j, ratio in enumerate(ratios):
        out = model(images, ratio)
        if not isinstance(out, tuple):
            raise ValueError("width_losses needs the distilled model in train mode (cls and dist logits)")
        # losses in at least float32 (the logits are bf16/fp16 under autocast)
        cls, dist = (o.to(torch.promote_types(o.dtype, torch.float32)) for o in out)
        if j == 0:
            kd_target = teacher_logits.argmax(dim=1) if teacher_logits is not None else targets
            alpha = distill_alpha if teacher_logits is not None else 0.5
            loss = (1 - alpha) * F.cross_entropy(cls, targets) + alpha * F.cross_entropy(dist, kd_target)
            full = dist.detach()
        else:
            teacher = full if transfer == "US" else previous
            loss = (F.kl_div(F.log_softmax(dist, dim=1), F.softmax(teacher, dim=1), reduction="batchmean")
                    + ce_coefficient * F.cross_entropy(cls, targets))
        previous = dist.detach()
        yield ratio, loss


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: DeiT-style files (the weights under ``model``, the flags as an argparse.Namespace under
# ``args``: model name, smallest_ratio, largest_ratio, granularity); the keys are this model's already.
def detect_official(sd: dict, records: dict) -> bool:
    """The distilled DeiT layout, or a plain DeiT-layout classifier whose recorded model name is a Scala one."""
    deit = {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "head.weight"} <= sd.keys()
    return deit and ("dist_token" in sd or "scala" in str(records.get("model", "")).lower())


def convert_official(sd: dict[str, torch.Tensor], records: dict) -> Converted:
    """An official Scala file -> a SlimmableViT: the architecture and classes from the shapes, the width space
    (s, l, ε) from the recorded flags (they become the defaults of evaluation and resume)."""
    shapes = vit_shapes(sd)
    if shapes["in_chans"] != 3 or not shapes["qkv_bias"]:
        raise UserError("not a Scala layout: RGB input and qkv biases expected")
    settings = dict(input_size=shapes["img_size"], patch_size=shapes["patch_size"], embed_dim=shapes["embed_dim"],
                    depth=shapes["depth"], mlp_ratio=shapes["mlp_ratio"], nb_classes=sd["head.weight"].shape[0],
                    distilled="dist_token" in sd)
    for name in ("smallest_ratio", "largest_ratio", "granularity"):
        if recorded(records, name) is not None:
            settings[name] = float(records[name])
    # every tensor of that model, with its shape, and nothing else (shapes do not depend on the head count)
    with torch.device("meta"):
        ref = SlimmableViT(ScalaConfig(**settings, num_heads=1)).state_dict()
    wrong = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and ref[k].shape != sd[k].shape]
    if wrong:
        raise UserError(f"official Scala state dict does not fit the inferred architecture: {wrong[:8]}")
    return Converted(dict(sd), "slimmable", settings)


register_converter("scala", detect_official, convert_official)
