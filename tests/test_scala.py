"""Scala (slimmable ViT): deterministic cases worked out from the official code
(github.com/BeSpontaneous/Scala-pytorch), export, official-checkpoint converter, encoder init.

Tiny configs (D 64, 4 heads, depth 2, patch 4, 32 px) in float64 where exactness matters; DeiT-S/B sizes only on
the meta device. Reference computations slice the weights independently of models/scala.py (the per-tensor slicing
of the official forward) and run them through timm's own DeiT, with the attention scale forced to the full head
dim, as the official code keeps it.
"""
import argparse
import math
import random
from functools import partial

import pytest
import timm.models.deit as timm_deit
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.converters import CONVERTERS
from models.formats import load_encoder_weights, normalize_checkpoint
from models.registry import create_model
from models.scala import WidthSpace, width_losses
from models.vit import VisionTransformer

D, H, C = 64, 4, 10  # tiny: scala_vit_tiny with 10 classes
GRID13 = [0.25 + k / 16 for k in range(13)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barriers make
    every op ~100x slower; restore the setting for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scala(name, **kw):
    """A registered Scala preset; without drop-path unless asked (train-mode outputs are compared exactly)."""
    return create_model(name, "slimmable", **{"nb_classes": 1000, "drop_path": 0.0, **kw})


def tiny(dtype=torch.float64, seed=0, std=0.3, **kw):
    """The tiny model with weights large enough that every parameter visibly matters (init std is 0.02)."""
    torch.manual_seed(seed)
    m = scala("scala_vit_tiny", nb_classes=C, **kw).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


def reference_slices(sd, r, first, full_dim=D):
    """The official sub-network's slices (the Scala-pytorch models_scala.py forward), written out independently:
    d = int(r·D) channels (first or last), qkv as one contiguous
    block of 3d rows, MLP hidden int(r·4D), classifier biases untouched."""
    d, hd = int(r * full_dim), int(r * 4 * full_dim)

    def cut(t, n, dim):
        return t[(slice(None),) * dim + (slice(0, n) if first else slice(t.shape[dim] - n, None),)]

    out = {}
    for k, t in sd.items():
        if k in ("cls_token", "dist_token", "pos_embed"):
            t = cut(t, d, 2)
        elif k in ("head.weight", "head_dist.weight"):
            t = cut(t, d, 1)
        elif k in ("head.bias", "head_dist.bias"):
            pass
        elif "attn.qkv" in k:
            t = cut(t, 3 * d, 0)
            t = cut(t, d, 1) if t.ndim == 2 else t
        elif "mlp.fc1" in k:
            t = cut(t, hd, 0)
            t = cut(t, d, 1) if t.ndim == 2 else t
        elif "mlp.fc2" in k:
            t = cut(t, d, 0)
            t = cut(t, hd, 1) if t.ndim == 2 else t
        elif "attn.proj" in k:
            t = cut(t, d, 0)
            t = cut(t, d, 1) if t.ndim == 2 else t
        else:  # patch embed (output channels), norms
            t = cut(t, d, 0)
        out[k] = t.clone()
    return out


def timm_deit_distilled(sd, r, first, scale=0.25, eps=1e-5):
    """timm's DeiT-distilled at width int(r·D) with the same heads, loaded with reference slices; ``scale``
    None keeps timm's own (d/h)^-0.5 (and its fused SDPA path)."""
    d = int(r * D)
    net = timm_deit.VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=d, depth=2, num_heads=H,
                                               mlp_ratio=4.0, num_classes=C,
                                               norm_layer=partial(nn.LayerNorm, eps=eps)).double().eval()
    net.load_state_dict(reference_slices(sd, r, first), strict=True)
    if scale is not None:
        for blk in net.blocks:
            blk.attn.fused_attn = False  # timm's fused path ignores attn.scale
            blk.attn.scale = scale
    return net


@pytest.fixture(scope="module")
def deit_s_b():
    with torch.device("meta"):
        return (scala("scala_deit_small_patch16"), scala("scala_deit_base_patch16"),
                scala("scala_deit_small_patch16", distilled=False))


