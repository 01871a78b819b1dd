"""Pixel targets shared by the methods that predict pixels (XTRA, SAIM, MAE): MAE's patch layout and the per-unit
target normalisation ("norm_pix_loss")."""
from __future__ import annotations

import torch

NORM_PIX_EPS = 1e-6  # added to the variance inside the square root, as in the MAE, SAIM and XTRA code


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


def norm_pix_stats(values: torch.Tensor, eps: float = NORM_PIX_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sqrt(unbiased variance + eps) over the last axis (one unit: a patch or a block, channels
    pooled), both [..., 1]."""
    return values.mean(dim=-1, keepdim=True), (values.var(dim=-1, keepdim=True) + eps).sqrt()


def norm_pix(values: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Each unit (last axis) minus its mean, divided by sqrt(unbiased variance + eps)."""
    mean, std = norm_pix_stats(values, eps)
    return (values - mean) / std
