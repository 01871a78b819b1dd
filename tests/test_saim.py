"""SAIM: deterministic cases worked out from the official code (github.com/qiy20/SAIM), two-stream equivalences,
converter, flags, end to end."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import main_pretrain
from models.converters import CONVERTERS
from models.formats import encoder_record, load_encoder_weights
from models.masks import permutation_two_stream_masks, random_orders
from models.pixels import patchify, unpatchify
from models.registry import create_model, lookup, model_config
from models.saim import SAIM, GaussianBlur, SAIMConfig, gaussian_kernel2d
from models.vit import VisionTransformer
from tests.helpers import FAST, read_log, run_script
from util.settings import SettingsError

# 16 patches (4×4 grid of 8-px patches): a toy model small enough to check masks by hand
TOY = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, query_depth=2, gaussian_kernel_size=3,
           gaussian_sigma=1.0)


def toy(**kw) -> SAIM:
    torch.manual_seed(0)
    return SAIM(SAIMConfig(**{**TOY, **kw})).eval()


# ---- masks ------------------------------------------------------------------------------------------
def test_exact_masks_of_the_worked_example():
    noise = torch.tensor([[0.3, 0.9, 0.1, 0.5]])
    order = noise.argsort(dim=1)
    assert order.tolist() == [[2, 0, 3, 1]]
    content, query = permutation_two_stream_masks(order)
    assert content.shape == query.shape == (1, 1, 5, 5) and content.dtype == torch.bool
    assert content[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                             [1, 1, 0, 1, 0],
                                             [1, 1, 1, 1, 1],
                                             [1, 0, 0, 1, 0],
                                             [1, 1, 0, 1, 1]]
    assert query[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                           [1, 0, 0, 1, 0],
                                           [1, 1, 0, 1, 1],
                                           [1, 0, 0, 0, 0],
                                           [1, 1, 0, 1, 0]]


def test_mask_invariants_for_random_orders():
    torch.manual_seed(0)
    order = torch.rand(3, 196).argsort(dim=1)
    content, query = (m[:, 0] for m in permutation_two_stream_masks(order))
    assert content[:, :, 0].all() and query[:, :, 0].all()  # everyone sees cls
    assert content[:, 0, 1:].sum() == 0 and query[:, 0, 1:].sum() == 0  # cls sees only itself
    assert content.diagonal(dim1=1, dim2=2).all()
    assert not query.diagonal(dim1=1, dim2=2)[:, 1:].any()
    assert not (query & ~content).any()  # query ⊂ content
    rank = order.argsort(dim=1)
    torch.testing.assert_close(content[:, 1:].sum(-1), rank + 2)
    torch.testing.assert_close(query[:, 1:].sum(-1), rank + 1)
    assert content[0].sum() == 19_503 and query[0].sum() == 19_307
    assert not torch.equal(content[0], content[1])


def test_bad_orders_raise():
    """An order given from outside is checked (the model's own random orders are not: no host read per step)."""
    model = create_model("saim_vit_tiny")
    imgs = torch.randn(2, 3, 32, 32)
    bad = torch.arange(64).expand(2, -1).clone()
    bad[0, 1] = 0
    with pytest.raises(ValueError, match="permutation"):
        model.forward_with_outputs(imgs, order=bad)
    with pytest.raises(ValueError, match="batch, patches"):
        permutation_two_stream_masks(torch.arange(4))


def test_random_orders_are_permutations_per_image_and_per_call():
    model = toy()
    a, b = random_orders(8, 16, torch.device("cpu")), random_orders(8, 16, torch.device("cpu"))
    assert (a.sort(dim=1).values == torch.arange(16)).all()
    assert len({tuple(r) for r in a.tolist()}) == 8 and not torch.equal(a, b)
    _, out = model.forward_with_outputs(torch.randn(2, 3, 32, 32))  # sampled when not given
    assert out["order"].shape == (2, 16) and not torch.equal(out["order"][0], out["order"][1])
    loss, metrics = model(torch.randn(2, 3, 32, 32))  # the training forward: the loss and no tensor outputs
    assert loss.ndim == 0 and metrics == {}


# ---- causality --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"fuse_streams": True}, {"share_weight": True},
                                {"depth": 4, "query_depth": 2, "fuse_streams": True}])
