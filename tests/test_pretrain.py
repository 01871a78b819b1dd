"""End to end pretraining through main_pretrain.py (XTRA tiny on digits): loss falls, checkpoints and the timm
export work, the encoder fine-tunes and probes, torchrun ×2, resume continues with identical losses."""
import shutil

import pytest
import timm
import torch

from models.vit import VisionTransformer, timm_kwargs
from tests.helpers import FAST, read_log, run_script

PT = [*FAST, "--model", "xtra_vit_tiny", "--batch_size", "64", "--warmup_epochs", "1", "--save_freq", "2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    run_script("main_pretrain.py", *PT, "--epochs", "3", "--output_dir", out)
    return out


def test_pretraining_loss_falls_and_checkpoints_are_complete(pretrained):
    log = read_log(pretrained)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert log[-1]["train_loss"] < 0.9 * log[0]["train_loss"]
    ckpt = torch.load(pretrained / "checkpoint-last.pth", weights_only=True)
    assert ckpt["vit_prefix"] == "encoder." and ckpt["model_name"] == "xtra_vit_tiny"
    assert ckpt["encoder_mask"] == {"type": "block_causal", "block_size": 2}
    assert any(k.startswith("predictor.") for k in ckpt["model"])  # the full pretraining model is stored
    assert {"optimizer", "scaler", "rng", "args"} <= set(ckpt)


def test_exported_encoder_is_a_timm_vit(pretrained):
    exported = torch.load(pretrained / "encoder.pth", weights_only=True)
    ours = VisionTransformer(**exported["vit_config"]).eval()
    ours.load_state_dict(exported["model"])
    theirs = timm.models.vision_transformer.VisionTransformer(**timm_kwargs(exported["vit_config"])).eval()
    theirs.load_state_dict(exported["model"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), rtol=0, atol=1e-6)


def test_pretrained_encoder_fine_tunes(pretrained, tmp_path):
    run_script("main_finetune.py", *FAST, "--finetune", pretrained / "checkpoint-last.pth", "--epochs", "2",
               "--batch_size", "32", "--blr", "5e-3", "--warmup_epochs", "0", "--layer_decay", "1", "--aa", "none",
               "--reprob", "0", "--output_dir", tmp_path)
    assert read_log(tmp_path)[-1]["test_acc1"] > 15.0  # chance: 10 %


@pytest.mark.slow
def test_pretraining_under_torchrun(tmp_path):
    run_script("main_pretrain.py", *PT, "--epochs", "1", "--output_dir", tmp_path, nproc=2)
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert read_log(tmp_path)[0]["train_loss"] < 1.0


def test_resume_from_an_interrupted_run_matches(pretrained, tmp_path):
    # Pretend the run died after epoch 1: keep only what it had written by then, and start it again.
    shutil.copy(pretrained / "checkpoint-1.pth", tmp_path / "checkpoint-last.pth")
    (tmp_path / "log.txt").write_text("\n".join((pretrained / "log.txt").read_text().splitlines()[:2]) + "\n")
    run_script("main_pretrain.py", *PT, "--epochs", "3", "--output_dir", tmp_path)
    assert read_log(tmp_path)[2] == read_log(pretrained)[2]  # epoch 2: bit-identical loss, lr, grad norm


@pytest.mark.slow
def test_attentive_probe_of_the_pretrained_encoder_under_torchrun(pretrained, tmp_path):
    proc = run_script("main_linprobe.py", *FAST, "--finetune", pretrained / "checkpoint-last.pth", "--probe",
                      "attentive", "--batch_size", "32", "--epochs", "1", "--warmup_epochs", "0", "--blr", "0.05",
                      "--aa", "none", "--reprob", "0", "--output_dir", tmp_path, nproc=2)
    assert "mask: on" in proc.stdout  # XTRA probes keep the block-causal mask recorded in the checkpoint
    log = read_log(tmp_path)
    assert log[0]["test_n"] == 359 and log[0]["test_acc1"] > 12.0  # chance: 10 %


def test_tensorboard_scalars_per_step(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(pretrained)).Reload()
    assert {"train_loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("train_loss")]
    assert len(steps) == 3 * 22 and steps[0] == 0 and steps[-1] < 3000  # epoch_1000x axis, 22 steps per epoch


@pytest.mark.slow
def test_compiled_training_matches_eager(pretrained, tmp_path):
    """--compile (torch.compile of the model) trains the same: per-epoch losses as the eager run, and the same
    checkpoint keys (no compile prefix)."""
    run_script("main_pretrain.py", *PT, "--epochs", "3", "--compile", "--output_dir", tmp_path, timeout=600)
    eager, compiled = read_log(pretrained), read_log(tmp_path)
    for a, b in zip(eager, compiled, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    keys = set(torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"])
    assert keys == set(torch.load(pretrained / "checkpoint-last.pth", weights_only=True)["model"])
