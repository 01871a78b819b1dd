"""D-iGPT: deterministic cases worked out from the official code (github.com/OliverRensu/D-iGPT), the official-checkpoint converter against an independent
reference forward in the official layout, the builder/flags, and one end-to-end run on the digits data."""
import pytest
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

import main_pretrain
import models  # noqa: F401  (registers presets and converters)
from models.converters import CONVERTERS
from models.digpt import DiGPT, DiGPTConfig, cosine_loss, resize_segments
from models.formats import load_checkpoint, load_vit
from models.masks import check_orders, segment_causal_mask
from models.registry import create_model, lookup, model_config
from models.teacher import teacher_tokens
from models.vit import VisionTransformer
from util.settings import SettingsError

# The official geometry (224/16, 2×2 segments of 7×7, teacher 16×16) on narrow widths, cheap on CPU.
MINI = dict(input_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, segment_size=7, enc_layers=(1, 2),
            decoder_dim=32, decoder_depth=1, decoder_heads=2, teacher_dim=16, teacher_grid=16)
PERM = torch.tensor([3, 2, 0, 1])
# Without a teacher, teacher_dim/teacher_grid fall back to the official 1024 / 16: the tiny model's are given.
TINY_TEACHER = dict(teacher_dim=64, teacher_grid=8)
# The digpt_vit_tiny preset in the official state-dict layout's terms (teacher: 64-d tokens on an 8×8 grid).
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, segment_size=4, enc_layers=(2, 3, 4),
            decoder_dim=64, decoder_depth=2, decoder_heads=4, **TINY_TEACHER)


def official_mask(num_seg: int, seg_len: int) -> torch.Tensor:
    """The official additive mask: block lower-triangular, then reflect-padded by one row and column."""
    m = torch.tril(torch.ones(num_seg, num_seg))
    m = torch.zeros_like(m).masked_fill(m == 0, float("-inf"))
    m = m.repeat_interleave(seg_len, 0).repeat_interleave(seg_len, 1)
    return F.pad(m[None, None], (0, 1, 0, 1), mode="reflect")[0, 0]


def quadrant_slices(q: int, side: int, size: int) -> tuple[slice, slice]:
    r, c = divmod(int(q), side)
    return slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size)


@pytest.fixture(scope="module")
def tiny() -> DiGPT:
    torch.manual_seed(0)
    return create_model("digpt_vit_tiny", **TINY_TEACHER).eval()


@pytest.fixture(scope="module")
def mini() -> DiGPT:
    torch.manual_seed(0)
    return DiGPT(DiGPTConfig(**MINI)).eval()


