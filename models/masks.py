"""Attention-mask builders shared by the method files. Convention: boolean, ``True`` = may attend
(what ``scaled_dot_product_attention`` expects), rows are queries, columns are keys."""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def block_ids(grid_size: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Block index of every patch token in raster order: blocks are ``block_size``×``block_size``
    patches, numbered in raster order over the block grid."""
    if grid_size % block_size:
        # The official create_block_mask silently mixes blocks here (spec xtra.md §9.6); refuse instead.
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

    This is the closed form of the official reflect-padded mask (spec digpt.md §2); it agrees with the official
    one for ``segment_len >= 2``, where reflect padding copies a last-segment row/column as intended."""
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
    Both: every row sees the cls key; the cls row sees only itself (spec saim.md §2)."""
    if order.dim() != 2:
        raise ValueError(f"order must be [batch, patches], got shape {tuple(order.shape)}")
    B, L = order.shape
    steps = torch.arange(L, device=order.device).expand(B, L)
    if not torch.equal(order.sort(dim=1).values, steps):
        raise ValueError("every row of order must be a permutation of 0..L-1")
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
