"""XTRA (cases worked out from the official code, github.com/elad-amrani/xtra): block-causal mask, layouts, causality, per-block normalisation, multi-head loss,
pseudo-random orders, parameter counts of the released sizes, and the official-checkpoint converter checked
against an independent forward written with the official layout (separate q/k/v, masked_fill softmax, unfold)."""
import math

import pytest
import torch
import torch.nn.functional as F

import main_pretrain
import models  # noqa: F401  (registers presets)
from models.converters import CONVERTERS
from models.masks import BlockCausal, block_causal_mask
from models.pixels import norm_pix
from models.registry import create_model, lookup, model_config
from models.vit import Attention
from models.xtra import XTRA, XTRAConfig, create_random_permutations

# grid 4 (img 32 / patch 8) with k=2: 4 blocks, small enough to check causality block by block. drop_path 0: the
# XTRAConfig default is the official 0.1; these unit tests check exact values in train mode.
SMALL = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_size=2, predictor_depth=2,
             predictor_width=32, predictor_heads=2, proj_hidden=48, head_hidden=40, drop_path=0.0)

SPEC_MASK = """
1100110000000000
1100110000000000
1111111100000000
1111111100000000
1100110000000000
1100110000000000
1111111100000000
1111111100000000
1111111111001100
1111111111001100
1111111111111111
1111111111111111
1111111111001100
1111111111001100
1111111111111111
1111111111111111"""


def small(**kw) -> XTRA:
    torch.manual_seed(0)
    return XTRA(XTRAConfig(**{**SMALL, **kw}))


# ---- 1, 2: mask ---------------------------------------------------------------------------------------
def test_exact_block_causal_mask_and_counts():
    expected = torch.tensor([[int(ch) for ch in row] for row in SPEC_MASK.split()], dtype=torch.bool)
    mask = block_causal_mask(4, 2)
    assert torch.equal(mask, expected)
    assert mask.sum(1).tolist() == [4, 4, 8, 8, 4, 4, 8, 8, 12, 12, 16, 16, 12, 12, 16, 16]
    big = block_causal_mask(16, 4)
    assert int(big.sum()) == 34816 and int((~big).sum()) == 30720
    for g in (4, 16):
        assert torch.equal(block_causal_mask(g, 1), torch.ones(g * g, g * g).tril().bool())


@pytest.mark.parametrize("grid,k", [(4, 2), (8, 2), (8, 4), (6, 3)])
def test_mask_semantics(grid, k):
    mask = block_causal_mask(grid, k)
    blk = [(i // k) * (grid // k) + j // k for i in range(grid) for j in range(grid)]
    for q in range(grid * grid):
        for j in range(grid * grid):
            assert bool(mask[q, j]) == (blk[j] <= blk[q])
    for b in set(blk):  # full, symmetric attention inside a block
        idx = torch.tensor([t for t in range(grid * grid) if blk[t] == b])
        assert bool(mask[idx][:, idx].all())


# ---- 3, 11: shapes and parameter counts of the released sizes (meta device: no memory, no compute) --------
def _shapes_on_meta(name: str, side: int) -> dict:
    with torch.device("meta"):
        model = create_model(name)
        seen = {}
        model.encoder.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("encoder", o.shape))
        model.proj.register_forward_hook(lambda m, i, o: seen.__setitem__("proj", o.shape))
        model.predictor.register_forward_hook(lambda m, i, o: seen.__setitem__("predictor", o.shape))
        model.aim_proj[0].register_forward_hook(lambda m, i, o: seen.update(concat=i[0].shape, pred=o.shape))
        imgs = torch.empty(2, 3, side, side)
        seen["target"] = model.patchify(imgs).shape
        model(imgs)
    params = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("encoder", "proj", "predictor", "aim_proj")}
    return {k: tuple(v) for k, v in seen.items()}, params