@pytest.mark.parametrize("t", [0, 5, 15])
def test_perturbing_the_patch_at_rank_t_changes_only_later_predictions(kw, t):
    model = toy(**kw)
    imgs = torch.randn(1, 3, 32, 32)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(t))[None]
    patch = order[0, t].item()
    r, c = divmod(patch, 4)
    moved = imgs.clone()
    moved[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += torch.randn(3, 8, 8)
    with torch.no_grad():
        before = model.forward_with_outputs(imgs, order)[1]["pred"][0, order[0]]  # rows in generation order
        after = model.forward_with_outputs(moved, order)[1]["pred"][0, order[0]]
    assert torch.equal(before[: t + 1], after[: t + 1])  # bit-identical, incl. the patch itself
    assert ((before[t + 1:] - after[t + 1:]).abs().amax(dim=1) > 0).all()


def test_first_generated_patch_is_content_free():
    model = toy()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))[None].expand(2, -1)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pred = model.forward_with_outputs(imgs, order)[1]["pred"]
    first, second = order[0, 0], order[0, 1]
    torch.testing.assert_close(pred[0, first], pred[1, first], rtol=0, atol=0)
    assert not torch.allclose(pred[0, second], pred[1, second])


# ---- the stacked attention call is exact ---------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"share_weight": True}, {"depth": 4, "query_depth": 2},
                                {"depth": 4, "query_depth": 1, "share_weight": True}])
