"""Failure paths: bad input is one `error:` line, exit 2, with nothing written; a kill at any point of a run leaves
files that a rerun completes (never a run that claims to be finished but is not); unreadable images are logged,
replaced and counted; non-finite updates never reach a checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main_pretrain
from tests.helpers import FAST, ROOT, one_error_line, read_log, run_script, tmpfs
from util.settings import SettingsError

PT = [*FAST, "--model", "xtra_vit_tiny", "--batch_size", "64", "--warmup_epochs", "1", "--save_freq", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("complete")
    run_script("main_pretrain.py", *PT, "--epochs", "3", "--output_dir", out)
    return out


def _copy(src: Path, dst: Path, files: list[str], log_epochs: int) -> None:
    dst.mkdir()
    for name in files:
        shutil.copy(src / name, dst / name)
    (dst / "log.txt").write_text("".join(line + "\n" for line in (src / "log.txt").read_text().splitlines()[:log_epochs]))
    shutil.copy(src / "args.json", dst / "args.json")


def test_a_complete_run_records_its_completion_last_and_a_rerun_does_nothing(finished_run):
    assert json.loads((finished_run / "done.json").read_text()) == {"epochs": 3}
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir() if p.is_file()}
    proc = run_script("main_pretrain.py", *PT, "--epochs", "3", "--output_dir", finished_run)
    assert "nothing to do" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("killed_after", ["log line", "encoder", "numbered checkpoint", "last checkpoint"])
def test_a_kill_during_the_last_epoch_is_completed_by_the_rerun(finished_run, tmp_path, killed_after):
    """The files a kill at each point of the last epoch leaves (each epoch writes its log line, encoder.pth, the
    numbered checkpoint, then checkpoint-last.pth; done.json closes the run), plus torn temporary files."""
    out = tmp_path / "run"
    committed = killed_after == "last checkpoint"
    files = ["checkpoint-1.pth"] + {"log line": [], "encoder": ["encoder.pth"],
                                    "numbered checkpoint": ["encoder.pth", "checkpoint-2.pth"],
                                    "last checkpoint": ["encoder.pth", "checkpoint-2.pth"]}[killed_after]
    _copy(finished_run, out, files, log_epochs=3)
    shutil.copy(finished_run / ("checkpoint-2.pth" if committed else "checkpoint-1.pth"), out / "checkpoint-last.pth")
    (out / "checkpoint-last.pth.tmp.4242").write_bytes(b"")  # torn writes of the killed process
    (out / "encoder.pth.tmp.4242").write_bytes(b"\x00" * 10)
    proc = run_script("main_pretrain.py", *PT, "--epochs", "3", "--output_dir", out)
    assert ("continuing at epoch 3" if committed else "continuing at epoch 2") in proc.stdout
    assert read_log(out) == read_log(finished_run)  # every epoch once, the redone one bit-identical
    assert not list(out.glob("*.tmp.*"))
    assert {"checkpoint-2.pth", "encoder.pth", "done.json"} <= {p.name for p in out.iterdir()}
    redone = torch.load(out / "checkpoint-2.pth", weights_only=True)["model"]
    reference = torch.load(finished_run / "checkpoint-2.pth", weights_only=True)["model"]
    assert all(torch.equal(redone[k], reference[k]) for k in reference)


def test_a_kill_during_the_first_save_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pth.tmp.99").write_bytes(b"")
    run_script("main_pretrain.py", *PT, "--epochs", "1", "--output_dir", out)
    assert not list(out.glob("*.tmp.*")) and (out / "done.json").is_file()


def test_auto_resume_into_another_models_run_is_refused_before_anything_is_written(finished_run, tmp_path):
    args_json = (finished_run / "args.json").read_text()
    proc = run_script("main_pretrain.py", *FAST, "--model", "saim_vit_tiny", "--output_dir", finished_run, check=False)
    one_error_line(proc, "checkpoint of xtra_vit_tiny, not saim_vit_tiny", after_warnings=True)
    assert (finished_run / "args.json").read_text() == args_json
    proc = run_script("main_finetune.py", *FAST, "--resume", finished_run / "checkpoint-last.pth",
                      "--output_dir", tmp_path / "ft", check=False)
    one_error_line(proc, "not a classifier checkpoint", "--finetune", after_warnings=True)
    assert not (tmp_path / "ft").exists()


def test_impossible_counts_and_devices_are_refused_up_front(tmp_path):
    for flags, needle in ((["--epochs", "0"], "--epochs must be at least 1"),
                          (["--epochs", "-3"], "--epochs must be at least 1"),
                          (["--save_freq", "0"], "--save_freq must be at least 1"),
                          (["--accum_iter", "0"], "--accum_iter must be at least 1"),
                          (["--max_unreadable", "2"], "--max_unreadable")):
        with pytest.raises(SettingsError, match=needle):
            main_pretrain.resolve_settings([*PT, *flags, "--output_dir", str(tmp_path)])
    if not torch.cuda.is_available():
        proc = run_script("main_pretrain.py", *PT, "--device", "cuda", "--output_dir", tmp_path / "x", check=False)
        one_error_line(proc, "CUDA is not available", after_warnings=True)
    assert not list(tmp_path.iterdir())


def test_an_output_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    proc = run_script("main_pretrain.py", *PT, "--output_dir", afile / "sub", check=False)
    one_error_line(proc, "is a file", after_warnings=True)
    assert afile.read_text() == "keep me"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: fake a read-only disk
    with pytest.raises(SettingsError, match="not writable"):
        main_pretrain.resolve_settings([*PT, "--output_dir", str(tmp_path / "new")])


def test_a_missing_data_path_creates_no_output_dir(tmp_path):
    proc = run_script("main_pretrain.py", *PT, "--dataset", "imagefolder", "--data_path", tmp_path / "nope",
                      "--output_dir", tmp_path / "out", check=False)
    one_error_line(proc, "--data_path", after_warnings=True)
    assert not (tmp_path / "out").exists()


def test_an_exploding_update_never_reaches_a_checkpoint(tmp_path):
    """lr 1e10 with a few steps per epoch: the loss of the last step is still finite, but the updated weights give a
    non-finite loss; nothing of that epoch is written."""
    proc = run_script("main_pretrain.py", *PT, "--batch_size", "512", "--epochs", "3", "--lr", "1e10",
                      "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "log.txt").exists()


def _image_folder(root: Path, n: int = 40) -> None:
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n // 2):
                Image.new("RGB", (40, 40), (60 * c + i, 90, 30)).save(d / f"{i}.jpg", quality=90)


def test_unreadable_images_are_logged_replaced_and_counted(tmp_path):
    data = tmp_path / "data"
    _image_folder(data)
    bad = [data / "train" / "class0" / "0.jpg", data / "train" / "class1" / "3.jpg", data / "val" / "class0" / "5.jpg"]
    bad[0].write_bytes(b"")  # zero-byte
    good = (data / "train" / "class1" / "4.jpg").read_bytes()
    bad[1].write_bytes(good[: len(good) // 2])  # truncated JPEG
    bad[2].write_text("not an image")
    flags = [*FAST, "--dataset", "imagefolder", "--data_path", data, "--model", "vit_tiny_patch4", "--input_size",
             "32", "--batch_size", "8", "--epochs", "2", "--aa", "none", "--reprob", "0", "--warmup_epochs", "0"]
    proc = run_script("main_finetune.py", *flags, "--max_unreadable", "0.1", "--output_dir", tmp_path / "ok")
    for path in bad:  # each reported once, with its path
        assert proc.stderr.count(f"unreadable image {path}") == 1, proc.stderr
    log = read_log(tmp_path / "ok")
    assert [r["test_n"] for r in log] == [39, 39] and [r["test_unreadable"] for r in log] == [1, 1]
    proc = run_script("main_finetune.py", *flags, "--max_unreadable", "0", "--output_dir", tmp_path / "strict",
                      check=False)
    line = one_error_line(proc, "unreadable training images", "--max_unreadable", after_warnings=True)
    assert str(bad[0]) in line or str(bad[1]) in line
    assert not list((tmp_path / "strict").glob("checkpoint-*"))


def test_a_killed_resume_of_the_same_image_folder_is_bit_identical(tmp_path):
    """Replacement is deterministic: a run resumed after epoch 0 gives the losses of an uninterrupted one."""
    data = tmp_path / "data"
    _image_folder(data)
    (data / "train" / "class0" / "2.jpg").write_bytes(b"")
    flags = [*FAST, "--dataset", "imagefolder", "--data_path", data, "--model", "vit_tiny_patch4", "--input_size",
             "32", "--batch_size", "8", "--aa", "none", "--reprob", "0", "--warmup_epochs", "0", "--max_unreadable",
             "0.1", "--save_freq", "1"]
    run_script("main_finetune.py", *flags, "--epochs", "2", "--output_dir", tmp_path / "straight")
    resumed = tmp_path / "resumed"
    run_script("main_finetune.py", *flags, "--epochs", "2", "--output_dir", resumed)
    (resumed / "done.json").unlink()  # as if killed right after epoch 0 was committed
    shutil.copy(resumed / "checkpoint-0.pth", resumed / "checkpoint-last.pth")
    run_script("main_finetune.py", *flags, "--epochs", "2", "--output_dir", resumed)
    assert read_log(resumed) == read_log(tmp_path / "straight")


@pytest.mark.slow
def test_eval_of_a_fine_tuned_checkpoint_as_the_docs_show_writes_nothing(tmp_path):
    ft = tmp_path / "ft"
    run_script("main_finetune.py", *FAST, "--model", "vit_tiny_patch4", "--input_size", "32", "--epochs", "1",
               "--batch_size", "64", "--aa", "none", "--reprob", "0", "--output_dir", ft)
    before = set(os.listdir(ROOT))
    proc = subprocess.run([sys.executable, "main_finetune.py", "--eval", "--resume", str(ft / "checkpoint-best.pth"),
                           "--dataset", "digits", "--num_workers", "0"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Acc@1 {read_log(ft)[-1]['test_acc1']:.3f}" in proc.stdout
    assert set(os.listdir(ROOT)) == before  # no ./output_dir/args.json


@pytest.mark.slow
def test_run_and_eval_scripts_use_the_interpreters_launcher_and_refuse_a_wrong_preset(tmp_path):
    teacher, scala = tmp_path / "teacher", tmp_path / "scala"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run_script("main_finetune.py", *FAST, "--model", "vit_tiny_patch4", "--input_size", "16", "--epochs", "1",
               "--aa", "none", "--reprob", "0", "--output_dir", teacher)
    proc = subprocess.run(["bash", "run.sh", "tiny", "--epochs", "1", "--output_dir", str(scala)], cwd=ROOT,
                          capture_output=True, text=True, env={**env, "TEACHER": str(teacher / "checkpoint-last.pth")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(["bash", "eval.sh", "tiny", str(scala / "checkpoint-last.pth"), "--throughput_iters", "1"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ratio" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(["bash", "eval.sh", "small", str(scala / "checkpoint-last.pth")], cwd=ROOT,
                          capture_output=True, text=True, env={**env, "IMAGENET": str(tmp_path)})
    one_error_line(proc, "checkpoint of scala_vit_tiny, not scala_deit_small_patch16", after_warnings=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB filesystem: room for one tiny-preset checkpoint (3.6 MB) but not for its replacement next to it."""
    with tmpfs(tmp_path / "disk", "size=6M") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_committed_checkpoint(small_disk):
    out = small_disk / "run"
    proc = run_script("main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--batch_size", "64", "--epochs", "3",
                      "--save_freq", "100", "--save_encoder", "false", "--log_dir", "", "--output_dir", out,
                      check=False)
    line = one_error_line(proc, "cannot write ", "No space left on device", "MiB free there",
                          "the last committed checkpoint is untouched", after_warnings=True)
    assert "checkpoint-last.pth" in line
    assert not list(out.glob("*.tmp.*")), "the partial file was left behind"
    committed = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert committed["epoch"] == 0 and not (out / "done.json").exists()
    # a rerun with room to write drops the uncommitted epoch's log line and continues at epoch 1
    shutil.copytree(out, small_disk.parent / "moved")
    proc = run_script("main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--batch_size", "64", "--epochs", "3",
                      "--save_freq", "100", "--save_encoder", "false", "--log_dir", "",
                      "--output_dir", small_disk.parent / "moved")
    assert "continuing at epoch 1" in proc.stdout
    assert [r["epoch"] for r in read_log(small_disk.parent / "moved")] == [0, 1, 2]


def test_an_unwritable_log_is_one_line_without_a_torn_entry(tmp_path, monkeypatch):
    """A write that fails half-way through log.txt is cut back to the last whole line."""
    from util import run as train_run

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_run.os, "fsync", failing_fsync)
    with pytest.raises(train_run.UserError, match=r"cannot write .*log.txt: No space left on device"):
        train_run.write_json_line(str(out), {"epoch": 1, "train_loss": 0.5})
    assert (out / "log.txt").read_text() == '{"epoch": 0}\n'


@pytest.mark.slow
def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_committed_checkpoint(small_disk):
    out = small_disk / "run"
    proc = run_script("main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--batch_size", "64", "--epochs", "3",
                      "--save_freq", "100", "--save_encoder", "false", "--log_dir", "", "--fsdp",
                      "--output_dir", out, check=False)
    line = one_error_line(proc, "cannot write ", "checkpoint-1.dcp.tmp", "No space left on device", "MiB free there",
                          after_warnings=True)
    assert "Traceback" not in line and not (out / "checkpoint-1.dcp.tmp").exists()
    assert json.loads((out / "checkpoint-last.json").read_text())["epoch"] == 0
    assert (out / "checkpoint-0.dcp").is_dir() and not (out / "done.json").exists()
