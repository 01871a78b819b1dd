"""main_slimmable.py end to end on the embedded digits (16 px): a tiny teacher from main_finetune.py, a Scala run
with the end-of-training all-ratios table, eval-only reproducing it, export, torchrun ×2 with --init_from, bad input."""
import json
import re
from functools import partial

import pytest
import timm.models.deit as timm_deit
import torch
import torch.nn as nn

import main_slimmable
from models.registry import create_model
from models.vit import VisionTransformer
from tests.helpers import FAST, read_log, run_script

SMALL = [*FAST, "--input_size", "16", "--aa", "none", "--reprob", "0", "--warmup_epochs", "0"]
SLIM = [*SMALL, "--model", "scala_vit_tiny", "--batch_size", "32", "--lr", "4e-3", "--mixup", "0", "--cutmix", "0",
        "--granularity", "0.25", "--throughput_iters", "2"]
ROW = re.compile(r"^\s*([\d.]+)\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def table(stdout):
    """Rows (ratio, width, params, GFLOPs, top-1) of the printed eval table."""
    return [(float(m[1]), int(m[2]), int(m[3].replace(",", "")), float(m[4]), float(m[5]))
            for m in map(ROW.match, stdout.splitlines()) if m]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_script("main_finetune.py", *SMALL, "--model", "vit_tiny_patch4", "--batch_size", "64", "--lr", "3e-3",
               "--layer_decay", "1.0", "--epochs", "2", "--output_dir", out)
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def slim_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("slim")
    proc = run_script("main_slimmable.py", *SLIM, "--teacher", teacher, "--epochs", "3", "--full_warm_epochs", "1",
                      "--output_dir", out)
    return out, proc


def test_training_learns_and_prints_the_all_ratio_table(slim_run):
    out, proc = slim_run
    log = read_log(out)
    epochs = [r for r in log if "eval_table" not in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert "train_loss_s" not in epochs[0]  # full-width warm-up epoch
    # X = 4 (ε = 1/4): every iteration runs the four widths 1, 0.75, 0.5, 0.25
    assert epochs[1]["train_r3"] == 0.75 and epochs[1]["train_r2"] == 0.5
    assert epochs[-1]["train_loss"] == pytest.approx(sum(epochs[-1][f"train_loss_{k}"] for k in ("full", "r3", "r2", "s")))
    assert epochs[-1]["train_loss_full"] < epochs[0]["train_loss_full"]
    rows = table(proc.stdout)
    assert [r[0] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    model = create_model("scala_vit_tiny", "slimmable", nb_classes=10, input_size=16)
    for ratio, width, params, gflops, _ in rows:
        assert (width, params) == (int(64 * ratio), model.num_params(ratio))
        assert gflops == pytest.approx(model.flops(ratio) / 1e9, abs=1e-4)
    assert [round(r["acc1"], 2) for r in log[-1]["eval_table"]] == [r[4] for r in rows]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model_config"]["smallest_ratio"] == 0.25
    assert ckpt["args"]["granularity"] == 0.25 and "dist_token" in ckpt["model"]


def test_eval_only_reproduces_the_table_and_exports(slim_run, tmp_path):
    out, proc = slim_run
    exported = tmp_path / "sub.pth"
    # s, l and ε come from the checkpoint's args (the official eval.sh forgets --smallest_ratio)
    ev = run_script("main_slimmable.py", *[a for a in SLIM if a not in ("--granularity", "0.25")], "--eval",
                    "--resume", out / "checkpoint-last.pth", "--export", exported, "--export_ratio", "0.5",
                    "--output_dir", "")
    assert [r[:5] for r in table(ev.stdout)] == [r[:5] for r in table(proc.stdout)]
    meta = json.loads((tmp_path / "sub.pth.json").read_text())
    assert meta["embed_dim"] == 32 and meta["attn_scale"] == 0.25 and meta["norm_eps"] == 1e-5
    net = timm_deit.VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                               num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    net.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    for blk in net.blocks:
        blk.attn.fused_attn, blk.attn.scale = False, meta["attn_scale"]
    model = create_model("scala_vit_tiny", "slimmable", nb_classes=10, input_size=16).eval()
    model.load_state_dict(torch.load(out / "checkpoint-last.pth", weights_only=True)["model"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), model(x, 0.5), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_from_a_pretraining_encoder(tmp_path, teacher):
    # an XTRA-style encoder (no cls token) in the pretraining-checkpoint format
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4, class_token=False,
                            global_pool="avg")
    torch.save({"model": {f"encoder.{k}": v for k, v in vit.state_dict().items()}, "vit_config": vit.config,
                "vit_prefix": "encoder.", "epoch": 0}, tmp_path / "enc.pth")
    proc = run_script("main_slimmable.py", *SLIM, "--teacher", teacher, "--epochs", "1", "--full_warm_epochs", "0",
                      "--init_from", tmp_path / "enc.pth", "--output_dir", tmp_path / "out", nproc=2)
    assert "missing ['cls_token', 'dist_token', 'head.weight'" in proc.stdout
    log = read_log(tmp_path / "out")
    assert log[0]["test_n"] == 359 and "train_loss_s" in log[0]
    assert [r[0] for r in table(proc.stdout)] == [0.25, 0.5, 0.75, 1.0]


def test_bad_input_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = run_script("main_slimmable.py", *SLIM, "--model", "scala_nope", "--output_dir", out, check=False)
    assert proc.returncode == 2 and "unknown slimmable model 'scala_nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
    for extra, message in [(["--eval_ratios", "0.3"], "not a positive multiple of the 4 heads"),
                           (["--granularity", "0.1"], "multiples of granularity"),
                           (["--teacher", str(tmp_path / "missing.pth")], "not found"),
                           (["--eval"], "--eval needs --resume"),
                           (["--largest_ratio", "1.5"], "largest_ratio <= 1")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            main_slimmable.main([*map(str, SLIM), *extra, "--output_dir", str(out)])
    assert not (out / "args.json").exists()