# -- 1. masks -----------------------------------------------------------------------------------------
def test_mask_matches_the_official_counts_and_closed_form():
    m = segment_causal_mask(3, 49)
    assert m.shape == (148, 148) and m.dtype == torch.bool
    assert m.sum() == 14603 and (~m).sum() == 7301
    i = torch.arange(147)
    torch.testing.assert_close(m[:147, :147], (i[None] // 49) <= (i[:, None] // 49))
    assert m[147].all()
    assert torch.equal(m[:, 147].nonzero().flatten(), torch.arange(98, 148))
    small = segment_causal_mask(3, 2).int()
    assert small.tolist() == [[1, 1, 0, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0, 0]] * 2 + [[1] * 7] * 3
    assert segment_causal_mask(2, 2).int().tolist() == [[1, 1, 0, 0, 0]] * 2 + [[1] * 5] * 3
    for s, t in [(3, 49), (3, 2), (2, 2), (3, 16), (1, 3)]:  # equals the official reflect trick for T >= 2
        assert torch.equal(segment_causal_mask(s, t), official_mask(s, t) == 0)
    with pytest.raises(ValueError):
        segment_causal_mask(0, 4)


# -- 2. raster / target assembly with a fixed order -----------------------------------------------------
def test_encoder_sequence_order_and_cls_last(mini):
    x = torch.randn(1, 3, 224, 224)
    seen = {}
    hook = mini.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    mini.predict(x, PERM)
    hook.remove()
    enc = mini.encoder
    tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    expected = []
    for q in PERM[:3].tolist():  # quadrants 3, 2, 0, row-major inside each 7×7 quadrant
        rows, cols = quadrant_slices(q, 2, 7)
        expected += [r * 14 + c for r in range(14)[rows] for c in range(14)[cols]]
    assert seen["x"].shape == (1, 148, 32)
    torch.testing.assert_close(seen["x"][:, :147], tokens[:, expected])
    torch.testing.assert_close(seen["x"][:, 147], (enc.cls_token + enc.pos_embed[:, 0])[:, 0])
    assert not enc.cls_token.any() and not enc.pos_embed[:, 0].any()  # zero-init cls, zero cls pos row


def test_targets_are_permuted_teacher_quadrants(mini):
    B, C = 2, 16
    t_cls, t_patch = torch.randn(B, C), torch.randn(B, 256, C)
    _, out = mini.forward_with_outputs(torch.randn(B, 3, 224, 224), teacher_feats=(t_cls, t_patch), order=PERM)
    assert out["target_next"].shape == out["target_vis"].shape == (B, 193, C)
    grid = t_patch.view(B, 16, 16, C)

    def quadrant(q):
        rows, cols = quadrant_slices(q, 2, 8)
        return grid[:, rows, cols].reshape(B, 64, C)

    torch.testing.assert_close(out["target_next"], torch.cat([*(quadrant(q) for q in PERM[1:]), t_cls[:, None]], 1))
    torch.testing.assert_close(out["target_vis"], torch.cat([*(quadrant(q) for q in PERM[:3]), t_cls[:, None]], 1))


def test_per_image_orders_and_bad_orders(tiny):
    x = torch.randn(2, 3, 32, 32)
    orders = torch.tensor([[0, 1, 2, 3], [2, 3, 1, 0]])
    both = tiny.predict(x, orders)
    for b in range(2):
        single = tiny.predict(x[b:b + 1], orders[b])
        for p, s in zip(both, single):
            torch.testing.assert_close(p[b:b + 1], s, rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2]), torch.zeros(3, 4, dtype=torch.long),
                torch.tensor([0.0, 1, 2, 3])):
        with pytest.raises(ValueError):
            check_orders(bad, 2, 4)
    # a random order is a permutation per image
    _, out = tiny.forward_with_outputs(x, teacher_feats=(torch.randn(2, 64), torch.randn(2, 64, 64)))
    assert torch.equal(out["order"].sort(1).values, torch.arange(4).expand(2, -1))


# -- 4/5. causality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_perturbing_a_segment_changes_only_later_predictions(tiny, j):
    order = torch.tensor([1, 3, 0, 2])
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    rows, cols = quadrant_slices(order[j].item(), 2, 16)
    x2[..., rows, cols] += torch.randn_like(x2[..., rows, cols])
    with torch.no_grad():
        before, after = tiny.predict(x, order), tiny.predict(x2, order)
    for p, q in zip(before, after):  # next-segment and visible-segment decoders
        seg_p, seg_q = p[:, :-1].reshape(1, 3, 16, -1), q[:, :-1].reshape(1, 3, 16, -1)
        for k in range(3):
            if k < j:
                assert torch.equal(seg_p[:, k], seg_q[:, k])  # bit-identical
            else:
                assert (seg_p[:, k] - seg_q[:, k]).abs().max() > 1e-4
        if j == 3:  # the never-seen quadrant changes nothing, cls included
            assert torch.equal(p, q)
        else:
            assert (p[:, -1] - q[:, -1]).abs().max() > 1e-4


