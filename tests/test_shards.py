"""WebDataset tar shards: the writer (digits and ImageFolder, resumable, unreadable images skipped and named), the
reader (every sample at most once per epoch for any rank and worker count, the same number of batches on every
rank, mid-epoch resume, validation exactly once), every entry script on shards under torchrun, and corrupt or
missing shards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import FAST, ROOT, read_log, run_script, run_sequence, threads, tmpfs
from util.datasets import DigitsDataset, build_dataset, build_loader
from util.errors import UserError
from util.shards import ShardSet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the DataLoader's length estimate of a stream


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    run_script("util.make_shards", "--dataset", "digits", out, "--samples_per_shard", "200", "--workers", "2")
    return out


def test_the_digits_become_shards_of_the_same_images(digit_shards):
    for split, n, shards in (("train", 1438, 8), ("val", 359, 2)):
        index = json.loads((digit_shards / split / "index.json").read_text())
        assert index["samples"] == n and len(index["shards"]) == shards and index["skipped"] == []
        assert index["classes"] == [str(i) for i in range(10)]
        assert sum(s["samples"] for s in index["shards"]) == n
    with tarfile.open(digit_shards / "val" / "shard-000001.tar") as tar:
        names = tar.getnames()
        png = tar.extractfile("000000200.png").read()
        label = int(tar.extractfile("000000200.cls").read())
    assert names[:2] == ["000000200.cls", "000000200.png"] or names[:2] == ["000000200.png", "000000200.cls"]
    image, target = DigitsDataset("val", 32)[200]
    with Image.open(io.BytesIO(png)) as decoded:
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image)) and label == target


def _numbered_folder(root, n: int) -> None:
    """An ImageFolder of n 8-px PNGs in 3 classes whose first pixel encodes the image's number."""
    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"class{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i % 256, i // 256, 7)).save(folder / f"{i:04d}.png")


def _number(img: Image.Image) -> torch.Tensor:
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor(r + 256 * g)