def test_base_patch16_shapes_and_parameters():
    shapes, params = _shapes_on_meta("xtra_vit_base_patch16", 256)
    assert shapes == dict(encoder=(2, 256, 768), proj=(2, 256, 768), predictor=(2, 256, 768), concat=(2, 16, 12288),
                          pred=(2, 16, 12288), target=(2, 16, 3, 64, 64))
    assert params == dict(encoder=85_843_200, proj=6_295_552, predictor=56_901_120, aim_proj=151_013_376)


def test_huge_patch14_shapes_and_parameters():
    shapes, params = _shapes_on_meta("xtra_vit_huge_patch14", 224)
    assert shapes == dict(encoder=(2, 256, 1280), proj=(2, 256, 640), predictor=(2, 256, 640), concat=(2, 16, 10240),
                          pred=(2, 16, 9408), target=(2, 16, 3, 56, 56))
    # the official H/14 model: 630.76M, 9.84M, 39.55M, 184.87M
    assert params == dict(encoder=630_762_240, proj=9_835_520, predictor=39_553_280, aim_proj=184_867_200)


def test_tiny_shapes_and_preset():
    model = small(input_size=64, patch_size=16, num_pred_heads=2)
    loss, out = model.forward_with_outputs(torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 2, 4, 3072) and out["target"].shape == (2, 4, 3072) and loss.ndim == 0
    assert model.patchify(torch.randn(2, 3, 64, 64)).shape == (2, 4, 3, 32, 32)
    tiny = create_model("xtra_vit_tiny")
    assert tiny.encoder_mask.to_dict() == {"type": "block_causal", "block_size": 2}
    assert tiny.encoder.config["class_token"] is False and tiny.encoder.num_features == 64
    assert sorted(tiny.visualize(torch.randn(3, 3, 32, 32))) == ["input", "prediction", "target"]
    assert lookup("xtra_vit_base_patch16", "pretrain")[0].recipe["lr"] == 1e-3


# ---- 4, 5: layouts -------------------------------------------------------------------------------------
def test_concat_order_is_channel_major():
    z = torch.stack([torch.arange(16.0), torch.arange(16.0) + 100], dim=-1)[None]  # grid 4x4, D=2
    e = small().concat_blocks(z)
    assert e[0].tolist() == [[0, 1, 4, 5, 100, 101, 104, 105], [2, 3, 6, 7, 102, 103, 106, 107],
                             [8, 9, 12, 13, 108, 109, 112, 113], [10, 11, 14, 15, 110, 111, 114, 115]]


def test_target_patchify_order():
    model = small(input_size=64, patch_size=16)  # block side 32 px
    img = torch.arange(3 * 64 * 64, dtype=torch.float).reshape(1, 3, 64, 64)
    t = model.patchify(img)
    assert t[0, 1, 0, 0, 0] == img[0, 0, 0, 32] == 32 and t[0, 2, 0, 0, 0] == img[0, 0, 32, 0] == 2048
    assert t[0, 3, 2, 5, 7] == img[0, 2, 37, 39]  # channel-major (c, y, x) inside each block
    assert torch.equal(model.unpatchify(t.flatten(2)), img)


