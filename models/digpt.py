"""D-iGPT ("Rejuvenating image-GPT as Strong Visual Representation Learners", Ren et al., ICML 2024; official code
github.com/OliverRensu/D-iGPT): segment-wise autoregressive prediction of a frozen teacher's features.

The patch grid is cut into square segments (official: 2×2 quadrants of 7×7 tokens at 224/16). Each image gets a
random segment order; all segments but the last, followed by ONE trailing cls token, go through the encoder
under a segment-causal mask (``models.masks.segment_causal_mask``). A learned fusion (one shared LayerNorm, one
Linear) of several encoder blocks (official 6/8/10/12) gives one memory per decoder layer for each of two
cross-attention decoders with position-only queries:
  * ``next_*``: queries at the NEXT segment's positions predict the teacher features of segments order[1:];
  * ``vis_*``:  queries at the SAME (visible) positions predict those of segments order[:-1];
in both the cls query predicts the teacher's cls feature. Predictions are resized per segment to the teacher's
grid (official 7×7 -> 8×8, bilinear) and the loss is 2 − 2·cos per token, mean over tokens, summed over both.

Fine-tuning and probing use the encoder bidirectionally with cls first, as the official fine-tuning does, so
``encoder_mask`` is None. The teacher is held outside the module tree: it is neither in
``state_dict()`` nor in ``parameters()``, but ``.to()`` / ``.cuda()`` move it along.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, trunc_normal_

from models.converters import Converted, recorded, register_converter
from models.formats import encoder_record, vit_shapes
from models.masks import block_ids, check_orders, random_orders, segment_causal_mask
from models.registry import TINY_CPU_BUDGET, VIT_H14, Method, Preset, PretrainingModel, register_method
from models.teacher import OPEN_CLIP_PREFIX, FrozenTeacher, load_teacher, teacher_tokens
from models.vit import (
    Attention,
    EncoderConfig,
    VisionTransformer,
    sincos_pos_embed_2d,
    take_carried_buffer,
    upcast,
)
from util.checkpoint import save_atomic
from util.errors import UserError
from util.settings import setting

# The official teacher, OpenCLIP ViT-H/14 at 224 px, has 1024-d tokens (on a 16×16 grid).
OFFICIAL_TEACHER_DIM = 1024


# ---------------------------------------------------------------------------------------------------
# Segment bookkeeping (pure tensor functions, shared by the student tokens, the queries and the teacher targets)
def segment_index(grid_size: int, segment_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Raster indices of a grid's tokens sorted by segment (segments numbered row-major, tokens row-major
    inside each segment): ``tokens[:, segment_index(...)]`` lists segment 0's tokens first."""
    return torch.argsort(block_ids(grid_size, segment_size, device), stable=True)


def split_segments(tokens: torch.Tensor, grid_size: int, segment_size: int) -> torch.Tensor:
    """[B, G*G, C] raster tokens -> [B, S, T, C] with S = (G/s)² segments of T = s² tokens."""
    B, N, C = tokens.shape
    if N != grid_size ** 2:
        raise ValueError(f"{N} tokens do not form a {grid_size}×{grid_size} grid")
    idx = segment_index(grid_size, segment_size, tokens.device)
    return tokens[:, idx].reshape(B, -1, segment_size ** 2, C)


