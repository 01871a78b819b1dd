"""Attention-mask builders shared by the method files. Convention: boolean, ``True`` = may attend
(what ``scaled_dot_product_attention`` expects), rows are queries, columns are keys."""
from __future__ import annotations

import torch


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
