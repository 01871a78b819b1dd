"""Frozen-backbone probes: MAE's linear probe and XTRA/AIM's attentive probe, on any encoder of this project."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.vit import VisionTransformer, upcast


class AttentivePoolingHead(nn.Module):
    """Non-affine BatchNorm over tokens, ``num_queries`` learned queries (no q projection), bias-free k/v
    projections, multi-head SDPA, heads concatenated (no output projection), the mean over queries, Linear
    classifier (XTRA's probe, adapted from apple/ml-aim; XTRA uses 1 query and 16 heads)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe heads {num_heads} do not divide the feature width {dim}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        x = self.bn(tokens.transpose(1, 2)).transpose(1, 2)
        h, d, Q = self.num_heads, C // self.num_heads, self.query.shape[1]
        q = self.query.expand(B, -1, -1).reshape(B, Q, h, d).transpose(1, 2)
        k = self.k(x).reshape(B, N, h, d).transpose(1, 2)
        v = self.v(x).reshape(B, N, h, d).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Q, C).mean(1)
        return self.linear(pooled)


class LinearHead(nn.Module):
    """MAE linear probe: non-affine BatchNorm on the pooled features, Linear (init std 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(feats))


class HeadSweep(nn.ModuleList):
    """Heads trained side by side on the same features, one per learning rate of an lr sweep: logits
    [heads, B, classes]. Each head computes exactly what it computes alone."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(feats) for head in self])


def default_pool(encoder: VisionTransformer) -> str:
    """How the linear probe pools an encoder's tokens unless told: the encoder's own ``global_pool``, else the cls
    token when it has one, else the mean of the patch tokens."""
    if encoder.global_pool in ("token", "avg"):
        return encoder.global_pool
    return "token" if encoder.num_prefix_tokens else "avg"


def pooled_features(encoder: VisionTransformer, x: torch.Tensor, mask: torch.Tensor | None, pool: str | None,
                    n_last_blocks: int = 1, final_norm: bool = False) -> torch.Tensor:
    """The probes' features: the mean of the last ``n_last_blocks`` block outputs (after the final norm with
    ``final_norm``), pooled by ``pool`` ('token': the cls token, 'avg': the mean of the patch tokens; None: every
    token). Runs with whatever gradient mode the caller set."""
    layers = encoder.get_intermediate_layers(x, n_last_blocks, mask=mask)
    feats = torch.stack(layers).mean(0)
    if final_norm:
        feats = encoder.norm(feats)
    if pool == "token":
        return feats[:, 0]
    if pool == "avg":
        return feats[:, encoder.num_prefix_tokens:].mean(1)
    return feats


class Probe(nn.Module):
    """Frozen backbone (always in eval mode, run without gradients) + a trainable head (one, a :class:`HeadSweep`,
    or ``nn.Identity`` for the pooled features themselves).

    Features: the average of the last ``n_last_blocks`` block outputs before the final norm (XTRA/AIM), or after
    it with ``final_norm``; ``pool`` 'token' / 'avg' pools them for the linear probe, None keeps every token
    (attentive probe). ``mask``: the attention mask the backbone keeps (XTRA's block-causal mask), or None."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module, n_last_blocks: int, pool: str | None,
                 final_norm: bool, mask: torch.Tensor | None):
        super().__init__()
        self.backbone, self.head = backbone.requires_grad_(False), head
        self.n_last_blocks, self.pool, self.final_norm = n_last_blocks, pool, final_norm
        self.register_buffer("mask", mask, persistent=False)

    def train(self, mode: bool = True) -> Probe:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = pooled_features(self.backbone, x, self.mask, self.pool, self.n_last_blocks, self.final_norm)
        return self.head(upcast(feats))
