"""Training state on disk: plain dicts loaded with ``weights_only=True``, written atomically, resumable.

A training checkpoint holds ``model`` (state dict), ``optimizer``, ``scaler``, ``epoch``, ``args`` (the run's
resolved settings), ``rng`` (python/numpy/torch states, one entry per rank), ``generators`` (states of the
model's own ``torch.Generator``s) and ``extra`` (best accuracy, EMA weights, ...). What the model *is* (encoder
architecture, registered model name and settings) is added by the caller from ``models.checkpoint``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn

from util.misc import get_rank, get_world_size, is_dist, is_main_process, print0, rng_state, set_rng_state


def load_file(path: str) -> dict:
    """torch.load with weights_only=True and one clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # official MAE/DeiT/Scala files pickle their flags as an argparse.Namespace: allow that one class
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, then rename: a killed job never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _gather_rng_states() -> list[dict]:
    if not is_dist():
        return [rng_state()]
    states: list = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The model's own ``torch.Generator`` attributes (e.g. XTRA's order choice), by module path. Their states
    go into checkpoints next to the global RNG states, so that a resumed run continues their sequences."""
    return {f"{path}.{attr}" if path else attr: value for path, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Generator)}


def training_state(model: nn.Module, epoch: int, settings: dict, optimizer: torch.optim.Optimizer | None = None,
                   scaler_state: dict | None = None, extra: dict | None = None) -> dict:
    """Everything needed to continue training after ``epoch``. Every rank must call it (RNG states are
    gathered); only rank 0's result is written."""
    return {"model": model.state_dict(), "epoch": epoch, "args": dict(settings),
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "scaler": scaler_state or {},
            "rng": _gather_rng_states(),
            "generators": {k: g.get_state() for k, g in module_generators(model).items()}, "extra": extra or {}}


def save_checkpoint(state: dict, output_dir: str, epoch: int, epochs: int, save_freq: int, keep_last: int) -> None:
    """On rank 0: ``checkpoint-<epoch>.pth`` every ``save_freq`` epochs and at the last epoch (only the
    ``keep_last`` newest numbered ones are kept; 0 = all), then ``checkpoint-last.pth``, which commits the epoch."""
    if not output_dir or not is_main_process():
        return
    if (epoch + 1) % save_freq == 0 or epoch + 1 == epochs:
        save_atomic(state, os.path.join(output_dir, f"checkpoint-{epoch}.pth"))
        if keep_last > 0:
            found = [(re.search(r"checkpoint-(\d+)\.pth$", p), p)
                     for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))]
            numbered = sorted((int(m.group(1)), p) for m, p in found if m)
            for _, old in numbered[:-keep_last]:
                os.remove(old)
    save_atomic(state, os.path.join(output_dir, "checkpoint-last.pth"))


# ---------------------------------------------------------------------------------------------------
# A run's files survive a kill at any point. Each epoch writes, in this order: its log.txt line, its other files
# (encoder.pth, checkpoint-best.pth, checkpoint-<epoch>.pth), then checkpoint-last.pth, which commits the epoch;
# after the last epoch and whatever follows it, done.json says the run is complete. A rerun removes torn
# temporary files, drops log lines of epochs that were not committed, redoes the first uncommitted epoch, and
# finishes whatever is missing.
DONE = "done.json"


def write_json_line(output_dir: str, record: dict) -> None:
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def clean_start(output_dir: str, last_committed: int) -> None:
    """On rank 0 before a run writes anything: remove this project's torn temporary files and the log lines of
    epochs after ``last_committed`` (-1: none), so that log.txt and the checkpoints agree."""
    if not output_dir or not is_main_process() or not os.path.isdir(output_dir):
        return
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp.*")):
        os.remove(tmp)
    log = os.path.join(output_dir, "log.txt")
    if os.path.isfile(log):
        with open(log) as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if json.loads(line).get("epoch", -1) <= last_committed]
        if kept != lines:
            tmp = f"{log}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, log)


def commit_epoch(output_dir: str, epoch: int, record: dict, state: dict, epochs: int, save_freq: int,
                 keep_last: int, files: dict[str, dict] | None = None) -> None:
    """Write an epoch's results in the crash-safe order: the log line, ``files`` (name -> contents), the numbered
    checkpoint when due, and checkpoint-last.pth last."""
    write_json_line(output_dir, record)
    if output_dir and is_main_process():
        for name, contents in (files or {}).items():
            save_atomic(contents, os.path.join(output_dir, name))
    save_checkpoint(state, output_dir, epoch, epochs, save_freq, keep_last)


def finish_run(output_dir: str, epochs: int) -> None:
    """Record that the run completed all ``epochs`` and what follows them (written last)."""
    if output_dir and is_main_process():
        tmp = os.path.join(output_dir, f"{DONE}.tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"epochs": epochs}, f)
        os.replace(tmp, os.path.join(output_dir, DONE))


def finished(output_dir: str, epochs: int) -> bool:
    """Whether done.json records a completed run of ``epochs`` epochs."""
    path = os.path.join(output_dir, DONE) if output_dir else ""
    if not path or not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("epochs") == epochs


def resume_path(resume: str, output_dir: str, auto_resume: bool) -> str:
    """--resume, else output_dir/checkpoint-last.pth when it exists and auto-resume is on, else ''."""
    if resume:
        return resume
    last = os.path.join(output_dir, "checkpoint-last.pth") if output_dir else ""
    return last if auto_resume and last and os.path.isfile(last) else ""


def resume(ckpt: dict, path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
           optim_step=None) -> tuple[int, dict]:
    """Continue from a loaded training checkpoint: model (strict), optimizer and scaler (when given), the model's
    own generators and this rank's RNG state. Returns (first epoch to run, the checkpoint's ``extra``)."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:  # another model's checkpoint, or other settings
        raise ValueError(f"{path} does not fit this model: {' '.join(str(e).split())[:300]}") from None
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
        if optim_step is not None:
            optim_step.load_state_dict(ckpt.get("scaler") or {})
    for name, generator in module_generators(model).items():
        if name in ckpt.get("generators", {}):
            generator.set_state(ckpt["generators"][name])
    rng = ckpt.get("rng") or []
    if len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        print0(f"warning: checkpoint has RNG states for {len(rng)} ranks, running {get_world_size()}; not restored")
    start_epoch = ckpt["epoch"] + 1
    print0(f"resumed from {path} (epoch {ckpt['epoch']}), continuing at epoch {start_epoch}")
    return start_epoch, ckpt.get("extra", {})
