"""Utilities: lr schedule, checkpoint files and retention, RNG round trip, exact eval shards, NaN stop."""
import argparse
import random

import numpy as np
import pytest
import torch
from PIL import Image

from models.formats import encoder_record
from models.registry import create_model
from models.vit import VisionTransformer
from tests.helpers import run_script
from util import rng
from util.checkpoint import Position, load_file, save_atomic, save_checkpoint, training_state
from util.config import OptimSettings
from util.datasets import DigitsDataset, ShardSampler, SyntheticDataset, build_dataset, build_loader, build_transform
from util.errors import UserError
from util.images import first_images, imagenet_normalize, imagenet_unnormalize, panels_figure, panels_image, save_panels
from util.lr_sched import Schedule, adjust_learning_rate
from util.rng import rng_state, set_rng_state
from util.train_loop import MidEpochSaves, Trainer, TrainingEpoch


def schedule(**kw):
    return Schedule(**{**dict(lr=1e-3, min_lr=1e-6, warmup_epochs=10, warmup_lr=1e-4, epochs=100), **kw})


def test_warmup_then_half_cycle_cosine():
    a = schedule()
    assert a.at(0) == pytest.approx(1e-4)
    assert a.at(5) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert a.at(10) == pytest.approx(1e-3)
    assert a.at(55) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)  # half way through the cosine
    assert a.at(100) == pytest.approx(1e-6)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5},
                           {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    adjust_learning_rate(opt, 10, a)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])


def test_checkpoint_retention_and_weights_only(tmp_path):
    model = torch.nn.Linear(2, 2)
    for epoch in range(9):
        state = training_state(model, epoch, {"model": "m"}, torch.optim.SGD(model.parameters(), lr=0.1))
        save_checkpoint(state, str(tmp_path), epoch, epochs=9, save_freq=2, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-7.pth", "checkpoint-8.pth", "checkpoint-last.pth"]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # plain dict, no pickled objects
    assert ckpt["epoch"] == 8 and ckpt["args"]["model"] == "m" and len(ckpt["rng"]) == 1


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_file(str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_file(str(tmp_path / "bad.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        load_file(str(tmp_path / "list.pth"))


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    rng.seed_everything(3)
    torch.save({"rng": rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_shard_sampler_covers_each_index_once(monkeypatch):
    seen = []
    for rank in range(3):
        monkeypatch.setattr("util.datasets.get_rank", lambda r=rank: r)
        monkeypatch.setattr("util.datasets.get_world_size", lambda: 3)
        seen += list(ShardSampler(10))
    assert sorted(seen) == list(range(10))


def test_digits_split_is_fixed_and_disjoint():
    train, val = DigitsDataset("train", 16), DigitsDataset("val", 16)
    assert (len(train), len(val)) == (1438, 359)
    assert train.images[0].size == (16, 16) and train.images[0].mode == "RGB"
    assert DigitsDataset("val", 16).targets == val.targets


def tiny_epoch(model: torch.nn.Module, accum_iter: int = 1, clip_grad: float | None = None) -> TrainingEpoch:
    """An epoch of 8 micro-steps (64 synthetic images, batch 8) that trains ``model`` with SGD at lr 0.1."""
    loader = build_loader(SyntheticDataset(64, 4), 8, 0, is_train=True)
    optim = OptimSettings(batch_size=8, epochs=1, accum_iter=accum_iter, lr=0.1, warmup_epochs=0, min_lr=0.1,
                          clip_grad=clip_grad, amp="off")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), optim, torch.device("cpu"), 1000)
    return trainer.epoch(loader, 0, MidEpochSaves(0, "", Position(0), lambda epoch, position: {}))


def test_non_finite_loss_stops_naming_the_step_before_the_update():
    model = torch.nn.Linear(3, 1)
    epoch = tiny_epoch(model)
    with pytest.raises(UserError, match="non-finite loss on 1 rank\\(s\\) at epoch 0, step 5"):
        for batch in epoch:
            loss = model(torch.ones(1, 3)).sum() * (float("nan") if batch.step == 5 else 1.0)
            epoch.backward(loss)
            before = [p.detach().clone() for p in model.parameters()]
            epoch.step(loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the NaN update was not applied


def test_accumulation_steps_only_every_k_micro_batches():
    model = torch.nn.Linear(3, 1).double()  # float64: the 1e-4 update is measured exactly
    epoch = tiny_epoch(model, accum_iter=2, clip_grad=1e-3)
    batches = iter(epoch)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    next(batches)
    epoch.backward(model(torch.ones(1, 3, dtype=torch.float64)).sum())
    assert not epoch.step(loss=torch.tensor(1.0))
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), before)
    next(batches)
    epoch.backward(model(torch.ones(1, 3, dtype=torch.float64)).sum())
    assert epoch.step(loss=torch.tensor(1.0))
    assert epoch.meters.meters["grad_norm"].value == pytest.approx(2.0)  # grads (1, 1, 1 | 1), mean of the two
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-4)  # clipped to norm 1e-3


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_plain_timm_vit_checkpoint_loads_with_inferred_architecture(tmp_path, global_pool):
    import timm

    from models.formats import load_vit
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7,
                               global_pool=global_pool).eval()
    # an MAE-style file: DDP-prefixed weights and the flags (whose model name tells the head count)
    torch.save({"model": {f"module.{k}": v for k, v in theirs.state_dict().items()},
                "args": argparse.Namespace(model="vit_small_patch16")}, tmp_path / "mae_style.pth")
    ours, ckpt = load_vit(str(tmp_path / "mae_style.pth"))
    assert ckpt["vit_config"]["num_heads"] == 6 and ckpt["vit_config"]["fc_norm"] == (global_pool == "avg")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-6)


