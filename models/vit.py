"""The one ViT backbone every method in this project is built on.

State-dict keys follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``fc_norm``, ``head``), so an
encoder saved here loads into ``timm.create_model('vit_*', ...)`` with identical outputs.

Every block takes an optional boolean attention mask per forward (``True`` = may attend, the
``scaled_dot_product_attention`` convention), so the block-causal, permutation and query-stream masks of
the method files all run through the same blocks. A FlexAttention ``BlockMask`` (``models.masks.to_block_mask``)
is accepted in its place and runs through ``flex_attention``; ``benchmarks/throughput.py`` compares the two.
A block can also attend to a separate ``context`` sequence (cross-attention with the block's own k/v
projections), which SAIM's query stream needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from util.settings import setting


@dataclass(frozen=True)
class EncoderConfig:
    """The size of a method's ViT encoder. Every method's settings dataclass extends it and redeclares the
    defaults of its official recipe; a preset is a named set of overrides."""

    input_size: int = setting(224, "image side in pixels")
    patch_size: int = setting(16, "patch side in pixels")
    embed_dim: int = setting(768, "encoder width")
    depth: int = setting(12, "encoder blocks")
    num_heads: int = setting(12, "encoder attention heads")
    mlp_ratio: float = setting(4.0, "encoder MLP hidden width / embed_dim")
    drop_path: float = setting(0.0, "stochastic depth: rate of the last encoder block (linear from 0)")

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def vit_kwargs(self) -> dict:
        """The ``VisionTransformer`` arguments these settings fix."""
        return dict(img_size=self.input_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    drop_path_rate=self.drop_path)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: bf16 / fp16 activations (autocast) become float32 for losses and heads, while a
    float64 model keeps computing in float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def take_carried_buffer(module: nn.Module, name: str, state_dict: dict, prefix: str, error_msgs: list) -> None:
    """For ``module._load_from_state_dict``: a non-persistent buffer (a table or kernel the model computes from its
    settings) takes the value a state dict carries under its key, bit for bit, instead of the computed one. Official
    files hold such buffers as their own code computed them, a few ulp from ours; a state dict without the key
    leaves the computed value. The key is removed, so strict loading does not report it as unexpected."""
    value = state_dict.pop(prefix + name, None)
    if value is None:
        return
    buffer = getattr(module, name)
    if value.shape != buffer.shape:
        error_msgs.append(f"size mismatch for {prefix}{name}: the state dict's shape is {tuple(value.shape)}, the "
                          f"model's {tuple(buffer.shape)}")
        return
    with torch.no_grad():
        buffer.copy_(value)


def resize_pos_embed(pos: torch.Tensor, num_patches: int, num_prefix_tokens: int) -> torch.Tensor:
    """A [1, prefix + N, D] position table for ``num_patches`` tokens on a square grid: unchanged when it already
    fits, else its patch rows resampled bicubically (timm), prefix rows kept."""
    if pos.shape[1] == num_patches + num_prefix_tokens:
        return pos
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return resample_abs_pos_embed(pos, (side, side), num_prefix_tokens=num_prefix_tokens)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, shape [grid², D] (+ zero rows for prefix tokens in front).

    Written out (instead of timm's ``build_sincos2d_pos_embed``) because the channel layout must match
    MAE's exactly: the first D/2 channels encode the column (x), the last D/2 the row (y), each as
    [sin | cos] over frequencies 1/10000^(2i/(D/2)). SAIM and D-iGPT checkpoints store this table.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(col), encode(row)], dim=1)
    table = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), table])
    return table.float()


class Attention(nn.Module):
    """Multi-head attention through SDPA, with an optional boolean mask and optional context (cross-attn)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if context is None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:  # queries from x, keys/values from context, with the same fused projection
            w_q, w_kv = self.qkv.weight.split([C, 2 * C])
            b_q, b_kv = self.qkv.bias.split([C, 2 * C]) if self.qkv.bias is not None else (None, None)
            q = F.linear(x, w_q, b_q).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            M = context.shape[1]
            k, v = F.linear(context, w_kv, b_kv).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if isinstance(mask, BlockMask):
            x = flex_attention(q, k, v, block_mask=mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block. With ``context``, the same norm1 is applied to x and to the context."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        context = None if context is None else self.norm1(context)
        x = x + self.drop_path(self.attn(self.norm1(x), mask=mask, context=context))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder (+ optional classifier head) with timm-compatible state-dict keys.

    ``pos_embed``: ``'learn'`` (trunc-normal 0.02, trained) or ``'sincos'`` (fixed MAE table, frozen
    parameter so that it is stored under the same key). ``global_pool``: ``'token'`` (cls token after
    the final norm), ``'avg'`` (mean of patch tokens, then ``fc_norm`` when ``fc_norm`` is set, else
    after the final norm) or ``''`` (no pooling).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True, pos_embed: str = "learn",
                 global_pool: str = "token", fc_norm: bool = False, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, block: type[Block] | None = None):
        super().__init__()
        # Constructor arguments, stored in checkpoints so that an encoder can be rebuilt without flags.
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           class_token=class_token, pos_embed=pos_embed, norm_eps=norm_eps,
                           num_classes=num_classes, global_pool=global_pool, fc_norm=fc_norm)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.pos_embed_type = pos_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size = self.patch_embed.grid_size[0]
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim),
                                      requires_grad=pos_embed == "learn")
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList([  # ``block``: a subclass with its own forward (Scala's sliced widths)
            (block or Block)(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed_type == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size, self.num_prefix_tokens))
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight.data  # MAE: xavier on the conv seen as a matrix
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.apply(_init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def transformer_blocks(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one and ``--grad_ckpt`` recomputes (util/parallel.py)."""
        return list(self.blocks)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's ``param_groups_layer_decay``: embeddings 0, block i -> i + 1, the rest last."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def reset_classifier(self, num_classes: int, head_init_std: float = 2e-5) -> None:
        self.config["num_classes"] = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=head_init_std)
            nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (+ cls token in front), with position embeddings added; resized on the fly."""
        x = self.patch_embed(x)
        pos = resize_pos_embed(self.pos_embed, x.shape[1], self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + pos

    def forward_blocks(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       return_layers: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on embedded tokens; also return the raw outputs (before the final norm) of
        the blocks whose indices are in ``return_layers`` (negative indices count from the end)."""
        wanted = {i % len(self.blocks) for i in return_layers}
        taps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask=mask)
            if i in wanted:
                taps.append(x)
        return x, taps

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, _ = self.forward_blocks(self.embed(x), mask=mask)
        return self.norm(x)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1,
                                mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Outputs of the last ``n`` blocks (or of the listed block indices), before the final norm.
        Blocks after the deepest requested one are not run."""
        depth = len(self.blocks)
        layers = list(range(max(depth - n, 0), depth)) if isinstance(n, int) else list(n)  # n > depth: all
        layers = [i % depth for i in layers]
        x = self.embed(x)
        taps = {}
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):
            x = blk(x, mask=mask)
            taps[i] = x
        return [taps[i] for i in layers]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask=mask))


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------
# Named presets. Each entry holds only architecture sizes; callers add img_size, pooling, etc.
VIT_PRESETS: dict[str, dict] = {
    "vit_tiny_patch4": dict(patch_size=4, embed_dim=64, depth=2, num_heads=4),  # CPU demos and tests
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_tiny_patch14": dict(patch_size=14, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch14": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch16": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
}


def vit_config(name: str) -> dict:
    """Architecture sizes of a named preset; a clear error lists the known names."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(VIT_PRESETS))}")
    return dict(VIT_PRESETS[name])


def create_vit(name: str, **kwargs) -> VisionTransformer:
    """Build a preset by name; ``kwargs`` (img_size, num_classes, global_pool, ...) override it."""
    return VisionTransformer(**{**vit_config(name), **kwargs})


def timm_kwargs(config: dict) -> dict:
    """kwargs for ``timm.models.vision_transformer.VisionTransformer`` that give the same network as ``config``
    (timm's default LayerNorm eps is already 1e-6; other eps values are not expressible this way)."""
    keep = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
            "class_token", "num_classes", "global_pool", "fc_norm")
    if config.get("norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"LayerNorm eps {config['norm_eps']} differs from timm's 1e-6; pass norm_layer yourself")
    return {k: config[k] for k in keep if k in config}
