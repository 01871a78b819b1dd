"""The first hour on a GPU node, in one command: versions, every method's training runs on the device against the
CPU, the attention kernels, torch.compile's graph breaks, B/16 throughput, XTRA-H/14 memory and the input pipeline.

    python -m benchmarks.gpu_check --json gpu_check.json            # one GPU (plus the 2-GPU part if 2 are visible)
    python -m benchmarks.gpu_check --sections correctness sdpa      # a subset
    python -m benchmarks.gpu_check --device cpu                     # the reduced CPU form (seconds)

Sections, in the order they run:

* versions: torch, CUDA and cuDNN, NCCL, the GPUs (and whether MFU knows their peak bf16 FLOP/s), the CPUs.
* correctness: each method's tiny preset trains two epochs on the digits (batch 64) on the device in bf16, as its
  entry script run by a user: eager, --compile, --grad_ckpt and --fsdp (one process). Each run's per-epoch
  train_loss in log.txt must match the CPU fp32 run of the same seed within the preset's stated tolerance (TOLERANCE,
  calibrated below).
* compile: graph breaks (distinct reasons), graphs and recompiles of the --compile runs above, from torch._dynamo's
  counters and its recompile log, read inside the run (this script's --worker runs the entry script's main).
* sdpa: the scaled_dot_product_attention kernels of one training step of each method (B/16 presets on CUDA, tiny
  presets on CPU), from the profiler's op names: flash, efficient, cudnn, or the slow math fallback.
* throughput: each method's B/16 preset, batch 64, bf16: img/s, MFU and peak memory of a training step, eager and
  (XTRA-B by default, --b16_compiled for others) compiled; benchmarks.throughput measures it.
* h14: XTRA-H/14 at batch 32 in bf16 on one GPU: peak memory and step time with and without --grad_ckpt.
* input: the pretraining input pipeline's img/s per loader worker (CPU decoding), and batched
  torchvision.io.decode_jpeg on the GPU; benchmarks.input_pipeline measures it.
* syncs: host synchronisations per optimiser update of an XTRA run on the GPU (torch.cuda.set_sync_debug_mode, in
  two runs of 8 and 16 updates): the training loop reads the device once per update. Its runs are made with the
  correctness section's, so that they do not share the GPU with the timed sections.
* multi_gpu (2 or more GPUs): XTRA under torchrun with 2 ranks, DDP and --fsdp against the CPU; SIGTERM inside an
  epoch and the same command again (compared with an uninterrupted run, --deterministic); the sharded checkpoint
  resumed by one GPU; python -m models.convert --consolidate.

Each check is a row: section, check, status (ok, FAIL, or skip: why), value, expected. A line per row goes to
stderr as it completes, the table to stdout at the end, and --json PATH is rewritten after every row. The first
FAIL ends the run (exit 1) unless --keep_going. Every run's command output and directory stay under --out (a
temporary directory, removed after a run without FAIL, when not given).

--device cpu is the reduced form the test suite runs: one method's bf16 run against fp32 on synthetic images, the
CPU's attention kernels, a tiny throughput row and a small input-pipeline row; rows that need a GPU say skip.
On CPU, compile and multi_gpu take minutes: they run only when named in --sections (multi_gpu: 2 gloo ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

import models
from benchmarks.input_pipeline import gpu_decode_rate, images_per_second, make_jpegs
from benchmarks.throughput import count_flops, measure, method_forward, mfu, peak_flops, train_step
from models.registry import model_names
from models.stand_ins import stand_in_teacher, tiny_model_names
from util.checkpoint import POINTER
from util.errors import run_cli
from util.parallel import recompute_blocks
from util.suite import flag_words
from util.train_loop import adamw

assert models  # importing the package registers every method
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("versions", "correctness", "compile", "sdpa", "throughput", "h14", "input", "syncs", "multi_gpu")
CPU_ON_REQUEST = {"compile": "about a minute per compile", "multi_gpu": "2 gloo ranks, minutes"}
# Seconds on one H100, estimated from the runs × their start-up and steps (the table prints the elapsed seconds next
# to them). correctness: 25 processes, 8 at a time (5 CPU fp32 references of up to 20 s, 15 device runs of ~10 s:
# interpreter, CUDA, 44 steps; 5 --compile runs of ~40 s: compiling a tiny preset); compile reads those runs; sdpa:
# 5 B/16 models built on the CPU (~3 s each) and one step; throughput: 5 B/16 presets × (build + 2 warm-up + 5 timed
# + 1 counted steps) + compiling XTRA-B (~60 s); h14: building XTRA-H/14 (~10 s) and 2 × 4 steps; input: 512 JPEGs
# written, 2 passes, GPU decoding; syncs: 2 runs, made with correctness's; multi_gpu: 3 torchrun launches together,
# then 2, then the consolidation (~15 s each round).
ESTIMATE_S = {"versions": 2, "correctness": 90, "compile": 0, "sdpa": 20, "throughput": 95, "h14": 25, "input": 15,
              "syncs": 0, "multi_gpu": 60}

PRETRAIN_TINY, SLIMMABLE_TINY = tiny_model_names("pretrain"), tiny_model_names("slimmable")
TINY = [*PRETRAIN_TINY, *SLIMMABLE_TINY]
B16 = sorted(n for n in [*model_names("pretrain"), *model_names("slimmable")] if n.endswith("_base_patch16"))
H14 = "xtra_vit_huge_patch14"
TWO_RANK_MODEL = "xtra_vit_tiny"  # draws no random numbers on the device: only precision separates it from the CPU

# Largest relative difference of a bf16 run's per-epoch train_loss from the CPU fp32 run's. Calibrated on the CPU
# (2-core AMD EPYC, torch 2.14.1) with these runs (digits, batch 64, 2 epochs), as relative differences per epoch:
#   bf16 vs fp32:              xtra 2.5e-5, mae 5.9e-5, saim 1.6e-4, digpt 2.4e-2, scala 4.9e-6
#   --fsdp bf16 vs fp32:       xtra 1.0e-4, mae 5.6e-4, saim 4.0e-4, scala 6.5e-6 (digpt cannot: see below)
#   another mask stream, fp32: mae 1.0e-3, saim 4.6e-4, digpt 1.3e-2 (a GPU draws the masks from its own generator;
#                              scala's drop-path: --seed 1, init included, 1.6e-3; xtra draws nothing on the device)
#   no update (--lr 1e-9):     xtra 3.7e-1, mae 1.6, saim 5.6e-1, digpt 4.4e-1, scala 4.2e-3 (the largest epoch)
# so 1e-2 is ≥ 6× the noise and below a broken update for all but Scala (whose loss hardly moves in 2 epochs), and
# D-iGPT's bf16 teacher targets need 8e-2 (2× its bf16 + mask-stream noise). On CPU, --fsdp --amp bf16 fails for
# digpt_vit_tiny: CPU LayerNorm refuses fp32 inputs with FSDP's bf16 weights (CUDA autocast runs it in fp32).
TOLERANCE = {"digpt_vit_tiny": 8e-2}
DEFAULT_TOLERANCE = 1e-2

RUN_TIMEOUT_S = 300  # a run that hangs (a collective waiting for a rank that died) is killed
# The training runs' data: the digits on a GPU (losses that move); a handful of synthetic steps in the reduced form.
DATA = {"cuda": ["--dataset", "digits", "--epochs", "2"],
        "cpu": ["--dataset", "synthetic", "--synthetic_size", "64", "--epochs", "2"]}
BATCH = {"cuda": 64, "cpu": 16}
TWO_RANK_DATA = {"cuda": ["--dataset", "digits", "--epochs", "2"],  # 8 per rank: 89 steps per epoch
                 "cpu": ["--dataset", "synthetic", "--synthetic_size", "256", "--epochs", "2"]}
SCALA_FLAGS = ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--eval_ratios", "1",
               "--throughput_iters", "1", "--full_warm_epochs", "1"]
SDPA_PREFIX = "aten::_scaled_dot_product_"


def tolerance(preset: str) -> float:
    return TOLERANCE.get(preset, DEFAULT_TOLERANCE)


# ---------------------------------------------------------------------------------------------------
# Rows
@dataclass
class Row:
    section: str
    check: str
    status: str  # "ok", "FAIL" or "skip: <why>"
    value: str
    expected: str


class FirstFailure(Exception):
    """A FAIL row without --keep_going: the run ends after the table and the JSON."""


@dataclass
class Report:
    json_path: Path | None
    keep_going: bool
    meta: dict
    rows: list[Row] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)

    deferring: bool = False

    def add(self, section: str, check: str, status: str, value: str = "", expected: str = "") -> None:
        row = Row(section, check, status, value, expected)
        self.rows.append(row)
        print(f"[gpu_check] {section} | {check} | {status}" + (f" | {value}" if value else ""), file=sys.stderr,
              flush=True)
        self.write()
        if status == "FAIL" and not self.keep_going and not self.deferring:
            raise FirstFailure(check)

    @contextlib.contextmanager
    def finished_runs(self):
        """Rows of runs that are already done: all of them are reported, then the first FAIL ends the check."""
        before, self.deferring = len(self.rows), True
        try:
            yield
        finally:
            self.deferring = False
        failed = [r for r in self.rows[before:] if r.status == "FAIL"]
        if failed and not self.keep_going:
            raise FirstFailure(failed[0].check)

    def write(self) -> None:
        if self.json_path is None:
            return
        data = {**self.meta, "status": "FAIL" if self.failed else "ok", "rows": [asdict(r) for r in self.rows],
                "seconds": {s: {"elapsed": round(t, 1), "estimate_h100": ESTIMATE_S[s]}
                            for s, t in self.seconds.items()}}
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.json_path)  # a reader never sees half a file

    def table(self) -> str:
        cells = [[r.section, r.check, r.status, r.value, r.expected] for r in self.rows]
        lines = ["| section | check | status | value | expected |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        estimate = self.meta["device"] == "cuda"
        timing = ", ".join(f"{s} {t:.0f} s" + (f" (H100 estimate {ESTIMATE_S[s]} s)" if estimate else "")
                           for s, t in self.seconds.items())
        return "\n".join(lines) + f"\n\nseconds per section: {timing}; total {sum(self.seconds.values()):.0f} s"


# ---------------------------------------------------------------------------------------------------
# Runs: the entry scripts as a user types them, in parallel, each in a process group of its own
@dataclass
class Run:
    name: str  # its output directory under --out, and its command's output file <name>.txt
    cmd: list[str]
    out: Path
    result: Path | None = None  # the --worker's counts
    stop_at: str | None = None  # SIGTERM to the process at the first output line matching this
    slow: bool = False  # started first (compiling)
    fresh: bool = True  # its directory is emptied first: a directory left by an earlier check would be resumed
    returncode: int | None = None
    output: str = ""
    seconds: float = 0.0

    def failure(self) -> str | None:
        """Why the run failed (its error line, the last line of a traceback, or the exit code), else None."""
        if self.returncode == 0:
            return None
        lines = [line for line in self.output.splitlines() if line.strip()]
        # the project's one error line; else the first exception (a worker's, before torchrun's ChildFailedError)
        said = [line for line in lines if line.startswith(("error:", "stopped:"))] or \
            [line for line in lines if re.match(r"(\[rank\d+\]: )?\w+(\.\w+)*(Error|Exception)\b", line)][:1] or \
            lines[-1:]
        return f"exit {self.returncode}: {said[-1][:200] if said else 'no output'} (output: {self.log_file})"

    @property
    def log_file(self) -> Path:
        return self.out.parent / f"{self.name}.txt"

    def log(self) -> list[dict]:
        """log.txt's records (one per epoch)."""
        path = self.out / "log.txt"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def losses(self) -> dict[int, float]:
        """train_loss per epoch (Scala's closing evaluation record has none)."""
        return {r["epoch"]: r["train_loss"] for r in self.log() if "train_loss" in r}

    def counts(self) -> dict:
        return json.loads(self.result.read_text()) if self.result and self.result.is_file() else {}