def gather_segments(segments: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[B, S, T, C] segments -> the same, reordered per image: out[b, k] = segments[b, order[b, k]]."""
    B, S, T, C = segments.shape
    return torch.gather(segments.expand(order.shape[0], -1, -1, -1), 1, order[:, :, None, None].expand(-1, -1, T, C))


def resize_segments(tokens: torch.Tensor, segment_size: int, out_size: int) -> torch.Tensor:
    """[B, K*s*s, C] tokens of K square segments -> [B, K*o*o, C], each segment resized on its own
    (bilinear, align_corners=False, as the official 7×7 -> 8×8 step)."""
    if out_size == segment_size:
        return tokens
    B, N, C = tokens.shape
    x = tokens.reshape(-1, segment_size, segment_size, C).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(B, -1, C)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 2 − 2·cos(pred, target) = ||p/|p| − t/|t|||² (the official loss; F.normalize's
    1e-12 floor only matters for all-zero vectors, where the official code would give NaN)."""
    p, t = F.normalize(upcast(pred), dim=-1), F.normalize(upcast(target), dim=-1)
    return (2 - 2 * (p * t).sum(-1)).mean()


def _segment_grid(img_size: int, patch_size: int, segment_size: int) -> tuple[int, int]:
    """(patch grid side, segments per side), or a ValueError for a geometry D-iGPT cannot cut."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    grid = img_size // patch_size
    if segment_size < 1 or grid % segment_size or grid // segment_size < 2:
        raise ValueError(f"patch grid {grid} cannot be cut into at least 2×2 segments of {segment_size}×{segment_size}")
    return grid, grid // segment_size


# ---------------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Self-attention over the queries, cross-attention to one encoder memory (norm2_1 on the queries, norm2_2
    on the memory; attn2's fused qkv = the official attn2.q rows then attn2.kv rows), then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask=mask)
        x = x + self.attn2(self.norm2_1(x), mask=mask, context=self.norm2_2(memory))
        return x + self.mlp(self.norm2(x))


FEATURE_NORM_EPS = 1e-5  # the shared feature LayerNorm keeps PyTorch's default eps in the official code


@dataclass(frozen=True)
class DiGPTConfig(EncoderConfig):
    """D-iGPT's settings. The defaults are the official ViT-B/16: 224 px, 2×2 segments of 7×7 patches, encoder taps
    6/8/10/12, two decoders of 2 blocks (1024-d, 32 heads), teacher OpenCLIP ViT-H/14 (1024-d tokens, 16×16 grid)."""

    segment_size: int = setting(7, "segment side in patches")
    enc_layers: tuple[int, ...] = setting((6, 8, 10, 12), "1-based encoder blocks fused into the decoder memories "
                                                          "(strictly increasing, ending at depth)")
    decoder_dim: int = setting(1024, "width of the two decoders")
    decoder_depth: int = setting(2, "blocks per decoder")
    decoder_heads: int = setting(32, "decoder attention heads")
    teacher: str = setting("", "frozen teacher: a checkpoint of this project, a timm model name (with "
                               "--teacher_weights), or open_clip:<arch> (official: open_clip:ViT-H-14)")
    teacher_weights: str = setting("", "local weights file of a timm / open_clip teacher (nothing is downloaded)")
    teacher_dim: int | None = setting(None, "teacher token width; none: the teacher's own (official: 1024)")
    teacher_grid: int | None = setting(None, "teacher token grid side; none: the teacher's own (official: 16; "
                                             "without a teacher, the student's grid)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _, side = _segment_grid(self.input_size, self.patch_size, self.segment_size)
        layers = list(self.enc_layers)
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1 or layers[-1] != self.depth:
            # Blocks after the deepest tap would get no gradient (and break DDP); the official taps end at 12.
            raise ValueError(f"enc_layers must be strictly increasing block numbers in 1..{self.depth} ending at "
                             f"{self.depth}, got {layers}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        if self.teacher_grid is not None and self.teacher_grid % side:
            raise ValueError(f"teacher grid {self.teacher_grid} cannot be cut into the student's {side}×{side} "
                             "segments")
        if self.teacher_weights and not self.teacher:
            raise ValueError("teacher_weights given without teacher")


class DiGPT(PretrainingModel):
    """D-iGPT pretraining model; ``forward(imgs)`` -> (loss, {loss_next, loss_vis}). See the module docstring.

    ``enc_layers`` are 1-based block numbers (official 6, 8, 10, 12), strictly increasing and ending at the last
    block. ``teacher_dim``/``teacher_grid``: width and grid side of the teacher's tokens, read from the teacher
    when not set (without a teacher: the official 1024-d on the student's own grid); the teacher grid must split
    into the same number of segments per side. ``config`` records the values in use.
    There is deliberately no ``no_weight_decay()``: the official recipe decays the cls and query tokens.
    """

    def __init__(self, config: DiGPTConfig):
        super().__init__()
        frozen = load_teacher(config.teacher, config.teacher_weights or None) if config.teacher else None
        teacher_dim = config.teacher_dim or (frozen.embed_dim if frozen else OFFICIAL_TEACHER_DIM)
        teacher_grid = config.teacher_grid or (frozen.grid_size if frozen else config.grid_size)
        self.config = c = dataclasses.replace(config, teacher_dim=teacher_dim, teacher_grid=teacher_grid)
        grid, side = _segment_grid(c.input_size, c.patch_size, c.segment_size)
        self.img_size, self.grid_size, self.segment_size = c.input_size, grid, c.segment_size
        self.num_segments = side * side
        self.teacher_dim, self.teacher_grid = teacher_dim, teacher_grid
        self.teacher_segment = teacher_grid // side
        self.enc_layers = tuple(c.enc_layers)
        self.decoder_depth, self.decoder_dim = c.decoder_depth, c.decoder_dim
        self._teacher: FrozenTeacher | None = None  # downstream use is bidirectional (encoder_mask None)

        # Encoder config = what downstream rebuilds: no final norm (fc_norm + global average pooling, the
        # official fine-tune) and a LEARNABLE pos_embed there; here it holds the frozen sin-cos table.
        self.encoder = VisionTransformer(**c.vit_kwargs(), pos_embed="learn", global_pool="avg", fc_norm=True)
        self.encoder.pos_embed.data.copy_(sincos_pos_embed_2d(c.embed_dim, grid, num_prefix_tokens=1))
        self.encoder.pos_embed.requires_grad_(False)
        self.encoder.fc_norm.requires_grad_(False)  # unused in pretraining: frozen so DDP sees no idle parameter
        self.register_buffer("mask", segment_causal_mask(self.num_segments - 1, c.segment_size ** 2),
                             persistent=False)
        # computed, not saved; a state dict that carries it (a converted official file) sets it exactly
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(c.decoder_dim, grid, 1)[None],
                             persistent=False)

        def branch(prefix: str) -> None:
            # ONE LayerNorm shared by all tapped levels (the official [LN] * 4 list), PyTorch's default eps.
            setattr(self, f"{prefix}_feat_norm", nn.LayerNorm(c.embed_dim, eps=FEATURE_NORM_EPS))
            setattr(self, f"{prefix}_enc2dec", nn.Linear(len(c.enc_layers) * c.embed_dim,
                                                         c.decoder_depth * c.decoder_dim))
            setattr(self, f"{prefix}_query", nn.Parameter(torch.zeros(1, 1, c.decoder_dim)))
            setattr(self, f"{prefix}_blocks", nn.ModuleList(
                [DecoderBlock(c.decoder_dim, c.decoder_heads, c.mlp_ratio) for _ in range(c.decoder_depth)]))
            setattr(self, f"{prefix}_norm", nn.LayerNorm(c.decoder_dim, eps=1e-6))
            setattr(self, f"{prefix}_pred", nn.Linear(c.decoder_dim, teacher_dim))

        branch("next")  # official "ar": predicts the next segment
        branch("vis")   # official "kd": predicts the visible segments
        self.init_weights()
        self.set_teacher(frozen)

    @classmethod
    def check_settings(cls, config: DiGPTConfig, fsdp: bool = False) -> None:
        if not config.teacher:
            raise UserError("D-iGPT learns from a teacher's features: give --teacher (and --teacher_weights)")
        if not config.teacher.startswith(OPEN_CLIP_PREFIX) and not config.teacher_weights \
                and not os.path.exists(config.teacher):  # a file, or a sharded checkpoint's directory
            raise UserError(f"teacher checkpoint not found: {config.teacher}")

    def init_weights(self) -> None:
        """Official init: xavier-uniform Linears (zero bias), unit LayerNorms, queries N(0, 0.02) truncated,
        cls token ZERO (a quirk of the official code, kept); the patch conv keeps the encoder's xavier init."""
        self.apply(_init_xavier)
        nn.init.zeros_(self.encoder.cls_token)
        trunc_normal_(self.next_query, std=0.02)
        trunc_normal_(self.vis_query, std=0.02)

    # -- teacher, held outside the module tree --------------------------------------------------------
    @property
    def teacher(self) -> FrozenTeacher | None:
        return self._teacher

    def set_teacher(self, teacher: FrozenTeacher | None) -> None:
        if teacher is not None:
            if teacher.embed_dim != self.teacher_dim:
                raise UserError(f"teacher features are {teacher.embed_dim}-d but the model predicts "
                                f"{self.teacher_dim}-d (set teacher_dim)")
            if teacher.grid_size != self.teacher_grid:
                raise UserError(f"teacher grid is {teacher.grid_size}×{teacher.grid_size} but the model expects "
                                f"{self.teacher_grid} (set teacher_grid)")
            p = next(iter(self.parameters()))
            teacher = teacher.to(device=p.device)
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: stays out of state_dict/parameters

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        take_carried_buffer(self, "decoder_pos_embed", state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    # -- forward pieces -------------------------------------------------------------------------------
    def _segments(self, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return gather_segments(split_segments(tokens, self.grid_size, self.segment_size), order)

    def forward_encoder(self, imgs: torch.Tensor, order: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the tapped encoder blocks, [B, L, D] each, L = (S−1)·T patch tokens + the trailing cls."""
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"D-iGPT's segment layout is fixed for {self.img_size}px inputs, got "
                             f"{tuple(imgs.shape[-2:])}")
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, enc.num_prefix_tokens:]
        x = self._segments(x, order)[:, :-1].flatten(1, 2)  # the last segment is never seen
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        _, taps = enc.forward_blocks(torch.cat([x, cls], dim=1), mask=self.mask,
                                     return_layers=[i - 1 for i in self.enc_layers])
        return taps

    def _decode(self, prefix: str, taps: list[torch.Tensor], query_pos: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, f"{prefix}_feat_norm")
        memory = getattr(self, f"{prefix}_enc2dec")(torch.cat([norm(t) for t in taps], dim=-1))
        # Official layout: output row c·depth + l belongs to decoder layer l (layer index last).
        memory = memory.unflatten(-1, (self.decoder_dim, self.decoder_depth))
        x = getattr(self, f"{prefix}_query") + query_pos
        for layer, blk in enumerate(getattr(self, f"{prefix}_blocks")):
            x = blk(x, memory[..., layer], mask=self.mask)
        return getattr(self, f"{prefix}_pred")(getattr(self, f"{prefix}_norm")(x))

    def predict(self, imgs: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw decoder outputs (next, visible), [B, L, teacher_dim] each, on the student's segment grid: token
        k·T + t is position t of segment order[k+1] (next) or order[k] (visible); the last token is cls."""
        return self._predict(imgs, check_orders(order, imgs.shape[0], self.num_segments).to(imgs.device))

    def _predict(self, imgs: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = self.forward_encoder(imgs, order)
        pos = self._segments(self.decoder_pos_embed[:, 1:], order)  # [B, S, T, Dd], true 2-D positions
        cls_pos = self.decoder_pos_embed[:, :1].expand(imgs.shape[0], -1, -1)
        next_pos = torch.cat([pos[:, 1:].flatten(1, 2), cls_pos], dim=1)
        vis_pos = torch.cat([pos[:, :-1].flatten(1, 2), cls_pos], dim=1)
        return self._decode("next", taps, next_pos), self._decode("vis", taps, vis_pos)

    def to_teacher_grid(self, pred: torch.Tensor) -> torch.Tensor:
        """[B, (S−1)·s² + 1, T] predictions -> [B, (S−1)·st² + 1, T]: each segment resized to the teacher's
        segment side st, cls kept last."""
        patches = resize_segments(pred[:, :-1], self.segment_size, self.teacher_segment)
        return torch.cat([patches, pred[:, -1:]], dim=1)

    def targets(self, teacher_feats: tuple[torch.Tensor, torch.Tensor], order: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (cls [B, T], patches [B, Gt², T]) -> (next target, visible target), [B, (S−1)·st² + 1, T]."""
        t_cls, t_patch = teacher_feats
        B = order.shape[0]
        want = (B, self.teacher_grid ** 2, self.teacher_dim)
        if tuple(t_patch.shape) != want or tuple(t_cls.shape) != (B, self.teacher_dim):
            raise ValueError(f"teacher features must be cls [{B}, {self.teacher_dim}] and patches {list(want)}, got "
                             f"{list(t_cls.shape)} and {list(t_patch.shape)}")
        seg = gather_segments(split_segments(t_patch, self.teacher_grid, self.teacher_segment), order)
        t_cls = t_cls[:, None]
        return (torch.cat([seg[:, 1:].flatten(1, 2), t_cls], dim=1),
                torch.cat([seg[:, :-1].flatten(1, 2), t_cls], dim=1))

    def forward_with_outputs(self, imgs: torch.Tensor, teacher_feats: tuple[torch.Tensor, torch.Tensor] | None = None,
                             order: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss = L_next + L_vis, and every intermediate (orders, predictions, targets). ``teacher_feats``
        (cls, patches) and ``order`` ([S] or [B, S]) are computed here when not given (the order at random per
        image)."""
        B = imgs.shape[0]
        if order is None:  # official: torch.randperm per sample on the CPU RNG; here one draw on the device
            order = random_orders(B, self.num_segments, imgs.device)
        else:
            order = check_orders(order, B, self.num_segments).to(imgs.device)
        if teacher_feats is None:
            if self._teacher is None:
                raise ValueError("D-iGPT needs a teacher: build with teacher=... (--teacher) or call set_teacher")
            teacher_feats = teacher_tokens(self._teacher, imgs)
        target_next, target_vis = self.targets(teacher_feats, order)
        pred_next, pred_vis = (self.to_teacher_grid(p) for p in self._predict(imgs, order))
        loss_next, loss_vis = cosine_loss(pred_next, target_next), cosine_loss(pred_vis, target_vis)
        out = dict(loss_next=loss_next.detach(), loss_vis=loss_vis.detach(), order=order,
                   pred_next=pred_next, pred_vis=pred_vis, target_next=target_next, target_vis=target_vis)
        return loss_next + loss_vis, out

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, out = self.forward_with_outputs(imgs)
        return loss, {"loss_next": out["loss_next"], "loss_vis": out["loss_vis"]}

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature targets have no pixels to show. Panels: the input; what the encoder sees (the never-seen
        segment set to the mean colour); and, per teacher token, the cosine similarity of the prediction to its
        target (black −1 ... white +1) for the next-segment and the visible-segment decoders (black where a
        decoder predicts nothing)."""
        _, out = self.forward_with_outputs(imgs)
        order = out["order"]
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=imgs.device).view(1, 3, 1, 1)

        def to_image(values: torch.Tensor, segments: torch.Tensor, grid: int, side: int) -> torch.Tensor:
            """Values [B, K, side²] of segments [B, K] -> [B, 1, H, W] (zero where no segment is given)."""
            B = values.shape[0]
            per_segment = values.new_zeros(B, self.num_segments, side * side)
            per_segment.scatter_(1, segments[:, :, None].expand(-1, -1, side * side), values)
            raster = values.new_zeros(B, grid * grid)
            raster[:, segment_index(grid, side, values.device)] = per_segment.flatten(1)
            return F.interpolate(raster.view(B, 1, grid, grid), size=imgs.shape[-2:], mode="nearest")

        T = self.segment_size ** 2
        seen = to_image(imgs.new_ones(imgs.shape[0], self.num_segments - 1, T), order[:, :-1], self.grid_size,
                        self.segment_size)
        panels = {"input": imgs, "encoder_input": imgs * seen}  # 0 = the mean colour in normalised space
        st2 = self.teacher_segment ** 2
        for name, segments in (("next", order[:, 1:]), ("vis", order[:, :-1])):
            cos = F.cosine_similarity(out[f"pred_{name}"][:, :-1].float(), out[f"target_{name}"][:, :-1].float(), -1)
            heat = to_image((cos.view(cos.shape[0], -1, st2) + 1) / 2, segments, self.teacher_grid,
                            self.teacher_segment)
            panels[f"{name}_cosine"] = (heat - mean) / std
        return panels


def _init_xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def stand_in_teacher(config: DiGPTConfig, path: str) -> dict:
    """A randomly initialised classifier with the student's encoder shape, written to ``path``, as the teacher of
    benchmarks and tests that run D-iGPT without a trained one (its forward is part of the method's step)."""
    with torch.device("meta"):
        encoder = dict(DiGPT(config).encoder.config)
    vit = VisionTransformer(**{**encoder, "num_classes": 10, "global_pool": "token", "class_token": True})
    save_atomic({"model": vit.state_dict(), **encoder_record(vit, "", None)}, path)
    return {"teacher": path}


# ---------------------------------------------------------------------------------------------------
# The official recipe: AdamW (0.9, 0.95), wd 0.05, effective batch 4096 = 32 GPUs × 128 (or 64 × accum 2),
# lr = 1.5e-4 × 4096 / 256, 300 epochs with 40 warmup epochs, cosine to 0, RandomResizedCrop(0.2-1) + flip.
register_method(Method(
    key="digpt", name="D-iGPT", kind="pretrain", model_class=DiGPT, config_class=DiGPTConfig,
    recipe=dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), epochs=300, warmup_epochs=40, warmup_lr=0.0,
                min_lr=0.0, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), batch_size=128),
    presets={
        # CPU tests: 32 px, patch 4 -> 8×8 grid in 2×2 segments of 4×4; the teacher a project ViT of the same grid
        "digpt_vit_tiny": Preset(
            "CPU-sized D-iGPT: 32 px, patch 4, 64-d, depth 4, 2×2 segments of 4×4, taps 2/3/4",
            dict(TINY_CPU_BUDGET, patch_size=4, embed_dim=64, depth=4, num_heads=4, segment_size=4,
                 enc_layers=(2, 3, 4), decoder_dim=64, decoder_depth=2, decoder_heads=4),
            global_batch=TINY_CPU_BUDGET["batch_size"]),
        "digpt_vit_small_patch16": Preset(
            "not an official preset: ViT-S/16 at 224 px, taps 6/8/10/12, decoders 2 × 512-d × 16 heads, the base "
            "recipe", dict(embed_dim=384, num_heads=6, decoder_dim=512, decoder_heads=16)),
        "digpt_vit_base_patch16": Preset(
            "official D-iGPT ViT-B/16: 224 px, 2×2 segments of 7×7, taps 6/8/10/12, decoders 2 × 1024-d × 32 heads, "
            "teacher OpenCLIP ViT-H/14 (1024-d tokens on a 16×16 grid)"),
    },
    stand_in_teacher=stand_in_teacher,
    memory_sizes=(("digpt_vit_base_patch16", {}),
                  ("digpt_vit_base_patch16", dict(VIT_H14, enc_layers=(16, 21, 26, 32), segment_size=8))),
    global_batch=4096,  # the official pretraining: an effective batch of 4096, as MAE's
))


# ---------------------------------------------------------------------------------------------------
# Official checkpoints (github.com/OliverRensu/D-iGPT, DiGPT_torch)
def _official_detect(sd: dict, records: dict) -> bool:
    return "ar_enc2dec.weight" in sd and "kd_enc2dec.weight" in sd and "ar_blocks.0.attn2.kv.weight" in sd


# The official constructors (DiGPT_vit_base, and DiGPT_vit_large of the first commit) tap blocks 6/8/10/12 of
# ViT-B and use 32-head decoders.
OFFICIAL_TAPS = {12: (6, 8, 10, 12)}
OFFICIAL_DECODER_HEADS = 32


def _official_convert(sd: dict, records: dict) -> Converted:
    """Official state dict -> a whole D-iGPT model. The official forward unpacks the encoder's (kd memory, ar memory) as
    (ar, kd): the next-segment decoder ("ar_blocks") reads the memory of ``kd_enc_norm``/``kd_enc2dec`` and the
    visible-segment decoder ("kd_blocks") that of ``ar_enc_*``. The architecture comes from the shapes (the
    segment size from the stored mask buffer, the teacher width from the heads); the tapped blocks and the
    decoder head count from what the file records or the official constructors' values. The mapping below keeps
    that wiring, so converted weights compute what the released model computes. The decoders' sin-cos table
    ``decoder_pos_embed`` is kept as the file holds it; the model loads it instead of its computed one."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")):
            out[f"encoder.{k}"] = v
    dim = sd["cls_token"].shape[-1]
    out["encoder.fc_norm.weight"], out["encoder.fc_norm.bias"] = torch.ones(dim), torch.zeros(dim)
    for official, ours in (("ar", "next"), ("kd", "vis")):
        memory_src = "kd" if official == "ar" else "ar"  # the swap
        norms = sorted({k.split(".")[1] for k in sd if k.startswith(f"{memory_src}_enc_norm.")})
        for i in norms:  # the official list repeats one LayerNorm module: all copies must agree
            for p in ("weight", "bias"):
                if not torch.equal(sd[f"{memory_src}_enc_norm.{i}.{p}"], sd[f"{memory_src}_enc_norm.0.{p}"]):
                    raise UserError(f"{memory_src}_enc_norm.{i} differs from .0: not an official D-iGPT checkpoint")
        for p in ("weight", "bias"):
            out[f"{ours}_feat_norm.{p}"] = sd[f"{memory_src}_enc_norm.0.{p}"]
            out[f"{ours}_enc2dec.{p}"] = sd[f"{memory_src}_enc2dec.{p}"]
            out[f"{ours}_norm.{p}"] = sd[f"{official}_norm.{p}"]
            out[f"{ours}_pred.{p}"] = sd[f"{official}_pred.{p}"]
        out[f"{ours}_query"] = sd[f"{official}_token"]
        prefix = f"{official}_blocks."
        for k, v in sd.items():
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            j, name = rest.split(".", 1)
            if name.startswith("attn2.q."):  # fused with attn2.kv below
                p = name.rsplit(".", 1)[1]
                out[f"{ours}_blocks.{j}.attn2.qkv.{p}"] = torch.cat([v, sd[f"{prefix}{j}.attn2.kv.{p}"]], dim=0)
            elif not name.startswith("attn2.kv."):
                out[f"{ours}_blocks.{j}.{name}"] = v
    encoder = {k[len("encoder."):]: v for k, v in out.items() if k.startswith("encoder.")}
    shapes = vit_shapes(encoder)
    grid = shapes["img_size"] // shapes["patch_size"]
    taps = sd["ar_enc2dec.weight"].shape[1] // shapes["embed_dim"]
    settings = dict(input_size=shapes["img_size"], patch_size=shapes["patch_size"], embed_dim=shapes["embed_dim"],
                    depth=shapes["depth"], mlp_ratio=shapes["mlp_ratio"], decoder_dim=sd["ar_norm.weight"].shape[0],
                    decoder_depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("ar_blocks.")),
                    teacher_dim=sd["ar_pred.weight"].shape[0])
    if "mask" in sd:  # the official segment-causal buffer covers G² - s² + 1 tokens
        settings["segment_size"] = math.isqrt(grid * grid + 1 - sd["mask"].shape[-1])
    table = sd.get("decoder_pos_embed")
    if table is not None and table.shape == (1, grid * grid + 1, settings["decoder_dim"]):  # the model's shape
        out["decoder_pos_embed"] = table  # kept as the official code computed it (up to 2 ulp from ours)
    placeholders = {}
    layers = recorded(records, "enc_layers") or OFFICIAL_TAPS.get(shapes["depth"])
    if layers is not None and len(layers) == taps:
        settings["enc_layers"] = tuple(int(i) for i in layers)
    else:  # which blocks feed the decoders does not show in the shapes
        placeholders["enc_layers"] = tuple(range(shapes["depth"] - taps + 1, shapes["depth"] + 1))
    if recorded(records, "decoder_num_heads") is not None:
        settings["decoder_heads"] = int(records["decoder_num_heads"])
    elif recorded(records, "model") in ("DiGPT_vit_base", "DiGPT_vit_large"):
        settings["decoder_heads"] = OFFICIAL_DECODER_HEADS
    else:
        placeholders["decoder_heads"] = 1
    return Converted(out, "pretrain", settings, placeholders)


register_converter("digpt", _official_detect, _official_convert)
