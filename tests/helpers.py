"""Shared helpers for the end-to-end tests: run an entry script as a user would (optionally under torchrun)."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from util.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
# Small, quick settings shared by the end-to-end runs on the embedded digits data.
FAST = ["--dataset", "digits", "--num_workers", "0", "--print_freq", "1000", "--device", "cpu"]


def threads() -> int:
    """Threads of a run: the caller's OMP_NUM_THREADS, else 2 (pinned: results must not depend on the machine)."""
    return int(os.environ.get("OMP_NUM_THREADS", "2"))


def run_script(script: str, *args: str, nproc: int = 0, timeout: int = 300, check: bool = True,
               subprocess_run: bool = False, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``script`` (an entry script ``x.py`` or a module ``models.convert`` / ``benchmarks.x``) as a user would,
    from ``cwd`` (the repository root), with ``threads()`` threads (one per process under torchrun).

    Under torchrun (``nproc``) or with ``subprocess_run`` it is a new interpreter. Otherwise it runs in this process
    (the same ``main`` through the same ``run_cli``, with sys.argv, stdout and stderr swapped and the exit code
    caught): the interpreter start-up and imports are what a subprocess adds, and they cost seconds per run."""
    argv = [str(a) for a in args]
    if nproc or subprocess_run:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(1 if nproc else threads())}
        target = [script] if script.endswith(".py") else ["-m", script]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
        proc = subprocess.run([sys.executable, *launcher, *target, *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    else:
        proc = _in_process(script, argv, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _in_process(script: str, argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    name = script[:-3] if script.endswith(".py") else script
    module = importlib.import_module(name)
    out, err, saved_argv, saved_threads = io.StringIO(), io.StringIO(), sys.argv, torch.get_num_threads()
    code = 0
    sys.argv = [script, *argv]
    torch.set_num_threads(threads())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
            if name.startswith("benchmarks."):
                module.main()  # argparse from sys.argv
            else:
                run_cli(module.main)  # one `error:` line and SystemExit(2) on bad input, as from a shell
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def run_command(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A documented command (``python main_x.py ...`` or ``python -m module ...``) in this process, from ``cwd``."""
    script, argv = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    return _in_process(script, argv, cwd)


def run_sequence(runs: list[tuple[str, list]], nproc: int, workdir: Path, timeout: int = 600) -> str:
    """Entry-script runs ``(module, argv)`` one after another in one torchrun launch of ``nproc`` processes
    (tests/run_sequence.py); returns the output."""
    spec = Path(workdir) / "runs.json"
    spec.write_text(json.dumps([[module, [str(a) for a in argv]] for module, argv in runs]))
    return run_script("tests/run_sequence.py", spec, nproc=nproc, timeout=timeout).stdout


def kill_inside_epoch(script: str, args: list, checkpoint: Path, epoch: int, timeout: int) -> None:
    """Run ``script`` as ``run_script`` would, and SIGKILL it once ``checkpoint`` (a checkpoint-last.pth it
    writes) records a position inside ``epoch``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads())}
    proc = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout

    def inside() -> bool:
        with contextlib.suppress(Exception):  # not written yet, or being replaced
            return torch.load(checkpoint, weights_only=True).get("position", {}).get("epoch") == epoch
        return False

    while not inside():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_error_line(proc: subprocess.CompletedProcess, *needles: str, after_warnings: bool = False) -> str:
    """Exit 2 and one `error:` line holding each of ``needles`` on stderr, no traceback (with ``after_warnings``,
    `warning:` lines the run logged before may precede it); returns the line."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not (after_warnings and line.startswith("warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


def tensorboard_events(log_dir: Path, images: bool = False):
    """The TensorBoard events a run wrote into ``log_dir`` (an EventAccumulator, every scalar and image kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0 if images else 1})
    events.Reload()
    return events


def tensorboard_scalars(log_dir: Path) -> dict[str, list]:
    """Every scalar tag of a run's TensorBoard events -> its events (``.step``, ``.value``)."""
    events = tensorboard_events(log_dir)
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount`` (created) with ``options`` ("size=6M", "size=1M,ro") for the block; the test is
    skipped where mounting is not permitted (it needs root, which also writes through any file mode)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
