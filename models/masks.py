"""Attention masks and generation orders shared by the method files. Mask convention: boolean, ``True`` = may
attend (what ``scaled_dot_product_attention`` expects), rows are queries, columns are keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def random_orders(batch_size: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """One uniformly random permutation of 0..length-1 per image, [batch, length] (argsort of iid uniforms, as
    the official SAIM and D-iGPT samplers; ties have probability 0)."""
    return torch.rand(batch_size, length, device=device).argsort(dim=1)


def check_orders(order: torch.Tensor, batch_size: int, length: int) -> torch.Tensor:
    """Explicit generation orders as [batch, length] integers: ``order`` is [length] (the same for every image) or
    [batch, length], each row a permutation of 0..length-1; a ValueError otherwise."""
    order = torch.as_tensor(order)
    if order.ndim == 1:
        order = order[None].expand(batch_size, -1)
    if tuple(order.shape) != (batch_size, length) or order.is_floating_point():
        raise ValueError(f"order must be [{length}] or [{batch_size}, {length}] integers, got "
                         f"{tuple(order.shape)} {order.dtype}")
    if not torch.equal(order.sort(dim=1).values, torch.arange(length, device=order.device).expand(batch_size, -1)):
        raise ValueError(f"every row of order must be a permutation of 0..{length - 1}")
    return order.long()


@dataclass(frozen=True)
class BlockCausal:
    """The mask an encoder keeps downstream (probing, fine-tuning): XTRA's block-causal attention."""

    block_size: int

    def build(self, grid_size: int, num_prefix_tokens: int = 0, device: torch.device | str | None = None
              ) -> torch.Tensor:
        if num_prefix_tokens:
            raise ValueError("the block-causal mask is defined for encoders without prefix tokens (XTRA)")
        return block_causal_mask(grid_size, self.block_size, device)

    def to_dict(self) -> dict:
        return {"type": "block_causal", "block_size": self.block_size}


EncoderMask = BlockCausal  # every kind of mask an encoder can keep after pretraining (None: bidirectional)
ENCODER_MASKS = {"block_causal": BlockCausal}


def encoder_mask_from_dict(stored: dict | None) -> EncoderMask | None:
    """The typed mask recorded in a checkpoint (a plain dict there, so that it loads with weights_only)."""
    if not stored:
        return None
    kind = ENCODER_MASKS.get(stored.get("type"))
    if kind is None:
        raise ValueError(f"unknown encoder mask {stored!r} (known: {', '.join(ENCODER_MASKS)})")
    return kind(**{k: v for k, v in stored.items() if k != "type"})


def block_ids(grid_size: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Block index of every patch token in raster order: blocks are ``block_size``×``block_size``
    patches, numbered in raster order over the block grid."""
    if grid_size % block_size:
        # The official create_block_mask silently gives two blocks the same id here; refuse instead.
        raise ValueError(f"patch grid {grid_size} is not divisible by block size {block_size}")
    r = torch.arange(grid_size, device=device)
    return ((r[:, None] // block_size) * (grid_size // block_size) + r[None, :] // block_size).flatten()


def block_causal_mask(grid_size: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """XTRA's mask over a raster-ordered patch grid: token q may attend to token j iff
    block(j) <= block(q). ``block_size=1`` is the standard causal mask."""
    ids = block_ids(grid_size, block_size, device)
    return ids[None, :] <= ids[:, None]


def segment_causal_mask(num_segments: int, segment_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """D-iGPT's encoder/decoder mask over ``num_segments`` segments of ``segment_len`` tokens followed by ONE
    trailing cls token: patch tokens attend to their own and earlier segments, the cls query attends to
    everything, and the cls key is visible only to the last segment (and to cls itself).

    This is the closed form of the official mask, which the D-iGPT code builds by reflect-padding a segment-causal
    mask by one row and column; the two agree for ``segment_len >= 2``, where the padding copies a last-segment
    row/column as intended."""
    if num_segments < 1 or segment_len < 1:
        raise ValueError(f"need at least one segment of one token, got {num_segments} × {segment_len}")
    n = num_segments * segment_len
    seg = torch.arange(n + 1, device=device) // segment_len  # cls gets id num_segments
    allowed = seg[None, :] <= seg[:, None]
    allowed[n, :] = True  # cls query sees every segment
    allowed[:n, n] = seg[:n] == num_segments - 1  # cls key: last segment only
    return allowed


def permutation_two_stream_masks(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAIM's content- and query-stream masks for per-image generation orders, with ONE leading cls token.

    ``order`` [B, L]: ``order[b, t]`` is the patch generated t-th in image b. Returns two boolean masks
    [B, 1, L+1, L+1] (cls first, then patches in raster order). Content: a patch sees the patches generated
    before it and itself. Query: strictly earlier patches only, so a prediction never sees its own patch.
    Both: every row sees the cls key; the cls row sees only itself (as in the official SAIM code). Each row of
    ``order`` must be a permutation: orders given from outside are checked by the caller (:func:`check_orders`, a
    host read), the model's own random ones need no check."""
    if order.dim() != 2:
        raise ValueError(f"order must be [batch, patches], got shape {tuple(order.shape)}")
    B, L = order.shape
    steps = torch.arange(L, device=order.device).expand(B, L)
    rank = torch.empty_like(order).scatter_(1, order, steps)
    rank = torch.cat([rank.new_full((B, 1), -1), rank], dim=1)  # cls ranks first: visible to all, sees only itself
    content = rank[:, None, :] <= rank[:, :, None]
    query = rank[:, None, :] < rank[:, :, None]
    query[:, 0, 0] = True  # the cls query row would otherwise be empty
    return content.unsqueeze(1), query.unsqueeze(1)


def to_block_mask(mask: torch.Tensor) -> BlockMask:
    """The same mask as a FlexAttention ``BlockMask`` (for ``flex_attention``; ``models.vit.Attention`` takes
    either). ``mask``: boolean [Q, K], or [B, 1, Q, K] / [B, H, Q, K] per sample (and head)."""
    if mask.dim() == 2:
        return create_block_mask(lambda b, h, q, k: mask[q, k], None, None, *mask.shape, device=mask.device)
    if mask.dim() != 4:
        raise ValueError(f"mask must be [Q, K] or [B, H, Q, K], got shape {tuple(mask.shape)}")
    if mask.shape[1] == 1:  # index 0, not h: flex_attention calls the mask function with the real head index
        return create_block_mask(lambda b, h, q, k: mask[b, 0, q, k], mask.shape[0], None, *mask.shape[2:],
                                 device=mask.device)
    return create_block_mask(lambda b, h, q, k: mask[b, h, q, k], *mask.shape, device=mask.device)