def test_gradients_of_next_predictions_reach_only_earlier_segments(tiny):
    order = torch.tensor([3, 2, 0, 1])
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    pred_next, _ = tiny.predict(x, order)
    for k in range(4):  # sequence segments 0..2 predict order[1..3]; k = 3 is the cls query
        tokens = pred_next[:, -1] if k == 3 else pred_next[:, k * 16:(k + 1) * 16]
        (grad,) = torch.autograd.grad(tokens.sum(), x, retain_graph=True)
        norms = [grad[..., r, c].norm().item() for r, c in (quadrant_slices(q, 2, 16) for q in order.tolist())]
        seen = 3 if k == 3 else k + 1
        assert all(n > 0 for n in norms[:seen]) and all(n == 0 for n in norms[seen:]), (k, norms)


# -- 6/7. loss and the 7 -> 8 resize ------------------------------------------------------------------------
def test_resize_seven_to_eight_matches_official_values():
    ramp = torch.arange(7.0)[:, None].expand(7, 7).reshape(1, 49, 1)  # value = row index
    out = resize_segments(ramp, 7, 8).view(8, 8)
    expected = torch.tensor([0, 0.8125, 1.6875, 2.5625, 3.4375, 4.3125, 5.1875, 6.0])
    torch.testing.assert_close(out[:, 3], expected)
    const = torch.full((2, 3 * 49, 5), 2.5)
    torch.testing.assert_close(resize_segments(const, 7, 8), torch.full((2, 3 * 64, 5), 2.5))
    assert resize_segments(const, 7, 7) is const


def test_loss_on_constructed_tensors(mini):
    torch.manual_seed(0)
    v = torch.randn(16)
    w = torch.randn(16)
    w = w - (w @ v) / (v @ v) * v  # orthogonal to v
    pred = mini.to_teacher_grid(v.expand(1, 148, 16))
    assert pred.shape == (1, 193, 16)
    target = (3 * v).expand(1, 193, 16)
    assert cosine_loss(pred, target).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(pred, w.expand(1, 193, 16)).item() == pytest.approx(2.0, abs=1e-5)
    assert cosine_loss(pred, -5 * target).item() == pytest.approx(4.0, abs=1e-5)
    cls_flipped = target.clone()
    cls_flipped[:, -1] *= -1
    assert cosine_loss(pred, cls_flipped).item() == pytest.approx(4 / 193, abs=1e-6)
    x = torch.randn(2, 3, 224, 224)
    loss, out = mini.forward_with_outputs(x, teacher_feats=(torch.randn(2, 16), torch.randn(2, 256, 16)),
                                          order=PERM)
    assert 1.8 < out["loss_next"] < 2.2 and 1.8 < out["loss_vis"] < 2.2  # random targets: ≈ 2 each
    torch.testing.assert_close(loss, out["loss_next"] + out["loss_vis"])


# -- 8. shapes, parameter counts, position table --------------------------------------------------------
def test_base_preset_shapes_and_parameter_counts():
    with torch.device("meta"):
        model = create_model("digpt_vit_base_patch16")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    pred_next, pred_vis = model.predict(torch.empty(2, 3, 224, 224, device="meta"), PERM)
    # the official model: 167,889,152 in total including the two frozen sin-cos tables (151,296 + 201,728), which are
    # not trained here either (ours: the decoder table is a buffer; the encoder's unused fc_norm is frozen)
    assert trainable == 167_889_152 - 151_296 - 201_728
    assert encoder == 85_645_824
    assert model.next_enc2dec.weight.shape == (2048, 3072) == model.vis_enc2dec.weight.shape
    assert model.next_blocks[0].attn2.num_heads == 32 and model.next_blocks[0].attn2.head_dim == 32
    assert model.mask.shape == (148, 148) and model.encoder_mask is None
    assert pred_next.shape == pred_vis.shape == (2, 148, 1024)
    assert model.encoder.config["global_pool"] == "avg" and model.encoder.config["fc_norm"]
    method, preset = lookup("digpt_vit_base_patch16", "pretrain")
    recipe = {**method.recipe, **preset.settings}
    assert recipe["blr"] * 4096 / 256 == pytest.approx(2.4e-3)
    assert recipe["betas"] == (0.9, 0.95) and recipe["warmup_epochs"] == 40