def test_a_killed_conversion_is_completed_and_unreadable_images_are_skipped_and_named(tmp_path):
    _numbered_folder(tmp_path / "folder", 50)
    (tmp_path / "folder" / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "shards"
    run_script("util.make_shards", tmp_path / "folder", out, "--samples_per_shard", "8", "--workers", "2")
    first = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    index = json.loads(first["index.json"])
    assert index["samples"] == 50 and index["skipped"][0].endswith("broken.png")
    # as if killed while writing: one shard gone (with its record), a torn one left, no index yet
    for name in ("shard-000003.tar", "shard-000003.json", "index.json"):
        (out / "train" / name).unlink()
    (out / "train" / "shard-000004.tar.tmp.99").write_bytes(b"torn")
    proc = run_script("util.make_shards", tmp_path / "folder", out, "--samples_per_shard", "8", "--workers", "2")
    assert "skipped 1 unreadable" in proc.stdout
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == first  # byte for byte
    proc = run_script("util.make_shards", tmp_path / "folder", out, "--samples_per_shard", "5", check=False)
    assert proc.returncode == 2 and "holds another conversion" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("output", ["under a file", "read-only"])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, output):
    """Refused before the images are listed or the writing processes start (root writes through any file mode: a
    read-only filesystem stands for a folder without write permission)."""
    if output == "under a file":
        parent = tmp_path / "afile"
        parent.write_text("keep me")
        context, why = contextlib.nullcontext(parent), "is a file, not a directory"
    else:
        context, why = tmpfs(tmp_path / "ro", "size=1M,ro"), "is not writable"
    with context as parent:
        proc = run_script("util.make_shards", "--dataset", "digits", parent / "out", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: the output folder "), proc.stderr
    assert why in lines[0] and proc.stdout == ""


@pytest.mark.parametrize("entry", ["a path that leaves the folder", "a link to a file elsewhere"])
def test_a_shard_outside_the_split_folder_is_refused(digit_shards, tmp_path, entry):
    """index.json's shard names are read inside the split folder only: a name with ``..`` or a shard that is a link
    to a file outside is one error line naming the entry, before anything is read."""
    split, elsewhere = tmp_path / "shards" / "train", tmp_path / "other" / "train"
    shutil.copytree(digit_shards / "train", split)
    shutil.copytree(digit_shards / "train", elsewhere)
    name = "../../other/train/shard-000002.tar" if entry == "a path that leaves the folder" else "shard-000002.tar"
    if entry == "a link to a file elsewhere":
        (split / name).unlink()
        (split / name).symlink_to(elsewhere / name)
    index = json.loads((split / "index.json").read_text())
    index["shards"][2]["name"] = name
    (split / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as refused:
        ShardSet(str(split), None, train=True)
    assert f"shard {name!r} listed in {split / 'index.json'} lies outside {split}" in str(refused.value)
    assert str(elsewhere / "shard-000002.tar") in str(refused.value) and "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered")
    _numbered_folder(root / "folder", 103)
    run_script("util.make_shards", root / "folder", root / "shards", "--samples_per_shard", "10", "--workers", "2")
    return root / "shards"


def _epoch(shards, split: str, rank: int, world: int, workers: int, epoch: int, monkeypatch, start: int = 0):
    monkeypatch.setattr("util.datasets.get_rank", lambda: rank)
    monkeypatch.setattr("util.datasets.get_world_size", lambda: world)
    loader = build_loader(build_dataset("imagefolder", split, _number, 8, str(shards)), 4, workers,
                          is_train=split == "train", seed=5)
    loader.dataset.set_epoch(epoch, start)
    return [batch.tolist() for batch, _ in loader]


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_every_sample_is_read_at_most_once_and_every_rank_takes_as_many_steps(numbered_shards, world, workers,
                                                                              monkeypatch):
    """103 images in 11 shards, batches of 4: each rank reads 103 // W images in whole batches; no image twice in
    an epoch, at most W × 4 left out, another order next epoch; validation reads each of its images exactly once."""
    epochs = [[_epoch(numbered_shards, "train", r, world, workers, e, monkeypatch) for r in range(world)]
              for e in (0, 1)]
    for ranks in epochs:
        assert {len(batches) for batches in ranks} == {103 // world // 4}
        seen = [i for batches in ranks for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) and 103 - len(seen) < world * 4 and set(seen) <= set(range(103))
    assert epochs[0] != epochs[1]
    val = [i for r in range(world) for batch in _epoch(numbered_shards, "val", r, world, workers, 0, monkeypatch)
           for i in batch]
    assert sorted(val) == list(range(103))


@pytest.mark.parametrize("workers", [0, 3])
def test_an_epoch_started_after_some_batches_gives_the_rest_in_the_same_order(numbered_shards, workers,
                                                                             monkeypatch):
    whole = _epoch(numbered_shards, "train", 1, 2, workers, 3, monkeypatch)
    for done in (1, 4, 5):
        assert _epoch(numbered_shards, "train", 1, 2, workers, 3, monkeypatch, start=done * 4) == whole[done:]


@pytest.mark.slow
def test_every_script_trains_on_shards_under_torchrun_with_workers(digit_shards, tmp_path):
    """Two ranks, two loader workers each: pretraining with the kNN monitor, fine-tuning, both probes and Scala, one
    epoch each; validation counts each of the 359 images once."""
    data = ["--dataset", "imagefolder", "--data_path", digit_shards, "--num_workers", "2", "--device", "cpu",
            "--print_freq", "1000", "--epochs", "1", "--log_dir", ""]
    supervised = ["--input_size", "32", "--aa", "none", "--reprob", "0", "--batch_size", "32"]
    runs = [("main_pretrain", [*data, "--model", "mae_vit_tiny", "--knn_every", "1", "--output_dir", tmp_path / "pre"]),
            ("main_finetune", [*data, *supervised, "--finetune", tmp_path / "pre" / "checkpoint-last.pth",
                               "--output_dir", tmp_path / "ft"]),
            ("main_linprobe", [*data, "--finetune", tmp_path / "pre" / "checkpoint-last.pth", "--probe", "linear",
                               "--batch_size", "32", "--output_dir", tmp_path / "lin"]),
            ("main_linprobe", [*data, "--finetune", tmp_path / "pre" / "checkpoint-last.pth", "--probe", "attentive",
                               "--aa", "none", "--reprob", "0", "--batch_size", "32", "--output_dir", tmp_path / "att"]),
            ("main_slimmable", [*data, *supervised, "--model", "scala_vit_tiny", "--mixup", "0", "--cutmix", "0",
                                "--eval_ratios", "1", "--throughput_iters", "1", "--output_dir", tmp_path / "slim"])]
    out = run_sequence(runs, nproc=2, workdir=tmp_path)
    assert out.count("train: 1438 images in 8 shards") == 5
    assert read_log(tmp_path / "pre")[0]["knn_acc1"] > 30
    for name in ("ft", "lin", "att", "slim"):
        assert read_log(tmp_path / name)[0]["test_n"] == 359


@pytest.mark.slow
def test_a_run_on_shards_stopped_mid_epoch_resumes_exactly_with_workers(digit_shards, tmp_path):
    argv = ["main_pretrain.py", "--model", "mae_vit_tiny", "--dataset", "imagefolder", "--data_path", digit_shards,
            "--num_workers", "2", "--device", "cpu", "--print_freq", "1", "--epochs", "1", "--log_dir", ""]
    run_script(*argv, "--output_dir", tmp_path / "whole")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *argv, "--output_dir", str(tmp_path / "stopped")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.search(r"Epoch \[0\] \[5/", line):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped: SIGTERM at epoch 0" in err, err[-2000:]
    rerun = run_script(*argv, "--output_dir", tmp_path / "stopped")
    assert re.search(r"continuing at epoch 0, step \d+", rerun.stdout)
    assert (tmp_path / "stopped" / "log.txt").read_bytes() == (tmp_path / "whole" / "log.txt").read_bytes()


def test_corrupt_and_missing_shards(digit_shards, tmp_path):
    """A torn shard's lost samples and an image that does not decode are named and replaced, up to
    --max_unreadable, then one error line; a shard that index.json lists but that is missing is one error line
    before anything is written."""
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        (shards / split).mkdir(parents=True)
        for p in (digit_shards / split).iterdir():
            (shards / split / p.name).write_bytes(p.read_bytes())
    torn = shards / "train" / "shard-000002.tar"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    with tarfile.open(shards / "train" / "shard-000005.tar") as tar:
        offset = tar.getmember("000001010.png").offset_data
    broken = bytearray((shards / "train" / "shard-000005.tar").read_bytes())
    broken[offset:offset + 8] = b"garbage!"  # the PNG signature
    (shards / "train" / "shard-000005.tar").write_bytes(bytes(broken))
    flags = ["--model", "mae_vit_tiny", "--dataset", "imagefolder", "--data_path", shards, "--num_workers", "0",
             "--device", "cpu", "--epochs", "1", "--log_dir", ""]
    proc = run_script("main_pretrain.py", *flags, "--max_unreadable", "0.2", "--output_dir", tmp_path / "lenient")
    assert re.search(r"warning: shard .*shard-000002.tar gave \d+ of its samples", proc.stderr)
    assert "warning: unreadable image" in proc.stderr and "shard-000005.tar:000001010" in proc.stderr
    assert len(read_log(tmp_path / "lenient")) == 1
    proc = run_script("main_pretrain.py", *flags, "--max_unreadable", "0", "--output_dir", tmp_path / "strict",
                      check=False)
    assert proc.returncode == 2 and re.search(r"^error: \d+ unreadable training images", proc.stderr, re.M)
    assert not (tmp_path / "strict" / "checkpoint-last.pth").exists()
    (shards / "val" / "shard-000001.tar").unlink()
    proc = run_script("main_finetune.py", *FAST[2:], "--dataset", "imagefolder", "--data_path", shards,
                      "--model", "vit_tiny_patch4", "--input_size", "32", "--output_dir", tmp_path / "ft", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 1 shard(s) listed in") and "missing" in proc.stderr
    assert not (tmp_path / "ft").exists()