def test_stacked_attention_call_equals_separate_calls(kw):
    model = toy(**kw).train()
    imgs = torch.randn(2, 3, 32, 32)
    order = random_orders(2, 16, imgs.device)
    results = []
    for fuse in (False, True):
        model.fuse_streams = fuse
        model.zero_grad()
        loss, out = model.forward_with_outputs(imgs, order)
        loss.backward()
        results.append((loss, out["pred"], [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l0, p0, g0), (l1, p1, g1) = results
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---- Gaussian target, patchify ----------------------------------------------------------------------
def test_gaussian_kernel_values():
    w = GaussianBlur(9, 1.0).weight
    assert w.shape == (3, 1, 9, 9)
    torch.testing.assert_close(w.sum(dim=(1, 2, 3)), torch.ones(3), rtol=0, atol=1e-6)
    assert abs(w[0, 0, 4, 4].item() - 0.1591559) < 1e-7
    assert abs(w[0, 0, 0, 0].item() - 1.79e-8) < 1e-10
    assert abs(w[0, 0, 0, 4].item() - 5.339e-5) < 1e-8
    x = torch.arange(-4, 5, dtype=torch.float64)
    k1 = torch.exp(-(x**2) / 2)
    torch.testing.assert_close(w[1, 0].double(), torch.outer(k1, k1) / torch.outer(k1, k1).sum(), rtol=1e-6, atol=0)


def test_blurred_target_of_a_constant_image_with_zero_padding():
    model = SAIM(SAIMConfig(input_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                            query_depth=1))  # 9×9, σ 1
    imgs = torch.full((1, 3, 224, 224), 2.0)
    blurred = model.gaussian_blur(imgs)
    assert blurred.shape == imgs.shape
    torch.testing.assert_close(blurred[..., 4:-4, 4:-4], imgs[..., 4:-4, 4:-4], rtol=0, atol=1e-6)
    assert abs(blurred[0, 0, 0, 0].item() - 0.97852) < 1e-5
    assert abs(blurred[0, 0, 0, 100].item() - 1.39894) < 1e-5
    target = model.targets(imgs)
    assert target.shape == (1, 196, 768)
    grid = target.abs().amax(dim=-1).reshape(14, 14)
    assert (grid[1:-1, 1:-1] < 1e-3).all()  # 144 interior patches: constant, so ≈ 0 after norm_pix
    border = torch.ones(14, 14, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (grid[border] > 0.1).all() and border.sum() == 52
    assert abs(grid[0, 0].item() - 4.60) < 0.01


def test_blur_of_impulses_inside_and_at_the_border():
    blur = GaussianBlur(5, 1.0)
    k = gaussian_kernel2d(5, 1.0)
    img = torch.zeros(1, 3, 16, 16)
    img[:, :, 8, 8] = 1.0
    out = blur(img)
    torch.testing.assert_close(out[0, :, 6:11, 6:11], k.expand(3, 5, 5))  # the kernel itself (symmetric)
    assert out[0, :, :, :6].abs().max() == 0
    corner = torch.zeros(1, 3, 16, 16)
    corner[:, :, 0, 0] = 1.0
    out = blur(corner)
    # zero padding: the mass falling outside the image is lost (reflect padding would keep it)
    torch.testing.assert_close(out[0, 0].sum(), k[2:, 2:].sum())
    torch.testing.assert_close(out[0, 0, :3, :3], k[2:, 2:])


def test_patchify_layout_and_round_trip():
    img = torch.randn(2, 3, 64, 64)
    p = patchify(img, 16)
    assert p.shape == (2, 16, 768)
    for n, r, c, i, j, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 5, 7, 2), (0, 3, 1, 15, 0, 1)]:
        assert p[n, r * 4 + c, (i * 16 + j) * 3 + ch] == img[n, ch, r * 16 + i, c * 16 + j]
    assert torch.equal(unpatchify(p, 16), img)


# ---- loss ---------------------------------------------------------------------------------------------
def test_loss_values_on_constructed_inputs():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    model = SAIM(SAIMConfig(input_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, query_depth=1,
                            gaussian_kernel_size=0))  # no blur, norm_pix, L2
    target = model.targets(imgs)
    assert model.loss(target, target).item() == 0
    assert abs(model.loss(torch.zeros_like(target), target).item() - 767 / 768) < 1e-5  # unbiased variance
    model_l1 = SAIM(SAIMConfig(input_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, query_depth=1,
                               gaussian_kernel_size=0, norm_pix_loss=False, loss_type="l1"))
    t1 = model_l1.targets(imgs)
    torch.testing.assert_close(model_l1.loss(torch.zeros_like(t1), t1), imgs.abs().mean())
    # forward: mean squared error over every element of every patch, with the blurred normalised target
    blurred = toy()
    loss, out = blurred.forward_with_outputs(imgs)
    torch.testing.assert_close(loss, ((out["pred"] - out["target"]) ** 2).mean())
    t = patchify(F.conv2d(imgs, gaussian_kernel2d(3, 1.0).expand(3, 1, 3, 3), padding=1, groups=3), 8)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out["target"], t)


def test_cls_row_of_the_head_does_not_affect_the_loss():
    model = toy()
    imgs, order = torch.randn(2, 3, 32, 32), torch.arange(16).expand(2, -1)
    loss = model.forward_with_outputs(imgs, order)[0]

    def spoil_cls_row(module, inputs, output):
        output = output.clone()
        output[:, 0] = 1e6
        return output

    handle = model.prediction_head.register_forward_hook(spoil_cls_row)
    assert torch.equal(model.forward_with_outputs(imgs, order)[0], loss)
    handle.remove()


# ---- transfer, sizes --------------------------------------------------------------------------------
def test_base_preset_parameter_counts():
    with torch.device("meta"):
        model = create_model("saim_vit_base_patch16")
        shared = create_model("saim_vit_base_patch16", share_weight=True, prediction_head="linear")

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    content = count(model.encoder) - count(model.encoder.norm)  # encoder.norm is the query stream's norm
    assert (content, count(model.query_blocks)) == (85_645_824, 85_054_464)
    assert count(model.prediction_head) + count(model.encoder.norm) == 4_723_968
    assert count(model) == 175_424_256  # pos_embed is frozen
    assert not model.encoder.pos_embed.requires_grad
    assert count(shared) == 85_645_824 + 1536 + 768 * 768 + 768  # query blocks are the content blocks