def test_sincos_tables_follow_the_official_formula(mini):
    for table, dim in ((mini.encoder.pos_embed[0], 32), (mini.decoder_pos_embed[0], 32)):
        assert not table[0].any()
        omega = 10000 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        for r, c in [(0, 0), (3, 11), (13, 5)]:
            expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega),
                                  torch.cos(r * omega)]).float()
            torch.testing.assert_close(table[1 + r * 14 + c], expected)
    assert not mini.encoder.pos_embed.requires_grad


# -- converter: official key layout vs an independent reference forward -----------------------------------------
def official_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Random tensors under the official key names and shapes (DiGPT_torch/models_digpt.py)."""
    g = torch.Generator().manual_seed(seed)
    D, depth, p, Dd, Ld, T = (cfg[k] for k in ("embed_dim", "depth", "patch_size", "decoder_dim", "decoder_depth",
                                              "teacher_dim"))
    G = cfg["img_size"] // p
    n_taps = len(cfg["enc_layers"])

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, dim):
        return {f"{prefix}.weight": 1 + rnd(dim, scale=0.1), f"{prefix}.bias": rnd(dim)}

    def lin(prefix, out, inp):
        return {f"{prefix}.weight": rnd(out, inp, scale=inp ** -0.5), f"{prefix}.bias": rnd(out)}

    def sincos(dim):
        omega = 10000 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        rows = [torch.zeros(dim, dtype=torch.float64)]
        for r in range(G):
            for c in range(G):
                rows.append(torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega),
                                       torch.cos(r * omega)]))
        return torch.stack(rows)[None].float()

    sd = {"cls_token": rnd(1, 1, D), "pos_embed": sincos(D), "patch_embed.proj.weight": rnd(D, 3, p, p),
          "patch_embed.proj.bias": rnd(D), "decoder_pos_embed": sincos(Dd), "ar_token": rnd(1, 1, Dd, scale=0.02),
          "kd_token": rnd(1, 1, Dd, scale=0.02)}
    n_seg = (G // cfg["segment_size"]) ** 2
    L = (n_seg - 1) * cfg["segment_size"] ** 2 + 1
    sd["mask"] = official_mask(n_seg - 1, cfg["segment_size"] ** 2)
    assert sd["mask"].shape == (L, L)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({**ln(b + "norm1", D), **lin(b + "attn.qkv", 3 * D, D), **lin(b + "attn.proj", D, D),
                   **ln(b + "norm2", D), **lin(b + "mlp.fc1", 4 * D, D), **lin(b + "mlp.fc2", D, 4 * D)})
    for br in ("ar", "kd"):
        shared = ln("x", D)  # ONE LayerNorm repeated in the list
        for j in range(n_taps):
            sd[f"{br}_enc_norm.{j}.weight"], sd[f"{br}_enc_norm.{j}.bias"] = shared["x.weight"], shared["x.bias"]
        sd.update(lin(f"{br}_enc2dec", Ld * Dd, n_taps * D))
        for j in range(Ld):
            b = f"{br}_blocks.{j}."
            sd.update({**ln(b + "norm1", Dd), **lin(b + "attn1.qkv", 3 * Dd, Dd), **lin(b + "attn1.proj", Dd, Dd),
                       **ln(b + "norm2_1", Dd), **ln(b + "norm2_2", Dd), **lin(b + "attn2.q", Dd, Dd),
                       **lin(b + "attn2.kv", 2 * Dd, Dd), **lin(b + "attn2.proj", Dd, Dd), **ln(b + "norm2", Dd),
                       **lin(b + "mlp.fc1", 4 * Dd, Dd), **lin(b + "mlp.fc2", Dd, 4 * Dd)})
        sd.update({**ln(f"{br}_norm", Dd), **lin(f"{br}_pred", T, Dd)})
    return sd


def reference_forward(sd: dict, cfg: dict, imgs: torch.Tensor, perm: torch.Tensor) -> tuple:
    """The official forward written out on the official state dict: separate q/k/v, additive float mask,
    einops-style regrouping, and the branch swap of ``forward_encoder``'s return value."""
    B, p, s, D = imgs.shape[0], cfg["patch_size"], cfg["segment_size"], cfg["embed_dim"]
    G = cfg["img_size"] // p
    n = G // s
    mask = sd["mask"]

    def ln(x, prefix, eps):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def lin(x, prefix):
        return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    def attention(q, k, v, heads, proj):
        Bq, N, C = q.shape
        q, k, v = (t.reshape(Bq, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5 + mask
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(Bq, N, C)
        return lin(out, proj)

    def mlp(x, prefix):
        return lin(F.gelu(lin(x, prefix + ".fc1")), prefix + ".fc2")

    def raster(x, side):  # 'b (h p1) (w p2) c -> b (h w) (p1 p2) c', then the per-image permutation
        x = x.expand(B, -1, -1)
        x = x.reshape(B, n, side, n, side, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, side * side, -1)
        return x[torch.arange(B)[:, None], perm.expand(B, -1)]

    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    x = raster(x, s)[:, :-1].reshape(B, -1, D)
    x = torch.cat([x, (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, -1, -1)], 1)
    heads = cfg["num_heads"]
    taps = []
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        wq, wk, wv = sd[b + "attn.qkv.weight"].chunk(3)
        bq, bk, bv = sd[b + "attn.qkv.bias"].chunk(3)
        x = x + attention(h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv, heads, b + "attn.proj")
        x = x + mlp(ln(x, b + "norm2", 1e-6), b + "mlp")
        if i + 1 in cfg["enc_layers"]:
            taps.append(x)

    def latent(br):
        h = torch.cat([ln(t, f"{br}_enc_norm.{j}", 1e-5) for j, t in enumerate(taps)], -1)
        return lin(h, f"{br}_enc2dec").reshape(B, x.shape[1], cfg["decoder_dim"], cfg["decoder_depth"])

    x_kd, x_ar = latent("kd"), latent("ar")
    latent_ar, latent_kd = x_kd, x_ar  # forward_encoder returns (x_kd, x_ar); forward unpacks (ar, kd)
    dpos = raster(sd["decoder_pos_embed"][:, 1:], s)
    cls_pos = sd["decoder_pos_embed"][:, :1].expand(B, -1, -1)
    queries = {"ar": sd["ar_token"] + torch.cat([dpos[:, 1:].flatten(1, 2), cls_pos], 1),
               "kd": sd["kd_token"] + torch.cat([dpos[:, :-1].flatten(1, 2), cls_pos], 1)}
    outs = []
    dh = cfg["decoder_heads"]
    for br, lat in (("ar", latent_ar), ("kd", latent_kd)):
        q = queries[br]
        for j in range(cfg["decoder_depth"]):
            b = f"{br}_blocks.{j}."
            h = ln(q, b + "norm1", 1e-6)
            wq, wk, wv = sd[b + "attn1.qkv.weight"].chunk(3)
            bq, bk, bv = sd[b + "attn1.qkv.bias"].chunk(3)
            q = q + attention(h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv, dh, b + "attn1.proj")
            h, mem = ln(q, b + "norm2_1", 1e-6), ln(lat[..., j], b + "norm2_2", 1e-6)
            kv = lin(mem, b + "attn2.kv")
            q = q + attention(lin(h, b + "attn2.q"), kv[..., :kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:], dh,
                              b + "attn2.proj")
            q = q + mlp(ln(q, b + "norm2", 1e-6), b + "mlp")
        outs.append(lin(ln(q, f"{br}_norm", 1e-6), f"{br}_pred"))
    return tuple(outs)


def test_converter_matches_reference_forward(tmp_path):
    sd = official_state_dict(TINY)
    conv = CONVERTERS["digpt"]
    assert conv.detect(sd, {})
    converted = conv.convert(sd, {"enc_layers": [2, 3, 4], "decoder_num_heads": 4})
    # the architecture from the shapes (segments from the mask buffer, teacher width from the heads)
    assert DiGPTConfig(**converted.settings, num_heads=4) == model_config("digpt_vit_tiny", teacher_dim=64)
    assert conv.convert(sd, {}).placeholders == {"enc_layers": (2, 3, 4), "decoder_heads": 1}  # not recorded
    ours = converted.state_dict
    model = create_model("digpt_vit_tiny", **TINY_TEACHER).eval()
    assert not conv.detect(model.state_dict(), {})
    model.load_state_dict(ours, strict=True)
    x = torch.randn(2, 3, 32, 32)
    order = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])
    with torch.no_grad():
        pred_next, pred_vis = model.predict(x, order)
    ref_ar, ref_kd = reference_forward(sd, TINY, x, order)
    torch.testing.assert_close(pred_next, ref_ar, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred_vis, ref_kd, rtol=1e-4, atol=1e-5)
    # the swap matters: the unswapped wiring would give different predictions
    unswapped = dict(ours)
    for p in ("weight", "bias"):
        unswapped[f"next_enc2dec.{p}"], unswapped[f"vis_enc2dec.{p}"] = ours[f"vis_enc2dec.{p}"], ours[f"next_enc2dec.{p}"]
    model.load_state_dict(unswapped)
    assert not torch.allclose(model.predict(x, order)[0], ref_ar, atol=1e-3)

    # through the checkpoint loader, as `--finetune` / `--teacher` see an official file
    path = tmp_path / "digpt_official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299}, path)
    ckpt = load_checkpoint(str(path), num_heads=4)
    assert ckpt["converted_from"] == "digpt" and ckpt["model_name"] == "digpt"
    assert ckpt["unrecorded"] == ["decoder_heads", "enc_layers"]
    vit, _ = load_vit(str(path), num_heads=4, num_classes=10)
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    bad = dict(sd)
    bad["ar_enc_norm.2.weight"] = bad["ar_enc_norm.2.weight"] + 1
    with pytest.raises(ValueError, match="differs"):
        conv.convert(bad, {})