def panel_grid(picture: np.ndarray, rows: int, cols: int, side: int) -> tuple[int, list[list[np.ndarray]]]:
    """The whole-number enlargement of a figure of rows × cols panels of ``side``-px images (4-px gaps, the titles
    above), and each panel's pixels [row][col], found from the picture's size."""
    height, width = picture.shape[:2]
    scale, rest = divmod(width - (cols + 1) * 4, cols * side)
    assert rest == 0, "the panels are not a whole-number enlargement"
    panel = side * scale
    header = height - rows * (panel + 4)
    assert 30 <= header <= 80, "the rows do not fill the figure under its titles"
    return scale, [[picture[header + r * (panel + 4):header + r * (panel + 4) + panel,
                            4 + c * (panel + 4):4 + (c + 1) * panel + c * 4] for c in range(cols)] for r in range(rows)]


def test_attention_maps_of_any_vit_checkpoint_are_drawn(tmp_path):
    """visualize.py --attn_maps: a plain ViT classifier file gives a figure of input and cls-attention columns, the
    map overlaid on its image (the second column is the first tinted), over 400 px wide; imagenet_normalize is
    imagenet_unnormalize's inverse on [0, 1]."""
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(imagenet_unnormalize(imagenet_normalize(x)), x)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    save_atomic({"model": vit.state_dict(), **encoder_record(vit, "", None)}, str(tmp_path / "vit.pth"))
    out = tmp_path / "attn.png"
    proc = run_script("visualize.py", "--checkpoint", tmp_path / "vit.pth", "--attn_maps", "--dataset", "synthetic",
                      "--num_images", 2, "--output", out)
    assert "columns: input, cls attention" in proc.stdout
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] >= 400
    scale, panels = panel_grid(picture, rows=2, cols=2, side=32)
    assert scale >= 4 and all(not np.array_equal(image, overlaid) for image, overlaid in panels)


def test_a_tiny_presets_figure_titles_its_columns_and_itself_and_enlarges_pixel_for_pixel(tmp_path):
    """The panels of mae_vit_tiny (four columns) and xtra_vit_tiny (three, the narrowest) on three digits: each
    column titled with its panel's name, the figure with its title; the PNG over 400 px wide, three rows of square
    panels under the titles, each 32-px image enlarged by a whole factor >= 4 pixel for pixel (nearest); the array
    for TensorBoard is that PNG. A 224-px image is drawn at its own size."""
    imgs = first_images(build_dataset("digits", "val", build_transform(32, is_train=False), 32, None), 3,
                        torch.device("cpu"))
    for name, columns in (("mae_vit_tiny", ["input", "masked", "reconstruction", "reconstruction visible"]),
                          ("xtra_vit_tiny", ["input", "target", "prediction"])):
        panels = create_model(name).eval().visualize(imgs)
        fig = panels_figure(panels, f"{name}, epoch 2")
        assert [ax.get_title().replace("\n", " ") for ax in fig.axes[:len(columns)]] == columns
        assert [text.get_text() for text in fig.texts] == [f"{name}, epoch 2"]
        assert all(im.get_interpolation() == "nearest" for ax in fig.axes for im in ax.images)
        save_panels(panels, str(tmp_path / f"{name}.png"), f"{name}, epoch 2")
        picture = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        assert picture.shape[1] >= 400
        scale, drawn = panel_grid(picture, rows=3, cols=len(columns), side=32)
        assert scale >= 4
        for row in range(3):
            pixels = (imagenet_unnormalize(imgs[row:row + 1])[0].permute(1, 2, 0).numpy() * 255).round()
            expected = pixels.repeat(scale, 0).repeat(scale, 1)
            assert np.abs(drawn[row][0].astype(float) - expected).max() <= 1
        tensorboard = panels_image(panels, f"{name}, epoch 2")
        assert tensorboard.dtype == np.uint8 and np.array_equal(tensorboard, picture)
    big = panels_image({"input": torch.randn(1, 3, 224, 224), "target": torch.randn(1, 3, 224, 224)}, "big")
    assert panel_grid(big, rows=1, cols=2, side=224)[0] == 1