def test_pos_embed_is_the_mae_sincos_table():
    pos = toy(embed_dim=32).encoder.pos_embed[0]
    assert pos[0].abs().max() == 0
    omega = 1.0 / 10000 ** (torch.arange(8) / 8.0)
    e1 = torch.cat([torch.sin(omega), torch.cos(omega)])  # E1(1)
    e0 = torch.cat([torch.zeros(8), torch.ones(8)])  # E1(0)
    torch.testing.assert_close(pos[2], torch.cat([e1, e0]))  # patch (row 0, col 1)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_encoder_transfers_to_a_classifier(global_pool):
    model = toy()
    ckpt = {"model": model.state_dict(), **encoder_record(model.encoder, "encoder.", model.encoder_mask)}
    vit = VisionTransformer(**{**model.encoder.config, "num_classes": 5, "global_pool": global_pool,
                               "fc_norm": global_pool == "avg"})
    load_encoder_weights(vit, ckpt)
    torch.testing.assert_close(vit.pos_embed, model.encoder.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, model.encoder.blocks[1].attn.qkv.weight)
    if global_pool == "token":  # the final norm is the query stream's trained norm, as official
        torch.testing.assert_close(vit.norm.weight, model.encoder.norm.weight)


# ---- converter ------------------------------------------------------------------------------------------------
def _official_pretrain_sd(cfg: dict, head: str = "MLP", seed: int = 0) -> dict:
    """Random state dict with the official key names and shapes (the released files of github.com/qiy20/SAIM)."""
    g = torch.Generator().manual_seed(seed)
    D, P, n = cfg["embed_dim"], cfg["patch_size"], (cfg["img_size"] // cfg["patch_size"]) ** 2

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, n + 1, D), "patch_embed.proj.weight": r(D, 3, P, P),
          "patch_embed.proj.bias": r(D)}
    blocks = [f"blocks.{i}." for i in range(cfg["depth"])] + [f"query_blocks.{j}." for j in range(cfg["query_depth"])]
    for b in blocks:
        for name, shape in [("norm1", (D,)), ("norm2", (D,))]:
            sd[f"{b}{name}.weight"], sd[f"{b}{name}.bias"] = 1 + r(*shape), r(*shape)
        for name, (o, i) in [("attn.q", (D, D)), ("attn.k", (D, D)), ("attn.v", (D, D)), ("attn.proj", (D, D)),
                             ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))]:
            sd[f"{b}{name}.weight"], sd[f"{b}{name}.bias"] = r(o, i), r(o)
    sd["norm.weight"], sd["norm.bias"] = 1 + r(D), r(D)
    if head == "MLP":
        sd.update({"prediction_head.fc1.weight": r(4 * D, D), "prediction_head.fc1.bias": r(4 * D),
                   "prediction_head.fc2.weight": r(3 * P * P, 4 * D), "prediction_head.fc2.bias": r(3 * P * P)})
    else:
        sd.update({"prediction_head.weight": r(3 * P * P, D), "prediction_head.bias": r(3 * P * P)})
    k = cfg["gaussian_kernel_size"]
    x = torch.arange(k) - (k - 1) // 2
    kernel = torch.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * cfg["gaussian_sigma"] ** 2))
    sd["gaussian_blur.weight"] = (kernel / kernel.sum()).expand(3, 1, k, k).clone()
    return sd


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)


