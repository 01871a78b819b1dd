"""Shared helpers for the end-to-end tests: run an entry script as a user would (optionally under torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small, quick settings shared by the end-to-end runs on the embedded digits data.
FAST = ["--dataset", "digits", "--num_workers", "0", "--print_freq", "1000", "--device", "cpu"]


def run_script(script: str, *args: str, nproc: int = 0, timeout: int = 300, check: bool = True,
               ) -> subprocess.CompletedProcess:
    """Run ``script`` (an entry script ``x.py`` or a module ``benchmarks.x``) as a user would, from the repository
    root. Threads: one per process under torchrun, else the caller's OMP_NUM_THREADS (2 if unset)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1" if nproc else os.environ.get("OMP_NUM_THREADS", "2")}
    target = [script] if script.endswith(".py") else ["-m", script]  # an entry script, or a module (benchmarks.x)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    else:
        cmd = [sys.executable, *target]
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]
