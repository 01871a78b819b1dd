"""Long runs: a stop signal (SIGINT to the whole process group, SIGUSR1 twice) makes a run commit a
mid-epoch checkpoint and exit with one line; the rerun of the same command continues at that step and ends with
the uninterrupted run's log.txt, byte for byte (but for a measured throughput), and its weights, with and without
loader workers. Also: the
training order and augmentation do not depend on the number of workers, and skipping the samples a checkpoint
already used is the same set of samples for any number of ranks."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, ROOT, one_error_line, read_log, run_script, threads
from util.datasets import EpochSampler, build_dataset, build_loader, build_transform

RUNS = {
    # with both monitors: their numbers and the online probe's state resume exactly too
    "pretrain": ("main_pretrain.py", [*FAST, "--model", "mae_vit_tiny", "--epochs", "2", "--print_freq", "1",
                                      "--knn_every", "1", "--online_probe", "--log_dir", ""]),
    "slimmable": ("main_slimmable.py", [*FAST, "--model", "scala_vit_tiny", "--input_size", "16", "--batch_size",
                                        "64", "--aa", "none", "--reprob", "0.25", "--mixup", "0", "--cutmix", "0",
                                        "--granularity", "0.25", "--full_warm_epochs", "0", "--epochs", "2",
                                        "--eval_ratios", "1", "--throughput_iters", "1", "--print_freq", "1",
                                        "--knn_every", "1", "--log_dir", ""]),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    for name, (script, argv) in RUNS.items():
        run_script(script, *argv, "--output_dir", root / name)
    return {name: root / name for name in RUNS}


def _timeless(log: Path) -> list[str]:
    """log.txt's lines as written, but for the measured throughput (img/s) of main_slimmable's closing table."""
    return [re.sub(r'"img_s": [0-9.e+-]+', '"img_s": ...', line) for line in log.read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# SIGTERM: tests/test_shards.py (one process, two workers); SIGUSR1 to one of two ranks: tests/test_fsdp.py
@pytest.mark.slow
@pytest.mark.parametrize("run, signals, workers, to_group", [
    ("pretrain", [signal.SIGINT], 2, True),  # Ctrl-C in a terminal: the loader workers receive it too
    ("slimmable", [signal.SIGUSR1, signal.SIGUSR1], 0, False),  # a second signal during the stop changes nothing
], ids=["SIGINT-to-the-group-with-workers", "SIGUSR1-twice-scala"])
def test_a_stop_signal_commits_mid_epoch_and_the_rerun_ends_as_the_uninterrupted_run(uninterrupted, tmp_path, run,
                                                                                      signals, workers, to_group):
    script, argv = RUNS[run]
    argv = [*argv, "--num_workers", str(workers), "--output_dir", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # the signal arrives inside epoch 0
        if re.search(r"Epoch \[0\] \[3/", line):
            break
    for signum in signals:
        os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signals[0], err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    name = signal.Signals(signals[0]).name
    assert len(stopped) == 1 and "Traceback" not in err, err[-3000:]
    match = re.match(rf"stopped: {name} at epoch 0, step (\d+) of (\d+); (\S+) holds it: rerun the same command "
                     "to continue from there$", stopped[0])
    assert match and 3 <= int(match[1]) < int(match[2]) and match[3] == str(tmp_path / "checkpoint-last.pth"), err
    position = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["position"]
    assert position["epoch"] == 0 and position["images"] == int(match[1]) * 64 and len(position["meters"]) == 1
    assert not (tmp_path / "log.txt").exists() and not list(tmp_path.glob("checkpoint-[0-9]*"))

    rerun = run_script(script, *argv)
    assert f"continuing at epoch 0, step {match[1]} ({position['images']} images into it)" in rerun.stdout
    reference = uninterrupted[run]
    assert _timeless(tmp_path / "log.txt") == _timeless(reference / "log.txt")
    ours, theirs = _weights(tmp_path / "checkpoint-last.pth"), _weights(reference / "checkpoint-last.pth")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "position" not in torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)


def _epoch_batches(num_workers: int, epoch: int, start: int = 0) -> list[torch.Tensor]:
    dataset = build_dataset("digits", "train", build_transform(16, is_train=True, crop_scale=(0.2, 1.0)), 16)
    loader = build_loader(dataset, 32, num_workers, is_train=True, seed=3)
    loader.sampler.set_epoch(epoch, start)
    return [images for images, _ in loader]


def test_the_augmented_batches_do_not_depend_on_workers_or_on_where_the_epoch_starts():
    """Each sample is augmented from (seed, epoch, index): the same batches with 0 or 2 workers, the same tail when
    the epoch starts 5 batches in, other crops in another epoch; the training RNG is left untouched."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    plain, workers, later = _epoch_batches(0, 1), _epoch_batches(2, 1), _epoch_batches(0, 1, start=5 * 32)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(plain) == len(workers) == 1438 // 32 and all(torch.equal(a, b) for a, b in zip(plain, workers))
    assert len(later) == len(plain) - 5 and all(torch.equal(a, b) for a, b in zip(plain[5:], later))
    assert not torch.equal(_epoch_batches(0, 2)[0], plain[0])