def _official_block(sd, b, q_in, kv_in, heads, mask=None):
    """The official Block: separate q/k/v, the same norm1 on queries and keys/values, additive float mask."""
    def lin(x, name):
        return F.linear(x, sd[f"{b}{name}.weight"], sd[f"{b}{name}.bias"])

    B, N, D = q_in.shape
    qn, kvn = _layer_norm(q_in, sd, b + "norm1"), _layer_norm(kv_in, sd, b + "norm1")
    q, k, v = (lin(t, f"attn.{n}").reshape(B, N, heads, D // heads).transpose(1, 2)
               for t, n in [(qn, "q"), (kvn, "k"), (kvn, "v")])
    logits = q @ k.transpose(-2, -1) * (D // heads) ** -0.5
    if mask is not None:
        logits = logits + mask
    x = q_in + lin((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D), "attn.proj")
    return x + lin(F.gelu(lin(_layer_norm(x, sd, b + "norm2"), "mlp.fc1")), "mlp.fc2")


def _official_reference(sd, imgs, noise, cfg):
    """Predictions [B, L, 3p²] and loss of the official forward_saim/forward_loss."""
    P, heads = cfg["patch_size"], cfg["num_heads"]
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    B, L, _ = x.shape
    ni, nj = noise[:, :, None], noise[:, None, :]
    masks = []
    for blocked in (ni < nj, ni <= nj):  # content, query
        m = torch.zeros(B, 1, L + 1, L + 1)
        m[:, 0, 1:, 1:] = m[:, 0, 1:, 1:].masked_fill(blocked, float("-inf"))
        m[:, 0, 0, 1:] = float("-inf")
        masks.append(m)
    pos = sd["pos_embed"]
    h = torch.cat([(sd["cls_token"] + pos[:, :1]).expand(B, -1, -1), x + pos[:, 1:]], dim=1)
    g = pos.expand(B, -1, -1)
    step = cfg["depth"] // cfg["query_depth"]
    for i in range(cfg["depth"]):
        h = _official_block(sd, f"blocks.{i}.", h, h, heads, masks[0])
        if (i + 1) % step == 0:
            g = _official_block(sd, f"query_blocks.{i // step}.", g, h, heads, masks[1])
    g = _layer_norm(g, sd, "norm")
    pred = F.linear(F.gelu(F.linear(g, sd["prediction_head.fc1.weight"], sd["prediction_head.fc1.bias"])),
                    sd["prediction_head.fc2.weight"], sd["prediction_head.fc2.bias"])[:, 1:]
    w = sd["gaussian_blur.weight"]
    t = F.conv2d(imgs, w, padding=w.shape[-1] // 2, groups=3)
    G = imgs.shape[-1] // P
    t = t.reshape(B, 3, G, P, G, P).permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, P * P * 3)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    return pred, ((pred - t) ** 2).mean()


TINY_CFG = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, query_depth=2,
                gaussian_kernel_size=3, gaussian_sigma=0.5)  # = the saim_vit_tiny preset


@pytest.mark.parametrize("fuse", [False, True])
def test_converted_pretraining_checkpoint_matches_official_forward(fuse):
    official = _official_pretrain_sd(TINY_CFG)
    conv = CONVERTERS["saim"]
    assert conv.detect(official, {})
    converted = conv.convert(official, {"norm_pix_loss": True})
    # the architecture, the blur kernel's size and sigma come from the file itself
    assert SAIMConfig(**converted.settings, num_heads=4, fuse_streams=fuse) == \
        model_config("saim_vit_tiny", fuse_streams=fuse)
    model = create_model("saim_vit_tiny", fuse_streams=fuse).eval()
    model.load_state_dict(converted.state_dict, strict=True)
    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    ref_pred, ref_loss = _official_reference(official, imgs, noise, TINY_CFG)
    with torch.no_grad():
        loss, out = model.forward_with_outputs(imgs, order=noise.argsort(dim=1))
    torch.testing.assert_close(out["pred"], ref_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_converter_linear_head_and_share_weight_variants():
    cfg = {**TINY_CFG, "query_depth": 1}
    official = _official_pretrain_sd(cfg, head="LINEAR")
    converted = CONVERTERS["saim"].convert(official, {})
    assert converted.settings["prediction_head"] == "linear" and converted.settings["query_depth"] == 1
    assert converted.state_dict["gaussian_blur.weight"] is official["gaussian_blur.weight"]  # kept as the file has it
    model = create_model("saim_vit_tiny", prediction_head="linear", query_depth=1)
    model.load_state_dict(converted.state_dict, strict=True)
    # share_weight: the official state dict repeats blocks.* under query_blocks.*, as ours does
    shared = create_model("saim_vit_tiny", share_weight=True)
    assert {k for k in shared.state_dict() if k.startswith("query_blocks.")} == \
        {k.replace("encoder.blocks.", "query_blocks.") for k in shared.state_dict() if k.startswith("encoder.blocks.")}


def test_converted_file_keeps_its_blur_kernel_and_float64_targets_equal_the_official_ones(tmp_path):
    """The official code builds the kernel in float32 (ours: float64, then rounded; 1-4 ulp apart for 9×9, sigma 1).
    A converted file carries the official kernel and the model uses it bit for bit, so float64 targets are the
    official ones exactly."""
    from models.formats import load_checkpoint, model_from_checkpoint

    cfg = {**TINY_CFG, "gaussian_kernel_size": 9, "gaussian_sigma": 1.0}
    official = _official_pretrain_sd(cfg)
    kernel = official["gaussian_blur.weight"]
    assert not torch.equal(GaussianBlur(9, 1.0).weight, kernel)  # the computed kernel differs by a few ulp
    torch.save({"model": official, "epoch": 799, "args": {"norm_pix_loss": True}}, tmp_path / "official.pth")
    run_script("models.convert", "--from", "saim", tmp_path / "official.pth", tmp_path / "ours.pth",
               "--num_heads", "4")
    ckpt = load_checkpoint(str(tmp_path / "ours.pth"))
    model = model_from_checkpoint(ckpt)
    model.load_state_dict(ckpt["model"], strict=True)
    assert model.gaussian_blur.weight.dtype == torch.float32 and torch.equal(model.gaussian_blur.weight, kernel)
    assert "gaussian_blur.weight" not in model.state_dict()  # still computed for this project's own checkpoints

    model.double()
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the official forward_loss target in float64: its float32 buffer cast by .double(), zero-padded depthwise conv,
    # MAE's patchify, per-patch (t - mean) / (var + 1e-6) ** .5
    t = F.conv2d(imgs, kernel.double(), padding=4, groups=3)
    t = t.reshape(2, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 48)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.equal(model.targets(imgs), t)


def test_a_file_without_the_blur_kernel_converts_to_a_model_without_blur():
    official = {k: v for k, v in _official_pretrain_sd(TINY_CFG).items() if k != "gaussian_blur.weight"}
    converted = CONVERTERS["saim"].convert(official, {})
    assert converted.settings["gaussian_kernel_size"] == 0 and "gaussian_blur.weight" not in converted.state_dict
    model = SAIM(SAIMConfig(**converted.settings, num_heads=4))
    model.load_state_dict(converted.state_dict, strict=True)
    assert isinstance(model.gaussian_blur, torch.nn.Identity)
    with pytest.raises(RuntimeError, match="size mismatch for gaussian_blur.weight"):  # a carried buffer must fit
        toy().load_state_dict({**toy().state_dict(), "gaussian_blur.weight": torch.ones(3, 1, 5, 5)})


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_converted_finetuned_checkpoint_matches_official_classifier(tmp_path, pool):
    from models.formats import load_vit

    cfg = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, query_depth=2, gaussian_kernel_size=3,
               gaussian_sigma=0.5)
    official = {k: v for k, v in _official_pretrain_sd(cfg, seed=1).items()
                if not k.startswith(("query_blocks.", "prediction_head.", "gaussian_blur."))}
    norm = "fc_norm" if pool == "avg" else "norm"
    if pool == "avg":  # the official global-pool classifier replaces norm by fc_norm
        official["fc_norm.weight"], official["fc_norm.bias"] = official.pop("norm.weight"), official.pop("norm.bias")
    g = torch.Generator().manual_seed(2)
    official.update({"head.weight": torch.randn(7, 192, generator=g), "head.bias": torch.randn(7, generator=g)})
    conv = CONVERTERS["saim"]
    assert conv.detect(official, {})
    converted = conv.convert(official, {})
    assert converted.kind == "classifier"
    ours = converted.state_dict
    torch.save({"model": official, "epoch": 99}, tmp_path / "saim_ft.pth")
    with pytest.raises(ValueError, match="give --num_heads"):  # a file that records no model name
        load_vit(str(tmp_path / "saim_ft.pth"))
    vit, info = load_vit(str(tmp_path / "saim_ft.pth"), num_heads=3)  # architecture read from the shapes
    assert info["vit_config"]["global_pool"] == pool and info["vit_config"]["num_classes"] == 7
    assert vit.state_dict().keys() == ours.keys()
    imgs = torch.randn(2, 3, 32, 32)
    x = F.conv2d(imgs, official["patch_embed.proj.weight"], official["patch_embed.proj.bias"], stride=8)
    x = torch.cat([official["cls_token"].expand(2, -1, -1), x.flatten(2).transpose(1, 2)], 1) + official["pos_embed"]
    for i in range(2):
        x = _official_block(official, f"blocks.{i}.", x, x, 3)
    feat = _layer_norm(x[:, 1:].mean(1), official, norm) if pool == "avg" else _layer_norm(x, official, norm)[:, 0]
    ref = F.linear(feat, official["head.weight"], official["head.bias"])
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(imgs), ref, rtol=1e-4, atol=1e-4)
    assert not conv.detect(vit.state_dict(), {})  # fused-qkv checkpoints belong to other converters


