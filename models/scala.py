"""Scala: a slimmable ViT whose every width ratio r in [s, l] is a narrower ViT sliced out of one set of weights
("Slicing Vision Transformer for Flexible Inference", NeurIPS 2024; spec: specs/scala.md).

The model keeps the full-size parameters of the shared backbone (timm DeiT key layout, plus ``dist_token`` and
``head_dist`` for the distilled variant) and, for ``model(x, r)``, slices them on the fly (spec §1.3):

* embed width d = int(r·D), MLP hidden int(r·4D); the fused qkv matrix gives ONE contiguous block of 3d rows
  (so the sub-network's q/k/v are not the first d rows of the full q, k and v: official checkpoints need this);
* the number of heads is fixed, the head dim is sliced, and the attention scale stays (D/h)^-0.5;
* every LayerNorm normalises over the d active channels with eps 1e-5 (the official forward calls
  ``F.layer_norm`` without eps, so 1e-5 is what released checkpoints were trained with, also at r = 1);
* classifier biases are shared by all widths;
* "isolated activation": r = s and r = l take the FIRST d channels of every axis, every other r the LAST d.

The direction of the tokens, position embedding, final norm and heads of the official distilled model is
decided by the literal ratios 0.25 / 1.0 instead of s / l (a bug, spec §1.2); ``literal_end_ratios=True``
reproduces it, which matters only when s != 0.25 or l != 1 and is needed for checkpoints trained that way.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from models.registry import register_converter
from models.vit import VIT_PRESETS, VisionTransformer

# Presets: (shared ViT preset, image size). The tiny one is for CPU tests.
SCALA_PRESETS: dict[str, tuple[str, int]] = {
    "scala_vit_tiny": ("vit_tiny_patch4", 32),
    "scala_deit_small_patch16": ("vit_small_patch16", 224),
    "scala_deit_base_patch16": ("vit_base_patch16", 224),
}

# How each parameter is sliced (spec §1.3): {axis: active size} with sizes 'd' (embed width), '3d' (the
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


class SlimmableViT(VisionTransformer):
    """Scala's slimmable DeiT (distilled by default). ``forward(x, ratio)``: in train mode the distilled model
    returns ``(cls_logits, dist_logits)``, in eval mode their mean; the plain model returns the cls logits."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, distilled: bool = True,
                 smallest_ratio: float = 0.25, largest_ratio: float = 1.0, norm_eps: float = 1e-5,
                 literal_end_ratios: bool = True):
        if num_classes <= 0:
            raise ValueError(f"a slimmable classifier needs num_classes > 0, got {num_classes}")
        if not 0 < smallest_ratio <= largest_ratio <= 1:
            raise ValueError(f"need 0 < smallest_ratio <= largest_ratio <= 1, got {smallest_ratio}, {largest_ratio}")
        for r in (smallest_ratio, largest_ratio):
            _active_width(r, embed_dim, num_heads)  # both ends must be valid widths (before building anything)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, class_token=True, pos_embed="learn", global_pool="token",
                         fc_norm=False, drop_path_rate=drop_path_rate, norm_eps=norm_eps)
        # Everything needed to rebuild this model (self.config stays the plain-ViT part, as for every encoder).
        self.scala_config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                 num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, distilled=distilled,
                                 smallest_ratio=smallest_ratio, largest_ratio=largest_ratio, norm_eps=norm_eps,
                                 literal_end_ratios=literal_end_ratios)
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.mlp_hidden = self.blocks[0].mlp.fc1.out_features
        self.norm_eps = norm_eps
        self.distilled = distilled
        self.smallest_ratio, self.largest_ratio = smallest_ratio, largest_ratio
        self.literal_end_ratios = literal_end_ratios and distilled  # the plain official model uses s/l
        self.attn_scale = (embed_dim // num_heads) ** -0.5  # fixed at the FULL head dim for every ratio
        self.num_prefix_tokens = 2 if distilled else 1
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

    def reset_classifier(self, num_classes: int, head_init_std: float = 0.02) -> None:
        if num_classes <= 0:
            raise ValueError(f"a slimmable classifier needs num_classes > 0, got {num_classes}")
        super().reset_classifier(num_classes, head_init_std)
        self.num_classes = self.scala_config["num_classes"] = num_classes
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes)
            trunc_normal_(self.head_dist.weight, std=head_init_std)
            nn.init.zeros_(self.head_dist.bias)

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

    def sliced_parameters(self, ratio: float) -> dict[str, torch.Tensor]:
        """Views of every parameter at ``ratio`` (the sub-network's weights; gradients reach the full tensors)."""
        d, hidden = self.widths(ratio)
        size = {"d": d, "3d": 3 * d, "h": hidden}
        first = {"body": self.takes_first(ratio), "ends": self.takes_first(ratio, ends=True)}
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("blocks."):
                group, axes = "body", _BLOCK_SLICES[name.split(".", 2)[2]]
            else:
                group, axes = _TOP_SLICES[name]
            for axis, unit in axes.items():
                n = size[unit]
                p = p.narrow(axis, 0 if first[group] else p.shape[axis] - n, n)
            out[name] = p
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
        pos = p["pos_embed"]
        if x.shape[1] + self.num_prefix_tokens != pos.shape[1]:
            side = math.isqrt(x.shape[1])
            pos = resample_abs_pos_embed(pos, (side, side), num_prefix_tokens=self.num_prefix_tokens)
        prefix = [p["cls_token"]] + ([p["dist_token"]] if self.distilled else [])
        return torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + pos

    def _block(self, i: int, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        blk, pre = self.blocks[i], f"blocks.{i}."
        B, N, d = x.shape
        h = F.layer_norm(x, (d,), p[pre + "norm1.weight"], p[pre + "norm1.bias"], self.norm_eps)
        qkv = F.linear(h, p[pre + "attn.qkv.weight"], p.get(pre + "attn.qkv.bias"))
        # heads fixed, head dim d/h: the contiguous 3d-row block is split into its own q | k | v thirds
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.attn_scale)
        a = F.linear(a.transpose(1, 2).reshape(B, N, d), p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
        x = x + blk.drop_path(a)
        h = F.layer_norm(x, (d,), p[pre + "norm2.weight"], p[pre + "norm2.bias"], self.norm_eps)
        h = blk.mlp.act(F.linear(h, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"]))
        return x + blk.drop_path(F.linear(h, p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"]))

    def _features(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._embed(x, p)
        for i in range(len(self.blocks)):
            x = self._block(i, x, p)
        return F.layer_norm(x, (x.shape[-1],), p["norm.weight"], p["norm.bias"], self.norm_eps)

    def embed(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """Prefix tokens + patch tokens + position embedding at ``ratio`` (the inherited ``forward_blocks`` /
        ``get_intermediate_layers`` run the unsliced blocks, so use them at ratio 1 only)."""
        return self._embed(x, self.sliced_parameters(ratio))

    def forward_features(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """Final-norm tokens [B, prefix + patches, d] of the sub-network at ``ratio``."""
        return self._features(x, self.sliced_parameters(ratio))

    def forward(self, x: torch.Tensor, ratio: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        p = self.sliced_parameters(ratio)
        x = self._features(x, p)
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


def create_scala(name: str, **kwargs) -> SlimmableViT:
    """Build a preset by name; ``kwargs`` (num_classes, smallest_ratio, drop_path_rate, ...) override it."""
    if name not in SCALA_PRESETS:
        raise ValueError(f"unknown Scala model {name!r}; known: {', '.join(sorted(SCALA_PRESETS))}")
    vit_name, img_size = SCALA_PRESETS[name]
    return SlimmableViT(**{**VIT_PRESETS[vit_name], "img_size": img_size, **kwargs})


# ---------------------------------------------------------------------------------------------------
# Ratio grid and stable sampling (spec §2)
def _grid_steps(smallest: float, largest: float, granularity: float) -> tuple[int, int]:
    """s/ε and l/ε as integers; the official sampler draws multiples of ε, so s and l must be multiples too."""
    if granularity <= 0 or not 0 < smallest <= largest:
        raise ValueError(f"need granularity > 0 and 0 < smallest <= largest, got {granularity}, {smallest}, {largest}")
    a, b = smallest / granularity, largest / granularity
    if abs(a - round(a)) > 1e-9 or abs(b - round(b)) > 1e-9:
        raise ValueError(f"smallest {smallest} and largest {largest} must be multiples of granularity {granularity}")
    return round(a), round(b)


def ratio_grid(smallest: float = 0.25, largest: float = 1.0, granularity: float = 1 / 16) -> list[float]:
    """The X = (l - s)/ε + 1 trained widths [s, s+ε, ..., l]. Middle values are ε·k, the very floats the
    sampler draws (exact for binary fractions), and the ends are s and l themselves."""
    a, b = _grid_steps(smallest, largest, granularity)
    return [smallest] + [granularity * k for k in range(a + 1, b)] + ([largest] if b > a else [])


def sample_ratios(rng: random.Random, smallest: float = 0.25, largest: float = 1.0,
                  granularity: float = 1 / 16) -> list[float]:
    """Stable sampling for one iteration: [l, r3, r2, s] with r3 uniform on the upper stratum
    [ε·floor(m/ε), l-ε] and r2 uniform on the lower one [s+ε, ε·floor(m/ε)-ε], m = (s+l)/2 (the official
    draws, in the same order: given the same ``random.Random`` state they give the same ratios).

    X = 4 widths (e.g. ε = 1/4): the official lower stratum is empty and ``randint`` crashes; here both
    interior widths run every iteration, [l, l-ε, s+ε, s] (no randomness). Fewer than 4 widths: ValueError.
    """
    a, b = _grid_steps(smallest, largest, granularity)
    if b - a < 3:
        raise ValueError(f"stable sampling needs at least 4 widths, the grid {smallest}..{largest} step "
                         f"{granularity} has {b - a + 1}")
    if b - a == 3:
        return [largest, granularity * (b - 1), granularity * (a + 1), smallest]
    mid = (a + b) // 2  # floor(m / ε)
    r3 = granularity * rng.randint(mid, b - 1)
    r2 = granularity * rng.randint(a + 1, mid - 1)
    return [largest, r3, r2, smallest]


# ---------------------------------------------------------------------------------------------------
# Losses of one iteration (spec §4)
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
# Official checkpoints and initialisation from this project's encoders
def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """SlimmableViT kwargs (architecture) of a timm-DeiT-layout state dict. Heads are not visible in the
    shapes: default D/64 (DeiT-Ti/S/B all use head dim 64)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "head.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a DeiT/Scala state dict: missing {missing}")
    from util.checkpoint import vit_shapes  # here: util.checkpoint imports the models package

    shapes = vit_shapes(sd)
    D = shapes["embed_dim"]
    if num_heads is None:
        if D % 64:
            raise ValueError(f"cannot infer the number of heads for embed dim {D}; pass num_heads")
        num_heads = D // 64
    return dict(shapes, num_classes=sd["head.weight"].shape[0], num_heads=num_heads, distilled="dist_token" in sd)


def _detect_official(sd: dict) -> bool:
    return {"dist_token", "head_dist.weight", "pos_embed", "blocks.0.attn.qkv.weight"} <= sd.keys()


def convert_official(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], None]:
    """Official Scala checkpoints (``model`` of a DeiT-style file) already use this model's keys: check them
    against the inferred architecture and return them. No pretraining preset fits a classifier, so the preset
    is None; rebuild with ``SlimmableViT(**config_from_state_dict(sd))`` (+ the s/l it was trained with)."""
    with torch.device("meta"):
        ref = SlimmableViT(**config_from_state_dict(sd)).state_dict()
    wrong = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and ref[k].shape != sd[k].shape]
    if wrong:
        raise ValueError(f"official Scala state dict does not fit the inferred architecture: {wrong[:8]}")
    return dict(sd), None


register_converter("scala", _detect_official, convert_official)


def load_encoder(model: SlimmableViT, ckpt: dict) -> dict[str, list[str]]:
    """Initialise ``model`` from the encoder of a checkpoint of this project (XTRA, SAIM, D-iGPT pretraining,
    fine-tuned classifiers, Scala): keys ``model``, ``vit_config``, ``vit_prefix``.

    Same-shape weights are copied; the patch part of the position embedding is resampled to this grid; the cls
    position row is copied when the encoder has a cls token. Tokens the encoder lacks (the dist token, and the
    cls token of XTRA encoders, which have none) keep their fresh init with a ZERO position row, so at the
    start they only carry their learned token. Heads are fresh unless shapes match. Note the encoder's
    LayerNorm eps (1e-6) becomes Scala's 1e-5. Returns the missing and unexpected keys.
    """
    from util.checkpoint import vit_state_dict  # here: util.checkpoint imports the models package

    cfg = ckpt["vit_config"]
    clash = {k: (cfg.get(k), model.config[k]) for k in ("embed_dim", "depth", "num_heads", "patch_size",
                                                           "mlp_ratio", "qkv_bias", "in_chans")
             if cfg.get(k, model.config[k]) != model.config[k]}
    if clash:
        raise ValueError(f"encoder architecture differs from the slimmable model (checkpoint, model): {clash}")
    sd = vit_state_dict(ckpt)
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        n_src = int(cfg.get("class_token", True)) + int("dist_token" in sd)
        patches = resample_abs_pos_embed(pos, (model.grid_size, model.grid_size), num_prefix_tokens=n_src)
        prefix = torch.zeros(1, model.num_prefix_tokens, pos.shape[-1], dtype=pos.dtype)
        n_copy = min(n_src, model.num_prefix_tokens)
        prefix[:, :n_copy] = pos[:, :n_copy]
        sd["pos_embed"] = torch.cat([prefix, patches[:, n_src:]], dim=1)
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = model.load_state_dict(keep, strict=False).missing_keys
    return {"missing": missing, "unexpected": sorted(set(sd) - set(keep))}
