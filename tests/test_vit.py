"""The shared backbone: timm compatibility, masks per forward, intermediate layers, presets, sin-cos table."""
import math

import pytest
import timm
import torch

from models.masks import block_causal_mask, permutation_two_stream_masks, segment_causal_mask, to_block_mask
from models.vit import Block, VisionTransformer, create_vit, sincos_pos_embed_2d

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("global_pool,class_token,fc_norm,pos", [
    ("token", True, False, "learn"), ("avg", True, True, "sincos"), ("avg", False, False, "learn")])
def test_timm_round_trip_identical_outputs(global_pool, class_token, fc_norm, pos):
    torch.manual_seed(0)
    ours = VisionTransformer(**TINY, num_classes=5, global_pool=global_pool, class_token=class_token,
                             fc_norm=fc_norm, pos_embed=pos).eval()
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY, num_classes=5,
                               global_pool=global_pool, class_token=class_token, fc_norm=fc_norm).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    # ... and back: timm weights into ours
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_mask_is_applied_per_forward():
    torch.manual_seed(0)
    vit = VisionTransformer(**TINY, class_token=False, global_pool="avg").eval()
    x = torch.randn(1, 3, 32, 32)
    mask = block_causal_mask(vit.grid_size, 2)
    full, causal = vit.forward_features(x), vit.forward_features(x, mask=mask)
    assert not torch.allclose(full, causal)
    # under the block-causal mask the first block's tokens ignore every later pixel
    x2 = x.clone()
    x2[..., 16:, :] += 1.0  # bottom half: later blocks only
    first_block = mask[0].nonzero().flatten()
    out2 = vit.forward_features(x2, mask=mask)
    torch.testing.assert_close(out2[:, first_block], causal[:, first_block])
    assert not torch.allclose(out2, causal)


def test_cross_attention_context_uses_fused_kv_rows():
    torch.manual_seed(0)
    blk = Block(16, 2).eval()
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    out = blk(x, context=ctx)
    # reference: q from x, k/v from context, each through its third of the fused qkv projection
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
    nx, nc = blk.norm1(x), blk.norm1(ctx)
    q = (nx @ w[:16].T + b[:16]).reshape(1, 3, 2, 8).transpose(1, 2)
    k = (nc @ w[16:32].T + b[16:32]).reshape(1, 5, 2, 8).transpose(1, 2)
    v = (nc @ w[32:].T + b[32:]).reshape(1, 5, 2, 8).transpose(1, 2)
    att = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v
    y = x + blk.attn.proj(att.transpose(1, 2).reshape(1, 3, 16))
    y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex_attention warns that it is unfused
def test_flex_block_masks_match_the_boolean_masks():
    """Each method's mask as a FlexAttention BlockMask gives the SDPA result (forward: no flex backward on CPU)."""
    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    saim_content, saim_query = permutation_two_stream_masks(torch.stack([torch.randperm(16) for _ in range(2)]))
    cases = [(block_causal_mask(4, 2), None), (segment_causal_mask(4, 4), None), (saim_content, None),
             (saim_query, torch.randn(2, 17, 32))]  # the query stream attends to the content stream
    for mask, context in cases:
        x = torch.randn(2, mask.shape[-2], 32)
        with torch.no_grad():
            expected = blk(x, mask=mask, context=context)
            torch.testing.assert_close(blk(x, mask=to_block_mask(mask), context=context), expected,
                                       rtol=1e-5, atol=1e-6)
            assert not torch.allclose(blk(x, context=context), expected)  # the mask matters
    with pytest.raises(ValueError, match="Q, K"):
        to_block_mask(torch.ones(2, 4, 4, dtype=torch.bool))


def test_intermediate_layers_are_pre_norm_block_outputs():
    torch.manual_seed(0)
    vit = VisionTransformer(**{**TINY, "depth": 3}).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = vit.get_intermediate_layers(x, 2)
    h = vit.embed(x)
    outs = []
    for blk in vit.blocks:
        h = blk(h)
        outs.append(h)
    torch.testing.assert_close(layers[0], outs[1])
    torch.testing.assert_close(layers[1], outs[2])
    torch.testing.assert_close(vit.forward_features(x), vit.norm(outs[2]))
    assert vit.get_intermediate_layers(x, [0])[0].shape == (2, 65, 32)


def test_sincos_table_matches_mae_layout():
    table = sincos_pos_embed_2d(8, 3, num_prefix_tokens=1)
    assert table.shape == (10, 8)
    assert torch.all(table[0] == 0)
    # token (row 1, col 2) -> index 1 + 1*3 + 2; first half encodes the column, second half the row
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2.0)
    col, row = 2.0, 1.0
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                          torch.cos(row * omega)]).float()
    torch.testing.assert_close(table[1 + 1 * 3 + 2], expected)


def test_pos_embed_resampled_for_new_resolution():
    vit = create_vit("vit_tiny_patch4", img_size=32).eval()
    assert vit.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 144, 64)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        create_vit("vit_gigantic")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionTransformer(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="needs class_token"):
        VisionTransformer(**TINY, class_token=False, global_pool="token")


def test_block_causal_mask_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        block_causal_mask(14, 4)