def test_official_file_loads_through_load_vit(tmp_path):
    from models.formats import load_vit

    official = _official_pretrain_sd(TINY_CFG)
    # an official file with its flags (argparse.Namespace) and a model name that does not fix the head count
    args = argparse.Namespace(model="saim_tiny_custom", query_depth=2, norm_pix_loss=True, gaussian_sigma=0.5)
    torch.save({"model": official, "epoch": 799, "args": args}, tmp_path / "saim_official.pth")
    vit, info = load_vit(str(tmp_path / "saim_official.pth"), num_heads=4)
    assert info["model_name"] == "saim" and info["encoder_mask"] is None and not info["unrecorded"]
    assert SAIMConfig(**info["model_config"]) == model_config("saim_vit_tiny")
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, torch.cat(
        [official[f"blocks.0.attn.{p}.weight"] for p in "qkv"]))
    torch.testing.assert_close(vit.norm.weight, official["norm.weight"])


# ---- presets, flags, bad input, visualisation ----------------------------------------------------------------
def test_flags_default_to_the_preset_and_override_it(tmp_path):
    base = ["--model", "saim_vit_tiny", "--query_depth", "1", "--loss_type", "l2", "--print_config",
            "--output_dir", str(tmp_path)]
    settings, ckpt, path = main_pretrain.resolve_settings(base)
    assert ckpt is None and not path
    # flags not given keep the preset's values; the given ones override it
    assert settings.of(SAIMConfig) == model_config("saim_vit_tiny", query_depth=1, loss_type="l2")
    assert settings.source("gaussian_kernel_size") == "preset" and settings.source("query_depth") == "command line"
    settings, _, _ = main_pretrain.resolve_settings(base + [
        "--share_weight", "false", "--prediction_head", "linear", "--loss_type", "l1", "--gaussian_kernel_size", "0",
        "--norm_pix_loss", "no"])
    model = SAIM(settings.of(SAIMConfig))
    assert isinstance(model.prediction_head, torch.nn.Linear) and len(model.query_blocks) == 1
    assert isinstance(model.gaussian_blur, torch.nn.Identity) and not model.norm_pix_loss and model.loss_type == "l1"
    assert model.encoder_mask is None and model.encoder.global_pool == "token"
    assert not list(tmp_path.iterdir())  # --print_config writes nothing
    with pytest.raises(SettingsError, match="loss_type"):  # no 'mse' alias any more
        main_pretrain.resolve_settings(base + ["--loss_type", "mse"])