@pytest.mark.parametrize("ranks, resumed_ranks", [(2, 1), (2, 4), (3, 2)])
def test_skipping_what_a_checkpoint_used_leaves_the_same_samples_for_any_number_of_ranks(ranks, resumed_ranks,
                                                                                         monkeypatch):
    """A checkpoint after s samples of each of W ranks used the first s × W of the epoch's permutation; a resume by
    W' ranks that skips s × W / W' each sees exactly the others."""
    data = list(range(120))

    def shares(world: int, start: int) -> list[set[int]]:
        found = []
        for rank in range(world):
            monkeypatch.setattr("util.datasets.get_world_size", lambda: world)
            monkeypatch.setattr("util.datasets.get_rank", lambda r=rank: r)
            sampler = EpochSampler(data, seed=0)
            sampler.set_epoch(4, start)
            found.append({index for index, _ in sampler})
        return found

    used = 24  # samples of each of the `ranks` ranks
    seen = set().union(*(full - rest for full, rest in zip(shares(ranks, 0), shares(ranks, used))))
    rest = shares(resumed_ranks, used * ranks // resumed_ranks)
    everything = set().union(*shares(ranks, 0))
    assert len(seen) == used * ranks and seen.isdisjoint(set().union(*rest))
    assert sum(map(len, rest)) == len(set().union(*rest))  # no sample twice
    covered = seen | set().union(*rest)
    # every sample of the epoch is seen exactly once, up to the few that drop_last leaves out for either count
    assert len(everything - covered) < max(ranks, resumed_ranks)


# --- one run per output directory ----------------------------------------------------------------------
def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads())}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_output_dir_is_refused_naming_it(tmp_path):
    """The same command started twice: the second run is one error line naming the first (pid, host), writes
    nothing, and the first goes on; its lock goes when it ends."""
    out = tmp_path / "run"
    argv = ["main_pretrain.py", *FAST, "--model", "mae_vit_tiny", "--epochs", "50", "--output_dir", str(out)]
    first = _start(argv)
    try:
        deadline = time.time() + 120
        while not (out / "log.txt").is_file() and time.time() < deadline:  # the first epoch is committed
            time.sleep(0.2)
        lock = json.loads((out / "run.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        log_before = (out / "log.txt").read_text()
        second = run_script(*argv, check=False)
        assert one_error_line(second).startswith(f"error: {out} is in use by another run: pid {first.pid} on "
                                                 f"{socket.gethostname()}")
        assert (out / "log.txt").read_text().startswith(log_before)  # nothing rewritten
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and not (out / "run.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_one_held_elsewhere_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(gone.stdout), "process_start": "1", "started": "earlier"}
    (out / "run.lock").write_text(json.dumps(holder))
    argv = [*FAST, "--model", "xtra_vit_tiny", "--epochs", "1", "--output_dir", out]
    proc = run_script("main_pretrain.py", *argv)
    assert f"warning: taking over {out / 'run.lock'}, left by a run that is gone" in proc.stdout
    assert (out / "done.json").is_file() and not (out / "run.lock").exists()
    elsewhere = {**holder, "host": "another-node", "pid": os.getpid()}
    (out / "run.lock").write_text(json.dumps(elsewhere))
    proc = run_script("main_pretrain.py", *argv, "--epochs", "2", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {out} is in use by another run: pid {os.getpid()} on another-node since earlier "
        f"({out / 'run.lock'}); wait for it to end or use another --output_dir (if that run is gone, remove "
        f"{out / 'run.lock'})"]
    assert len(read_log(out)) == 1  # the second epoch was not trained


SIGNAL_IN_FINISH = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import util.run
finish = util.run.finish_run
def finish_run(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's signal that arrives after the last epoch
    finish(*args)
util.run.finish_run = finish_run
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_signal_after_the_last_epoch_lets_the_run_finish(tmp_path):
    """The stop signals stay handled until the run has finished: one that arrives while done.json is written is
    recorded, and the run completes (exit 0) instead of dying on the default handler."""
    wrapper = tmp_path / "signal_in_finish.py"
    wrapper.write_text(SIGNAL_IN_FINISH)
    proc = run_script(str(wrapper), "main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--epochs", "1",
                      "--output_dir", tmp_path / "run", subprocess_run=True, check=False)
    assert proc.returncode == 0 and "received SIGTERM" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "run" / "done.json").is_file()


def test_a_resume_on_another_rank_count_names_the_step_it_takes(tmp_path):
    """A mid-epoch checkpoint of two ranks resumed by one: the resume line gives the step this run continues at,
    the same one as the warning that follows (not the two-rank step)."""
    out = tmp_path / "run"
    run_script("main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--epochs", "1", "--output_dir", out)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    meters = {"loss": {"window": 20, "fmt": "{median:.4f} ({global_avg:.4f})", "values": [1.0], "count": 64,
                       "total": 64.0}}
    torch.save({**ckpt, "epoch": 0, "rng": ckpt["rng"] * 2,
                "position": {"epoch": 1, "images": 640, "meters": [meters, meters]}}, out / "checkpoint-last.pth")
    (out / "done.json").unlink()
    proc = run_script("main_pretrain.py", *FAST, "--epochs", "2", "--output_dir", out)
    assert re.search(r"continuing at epoch 1, step 10 \(640 images into it\)", proc.stdout), proc.stdout
    assert "continues at step 10," in proc.stdout


CRASH_IN_THE_STEP = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import util.train_loop
def step(self, *args, **kwargs):
    raise RuntimeError("a bug in the step")
util.train_loop.TrainingEpoch.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_bug_in_a_run_with_loader_workers_ends_the_process(tmp_path):
    """A bug (any exception but the one-line ones) keeps its traceback and the process exits with code 1: the loader
    workers, which ignore SIGTERM and outlive an epoch, are killed at exit instead of being waited for forever."""
    wrapper = tmp_path / "crash_in_the_step.py"
    wrapper.write_text(CRASH_IN_THE_STEP)
    proc = run_script(str(wrapper), "main_pretrain.py", *FAST, "--model", "xtra_vit_tiny", "--num_workers", "2",
                      "--output_dir", tmp_path / "run", subprocess_run=True, check=False, timeout=120)
    assert proc.returncode == 1 and "RuntimeError: a bug in the step" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "run.lock").exists()
