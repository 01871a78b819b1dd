"""Run any of the four training scripts on SLURM through submitit, one task per GPU, requeued on a timeout or a
preemption (MAE's submitit_*.py, for every entry script):

    python submitit_train.py --script main_pretrain.py --nodes 8 --ngpus 8 --partition learn --timeout 4320 \\
        --account my_account --job_dir /checkpoint/$USER/xtra_h14 -- \\
        --model xtra_vit_huge_patch14 --global_batch 2088 --data_path /datasets/imagenet21k --fsdp

Everything after ``--`` goes to the entry script unchanged (its ``--output_dir`` defaults to ``--job_dir``), and it
is validated here, for ``--nodes × --ngpus`` ranks, before anything is queued. SLURM sends SIGUSR2
``--signal_delay_s`` seconds before the time limit (and on preemption); every rank then finishes its optimiser step
and commits a mid-epoch checkpoint, the job requeues itself, and the requeued job auto-resumes from that step.
``--cluster local`` runs the same job on this machine with submitit's local executor (what the tests use).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

import submitit

from util.errors import UserError, run_cli
from util.train_loop import request_stop

SCRIPTS = ("main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_slimmable.py")


class Job:
    """One task of the job: this rank's place in the job from submitit, then the entry script's ``main``."""

    def __init__(self, script: str, argv: list[str]):
        self.script, self.argv = script, argv

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # what torchrun would announce; init_distributed reads it
            os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                              LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes),
                              WORLD_SIZE=str(env.num_tasks), MASTER_ADDR=env.hostnames[0],
                              MASTER_PORT=str(20000 + int(str(env.job_id).split("_")[0]) % 20000))
        sys.argv = [self.script, *self.argv]
        # submitit's signal (SLURM sends it before the time limit, and on preemption) first stops the run at its
        # next optimiser step with a mid-epoch checkpoint, then goes to submitit's handler, which requeues the job
        usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        requeue = signal.signal(usr_sig, request_stop)
        try:
            run_cli(importlib.import_module(self.script.removesuffix(".py")).main)
        except SystemExit as e:
            if e.code == 128 + usr_sig and callable(requeue):
                requeue(usr_sig, None)  # rank 0: requeue and exit; other ranks: nothing
            raise

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On a timeout or a preemption: requeue the same command, which continues from the last checkpoint."""
        return submitit.helpers.DelayedSubmission(Job(self.script, self.argv))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="submitit_train.py", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--script", choices=SCRIPTS, required=True, help="the entry script to run")
    parser.add_argument("--job_dir", required=True, help="submitit's logs go to JOB_DIR/submitit; the default "
                                                         "--output_dir of the entry script")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ngpus", type=int, default=8, help="GPUs (= tasks) per node")
    parser.add_argument("--timeout", type=float, default=4320, help="time limit of one job in minutes")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--account", default="", help="SLURM account")
    parser.add_argument("--cpus_per_task", type=int, default=10)
    parser.add_argument("--mem_gb", type=int, default=0, help="memory per node (0: the partition's default)")
    parser.add_argument("--signal_delay_s", type=int, default=120, help="seconds between SIGUSR2 and the limit")
    parser.add_argument("--max_requeues", type=int, default=20, help="timeouts after which the job is not requeued")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="local: run here with submitit's local executor (tests, a CPU)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome")
    return parser


def validate(script: str, argv: list[str], world_size: int) -> None:
    """The entry script's own settings check, as its ranks will run it, before anything is queued."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        importlib.import_module(script.removesuffix(".py")).resolve_settings(argv)
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = saved


def main(argv: Sequence[str]) -> None:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    s = get_parser().parse_args(argv[:split])
    entry = argv[split + 1:]
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in entry):
        entry += ["--output_dir", s.job_dir]
    if s.nodes < 1 or s.ngpus < 1:
        raise UserError(f"--nodes and --ngpus must be at least 1, got {s.nodes} and {s.ngpus}")
    validate(s.script, entry, s.nodes * s.ngpus)

    folder = Path(s.job_dir) / "submitit"
    if s.cluster == "local":  # one node; whatever fraction of a minute the limit is (tests run for seconds)
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=s.max_requeues)
        executor.update_parameters(timeout_min=s.timeout, signal_delay_s=s.signal_delay_s,
                                   tasks_per_node=s.ngpus, gpus_per_node=0)
    else:
        executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=s.max_requeues)
        executor.update_parameters(
            name=f"{Path(s.script).stem}:{Path(s.job_dir).name}", timeout_min=max(1, round(s.timeout)),
            nodes=s.nodes, tasks_per_node=s.ngpus, gpus_per_node=s.ngpus, cpus_per_task=s.cpus_per_task,
            slurm_signal_delay_s=s.signal_delay_s, **({"mem_gb": s.mem_gb} if s.mem_gb else {}),
            **({"slurm_partition": s.partition} if s.partition else {}),
            **({"slurm_account": s.account} if s.account else {}))
    job = executor.submit(Job(s.script, entry))
    print(f"submitted {s.script} as job {job.job_id}; logs in {folder}", flush=True)
    if s.wait:
        try:
            job.result()
        except Exception as e:  # the job's own error is in its log
            raise UserError(f"job {job.job_id} failed ({type(e).__name__}); see {job.paths.stderr}") from None
        print(f"job {job.job_id} finished", flush=True)


if __name__ == "__main__":
    run_cli(main)