def test_recipe_weight_decay_groups_and_init_follow_the_official_code():
    from timm.optim import param_groups_weight_decay

    method, preset = lookup("saim_vit_base_patch16", "pretrain")
    recipe = {**method.recipe, **preset.settings}
    assert {k: recipe[k] for k in ("blr", "weight_decay", "betas", "warmup_epochs", "crop_scale")} == \
        dict(blr=2e-4, weight_decay=0.5, betas=(0.9, 0.95), warmup_epochs=30, crop_scale=(0.2, 1.0))
    assert method.model_class is SAIM and model_config("saim_vit_base_patch16") == SAIMConfig()  # official defaults
    model = toy()
    assert model.no_weight_decay() == set()  # main_pretrain then decays the cls token too, as official
    groups = param_groups_weight_decay(model, 0.5, no_weight_decay_list=model.no_weight_decay())
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.encoder.cls_token) in decayed and id(model.encoder.patch_embed.proj.weight) in decayed
    assert id(model.encoder.blocks[0].attn.qkv.bias) not in decayed and id(model.encoder.pos_embed) not in grouped
    # xavier on each of q, k, v (separate official Linears): bound sqrt(6 / 2D), not the fused sqrt(6 / 4D)
    D = TOY["embed_dim"]
    for blk in (model.encoder.blocks[0], model.query_blocks[1]):
        for w in blk.attn.qkv.weight.chunk(3):
            assert math.sqrt(6 / (4 * D)) < w.abs().max() <= math.sqrt(6 / (2 * D))