def test_converted_file_keeps_its_decoder_position_table(tmp_path):
    """The official table and ours differ by up to 2 ulp: a file that carries ``decoder_pos_embed`` sets the
    model's table bit for bit; a file without it leaves the computed one."""
    sd = official_state_dict(TINY)
    table = sd["decoder_pos_embed"].clone()
    table[0, 1::3] = torch.nextafter(table[0, 1::3], torch.full_like(table[0, 1::3], 2.0))  # 1 ulp off ours
    sd["decoder_pos_embed"] = table
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "epoch": 299, "args": {"enc_layers": [2, 3, 4], "decoder_num_heads": 4}}, path)
    ckpt = load_checkpoint(str(path), num_heads=4)
    model = create_model("digpt_vit_tiny", **TINY_TEACHER)
    computed = model.decoder_pos_embed.clone()
    assert not torch.equal(computed, table)
    model.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(model.decoder_pos_embed, table) and "decoder_pos_embed" not in model.state_dict()

    del sd["decoder_pos_embed"]  # a file without the table converts, and the model computes it
    converted = CONVERTERS["digpt"].convert(sd, {"enc_layers": [2, 3, 4], "decoder_num_heads": 4})
    assert "decoder_pos_embed" not in converted.state_dict
    fresh = create_model("digpt_vit_tiny", **TINY_TEACHER)
    fresh.load_state_dict(converted.state_dict, strict=True)
    assert torch.equal(fresh.decoder_pos_embed, computed)