class Check:
    """One gpu_check invocation: its device, work directory, the runs done so far (by name, shared by sections)."""

    def __init__(self, args: argparse.Namespace, report: Report, out: Path):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda" if self.cuda else "cpu"
        self.report, self.out, self.jobs = report, out, args.jobs
        self.named = set(args.sections or [])
        self.wanted = self.named or set(SECTIONS)
        self.b16_compiled = args.b16_compiled
        self.threads = int(os.environ.get("OMP_NUM_THREADS", max(1, (os.cpu_count() or 1) // self.jobs)))
        self.done: dict[str, Run] = {}
        self.live: set[subprocess.Popen] = set()
        self.lock, self.stopping = threading.Lock(), False
        self.teachers: dict[str, list[str]] = {}
        self.step_img_s: dict[str, float] = {}  # eager B/16 img/s, for the input section's workers per GPU
        self.gpus = torch.cuda.device_count() if self.cuda else 0

    # --- building runs ---------------------------------------------------------------------------------
    def teacher_flags(self, preset: str) -> list[str]:
        """A random teacher of the right shape for a method that needs one, written once under --out."""
        if preset not in self.teachers:
            overrides = stand_in_teacher(preset, str(self.out / f"{preset}-teacher.pth"))
            self.teachers[preset] = flag_words(overrides)
        return self.teachers[preset]

    def train_argv(self, preset: str, device: str, amp: str, batch: int, data: list[str], flags: Sequence[str],
                   out: Path, print_freq: int) -> tuple[str, list[str]]:
        """(the entry script's module, its arguments) of a training run."""
        script = "main_slimmable" if preset in SLIMMABLE_TINY else "main_pretrain"
        argv = ["--model", preset, *data, "--batch_size", str(batch), "--num_workers", "0", "--print_freq",
                str(print_freq),
                "--device", device, "--amp", amp, *(SCALA_FLAGS if script == "main_slimmable" else []),
                *self.teacher_flags(preset), *flags, "--output_dir", str(out)]
        return script, argv

    def train(self, name: str, preset: str, device: str, amp: str, flags: Sequence[str] = (), *, nproc: int = 0,
              batch: int | None = None, data: list[str] | None = None, worker: dict | None = None,
              stop_at: str | None = None, print_freq: int = 1000, out: Path | None = None) -> Run:
        """A training run named ``name`` (its directory: ``out``, default --out/name): ``python main_x.py ...``
        (under torchrun with ``nproc``), or through this script's --worker (``worker``: what it counts) to read
        counters inside the run."""
        out = out or self.out / name
        script, argv = self.train_argv(preset, device, amp, batch or BATCH[self.kind], data or DATA[self.kind],
                                       flags, out, print_freq)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
        if worker is None:
            return Run(name, [sys.executable, *launcher, f"{script}.py", *argv], out, stop_at=stop_at)
        spec = self.out / f"{name}.spec.json"
        result = self.out / f"{name}.counts.json"
        spec.write_text(json.dumps({"script": script, "argv": argv, "result": str(result), **worker}))
        return Run(name, [sys.executable, *launcher, "-m", "benchmarks.gpu_check", "--worker", str(spec)], out,
                   result=result, stop_at=stop_at, slow=True)

    def reference(self, preset: str, batch: int | None = None, data: list[str] | None = None) -> Run:
        """The CPU fp32 run a device run is compared with."""
        suffix = f"-b{batch}" if batch else ""
        return self.train(f"{preset}-cpu-fp32{suffix}", preset, "cpu", "off", batch=batch, data=data)

    # --- running them ----------------------------------------------------------------------------------
    def execute(self, runs: list[Run]) -> list[Run]:
        """Run those not run yet, ``--jobs`` at a time (compiling ones first); returns the runs as done."""
        new = {r.name: r for r in runs if r.name not in self.done}
        todo_runs = sorted(new.values(), key=lambda r: not r.slow)
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            list(pool.map(self._execute, todo_runs))
        except BaseException:  # Ctrl-C or a crash: no run outlives the check
            pool.shutdown(wait=False, cancel_futures=True)
            self.stop_all()
            raise
        finally:
            pool.shutdown()
        self.done.update({r.name: r for r in todo_runs})
        return [self.done[r.name] for r in runs]

    def _execute(self, run: Run) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        if run.fresh:
            shutil.rmtree(run.out, ignore_errors=True)
        if run.result:
            run.result.unlink(missing_ok=True)
        start = time.perf_counter()
        with self.lock:
            if self.stopping:
                raise RuntimeError("stopped")
            proc = subprocess.Popen(run.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            self.live.add(proc)
        watchdog = threading.Timer(RUN_TIMEOUT_S, self._kill, (proc,))
        watchdog.start()
        lines, signalled = [], False
        try:
            for line in proc.stdout:
                lines.append(line)
                if run.stop_at and not signalled and re.search(run.stop_at, line):
                    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
                    signalled = True
            run.returncode = proc.wait()
        finally:
            watchdog.cancel()
            self.live.discard(proc)
        timed_out = time.perf_counter() - start >= RUN_TIMEOUT_S
        run.output = "".join(lines) + (f"\nerror: killed after {RUN_TIMEOUT_S} s\n" if timed_out else "")
        run.seconds = time.perf_counter() - start
        run.log_file.write_text(" ".join(run.cmd) + "\n\n" + run.output)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the group of its own session

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in list(self.live):
                self._kill(proc)

    # --- rows ------------------------------------------------------------------------------------------
    def add(self, section: str, check: str, status: str, value: str = "", expected: str = "") -> None:
        self.report.add(section, check, status, value, expected)

    def attempt(self, section: str, check: str, rows: Callable[[], None]) -> None:
        """``rows()``, which adds a check's rows in this process; a crash (a CUDA error, out of memory) is a FAIL
        row of that check, its tensors freed with its frames."""
        try:
            rows()
        except FirstFailure:
            raise
        except Exception as e:
            traceback.print_exc()
            self.add(section, check, "FAIL", crash_message(e), "no exception")
        finally:
            free_memory()

    def compare(self, section: str, check: str, run: Run, ref: Run, tol: float, epochs: list[int] | None = None,
                against: str = "the CPU fp32 run") -> None:
        """A row: ``run``'s per-epoch train_loss within ``tol`` (relative) of ``ref``'s."""
        expected = f"≤ {tol:g} rel. of {against}, per epoch"
        for r in (run, ref):
            if r.failure():
                return self.add(section, check, "FAIL", f"{r.name}: {r.failure()}", expected)
        got, want = run.losses(), ref.losses()
        epochs = epochs if epochs is not None else sorted(want)
        if not epochs or any(e not in got or e not in want for e in epochs):
            return self.add(section, check, "FAIL", f"epochs logged: {sorted(got)} vs {sorted(want)} (output: "
                            f"{run.log_file})", expected)
        diff = max(abs(got[e] - want[e]) / max(abs(want[e]), 1e-12) if math.isfinite(got[e]) else math.inf
                   for e in epochs)
        value = f"train_loss {fmt([got[e] for e in epochs])} vs {fmt([want[e] for e in epochs])}: {diff:.1e}"
        self.add(section, check, "ok" if diff <= tol else "FAIL", value, expected)

    def skip_unless(self, section: str, needs_cuda: bool = False) -> str | None:
        """Why ``section`` is skipped here, if it is."""
        if needs_cuda and not self.cuda:
            return "skip: no CUDA"
        if not self.cuda and section in CPU_ON_REQUEST and section not in self.named:
            return f"skip: slow on CPU ({CPU_ON_REQUEST[section]}; --sections {section} runs it)"
        return None


def fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def crash_message(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Sections
def versions(ck: Check) -> None:
    s = "versions"
    ck.add(s, "torch", "ok", f"{torch.__version__} (git {(torch.version.git_version or '?')[:8]}), Python "
           f"{sys.version.split()[0]}")
    ck.add(s, "CPU", "ok", f"{os.cpu_count()} CPUs; training runs: {ck.jobs} at a time, OMP_NUM_THREADS="
           f"{ck.threads}")
    if not ck.cuda:
        for check in ("CUDA", "NCCL", "GPU"):
            ck.add(s, check, "skip: no CUDA", "--device cpu", "")
        return
    if not torch.cuda.is_available():
        return ck.add(s, "CUDA", "FAIL", f"not available (torch built with CUDA {torch.version.cuda}); --device cpu "
                      "runs the reduced form", "a visible GPU")
    driver = ""
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        driver = f", driver {query.stdout.split()[0]}" if query.returncode == 0 and query.stdout.split() else ""
    ck.add(s, "CUDA", "ok", f"runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}{driver}")
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    version = torch.cuda.nccl.version() if nccl else None  # (major, minor, patch), an int in older releases
    ck.add(s, "NCCL", "ok" if nccl else "FAIL", ".".join(map(str, version)) if isinstance(version, tuple) else
           str(version or "not available"), "available (DDP, FSDP)")
    props = torch.cuda.get_device_properties(0)
    peak = peak_flops(props.name)
    value = (f"{ck.gpus} × {props.name} (sm_{props.major}{props.minor}, {gib(props.total_memory)}); MFU against "
             + (f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else "no known peak (benchmarks.throughput.PEAK_TFLOPS)"))
    ck.add(s, "GPU", "ok" if torch.cuda.is_bf16_supported() else "FAIL", value, "supports bf16")


def correctness(ck: Check) -> None:
    presets = TINY if ck.cuda else ["xtra_vit_tiny"]  # reduced form: one method, a handful of steps
    variants = {"eager": [], "--compile": ["--compile"], "--grad_ckpt": ["--grad_ckpt"], "--fsdp": ["--fsdp"]}
    runs = {p: ck.reference(p) for p in presets}
    device_runs = {}
    for p in presets:
        for v, flags in variants.items():
            if v != "eager" and not ck.cuda:
                continue
            device_runs[p, v] = compiled_run(ck, p) if v == "--compile" else \
                ck.train(f"{p}-{ck.kind}-bf16-{v.strip('-')}", p, ck.kind, "bf16", flags)
    syncs = [sync_run(ck, n) for n in (256, 512)] if ck.cuda and "syncs" in ck.wanted else []
    ck.execute([*runs.values(), *device_runs.values(), *syncs])
    with ck.report.finished_runs():
        correctness_rows(ck, presets, variants, runs, device_runs)


def correctness_rows(ck: Check, presets: list[str], variants: dict, runs: dict[str, Run],
                     device_runs: dict[tuple[str, str], Run]) -> None:
    s = "correctness"
    for p in presets:
        ref = ck.done[runs[p].name]
        losses = ref.losses()
        ck.add(s, f"{p} CPU fp32 (reference)", "ok" if not ref.failure() and sorted(losses) == [0, 1] else "FAIL",
               ref.failure() or f"train_loss {fmt(list(losses.values()))}", "epochs 0 and 1 logged, exit 0")
        for v in variants:
            check = f"{p} {ck.kind} bf16 {v}"
            if (p, v) not in device_runs:
                ck.add(s, check, "skip: reduced CPU form", "", "")
                continue
            ck.compare(s, check, ck.done[device_runs[p, v].name], ref, tolerance(p))


def compiled_run(ck: Check, preset: str) -> Run:
    """The --compile run of a preset, through --worker: it reports torch._dynamo's counters (the compile section)."""
    return ck.train(f"{preset}-{ck.kind}-bf16-compile", preset, ck.kind, "bf16", ["--compile"],
                    worker={"count_syncs": False})


def sync_run(ck: Check, images: int) -> Run:
    """One epoch of XTRA on the device with CUDA's synchronisation warnings counted (--worker)."""
    data = ["--dataset", "synthetic", "--synthetic_size", str(images), "--epochs", "1"]
    return ck.train(f"syncs-{images}", "xtra_vit_tiny", "cuda", "bf16", batch=32, data=data,
                    worker={"count_syncs": True})


def syncs(ck: Check) -> None:
    """Host synchronisations per optimiser update: the difference of two runs of 8 and 16 updates (what a run does
    once, its start and its epoch's end, cancels)."""
    check, expected = "xtra_vit_tiny host syncs per update", "1 (one read per optimiser update)"
    if not ck.cuda:
        return ck.add("syncs", check, "skip: no CUDA", "torch.cuda.set_sync_debug_mode", "")
    short, long = ck.execute([sync_run(ck, n) for n in (256, 512)])
    for run in (short, long):
        if run.failure():
            return ck.add("syncs", check, "FAIL", f"{run.name}: {run.failure()}", expected)
    counts = [r.counts().get("sync_warnings", 0) + r.output.count("called a synchronizing CUDA operation")
              for r in (short, long)]
    per_update = (counts[1] - counts[0]) / 8
    ck.add("syncs", check, "ok" if per_update == 1 else "FAIL",
           f"{per_update:g} ({counts[0]} and {counts[1]} in runs of 8 and 16 updates)", expected)


def compile_section(ck: Check) -> None:
    s = "compile"
    why = ck.skip_unless(s)
    presets = TINY if ck.cuda else ["xtra_vit_tiny"]
    if why:
        return ck.add(s, "graph breaks, recompiles", why, "", "")
    runs = ck.execute([compiled_run(ck, p) for p in presets])
    with ck.report.finished_runs():
        for p, run in zip(presets, runs):
            compile_row(ck, p, run)


def compile_row(ck: Check, preset: str, run: Run) -> None:
    check, expected = f"{preset} --compile", "reported (each break splits a graph; recompiles cost time)"
    if run.failure():
        return ck.add("compile", check, "FAIL", run.failure(), expected)
    c = run.counts()
    reasons = "; ".join(c["break_reasons"])
    ck.add("compile", check, "ok", f"graph breaks {c['graph_breaks']} ({c['break_kinds']} distinct"
           f"{': ' + reasons if reasons else ''}), graphs {c['unique_graphs']}, recompiles {c['recompiles']}",
           expected)


def sdpa(ck: Check) -> None:
    """One training step of each method under the profiler: which SDPA kernels ran."""
    args = argparse.Namespace(batch_size=2, amp="bf16")
    for p in B16 if ck.cuda else TINY:
        ck.attempt("sdpa", p, lambda p=p: sdpa_row(ck, p, args))


def sdpa_row(ck: Check, preset: str, args: argparse.Namespace) -> None:
    model, forward = method_forward(preset, args, ck.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the aten op names: no device trace needed
        forward().backward()
    kernels = {e.key[len(SDPA_PREFIX):]: e.count for e in prof.key_averages() if e.key.startswith(SDPA_PREFIX)}
    value = ", ".join(f"{k} ×{n}" for k, n in sorted(kernels.items())) or "no scaled_dot_product_attention call"
    if any("math" in k for k in kernels):
        value += " — math fallback: no fused kernel takes these calls (mask, shape or dtype)"
    ck.add("sdpa", preset, "ok" if kernels else "FAIL", value,
           "fused (flash / efficient / cudnn); math is the slow path")


def throughput(ck: Check) -> None:
    """Training-step img/s, MFU and peak memory: the B/16 presets on CUDA, one tiny preset on the CPU."""
    batch = 64 if ck.cuda else 8
    args = argparse.Namespace(batch_size=batch, amp="bf16", warmup=2 if ck.cuda else 1, rounds=1,
                              iters=5 if ck.cuda else 2)
    for p in B16 if ck.cuda else ["xtra_vit_tiny"]:
        ck.attempt("throughput", p, lambda p=p: throughput_rows(ck, p, args))
        torch._dynamo.reset()


def throughput_rows(ck: Check, preset: str, args: argparse.Namespace) -> None:
    s, expected = "throughput", f"batch {args.batch_size}, bf16, best of {args.rounds} × {args.iters} steps"
    model, forward = method_forward(preset, args, ck.device)
    opt = adamw(model.parameters(), lr=1e-4)
    steps = {"eager": train_step(forward, opt)}
    if preset in ck.b16_compiled and ck.cuda:
        steps["compiled"] = train_step(torch.compile(forward), opt)
    result = measure(steps, args, ck.device)
    flops = count_flops(steps["eager"])
    for label in ("eager", "compiled"):
        if label not in steps:
            why = f"skip: not by default (--b16_compiled {preset})" if ck.cuda else "skip: reduced CPU form"
            ck.add(s, f"{preset} {label}", why, "", "")
            continue
        img_s = result[f"{label}_img_s"]
        value = f"{img_s:.1f} img/s"
        if ck.cuda:
            peak = gib(result[f"{label}_mem_MB"] * 2**20)
            value += f", MFU {mfu(flops, img_s, args, ck.device):.1f} %, peak {peak}"
        ck.add(s, f"{preset} {label}", "ok" if img_s > 0 else "FAIL", value, expected)
    ck.step_img_s[preset] = result["eager_img_s"]


def h14(ck: Check) -> None:
    """XTRA-H/14 at batch 32, bf16, one GPU: peak memory and step time with full activations and with every block
    recomputed (--grad_ckpt's recompute_blocks), the model state (weights, AdamW moments) included."""
    s = "h14"
    if not ck.cuda:
        return ck.add(s, f"{H14} batch 32", "skip: no CUDA", "", "")
    args = argparse.Namespace(batch_size=32, amp="bf16", warmup=1, rounds=1, iters=3)
    total = torch.cuda.get_device_properties(ck.device).total_memory
    model, forward = method_forward(H14, args, ck.device)
    opt = adamw(model.parameters(), lr=1e-4)
    found: dict[str, tuple[float, float] | None] = {}
    state = 0.0
    for label in ("full activations", "--grad_ckpt"):
        if label == "--grad_ckpt":
            recompute_blocks(model.transformer_blocks())
        try:
            result = measure({label: train_step(forward, opt)}, args, ck.device)
            found[label] = (result[f"{label}_mem_MB"] * 2**20, args.batch_size / result[f"{label}_img_s"])
            state = torch.cuda.memory_allocated()  # after a step: weights and AdamW moments, gradients freed
        except torch.OutOfMemoryError:
            found[label] = None
        if found[label] is None:  # after the except block: its traceback held the step's tensors
            opt.zero_grad(set_to_none=True)
            free_memory()
        peak_step = found[label]
        value = f"peak {gib(peak_step[0])} of {gib(total)}, {peak_step[1]:.3f} s/step" if peak_step else \
            f"out of memory ({gib(total)})"
        ck.add(s, f"{H14} batch 32, {label}", "ok", value, "peak allocated, s/step (3 steps)")
    del model, forward, opt
    free_memory()
    full, ckpt = found["full activations"], found["--grad_ckpt"]
    expected = "the README's recipe: --fsdp --grad_ckpt at batch 32"
    if ckpt is None:
        return ck.add(s, "--grad_ckpt at batch 32", "FAIL", "out of memory even with --grad_ckpt", expected)
    if full is None:
        verdict = "needed: without it one GPU runs out of memory"
    else:
        step = full[0] - state  # activations, and gradients (which --fsdp shards too)
        verdict = (f"saves {gib(full[0] - ckpt[0])} at +{100 * (ckpt[1] / full[1] - 1):.0f} % step time; without it "
                   f"a step needs {gib(step)} above the weights and AdamW moments ({gib(state)}, sharded by --fsdp): "
                   + ("keep it" if step > 0.8 * total else "optional under --fsdp"))
    ck.add(s, "--grad_ckpt at batch 32", "ok", verdict, expected)


def input_section(ck: Check) -> None:
    s = "input"
    images, workers = (512, (1, 4)) if ck.cuda else (16, (0,))
    root = ck.out / "jpegs"
    make_jpegs(root, images)
    per_worker = []
    for w in workers:
        rate, cold = images_per_second(root, w, images)
        per_worker.append(rate / max(w, 1))
        ck.add(s, f"CPU decode + augmentation, {w} loader workers", "ok" if rate > 0 else "FAIL",
               f"{rate:.0f} img/s, {rate / max(w, 1):.0f} per worker ({'cold' if cold else 'warm'} file cache)",
               f"{images} JPEGs of 500 × 375, RandomResizedCrop 224")
    if not ck.cuda:
        return ck.add(s, "GPU decode_jpeg", "skip: no CUDA", "", "")
    rate = gpu_decode_rate(root, 256)
    ck.add(s, "GPU decode_jpeg", "ok" if rate > 0 else "FAIL", f"{rate:.0f} img/s", "torchvision.io.decode_jpeg, "
           "256 files in one batch")
    if ck.step_img_s:  # the throughput section ran: what its fastest method needs
        fastest = max(ck.step_img_s, key=ck.step_img_s.get)
        need = math.ceil(ck.step_img_s[fastest] / min(per_worker))
        ck.add(s, "loader workers per GPU", "ok", f"{need} for {fastest} at {ck.step_img_s[fastest]:.0f} img/s",
               "eager B/16 step rate ÷ the slowest per-worker rate")


def multi_gpu(ck: Check) -> None:
    """XTRA on 2 ranks (8 images each: the batches of one process with 16): DDP and --fsdp against the CPU fp32 run,
    a SIGTERM inside an epoch and the same command again, the sharded checkpoint resumed by one process, and its
    consolidation into one file."""
    s = "multi_gpu"
    why = "skip: 1 GPU" if ck.cuda and ck.gpus < 2 else ck.skip_unless(s)
    if why:
        return ck.add(s, "2 ranks", why, "", "")
    p, tol, data = TWO_RANK_MODEL, tolerance(TWO_RANK_MODEL), TWO_RANK_DATA[ck.kind]
    amp = "bf16" if ck.cuda else "off"  # CPU: gloo ranks in fp32, compared with the CPU run exactly
    common = dict(batch=8, data=data, print_freq=1)
    sharded = ["--fsdp", "--deterministic", "--save_every_minutes", "0", "--save_freq", "1"]
    ref = ck.reference(p, batch=16, data=data)
    ddp = ck.train("ddp-2", p, ck.kind, amp, nproc=2, **common)
    fsdp = ck.train("fsdp-2", p, ck.kind, amp, sharded, nproc=2, **common)
    stopped = ck.train("fsdp-2-stopped", p, ck.kind, amp, sharded, nproc=2, stop_at=r"Epoch \[0\] \[[1-9]\d*/",
                       **common)
    ck.execute([ref, ddp, fsdp, stopped])
    with ck.report.finished_runs():
        ck.compare(s, "torchrun DDP, 2 × 8 images", ddp, ref, tol)
        ck.compare(s, "torchrun --fsdp, 2 × 8 images", fsdp, ref, tol)
        stopped_row(ck, stopped)
    rerun = ck.train("fsdp-2-rerun", p, ck.kind, amp, sharded, nproc=2, out=stopped.out, **common)  # same command
    rerun.fresh = False  # it continues the stopped run's directory
    one = ck.train("fsdp-1-resumed", p, ck.kind, amp, ["--fsdp", "--resume", str(fsdp.out / "checkpoint-0.dcp")],
                   batch=16, data=data)
    ck.execute([rerun, one])
    with ck.report.finished_runs():
        resumed_row(ck, rerun, fsdp, tol)
        ck.compare(s, "sharded checkpoint of 2 ranks resumed by 1", one, fsdp, tol, epochs=[1],
                   against="the 2-rank run's epoch 1")
    merged = ck.out / "consolidated.pth"
    merged.unlink(missing_ok=True)  # models.convert writes no file over another
    convert = Run("consolidate", [sys.executable, "-m", "models.convert", "--consolidate", str(fsdp.out / POINTER),
                                  str(merged)], ck.out / "consolidate")
    ck.execute([convert])
    consolidated_row(ck, convert, merged, fsdp.out / "encoder.pth")


def stopped_row(ck: Check, stopped: Run) -> None:
    said = [line for line in stopped.output.splitlines() if line.startswith("stopped:")]
    pattern = r"stopped: (SIGTERM at epoch (\d+), step (\d+) of (\d+)); (\S+) holds it"
    where = re.match(pattern, said[0]) if said else None
    expected = "one stopped: line, inside an epoch; its checkpoint; torchrun exit ≠ 0"
    inside = len(said) == 1 and where and int(where[3]) < int(where[4]) and stopped.returncode != 0 and \
        Path(where[5]).exists()
    ck.add("multi_gpu", "SIGTERM to torchrun inside an epoch", "ok" if inside else "FAIL",
           f"{where[1]}, {Path(where[5]).name} committed; exit {stopped.returncode}" if where else
           f"{len(said)} stopped: lines, exit {stopped.returncode} (output: {stopped.log_file})", expected)


def resumed_row(ck: Check, rerun: Run, reference: Run, tol: float) -> None:
    check, expected = "the same command after SIGTERM", f"the uninterrupted run's log.txt (--deterministic); ≤ {tol:g}"
    if rerun.failure() or reference.failure():
        return ck.add("multi_gpu", check, "FAIL", rerun.failure() or reference.failure(), expected)
    got, want = ([{k: v for k, v in rec.items() if k.startswith("train_")} for rec in r.log()]
                 for r in (rerun, reference))
    if got and got == want:
        return ck.add("multi_gpu", check, "ok", "bit-identical", expected)
    ck.compare("multi_gpu", check, rerun, reference, tol, against="the uninterrupted run (not bit-identical)")


def consolidated_row(ck: Check, convert: Run, merged: Path, encoder: Path) -> None:
    check, expected = "models.convert --consolidate", "one file whose encoder equals the run's encoder.pth"
    if convert.failure():
        return ck.add("multi_gpu", check, "FAIL", convert.failure(), expected)
    whole = torch.load(merged, map_location="cpu", weights_only=True)["model"]
    plain = torch.load(encoder, map_location="cpu", weights_only=True)["model"]
    equal = sum(torch.equal(whole.get(f"encoder.{k}", torch.empty(0)), v) for k, v in plain.items())
    ck.add("multi_gpu", check, "ok" if equal == len(plain) else "FAIL",
           f"{len(whole)} tensors; {equal} of the {len(plain)} encoder tensors equal", expected)


SECTION_RUNNERS: dict[str, Callable[[Check], None]] = {
    "versions": versions, "correctness": correctness, "compile": compile_section, "sdpa": sdpa,
    "throughput": throughput, "h14": h14, "input": input_section, "syncs": syncs, "multi_gpu": multi_gpu}


# ---------------------------------------------------------------------------------------------------
# --worker: an entry script's main() with counters read inside its process
class _Counter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def worker(spec_path: str) -> None:
    """Run the spec's entry script as its command line would (run_cli: same exit codes), counting torch._dynamo's
    graph breaks, graphs and recompiles (its recompile log, on) and, with ``count_syncs``, CUDA's synchronising
    operations (set_sync_debug_mode('warn'), one warning each); the counts go to the spec's ``result`` file."""
    spec = json.loads(Path(spec_path).read_text())
    module = importlib.import_module(spec["script"])
    recompiles = _Counter()
    torch._logging.set_logs(recompiles=True)  # the reasons go to the run's output too
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(recompiles)
    caught: list[warnings.WarningMessage] = []
    sys.argv = [f"{spec['script']}.py", *spec["argv"]]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every synchronisation, not one per source line
            if spec["count_syncs"]:
                torch.cuda.set_sync_debug_mode("warn")
            run_cli(module.main)
    finally:
        if spec["count_syncs"]:
            torch.cuda.set_sync_debug_mode(0)
        breaks = torch._dynamo.utils.counters["graph_break"]
        counts = {"graph_breaks": breaks.total(), "break_kinds": len(breaks),
                  "break_reasons": [str(reason).splitlines()[0][:80] for reason in list(breaks)[:3]],
                  "unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                  "recompiles": recompiles.count,
                  "sync_warnings": sum("synchroniz" in str(w.message) for w in caught)}
        Path(spec["result"]).write_text(json.dumps(counts))


# ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the full check; cpu: the reduced form (seconds)")
    parser.add_argument("--json", type=Path, help="write the rows here (rewritten after every row)")
    parser.add_argument("--out", type=Path, help="work directory of the runs (default: a temporary one, removed "
                        "after a run without FAIL)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run these only (default: all)")
    parser.add_argument("--keep_going", action="store_true", help="go on after a FAIL (exit 1 at the end)")
    parser.add_argument("--b16_compiled", nargs="*", choices=B16, default=["xtra_vit_base_patch16"],
                        help="B/16 presets the throughput section also compiles (~1 min each on a GPU)")
    parser.add_argument("--jobs", type=int, default=min(8, max(2, (os.cpu_count() or 1) // 2)),
                        help="training runs at a time (they share the GPU; timed sections run alone)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a spec file: see worker()
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "torch": torch.__version__, "out": str(out),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None}
    report = Report(args.json, args.keep_going, meta)
    check = Check(args, report, out)
    try:
        for section in SECTIONS:
            if args.sections and section not in args.sections:
                continue
            start = time.perf_counter()
            try:  # a crash of the check's own process (CUDA error, out of memory): a FAIL row of the section
                check.attempt(section, "(section)", functools.partial(SECTION_RUNNERS[section], check))
            finally:
                report.seconds[section] = time.perf_counter() - start
            if check.cuda and not torch.cuda.is_available():
                break  # the versions row said why
    except FirstFailure:
        pass
    finally:
        check.stop_all()
        report.write()
        print(report.table(), flush=True)
    if report.failed:
        print(f"FAIL: the runs' output is under {out}", file=sys.stderr)
        raise SystemExit(1)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