# 1 ------------------------------------------------------------------------------------------------------
def test_ratio_grid():
    assert [len(WidthSpace(0.25, 1.0, e).grid()) for e in (1 / 32, 1 / 16, 1 / 8, 1 / 4)] == [25, 13, 7, 4]
    assert WidthSpace(0.25, 1.0, 1 / 16).grid() == GRID13  # exact binary floats
    assert WidthSpace(0.25, 1.0, 1 / 8).grid() == [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    for bad in [(0.25, 1.0, 0.1), (0.3, 1.0, 1 / 16), (0.25, 1.0, 0.0), (0.5, 0.25, 1 / 16)]:
        with pytest.raises(ValueError):
            WidthSpace(*bad).grid()


# 2 ------------------------------------------------------------------------------------------------------
def test_stable_sampling_supports_and_official_draws():
    rng = random.Random(0)
    draws = [WidthSpace(0.25, 1.0, 1 / 16).sample(rng) for _ in range(10_000)]
    assert {d[1] for d in draws} == {0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375}
    assert {d[2] for d in draws} == {0.3125, 0.375, 0.4375, 0.5, 0.5625}
    assert all(d[0] == 1.0 and d[3] == 0.25 and d[0] > d[1] > d[2] > d[3] for d in draws)
    assert sorted({r for d in draws for r in d}) == GRID13

    # same Random state -> the same ratios as a transcription of the official formula (r3 first, then r2)
    ours, official = random.Random(7), random.Random(7)
    for _ in range(200):
        s, l_, e = 0.25, 1.0, 1 / 32
        m = (l_ + s) / 2
        r3 = float(official.randint(int(m // e), int(l_ // e) - 1) * e)
        r2 = float(official.randint(int(s // e) + 1, int(m // e) - 1) * e)
        assert WidthSpace(s, l_, e).sample(ours) == [l_, r3, r2, s]

    rng = random.Random(1)
    d32 = [WidthSpace(0.25, 1.0, 1 / 32).sample(rng) for _ in range(5000)]
    assert len({d[1] for d in d32}) == 12 and len({d[2] for d in d32}) == 11
    d8 = [WidthSpace(0.25, 1.0, 1 / 8).sample(rng) for _ in range(500)]
    assert {d[1] for d in d8} == {0.625, 0.75, 0.875} and {d[2] for d in d8} == {0.375, 0.5}
    # X = 4: the official sampler crashes; here both interior widths run every iteration, no randomness
    state = rng.getstate()
    assert WidthSpace(0.25, 1.0, 1 / 4).sample(rng) == [1.0, 0.75, 0.5, 0.25]
    assert rng.getstate() == state
    with pytest.raises(ValueError, match="at least 4 widths"):
        WidthSpace(0.5, 1.0, 1 / 4).sample(rng)


# 3 ------------------------------------------------------------------------------------------------------
def closed_form_params(d, hd):  # the official DeiT-S/B distilled models, 1000 classes
    return (12 * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (hd * d + hd) + (d * hd + d)) + 2 * d + 198 * d
            + 768 * d + d + 2 * d + 2 * (1000 * d + 1000))


def test_shapes_and_parameter_counts(deit_s_b):
    small, base, plain = deit_s_b
    expected_s = {0.25: 1_629_296, 0.5: 5_910_800, 0.75: 12_846_512, 1.0: 22_436_432}
    expected_b = {0.25: 5_910_800, 0.5: 22_436_432, 0.75: 49_578_896, 1.0: 87_338_192}
    for r, (d, head_dim, hidden) in zip(expected_s, [(96, 16, 384), (192, 32, 768), (288, 48, 1152),
                                                     (384, 64, 1536)]):
        sd, meta = small.export(r)
        assert (meta["embed_dim"], meta["embed_dim"] // meta["num_heads"], meta["num_heads"]) == (d, head_dim, 6)
        assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
        assert sd["blocks.0.mlp.fc1.weight"].shape == (hidden, d) and sd["pos_embed"].shape == (1, 198, d)
        assert sd["head.bias"].shape == (1000,)
        assert sum(t.numel() for t in sd.values()) == small.num_params(r) == expected_s[r] == closed_form_params(d, hidden)
        assert meta["attn_scale"] == 0.125 and meta["norm_eps"] == 1e-5
        assert base.num_params(r) == expected_b[r]
    assert plain.num_params(1.0) == 22_050_664
    assert [plain.num_params(r) for r in (0.25, 0.5, 0.75)] == [1_532_104, 5_717_416, 12_556_936]
    assert sum(p.numel() for p in small.parameters()) == 22_436_432


# 4 ------------------------------------------------------------------------------------------------------
def test_subnetwork_equals_standalone_vit_with_negative_controls():
    model = tiny()
    sd = model.state_dict()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    controls = {"direction": [], "scale": [], "eps": []}
    for r in GRID13:
        first = r in (0.25, 1.0)
        ours = model(x, r)
        ref = timm_deit_distilled(sd, r, first)(x)
        assert (ours - ref).abs().max() < 1e-10, r
        exported, meta = model.export(r)  # the export is exactly the reference slices
        assert exported.keys() == sd.keys() and all(torch.equal(exported[k], v)
                                                       for k, v in reference_slices(sd, r, first).items())
        assert meta["attn_scale"] == 0.25 and meta["embed_dim"] == int(r * D)
        if r < 1:
            controls["direction"].append((ours - timm_deit_distilled(sd, r, not first)(x)).abs().max().item())
            controls["scale"].append((ours - timm_deit_distilled(sd, r, first, scale=None)(x)).abs().max().item())
        controls["eps"].append((ours - timm_deit_distilled(sd, r, first, eps=1e-6)(x)).abs().max().item())
    assert min(controls["direction"]) > 0.1
    assert min(controls["scale"]) > 1e-3
    assert min(controls["eps"]) > 1e-9  # small (eps is tiny next to the activations) but far above 1e-10


def test_fused_qkv_block_mixes_projections():
    """r = 0.5 takes the LAST 3d = 96 rows of the [q; k; v] matrix (rows 96..191 of 192): its q is the last
    half of the full k, its k and v the two halves of the full v (the official slicing, scaled from DeiT-S)."""
    model = tiny()
    full = model.blocks[0].attn.qkv.weight.detach()
    sub = model.export(0.5)[0]["blocks.0.attn.qkv.weight"]
    assert torch.equal(sub[:32], full[64 + 32:128, 32:])  # sub-q = full-k channels 32..63
    assert torch.equal(sub[32:64], full[128:160, 32:])  # sub-k = full-v channels 0..31
    assert torch.equal(sub[64:], full[160:, 32:])  # sub-v = full-v channels 32..63
    assert torch.equal(model.export(0.25)[0]["blocks.0.attn.qkv.weight"], full[:48, :16])  # all from full q


# 5 ------------------------------------------------------------------------------------------------------
def test_full_width_is_the_unsliced_network():
    model = tiny()
    sd = model.state_dict()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours = model(x, 1.0)
    timm_full = timm_deit_distilled(sd, 1.0, True, scale=None)  # plain timm DeiT, fused attention
    assert torch.equal(timm_full.state_dict()["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(ours, timm_full(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, timm_deit_distilled(sd, 1.0, False, scale=None)(x), rtol=0, atol=1e-12)

    # the plain (non-distilled) slimmable model at r = 1 is this project's VisionTransformer with eps 1e-5
    plain = tiny(distilled=False)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=D, depth=2, num_heads=H, num_classes=C,
                            norm_eps=1e-5).double().eval()
    vit.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(plain(x, 1.0), vit(x), rtol=0, atol=1e-12)
    plain_timm = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=H,
                                            num_classes=C, norm_layer=partial(nn.LayerNorm, eps=1e-5)).double()
    plain_timm.load_state_dict(plain.export(0.5)[0], strict=True)  # plain export: timm ViT keys
    for blk in plain_timm.blocks:
        blk.attn.fused_attn, blk.attn.scale = False, 0.25
    torch.testing.assert_close(plain(x, 0.5), plain_timm.eval()(x), rtol=0, atol=1e-10)


# 6 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,changed", [
    (slice(0, 16), {0.25, 0.8125, 0.875, 0.9375, 1.0}),  # DeiT-S [0:96]
    (slice(48, 64), set(GRID13) - {0.25}),  # DeiT-S [288:384]
    (slice(12, 16), {0.25, 0.8125, 0.875, 0.9375, 1.0}),  # DeiT-S [72:96]
])
def test_isolated_activation_by_perturbation(rows, changed):
    model = tiny()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = {r: model(x, r) for r in GRID13}
    with torch.no_grad():
        model.patch_embed.proj.weight[rows] += torch.randn_like(model.patch_embed.proj.weight[rows])
    after = {r: model(x, r) for r in GRID13}
    assert {r for r in GRID13 if not torch.equal(before[r], after[r])} == changed
    assert all((before[r] - after[r]).abs().max() > 1e-6 for r in changed)


def test_literal_end_ratio_quirk():
    """Official distilled model: tokens/pos/final norm/heads pick FIRST only at the literal 0.25 and 1.0."""
    for literal in (True, False):
        model = tiny(smallest_ratio=0.5, literal_end_ratios=literal)
        p, full = model.sliced_parameters(0.5), dict(model.named_parameters())
        assert torch.equal(p["patch_embed.proj.weight"], full["patch_embed.proj.weight"][:32])  # body: s -> first
        ends = full["cls_token"][..., 32:] if literal else full["cls_token"][..., :32]
        assert torch.equal(p["cls_token"], ends) and p["head.weight"].shape == (C, 32)
    plain = tiny(smallest_ratio=0.5, distilled=False)  # the official plain model uses s/l everywhere
    assert torch.equal(plain.sliced_parameters(0.5)["cls_token"], plain.cls_token[..., :32])


# 7 ------------------------------------------------------------------------------------------------------
def test_output_contract_and_invalid_ratios(deit_s_b):
    model = tiny(dtype=torch.float32).train()
    x = torch.randn(3, 3, 32, 32)
    for r in (1.0, 0.625, 0.25):
        model.zero_grad()
        cls, dist = model(x, r)
        assert cls.shape == dist.shape == (3, C)
        (cls.sum() + dist.sum()).backward()
        assert model.head.bias.grad.abs().min() > 0 and model.head_dist.bias.grad.abs().min() > 0  # shared biases
        d, first = int(r * D), r in (0.25, 1.0)
        unused = slice(d, None) if first else slice(0, D - d)
        assert model.head.weight.grad[:, unused].abs().sum() == 0
        assert model.blocks[0].attn.qkv.weight.grad[:, unused].abs().sum() == 0
    model.eval()
    with torch.no_grad():
        out = model(x, 0.5)
        model.train()
        cls, dist = model(x, 0.5)
    torch.testing.assert_close(out, (cls + dist) / 2)
    for bad in (0.3, 0.2, 1.1):  # width 19 % 4 heads; below s; above l
        with pytest.raises(ValueError):
            model(x, bad)
    with pytest.raises(ValueError, match="width 115"):
        deit_s_b[0](torch.zeros(1, 3, 224, 224, device="meta"), 0.3)
    with pytest.raises(ValueError, match="unknown slimmable model 'scala_nope'"):
        scala("scala_nope")
    with pytest.raises(ValueError, match="width 19"):
        scala("scala_vit_tiny", smallest_ratio=0.3, granularity=0.1)  # a valid width space: only the width fails
    with pytest.raises(ValueError, match="distilled model in train mode"):
        next(width_losses(model.eval(), x, torch.zeros(3, dtype=torch.long), [1.0]))


# 8 ------------------------------------------------------------------------------------------------------
def loss_reference(model, x, y, teacher, ratios, transfer):
    """Per-width losses with every teacher passed as a CONSTANT tensor."""
    outs = [model(x, r) for r in ratios]
    consts = [o[1].detach().clone() for o in outs]
    losses = [0.5 * F.cross_entropy(outs[0][0], y) + 0.5 * F.cross_entropy(outs[0][1], teacher.argmax(1))]
    for j in range(1, len(ratios)):
        t = consts[0] if transfer == "US" else consts[j - 1]
        kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(outs[j][1], 1))).sum() / x.shape[0]
        losses.append(kl + 1.0 * -(y * F.log_softmax(outs[j][0], 1)).sum(1).mean())
    return losses


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("transfer", ["progressive", "US"])
def test_loss_and_gradient_composition(transfer):
    model = tiny(std=0.1).train()
    ratios = [1.0, 0.8125, 0.5, 0.25]
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.distributions.Dirichlet(torch.ones(C, dtype=torch.float64)).sample((4,))
    teacher = torch.randn(4, C, dtype=torch.float64)

    per_width, values = [], []
    for _, loss in width_losses(model, x, y, ratios, teacher, transfer=transfer, ce_coefficient=1.0):
        model.zero_grad()
        loss.backward()
        per_width.append(grads(model))
        values.append(loss.item())
    reference = loss_reference(model, x, y, teacher, ratios, transfer)
    assert values == pytest.approx([v.item() for v in reference], rel=1e-12)
    for j, ref_loss in enumerate(reference):
        model.zero_grad()
        ref_loss.backward(retain_graph=True)
        for name, g in grads(model).items():
            torch.testing.assert_close(per_width[j][name], g, rtol=1e-10, atol=1e-12)

    # accumulated over four sequential backward calls == gradient of the summed loss
    model.zero_grad()
    for _, loss in width_losses(model, x, y, ratios, teacher, transfer=transfer):
        loss.backward()
    accumulated = grads(model)
    model.zero_grad()
    sum(loss_reference(model, x, y, teacher, ratios, transfer)).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-10, atol=1e-12)

    # negative control: a teacher that is NOT detached would change the r2 gradient
    if transfer == "progressive":
        model.zero_grad()
        _, r3_dist = model(x, 0.8125)
        cls, dist = model(x, 0.5)
        kl = F.kl_div(F.log_softmax(dist, 1), F.softmax(r3_dist, 1), reduction="batchmean")
        (kl + F.cross_entropy(cls, y)).backward()
        leaked = grads(model)
        assert not torch.allclose(leaked["blocks.0.attn.qkv.weight"], per_width[2]["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError):
        next(width_losses(model, x, y, ratios, teacher, transfer="bad"))


# 10 -----------------------------------------------------------------------------------------------------
def test_flops_match_fvcore_numbers_and_a_counter(deit_s_b):
    small, base, _ = deit_s_b
    for m, expected in ((small, [0.370, 1.266, 2.687, 4.634]), (base, [1.266, 4.634, 10.104, 17.676])):
        for r, gf in zip((0.25, 0.5, 0.75, 1.0), expected):
            assert m.flops(r) / 1e9 == pytest.approx(gf, rel=5e-3)
    grid_s = [0.370, 0.545, 0.752, 0.993, 1.266, 1.572, 1.911, 2.282, 2.687, 3.124, 3.595, 4.098, 4.634]
    assert [round(small.flops(r) / 1e9, 3) for r in GRID13] == grid_s
    # the linear/conv part against torch's FLOP counter (2 per multiply-add; it does not see CPU SDPA)
    model = tiny()
    n = 66
    for r in (0.25, 0.5, 1.0):
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 32, 32, dtype=torch.float64), r)
        d = int(r * D)
        attention, layer_norms = 2 * (2 * n * n * d), 5 * n * d * 5
        assert counter.get_total_flops() // 2 + attention + layer_norms == model.flops(r)


# export / converter / encoder init ----------------------------------------------------------------------
def official_state_dict(seed=3):
    """A state dict with the official keys and shapes (timm's DeiT-distilled layout), random values."""
    torch.manual_seed(seed)
    net = timm_deit.VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=D, depth=2, num_heads=H,
                                               num_classes=C)
    return {k: torch.randn_like(v).double() * 0.3 for k, v in net.state_dict().items()}


def test_converter_official_checkpoint():
    official = official_state_dict()
    conv = CONVERTERS["scala"]
    assert conv.detect(official, {})
    plain_vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=D, depth=2, num_heads=H).state_dict()
    assert not conv.detect(plain_vit, {})
    converted = conv.convert(official, {})
    assert converted.kind == "slimmable" and converted.state_dict.keys() == official.keys()
    assert converted.settings == dict(input_size=32, patch_size=4, nb_classes=C, embed_dim=D, depth=2, mlp_ratio=4.0,
                                      distilled=True)
    # the head count does not show in the shapes: --num_heads (or the file's records) gives it, else an error
    assert normalize_checkpoint({"model": official}, num_heads=H)["model_config"]["num_heads"] == H
    with pytest.raises(ValueError, match="give --num_heads"):
        normalize_checkpoint({"model": official})
    model = scala("scala_vit_tiny", nb_classes=C).double().eval()
    model.load_state_dict(converted.state_dict, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for r in (0.25, 0.5, 0.8125, 1.0):
        ref = timm_deit_distilled(official, r, r in (0.25, 1.0))(x)
        assert (model(x, r) - ref).abs().max() < 1e-10
    broken = {k: v for k, v in official.items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(ValueError, match="does not fit"):
        conv.convert(broken, {})


def test_official_deit_s_file_goes_through_the_checkpoint_loader():
    """A released Scala-S file (DeiT layout: weights under 'model', DDP prefix, + model_ema, epoch, the flags as
    an argparse.Namespace), with meta tensors: only keys and shapes matter on this path."""
    with torch.device("meta"):
        net = timm_deit.VisionTransformerDistilled(embed_dim=384, depth=12, num_heads=6, num_classes=1000)
    official = {f"module.{k}": v for k, v in net.state_dict().items()}
    args = argparse.Namespace(model="deit_small_distilled_patch16_224_scala", smallest_ratio=0.25, largest_ratio=1.0,
                              granularity=0.0625)  # the official run.sh flags
    ckpt = normalize_checkpoint({"model": official, "model_ema": {}, "epoch": 99, "args": args})
    assert ckpt["converted_from"] == "scala" and ckpt["model_name"] == "scala"
    config = ckpt["model_config"]
    assert {k: config[k] for k in ("input_size", "patch_size", "nb_classes", "embed_dim", "depth", "num_heads",
                                   "mlp_ratio", "distilled")} == dict(
        input_size=224, patch_size=16, nb_classes=1000, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
        distilled=True)


def test_export_loads_into_a_standalone_timm_deit():
    model = tiny()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd, meta = model.export(0.75)
    net = timm_deit.VisionTransformerDistilled(
        img_size=meta["img_size"], patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
        num_heads=meta["num_heads"], mlp_ratio=meta["mlp_ratio"], num_classes=meta["num_classes"],
        norm_layer=partial(nn.LayerNorm, eps=meta["norm_eps"])).double().eval()
    net.load_state_dict(sd, strict=True)
    for blk in net.blocks:
        blk.attn.fused_attn, blk.attn.scale = False, meta["attn_scale"]
    assert (net(x) - model(x, 0.75)).abs().max() < 1e-10
    assert sd["head.weight"].is_contiguous() and sd["head.weight"].data_ptr() != model.head.weight.data_ptr()


@pytest.mark.parametrize("class_token,pos", [(False, "learn"), (True, "sincos")])
def test_init_from_pretraining_encoder(class_token, pos):
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=D, depth=2, num_heads=H, class_token=class_token,
                            pos_embed=pos, global_pool="token" if class_token else "avg")
    ckpt = {"model": {f"encoder.{k}": v for k, v in enc.state_dict().items()}, "vit_config": dict(enc.config),
            "vit_prefix": "encoder."}
    model = scala("scala_vit_tiny", nb_classes=C)
    fresh_dist = model.dist_token.detach().clone()
    report = load_encoder_weights(model, ckpt)
    expected_missing = {"dist_token", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert set(report["missing"]) == expected_missing | ({"cls_token"} if not class_token else set())
    assert report["unexpected"] == []
    assert torch.equal(model.blocks[1].mlp.fc2.weight, enc.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.pos_embed[:, 2:], enc.pos_embed[:, int(class_token):])  # same grid: no resampling
    assert torch.equal(model.pos_embed[:, 1], torch.zeros(1, D))  # dist slot: zero position row
    assert torch.equal(model.pos_embed[:, 0], enc.pos_embed[:, 0] if class_token else torch.zeros(1, D))
    assert torch.equal(model.dist_token, fresh_dist)
    model.train()(torch.randn(2, 3, 32, 32), 0.5)[0].sum().backward()  # trainable at once

    bigger = scala("scala_vit_tiny", nb_classes=C, input_size=48)  # other grid: resampled
    load_encoder_weights(bigger, ckpt)
    assert bigger.pos_embed.shape == (1, 2 + 144, D)
    with pytest.raises(ValueError, match=r"encoder differs from the model .*'depth': \(2, 3\)"):
        load_encoder_weights(scala("scala_vit_tiny", nb_classes=C, depth=3), ckpt)
    assert math.isfinite(bigger.eval()(torch.randn(1, 3, 48, 48), 1.0).sum().item())