# -- builder, flags, teacher wiring, visualisation ------------------------------------------------------
def write_vit_checkpoint(path, **kw) -> VisionTransformer:
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, **kw).eval()
    torch.save({"model": vit.state_dict(), "vit_config": dict(vit.config), "vit_prefix": "", "encoder_mask": None,
                "model_name": "vit_tiny_patch4", "epoch": 0, "args": {}}, path)
    return vit


def test_builder_flags_and_teacher_outside_the_state_dict(tmp_path):
    path = tmp_path / "teacher.pth"
    write_vit_checkpoint(path, num_classes=10, global_pool="avg", fc_norm=True)
    out = tmp_path / "out"
    argv = ["--model", "digpt_vit_tiny", "--print_config", "--output_dir", str(out)]
    with pytest.raises(ValueError, match="give --teacher"):  # refused before anything is built
        main_pretrain.resolve_settings(argv)
    settings, ckpt, _ = main_pretrain.resolve_settings(
        argv + ["--teacher", str(path), "--enc_layers", "3", "4", "--decoder_dim", "32", "--decoder_heads", "2"])
    config = settings.of(DiGPTConfig)
    assert ckpt is None and not out.exists()
    # flags not given keep the preset's values; teacher_dim / teacher_grid stay None = "from the teacher"
    assert config == model_config("digpt_vit_tiny", teacher=str(path), enc_layers=(3, 4), decoder_dim=32,
                                  decoder_heads=2)
    assert config.segment_size == 4 and config.teacher_dim is None and config.teacher_grid is None
    assert settings.source("segment_size") == "preset" and settings.source("enc_layers") == "command line"
    with pytest.raises(SettingsError, match="--loss_type"):  # another method's flag
        main_pretrain.resolve_settings(argv + ["--teacher", str(path), "--loss_type", "l2"])
    model = DiGPT(config)
    assert model.teacher is not None and model.teacher_dim == 64 and model.teacher_grid == 8
    assert model.enc_layers == (3, 4) and model.next_enc2dec.weight.shape == (2 * 32, 2 * 64)
    assert not any(k.startswith(("teacher", "_teacher")) for k in model.state_dict())
    n_own = sum(p.numel() for p in model.parameters())
    assert n_own == sum(v.numel() for k, v in model.state_dict().items())  # no teacher parameter anywhere
    # forward computes the teacher features itself, identical to precomputed ones
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    loss, _ = model.forward_with_outputs(x, order=PERM)
    loss_pre, _ = model.forward_with_outputs(x, teacher_feats=teacher_tokens(model.teacher, x), order=PERM)
    assert loss.item() == loss_pre.item()
    # the official recipe decays the 3-D cls and query tokens (no no_weight_decay exemptions), not 1-D params
    assert model.no_weight_decay() == set()
    groups = {g["weight_decay"]: g["params"]
              for g in param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0.05]}
    assert {"encoder.cls_token", "next_query", "vis_query", "next_enc2dec.weight"} <= decayed
    assert "encoder.pos_embed" not in decayed and "encoder.fc_norm.weight" not in decayed  # frozen
    assert all(p.ndim <= 1 for p in groups[0.0])
    model.double()  # dtype/device moves reach the teacher too
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.float()
    panels = model.visualize(x)
    assert list(panels) == ["input", "encoder_input", "next_cosine", "vis_cosine"]
    assert all(p.shape == (2, 3, 32, 32) for p in panels.values())
    for b in range(2):  # exactly one quadrant (the never-seen one) is blanked in the encoder-input panel
        blank = [not panels["encoder_input"][b, :, r, c].any() for r, c in (quadrant_slices(q, 2, 16) for q in range(4))]
        assert sum(blank) == 1
    with pytest.raises(ValueError, match="teacher features are 64-d"):
        create_model("digpt_vit_tiny", teacher=str(path), teacher_dim=32)
    with pytest.raises(ValueError, match="needs a teacher"):
        create_model("digpt_vit_tiny", **TINY_TEACHER)(x)


