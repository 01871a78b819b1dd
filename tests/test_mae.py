"""MAE: the model against an independent re-implementation of the official forward built from timm's own blocks (the
official MAE is built from timm's PatchEmbed and Block), masking, the masked-only loss, the converter, and an
end-to-end run on the digits."""
import argparse
import functools
import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import PatchEmbed

import models  # noqa: F401  (registers the methods)
from models.converters import CONVERTERS
from models.formats import file_records, load_checkpoint, official_state_dict
from models.mae import MAE, MAEConfig
from models.registry import create_model
from models.vit import sincos_pos_embed_2d
from tests.helpers import FAST, read_log, run_script

TOY = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=24, decoder_depth=2,
           decoder_heads=3)


class OfficialLayoutMAE(nn.Module):
    """The official MaskedAutoencoderViT's modules and key names, from timm's blocks (LayerNorm eps 1e-6)."""

    def __init__(self, img: int, p: int, D: int, depth: int, heads: int, Dd: int, dd: int, dh: int):
        super().__init__()
        ln = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img, p, 3, D)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(D, img // p, 1)[None], requires_grad=False)
        self.blocks = nn.ModuleList([TimmBlock(D, heads, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(depth)])
        self.norm = ln(D)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, Dd) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(Dd, img // p, 1)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([TimmBlock(Dd, dh, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(dd)])
        self.decoder_norm = ln(Dd)
        self.decoder_pred = nn.Linear(Dd, p * p * 3)
        self.p, self.n = p, n

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float = 0.75):
        """The official algorithm, step by step: shuffle by the noise, keep the first floor(L·(1-r)), encode,
        append mask tokens, unshuffle, decode, per-patch normalised targets, MSE averaged over removed patches."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(N, L, dtype=imgs.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(N, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        h = w = imgs.shape[2] // self.p
        target = imgs.reshape(N, 3, h, self.p, w, self.p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, -1)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def _official(c: dict = TOY, seed: int = 0) -> OfficialLayoutMAE:
    torch.manual_seed(seed)
    return OfficialLayoutMAE(c["input_size"], c["patch_size"], c["embed_dim"], c["depth"], c["num_heads"],
                             c["decoder_dim"], c["decoder_depth"], c["decoder_heads"]).double().eval()


def _official_state_dict(ref: OfficialLayoutMAE) -> dict:
    return {k: v.float() for k, v in ref.state_dict().items()}


def test_forward_matches_the_official_algorithm_in_float64():
    ref = _official()
    ours = MAE(MAEConfig(**TOY)).double().eval()
    ours.load_state_dict({("" if k.startswith(("mask_token", "decoder_")) else "encoder.") + k: v
                          for k, v in ref.state_dict().items()}, strict=True)
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)
    ref_loss, ref_pred, ref_mask = ref(imgs, noise)
    loss, out = ours.forward_with_outputs(imgs, shuffle=noise.argsort(dim=1))
    torch.testing.assert_close(out["pred"], ref_pred, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["mask"], ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)


def test_masking_keeps_a_quarter_and_the_loss_covers_removed_patches_only():
    model = MAE(MAEConfig(**TOY)).eval()
    imgs = torch.randn(4, 3, 32, 32)
    loss, out = model.forward_with_outputs(imgs)
    assert model.num_keep == 4 and (out["mask"].sum(1) == 12).all()
    assert len({tuple(r) for r in out["mask"].tolist()}) > 1  # a different mask per image
    per_patch = (out["pred"] - out["target"]).square().mean(-1)
    torch.testing.assert_close(loss, per_patch[out["mask"].bool()].mean())


def test_removed_patches_never_reach_the_predictions():
    model = MAE(MAEConfig(**TOY)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    shuffle = torch.stack([torch.randperm(16) for _ in range(2)])
    _, before = model.forward_with_outputs(imgs, shuffle)
    removed = int(shuffle[0, -1])  # a patch of image 0 that is never visible
    r, c = divmod(removed, 4)
    moved = imgs.clone()
    moved[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5.0
    _, after = model.forward_with_outputs(moved, shuffle)
    torch.testing.assert_close(after["pred"], before["pred"])
    assert not torch.allclose(after["target"][0, removed], before["target"][0, removed])


def test_norm_pix_loss_off_uses_raw_pixels():
    model = MAE(MAEConfig(**TOY, norm_pix_loss=False)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    _, out = model.forward_with_outputs(imgs)
    assert torch.equal(out["target"], imgs.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, -1))


def test_presets_follow_the_official_sizes():
    with torch.device("meta"):
        for name, (D, depth, p) in {"mae_vit_base_patch16": (768, 12, 16), "mae_vit_large_patch16": (1024, 24, 16),
                                    "mae_vit_huge_patch14": (1280, 32, 14)}.items():
            model = create_model(name)
            assert (model.encoder.embed_dim, len(model.encoder.blocks), model.patch_size) == (D, depth, p)
            assert (model.decoder_embed.out_features, len(model.decoder_blocks)) == (512, 8)
            assert model.decoder_blocks[0].attn.num_heads == 16 and model.num_keep == int((224 // p) ** 2 * 0.25)
    encoder = create_model("mae_vit_base_patch16").encoder
    assert sum(p.numel() for p in encoder.parameters()) == 85_798_656  # ViT-B/16 without a classifier
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == 85_798_656 - 197 * 768  # sin-cos frozen


@pytest.mark.parametrize("kw,match", [(dict(mask_ratio=1.0), "mask_ratio"), (dict(mask_ratio=0.99), "no visible"),
                                      (dict(decoder_heads=5), "divisible")])
def test_impossible_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MAEConfig(**{**TOY, **kw})


def test_official_checkpoint_converts_and_computes_the_same(tmp_path):
    """A non-preset official file (its args record a model name of no official size): the architecture from the
    shapes, the head counts from --num_heads and, for the decoder, from the resumed run's flags."""
    ref = _official()
    args = argparse.Namespace(model="mae_vit_custom", mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": _official_state_dict(ref), "epoch": 799, "args": args}, tmp_path / "mae_official.pth")
    with pytest.raises(ValueError, match="give --num_heads"):
        load_checkpoint(str(tmp_path / "mae_official.pth"))
    ckpt = load_checkpoint(str(tmp_path / "mae_official.pth"), num_heads=2)
    assert ckpt["converted_from"] == "mae" and ckpt["vit_prefix"] == "encoder." and ckpt["model_name"] == "mae"
    assert ckpt["unrecorded"] == ["decoder_heads"]
    assert MAEConfig(**ckpt["model_config"], decoder_heads=3) == MAEConfig(**TOY, drop_path=0.0)
    model = MAE(MAEConfig(**TOY)).double().eval()
    model.load_state_dict(ckpt["model"], strict=True)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16, dtype=torch.float64)
    torch.testing.assert_close(model.forward_with_outputs(imgs, noise.argsort(1))[0], ref(imgs, noise)[0],
                               rtol=1e-6, atol=1e-6)
    official = {"model": _official_state_dict(_official(dict(TOY, decoder_heads=16, decoder_dim=32))),
                "args": argparse.Namespace(model="mae_vit_base_patch16")}  # an official constructor's name
    assert CONVERTERS["mae"].convert(official_state_dict(official), file_records(official)).settings[
        "decoder_heads"] == 16


def test_end_to_end_pretraining_learns_and_fine_tunes(tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    run_script("main_pretrain.py", *FAST, "--model", "mae_vit_tiny", "--epochs", "3", "--output_dir", pre)
    log = read_log(pre)
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert not math.isnan(log[-1]["train_loss"])
    run_script("main_finetune.py", *FAST, "--finetune", pre / "checkpoint-last.pth", "--epochs", "1",
               "--batch_size", "32", "--blr", "5e-3", "--warmup_epochs", "0", "--layer_decay", "1", "--aa", "none",
               "--reprob", "0", "--output_dir", ft)
    assert read_log(ft)[0]["test_n"] == 359