# ---- 6: causality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, dict(block_size=1, input_size=16)])  # k=2 (4 blocks); plain causal (4 patches)
def test_prediction_at_block_b_depends_only_on_blocks_up_to_b(kw):
    model = small(**kw).eval()
    imgs = torch.randn(1, 3, model.crop_size * 2, model.crop_size * 2)
    base = model.predict(imgs)[0][:, 0]
    c = model.crop_size
    for j in range(4):
        noisy = imgs.clone()
        noisy[..., (j // 2) * c:(j // 2 + 1) * c, (j % 2) * c:(j % 2 + 1) * c] += torch.randn(1, 3, c, c)
        changed = (model.predict(noisy)[0][:, 0] - base).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.int().tolist() == [int(b >= j) for b in range(4)]


# ---- 7, 8: targets and loss ----------------------------------------------------------------------------
def test_per_block_normalisation_values():
    alt = (torch.arange(3 * 64 * 64) % 2 * 2.0)[None, None]  # 0, 2, 0, 2, ...
    assert alt.mean() == 1 and math.isclose(alt.var().item(), 12288 / 12287, rel_tol=1e-6)
    t = norm_pix(alt)
    torch.testing.assert_close(t.abs(), torch.full_like(t, 0.99995888), rtol=0, atol=1e-7)
    const = norm_pix(torch.full((1, 1, 192), 3.0))
    assert torch.equal(const, torch.zeros_like(const))
    # N(0,1) pixels, n = 12288 per block: mean square of the normalised block = (n-1)/n · v/(v+1e-6) ≈ 0.999918
    gauss = norm_pix(torch.randn(1, 64, 12288, generator=torch.Generator().manual_seed(0)))
    assert abs(gauss.double().pow(2).mean().item() - 0.999918) < 1e-6


def _reference_target(model: XTRA, imgs: torch.Tensor) -> torch.Tensor:
    c = model.crop_size
    crops = imgs.unfold(2, c, c).unfold(3, c, c).permute(0, 2, 3, 1, 4, 5)
    t = crops.reshape(imgs.shape[0], -1, 3 * c * c)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_zero_and_perfect_predictions():
    model = small()
    imgs = torch.randn(2, 3, 32, 32)
    t = _reference_target(model, imgs)
    for head in model.aim_proj:  # zero output layer: every prediction is 0
        torch.nn.init.zeros_(head.mlp[2].weight), torch.nn.init.zeros_(head.mlp[2].bias)
    loss, out = model.forward_with_outputs(imgs)
    torch.testing.assert_close(out["target"], t)
    raw = model.patchify(imgs).flatten(2)[:, 1:]
    n, v = raw.shape[-1], raw.var(-1)
    torch.testing.assert_close(loss, ((n - 1) / n * v / (v + 1e-6)).mean())
    perfect = torch.cat([t[:, 1:], torch.randn(2, 1, t.shape[-1])], dim=1)[:, None]  # last position: anything
    assert model.prediction_loss(perfect, t).item() == 0.0


@pytest.mark.parametrize("loss_type,fn", [("mse", F.mse_loss), ("l1", F.l1_loss)])
def test_multi_head_loss(loss_type, fn):
    model = small(num_pred_heads=2, loss_type=loss_type)
    imgs = torch.randn(2, 3, 32, 32)
    loss, out = model.forward_with_outputs(imgs)
    h0, h1, t = out["pred"][:, 0], out["pred"][:, 1], _reference_target(model, imgs)
    assert not torch.allclose(h0, h1)
    expected = 0.5 * (fn(h0[:, :-1], t[:, 1:]) + fn(h1[:, :-2], t[:, 2:]))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_raw_pixel_targets_without_norm_pix():
    model = small(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    loss, out = model.forward_with_outputs(imgs)
    torch.testing.assert_close(out["target"], model.patchify(imgs).flatten(2))
    torch.testing.assert_close(loss, F.mse_loss(out["pred"][:, 0, :-1], out["target"][:, 1:]))


# ---- 9: SDPA with a boolean mask = explicit masked softmax ----------------------------------------------
def test_sdpa_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x, mask = torch.randn(2, 16, 32), block_causal_mask(4, 2)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32))
    assert (attn(x, mask=mask) - ref).abs().max() < 1e-6


# ---- 10: pseudo-random orders --------------------------------------------------------------------------
def test_random_permutations_structure():
    token_perm, block_perm = create_random_permutations(16, 4, seed=3)
    assert token_perm.shape == (16, 256) and block_perm.shape == (16, 16)
    assert all(sorted(r) == list(range(16)) for r in block_perm.tolist())
    assert all(sorted(r) == list(range(256)) for r in token_perm.tolist())
    assert len(set(block_perm[:, 0].tolist())) == 16  # distinct first blocks
    for i in range(16):
        for p in range(256):
            r, c = divmod(p, 16)
            b = int(block_perm[i, (r // 4) * 4 + c // 4])  # the block moved into p's slot
            assert token_perm[i, p] == ((b // 4) * 4 + r % 4) * 16 + (b % 4) * 4 + c % 4
    again = create_random_permutations(16, 4, seed=3)
    other = create_random_permutations(16, 4, seed=4)
    assert torch.equal(again[1], block_perm) and not torch.equal(other[1], block_perm)


def _official_block_orders(num_blocks: int, seed: int) -> list[list[int]]:
    """The official sampler, as its code does it: reseed the GLOBAL RNG, then draw torch.randperm until no kept
    order shares a prefix (of any length 1..nb-1) with the new one."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    perms: list[list[int]] = []
    while len(perms) < num_blocks:
        p = torch.randperm(num_blocks).tolist()
        if all(p[:i] != q[:i] for q in perms for i in range(1, num_blocks)):
            perms.append(p)
    torch.set_rng_state(state)
    return perms


def test_pseudo_random_orders_equal_the_official_tables():
    # the official create_random_permutations(4, 16, 0): 4 blocks of 2×2 patches on a 4×4 grid
    assert create_random_permutations(4, 2, 0)[1].tolist() == [[0, 1, 3, 2], [3, 2, 0, 1], [2, 1, 0, 3], [1, 0, 2, 3]]
    for seed in (0, 1, 7):  # the baseline ablation's 16 blocks: every table equals the official sampler's
        assert create_random_permutations(16, 4, seed)[1].tolist() == _official_block_orders(16, seed)
    before = torch.get_rng_state()
    create_random_permutations(16, 4, 0)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone


def _order_mask(block_order: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Reference in ORIGINAL token indices: t may attend to u iff u's block comes no later than t's in the order."""
    blk = torch.tensor([(i // k) * (grid // k) + j // k for i in range(grid) for j in range(grid)])
    rank = torch.empty_like(block_order)
    rank[block_order] = torch.arange(len(block_order))
    return rank[blk][None, :] <= rank[blk][:, None]


def test_permuted_raster_mask_is_block_causal_in_the_permuted_order():
    token_perm, block_perm = create_random_permutations(8, 2, seed=1)
    raster = block_causal_mask(8, 2)
    for i in range(len(block_perm)):
        p = token_perm[i]
        assert torch.equal(raster, _order_mask(block_perm[i], 8, 2)[p][:, p])


def test_pseudo_random_forward_equals_order_mask_on_unpermuted_tokens():
    model = small(pseudo_random=True).eval()
    imgs = torch.randn(2, 3, 32, 32)
    i = 2
    token_perm, order = model.token_perms[i], model.block_perms[i]
    _, out = model.forward_with_outputs(imgs, perm_index=i)
    assert torch.equal(out["block_order"], order)
    torch.testing.assert_close(out["target"], norm_pix(model.patchify(imgs).flatten(2))[:, order])
    # reference: tokens in raster order under the order's mask, then grouped per block in that order
    mask = _order_mask(order, 4, 2)
    h, _ = model.encoder.forward_blocks(model.encoder.embed(imgs), mask=mask)
    z = model.predictor(model.proj(model.encoder.norm(h)), mask)
    ref = model.aim_proj[0](model.concat_blocks(z[:, token_perm]))
    torch.testing.assert_close(out["pred"][:, 0], ref, rtol=1e-5, atol=1e-5)


def test_pseudo_random_choice_uses_its_own_generator():
    torch.manual_seed(5)
    a = small(pseudo_random=True, perm_seed=7)
    torch.manual_seed(6)
    b = small(pseudo_random=True, perm_seed=7)
    assert torch.equal(a.block_perms, b.block_perms)  # independent of the global RNG
    a.train(), b.load_state_dict(a.state_dict())
    imgs = torch.randn(1, 3, 32, 32)
    state = torch.get_rng_state()
    with torch.no_grad():
        orders_a = [a.forward_with_outputs(imgs)[1]["block_order"][0].item() for _ in range(8)]
        assert torch.equal(torch.get_rng_state(), state)  # the per-step choice leaves the global RNG alone
        torch.manual_seed(123)  # another rank: different global RNG, same sequence of orders
        assert [b.forward_with_outputs(imgs)[1]["block_order"][0].item() for _ in range(8)] == orders_a
    assert len(set(orders_a)) > 1
    a.eval()
    assert a.forward_with_outputs(imgs)[1]["block_order"][0] == a.block_perms[0, 0]  # eval: order 0
    assert "token_perms" not in a.state_dict()  # rebuilt from perm_seed; official checkpoints load strictly


def test_resume_continues_the_order_sequence(tmp_path):
    """The order choice's generator is saved with the checkpoint, so a resumed run draws the orders that an
    uninterrupted run would have drawn next."""
    from util.checkpoint import load_file, resume_path, save_checkpoint, training_state
    from util.run import resume

    model = small(pseudo_random=True, perm_seed=3).train()
    imgs = torch.randn(1, 3, 32, 32)

    def orders(net, n=8):
        with torch.no_grad():
            return [net.forward_with_outputs(imgs)[1]["block_order"][0].item() for _ in range(n)]

    orders(model)  # part of an epoch
    save_checkpoint(training_state(model, 0, {"model": "xtra"}), str(tmp_path), epoch=0, epochs=10, save_freq=100,
                    keep_last=0)
    expected = orders(model)
    fresh = small(pseudo_random=True, perm_seed=3).train()
    assert orders(small(pseudo_random=True, perm_seed=3).train()) != expected  # a restart would repeat the start
    path = resume_path("", str(tmp_path), auto_resume=True)
    start, _ = resume(load_file(path), path, fresh)
    assert orders(fresh) == expected and start.epoch == 1


def test_visualize_places_predictions_in_their_blocks():
    model = small(pseudo_random=True).eval()
    imgs = torch.randn(2, 3, 32, 32)
    panels = model.visualize(imgs)
    order = model.block_perms[0]
    preds, target, _ = model.predict(imgs)
    blocks = model.patchify(panels["prediction"]).flatten(2)
    t = target.flatten(2)
    torch.testing.assert_close(blocks[:, order[0]], t[:, 0])  # first block of the order: the input block
    s = 1  # position 1 of the order: head 0 at position 0, de-normalised with that block's own statistics
    std = (t[:, s].var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(blocks[:, order[s]], preds[:, 0, 0] * std + t[:, s].mean(-1, keepdim=True))
    assert torch.equal(panels["input"], imgs)


# ---- bad input, flags ----------------------------------------------------------------------------------
def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by block_size"):
        XTRAConfig(**{**SMALL, "input_size": 48, "patch_size": 8, "block_size": 4})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        XTRAConfig(**{**SMALL, "input_size": 30})
    with pytest.raises(ValueError, match="without targets"):
        XTRAConfig(**{**SMALL, "num_pred_heads": 4})
    with pytest.raises(ValueError, match="loss_type"):
        XTRAConfig(**{**SMALL, "loss_type": "huber"})
    with pytest.raises(ValueError, match="predictor_heads"):
        XTRAConfig(**{**SMALL, "predictor_heads": 5})
    model = small()
    with pytest.raises(ValueError, match="multiple of the block side"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="square RGB"):
        model(torch.randn(1, 3, 32, 16))
    with pytest.raises(ValueError, match="pseudo_random"):
        model.forward_with_outputs(torch.randn(1, 3, 32, 32), perm_index=0)
    with pytest.raises(ValueError, match="out of range"):
        small(pseudo_random=True).forward_with_outputs(torch.randn(1, 3, 32, 32), perm_index=4)


def _resolve(tmp_path, *flags: str):
    """main_pretrain.py's real parser; --print_config: nothing is written, no checkpoint in tmp_path to resume."""
    settings, ckpt, path = main_pretrain.resolve_settings(["--model", "xtra_vit_tiny", *flags, "--print_config",
                                                           "--output_dir", str(tmp_path)])
    assert ckpt is None and path == ""
    return settings


def test_without_flags_the_settings_are_the_preset(tmp_path):
    settings = _resolve(tmp_path)
    preset = model_config("xtra_vit_tiny")
    assert settings.of(XTRAConfig) == preset
    assert preset.block_size == 2 and preset.embed_dim == 64 and preset.input_size == 32 and preset.drop_path == 0.0
    assert all(settings.source(name) != "command line" for name in ("block_size", "loss_type", "pseudo_random"))
    assert list(tmp_path.iterdir()) == []


def test_block_size_flag_reaches_the_settings_and_the_model(tmp_path):
    settings = _resolve(tmp_path, "--block_size", "1")
    config = settings.of(XTRAConfig)
    assert config.block_size == 1 and settings.source("block_size") == "command line"
    assert config == model_config("xtra_vit_tiny", block_size=1)  # the preset's other values are kept
    model = XTRA(config)
    assert model.block_size == 1 and model.num_blocks == 64 and model.encoder_mask == BlockCausal(1)
    assert model.encoder.num_features == 64 and len(model.predictor.blocks) == 1


def test_flags_override_the_preset(tmp_path):
    settings = _resolve(tmp_path, "--block_size", "4", "--num_pred_heads", "2", "--loss_type", "l1",
                        "--pseudo_random", "true", "--norm_pix_loss", "false")
    config = settings.of(XTRAConfig)
    assert config == model_config("xtra_vit_tiny", block_size=4, num_pred_heads=2, loss_type="l1",
                                  pseudo_random=True, norm_pix_loss=False)
    model = XTRA(config)
    assert model.block_size == 4 and len(model.aim_proj) == 2 and model.loss_type == "l1"
    assert model.pseudo_random and not model.norm_pix_loss and model.encoder_mask.block_size == 4


def test_no_weight_decay_exemptions_beyond_1d_params():
    assert small().no_weight_decay() == set()  # pos_embed and the patch conv are decayed, as officially


# ---- converter -----------------------------------------------------------------------------------------
def _official_state_dict(model: XTRA) -> dict:
    """Random weights under the official key names (the released Lightning files of github.com/elad-amrani/xtra), LayerNorms included."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        key = "enc." + k[len("encoder."):] if k.startswith("encoder.") else k
        is_ln_weight = "norm" in k and k.endswith(".weight")
        sd[key] = torch.randn(v.shape, generator=g) * (0.3 if v.ndim > 1 else 0.1) + float(is_ln_weight)
    return sd


def _ref_block(x, sd, pre, heads, mask):
    """Official layout: LN eps 1e-6, q/k/v as separate row blocks of the fused weight, masked_fill softmax."""
    B, N, D = x.shape
    h = F.layer_norm(x, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], eps=1e-6)
    w, b = sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]
    q, k, v = [(h @ w[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D]).reshape(B, N, heads, D // heads).transpose(1, 2)
               for i in range(3)]
    scores = (q @ k.transpose(-1, -2)) * (D // heads) ** -0.5
    a = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    x = x + F.linear(a.transpose(1, 2).reshape(B, N, D), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
    h = F.layer_norm(x, (D,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    return x + F.linear(h, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])


def _reference_forward(sd, imgs, patch, k, heads, pred_heads):
    B = imgs.shape[0]
    x = F.conv2d(imgs, sd["enc.patch_embed.proj.weight"], sd["enc.patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["enc.pos_embed"]
    G = int(math.isqrt(x.shape[1]))
    ids = torch.tensor([(i // k) * (G // k) + j // k for i in range(G) for j in range(G)])
    masked = ids[None, :] > ids[:, None]  # official convention: True = NOT allowed
    depth = len({key.split(".")[2] for key in sd if key.startswith("enc.blocks.")})
    for i in range(depth):
        x = _ref_block(x, sd, f"enc.blocks.{i}.", heads, masked)
    x = F.layer_norm(x, x.shape[-1:], sd["enc.norm.weight"], sd["enc.norm.bias"], eps=1e-6)
    z = F.linear(F.gelu(F.linear(x, sd["proj.mlp.0.weight"], sd["proj.mlp.0.bias"])), sd["proj.mlp.2.weight"])
    z = z + sd["predictor.pos_embed"]
    for i in range(len({key.split(".")[2] for key in sd if key.startswith("predictor.blocks.")})):
        z = _ref_block(z, sd, f"predictor.blocks.{i}.", pred_heads, masked)
    z = F.layer_norm(z, z.shape[-1:], sd["predictor.norm.weight"], sd["predictor.norm.bias"], eps=1e-6)
    D = z.shape[-1]  # concatenation as the official code does it: grid view, unfold, flatten per block
    e = z.transpose(1, 2).reshape(B, D, G, G).unfold(2, k, k).unfold(3, k, k)
    e = e.permute(0, 2, 3, 1, 4, 5).reshape(B, (G // k) ** 2, D * k * k)
    h = F.gelu(F.linear(e, sd["aim_proj.0.mlp.0.weight"], sd["aim_proj.0.mlp.0.bias"]))
    return F.linear(h, sd["aim_proj.0.mlp.2.weight"], sd["aim_proj.0.mlp.2.bias"])


TINY_RECORDS = {"enc_num_heads": 4, "predictor_num_heads": 4, "enc_block_size": 2}  # Lightning hyper-parameters


def test_converter_round_trip_matches_official_layout_forward():
    torch.manual_seed(0)
    model = create_model("xtra_vit_tiny")
    official = _official_state_dict(model)
    conv = CONVERTERS["xtra"]
    assert conv.detect(official, {}) and not conv.detect(model.state_dict(), {})
    converted = conv.convert(official, TINY_RECORDS)
    assert converted.kind == "pretrain" and converted.placeholders == {}
    assert XTRAConfig(**{**converted.settings, "num_heads": 4}) == model_config("xtra_vit_tiny", drop_path=0.1)
    model.load_state_dict(converted.state_dict, strict=True)
    model.eval()
    imgs = torch.randn(2, 3, 32, 32)
    loss, out = model.forward_with_outputs(imgs)
    ref = _reference_forward(official, imgs, patch=4, k=2, heads=4, pred_heads=4)
    torch.testing.assert_close(out["pred"][:, 0], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, F.mse_loss(ref[:, :-1], _reference_target(model, imgs)[:, 1:]),
                               rtol=1e-5, atol=1e-5)


def test_converter_reads_any_shape_and_asks_for_what_the_file_does_not_record():
    two_heads = _official_state_dict(create_model("xtra_vit_tiny", num_pred_heads=2, block_size=1))
    converted = CONVERTERS["xtra"].convert(two_heads, {})
    assert converted.settings["num_pred_heads"] == 2 and converted.settings["block_size"] == 1
    assert converted.placeholders == {"predictor_heads": 1}  # not visible in the shapes, not recorded
    encoder_only = {k: v for k, v in two_heads.items() if k.startswith("enc.")}
    assert CONVERTERS["xtra"].convert(encoder_only, {"enc_block_size": 4}).kind == "encoder"
    with pytest.raises(ValueError, match="enc_block_size"):
        CONVERTERS["xtra"].convert(encoder_only, {})


@pytest.mark.parametrize("wrap", ["lightning", "deepspeed"])
def test_official_file_loads_through_load_vit(tmp_path, wrap):
    from models.formats import load_vit

    model = create_model("xtra_vit_tiny")
    official = _official_state_dict(model)
    raw = {"state_dict": official, "epoch": 799, "hyper_parameters": TINY_RECORDS} if wrap == "lightning" else \
        {"module": {"module." + k: v for k, v in official.items()}}
    torch.save(raw, tmp_path / "official.pt")
    vit, info = load_vit(str(tmp_path / "official.pt"), num_heads=None if wrap == "lightning" else 4)
    assert info["encoder_mask"] == {"type": "block_causal", "block_size": 2}
    assert info["model_name"] == "xtra"
    assert info.get("unrecorded", []) == ([] if wrap == "lightning" else ["predictor_heads"])
    model.load_state_dict(CONVERTERS["xtra"].convert(official, TINY_RECORDS).state_dict)
    x, mask = torch.randn(2, 3, 32, 32), block_causal_mask(8, 2)
    torch.testing.assert_close(vit.eval().forward_features(x, mask=mask), model.encoder.eval().forward_features(x, mask=mask))