@pytest.mark.parametrize("kw,msg", [
    (dict(segment_size=3), "cannot be cut"), (dict(segment_size=8), "cannot be cut"),
    (dict(enc_layers=[2, 3]), "ending at 4"), (dict(enc_layers=[3, 2, 4]), "strictly increasing"),
    (dict(teacher_grid=9), "teacher grid 9"), (dict(input_size=30), "not a multiple")])
def test_impossible_configs_fail_early(kw, msg):
    with pytest.raises(ValueError, match=msg):
        create_model("digpt_vit_tiny", **kw)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="fixed for 32px"):
        tiny.predict(torch.randn(1, 3, 48, 48), PERM)
    with pytest.raises(ValueError, match="teacher features must be"):
        tiny.forward_with_outputs(torch.randn(1, 3, 32, 32), teacher_feats=(torch.randn(1, 64), torch.randn(1, 100, 64)), order=PERM)


# -- end to end on the digits data: teacher -> D-iGPT pretraining -> linear probe ----------------------------------
def test_end_to_end_teacher_pretrain_probe(tmp_path):
    from tests.helpers import FAST, read_log, run_script

    teacher, pre, probe = tmp_path / "teacher", tmp_path / "pre", tmp_path / "probe"
    run_script("main_finetune.py", *FAST, "--model", "vit_tiny_patch4", "--input_size", "32", "--epochs", "1",
               "--batch_size", "128", "--aa", "none", "--reprob", "0", "--blr", "5e-3", "--warmup_epochs", "0",
               "--layer_decay", "1.0", "--output_dir", teacher)
    run_script("main_pretrain.py", *FAST, "--model", "digpt_vit_tiny", "--teacher", teacher / "checkpoint-last.pth",
               "--epochs", "2", "--batch_size", "128", "--warmup_epochs", "0", "--blr", "1e-3", "--output_dir", pre)
    log = read_log(pre)
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[1]["train_loss"] < log[0]["train_loss"] < 4.5  # two cosine losses, ≈ 2 each at init
    ckpt = torch.load(pre / "checkpoint-last.pth", weights_only=True)
    assert ckpt["vit_prefix"] == "encoder." and ckpt["encoder_mask"] is None
    assert ckpt["args"]["teacher"] == str(teacher / "checkpoint-last.pth")
    assert {k.split(".")[0] for k in ckpt["model"]} == {
        "encoder", "next_feat_norm", "next_enc2dec", "next_query", "next_blocks", "next_norm", "next_pred",
        "vis_feat_norm", "vis_enc2dec", "vis_query", "vis_blocks", "vis_norm", "vis_pred"}  # no teacher weights
    # visualize.py rebuilds the model (and its teacher) from the checkpoint's settings; in-process to save a
    # start-up
    import visualize
    visualize.main(["--checkpoint", str(pre / "checkpoint-last.pth"), "--dataset", "digits", "--num_images", "2",
                    "--output", str(tmp_path / "vis.png")])
    assert (tmp_path / "vis.png").stat().st_size > 0
    run_script("main_linprobe.py", *FAST, "--finetune", pre / "checkpoint-last.pth", "--probe", "linear",
               "--batch_size", "128", "--epochs", "1", "--warmup_epochs", "0", "--blr", "0.5", "--output_dir", probe)
    # Plumbing only: two epochs on digits cannot show a downstream gain (a random tiny encoder's features
    # already separate the digits), so check that the probe trained on the frozen D-iGPT encoder.
    assert read_log(probe)[-1]["test_n"] == 359
    probe_sd = torch.load(probe / "checkpoint-last.pth", weights_only=True)["model"]
    for k in ("blocks.3.attn.qkv.weight", "pos_embed", "fc_norm.weight"):
        torch.testing.assert_close(probe_sd[f"backbone.{k}"], ckpt["model"][f"encoder.{k}"])
