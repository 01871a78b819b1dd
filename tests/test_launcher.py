"""submitit_train.py: any entry script as a submitit job, requeued on a timeout or a preemption, tested with
submitit's local executor on the CPU."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_log, run_script, threads

FLAGS = ["--model", "xtra_vit_tiny", "--dataset", "synthetic", "--synthetic_size", "128", "--batch_size", "32",
         "--num_workers", "0", "--epochs", "6", "--print_freq", "1000", "--device", "cpu", "--save_freq", "100",
         "--log_dir", ""]


def _tasks_of(job_dir: Path) -> list[int]:
    """PIDs of the job's task processes (submitit's local executor runs ``python -u -m submitit.core._submit``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "submitit.core._submit" in cmdline and str(job_dir) in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_job_signalled_mid_run_requeues_itself_and_ends_as_the_uninterrupted_run(tmp_path):
    """SIGUSR2 is what SLURM sends before a job's time limit (and on preemption): the job finishes its optimiser
    step, commits a mid-epoch checkpoint and requeues itself, the new job continues from that step, and log.txt
    ends byte for byte as an uninterrupted run's."""
    run_script("main_pretrain.py", *FLAGS, "--output_dir", tmp_path / "ref", subprocess_run=True)
    job = tmp_path / "job"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads())}
    launcher = subprocess.Popen([sys.executable, "submitit_train.py", "--cluster", "local", "--script",
                                 "main_pretrain.py", "--ngpus", "1", "--timeout", "30", "--job_dir", str(job),
                                 "--wait", "--", *FLAGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((job / "log.txt").exists() and len(read_log(job)) >= 2) and launcher.poll() is None:
        assert time.time() < deadline, "the job did not commit two epochs"
        time.sleep(0.2)
    committed = len(read_log(job))
    tasks = _tasks_of(job / "submitit")
    assert launcher.poll() is None and tasks and committed < 6, "the run ended before it could be signalled"
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out + err
    assert (job / "log.txt").read_bytes() == (tmp_path / "ref" / "log.txt").read_bytes()
    # both attempts append to the job's logs
    log = "".join(p.read_text() for p in sorted((job / "submitit").glob("*_log.*")))
    resumed_at = [(int(e), int(k)) for e, k in re.findall(r"continuing at epoch (\d+), step (\d+)", log)]
    assert "Requeued job" in log and "stopped: SIGUSR2 at epoch" in log, log[-3000:]
    assert len(resumed_at) == 1 and committed <= resumed_at[0][0] < 6 and resumed_at[0][1] >= 1, log[-3000:]


@pytest.mark.slow
def test_the_launcher_refuses_bad_entry_flags_before_queuing_anything(tmp_path):
    """The entry script's settings are checked for the whole job's ranks: 8 GPUs × 64 cannot make 2088."""
    proc = run_script("submitit_train.py", "--cluster", "local", "--script", "main_pretrain.py", "--ngpus", "8",
                      "--job_dir", tmp_path / "job", "--", "--model", "xtra_vit_base_patch16", "--batch_size", "64",
                      "--global_batch", "2088", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --global_batch 2088 is not a multiple of 64 per "
                                                           "rank × 8 ranks"), proc.stderr
    assert not (tmp_path / "job").exists()