@pytest.mark.parametrize("kw,match", [
    ({"query_depth": 3}, "query_depth"), ({"query_depth": 0}, "query_depth"),
    ({"prediction_head": "LINEAR"}, "prediction_head"), ({"loss_type": "L2"}, "loss_type"),
    ({"gaussian_kernel_size": 4}, "odd"), ({"gaussian_sigma": 0.0}, "sigma")])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        SAIM(SAIMConfig(**{**TOY, **kw}))


def test_bad_inputs_raise():
    model = toy()
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="order must be"):
        model.forward_with_outputs(torch.randn(1, 3, 32, 32), order=torch.arange(8)[None])


def test_visualize_panels_and_prediction_denormalisation(monkeypatch):
    model = toy()
    imgs = torch.randn(2, 3, 32, 32)
    panels = model.visualize(imgs)
    assert list(panels) == ["input", "target", "prediction"]
    assert all(p.shape == imgs.shape for p in panels.values())
    torch.testing.assert_close(panels["target"], model.gaussian_blur(imgs))
    # a perfect prediction of the normalised target de-normalises to the blurred image
    monkeypatch.setattr(model, "forward_predictions", lambda x, order: model.targets(x))
    torch.testing.assert_close(model.visualize(imgs)["prediction"], panels["target"], rtol=1e-4, atol=1e-4)


# ---- end to end: pretrain -> fine-tune -> linear probe on digits ---------------------------------------------
def test_end_to_end_pretrain_finetune_linprobe(tmp_path):
    pt, ft, lp = tmp_path / "pt", tmp_path / "ft", tmp_path / "lp"
    run_script("main_pretrain.py", *FAST, "--model", "saim_vit_tiny", "--batch_size", "64", "--epochs", "2",
               "--warmup_epochs", "1", "--blr", "1e-3", "--weight_decay", "0.05", "--output_dir", pt)
    log = read_log(pt)
    assert [r["epoch"] for r in log] == [0, 1] and all(math.isfinite(r["train_loss"]) for r in log)
    assert log[1]["train_loss"] < log[0]["train_loss"]
    ckpt = torch.load(pt / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model_name"] == "saim_vit_tiny" and ckpt["encoder_mask"] is None
    assert any(k.startswith("query_blocks.") for k in ckpt["model"])
    run_script("main_finetune.py", *FAST, "--finetune", pt / "checkpoint-last.pth", "--epochs", "2",
               "--batch_size", "32", "--blr", "5e-3", "--warmup_epochs", "0", "--aa", "none", "--reprob", "0",
               "--output_dir", ft)
    assert read_log(ft)[-1]["test_acc1"] > 12.0  # chance: 10 %
    # the official linear probe reads the cls token (which in pretraining saw only itself)
    run_script("main_linprobe.py", *FAST, "--finetune", pt / "checkpoint-last.pth", "--probe", "linear", "--pool",
               "token", "--batch_size", "64", "--epochs", "2", "--warmup_epochs", "0", "--blr", "0.5",
               "--output_dir", lp)
    assert read_log(lp)[-1]["test_acc1"] > 12.0
    probe = torch.load(lp / "checkpoint-last.pth", weights_only=True)["model"]
    torch.testing.assert_close(probe["backbone.blocks.0.attn.qkv.weight"], ckpt["model"]["encoder.blocks.0.attn.qkv.weight"])
