"""End to end on the embedded digits data: fine-tuning, both probes, torchrun ×2, resume after a kill, bad input."""
import re

import pytest
import torch

from tests.helpers import FAST, kill_inside_epoch, read_log, run_script, tensorboard_scalars

FT = [*FAST, "--model", "vit_tiny_patch4", "--input_size", "32", "--batch_size", "32", "--aa", "none",
      "--reprob", "0", "--blr", "5e-3", "--warmup_epochs", "1", "--layer_decay", "1.0"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    run_script("main_finetune.py", *FT, "--epochs", "4", "--output_dir", out)
    return out


def test_finetune_learns_and_writes_outputs(finetuned):
    log = read_log(finetuned)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["test_n"] == 359  # the whole val split, each image once
    assert log[-1]["test_acc1"] > 25.0  # chance is 10 %
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for name in ("args.json", "checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-3.pth"):
        assert (finetuned / name).is_file()
    assert not list(finetuned.glob("*.tmp*"))
    ckpt = torch.load(finetuned / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["vit_config"]["num_classes"] == 10 and isinstance(ckpt["args"], dict)


def test_eval_only_reproduces_logged_accuracy(finetuned):
    proc = run_script("main_finetune.py", *FT, "--eval", "--resume", finetuned / "checkpoint-last.pth",
                      "--output_dir", "")
    assert f"Acc@1 {read_log(finetuned)[-1]['test_acc1']:.3f}" in proc.stdout


@pytest.mark.parametrize("probe", ["linear", "attentive"])
def test_probes_train_on_a_frozen_backbone(finetuned, tmp_path, probe):
    # the augmentation flags belong to the attentive probe only (a linear probe refuses them)
    augment = ["--aa", "none", "--reprob", "0"] if probe == "attentive" else []
    run_script("main_linprobe.py", *FAST, "--finetune", finetuned / "checkpoint-last.pth", "--probe", probe,
               "--batch_size", "64", "--epochs", "3", "--warmup_epochs", "0", "--blr", "0.5", *augment,
               "--output_dir", tmp_path)
    log = read_log(tmp_path)
    assert log[-1]["test_acc1"] > 20.0
    # TensorBoard (in output_dir by default) has the validation accuracy of every epoch, as fine-tuning logs it
    assert [e.value for e in tensorboard_scalars(tmp_path)["perf/test_acc1"]] == \
        pytest.approx([r["test_acc1"] for r in log])
    probe_ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    backbone = torch.load(finetuned / "checkpoint-last.pth", weights_only=True)["model"]
    # the backbone stayed frozen
    torch.testing.assert_close(probe_ckpt["model"]["backbone.blocks.0.attn.qkv.weight"],
                               backbone["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_torchrun_two_processes_exact_eval(tmp_path):
    run_script("main_finetune.py", *FT, "--epochs", "1", "--output_dir", tmp_path, nproc=2)
    log = read_log(tmp_path)
    assert log[0]["test_n"] == 359  # 359 is odd: exact sharding, no padded duplicates
    assert (tmp_path / "checkpoint-last.pth").is_file()


@pytest.mark.slow
def test_a_run_killed_anywhere_inside_an_epoch_resumes_there_bit_identically(tmp_path):
    """Mid-epoch checkpoints every update (--save_every_minutes 0.0001), the EMA on; SIGKILL once one inside epoch
    2 is committed (the kill then lands anywhere: training, or writing the next one). The same command again
    continues inside epoch 2 and ends with the uninterrupted run's log.txt and weights, byte for byte."""
    args = [*FT, "--epochs", "3", "--print_freq", "1", "--model_ema", "true", "--model_ema_decay", "0.9",
            "--save_every_minutes", "0.0001", "--log_dir", ""]
    run_script("main_finetune.py", *args, "--output_dir", tmp_path / "straight")

    killed = tmp_path / "killed"
    kill_inside_epoch("main_finetune.py", [*args, "--output_dir", killed], killed / "checkpoint-last.pth", 2, 120)
    assert len(read_log(killed)) == 2
    rerun = run_script("main_finetune.py", *args, "--output_dir", killed)  # the same command again
    assert re.search(r"continuing at epoch 2, step [1-9]", rerun.stdout)
    assert (killed / "log.txt").read_bytes() == (tmp_path / "straight" / "log.txt").read_bytes()
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        ours, theirs = (torch.load(d / name, weights_only=True) for d in (killed, tmp_path / "straight"))
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert all(torch.equal(ours["extra"]["model_ema"][k], v) for k, v in theirs["extra"]["model_ema"].items())


def test_bad_input_fails_cleanly_without_writing(tmp_path):
    out = tmp_path / "out"
    proc = run_script("main_finetune.py", *FT, "--dataset", "imagefolder", "--data_path", tmp_path / "nope",
                      "--output_dir", out, check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "args.json").exists()

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    proc = run_script("main_linprobe.py", *FAST, "--finetune", corrupt, "--output_dir", out, check=False)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    proc = run_script("main_finetune.py", *FT, "--model", "vit_nonexistent", "--output_dir", out, check=False)
    assert proc.returncode == 2 and "unknown model" in proc.stderr
    assert not out.exists() or not any(out.iterdir())
