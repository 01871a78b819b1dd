"""Checkpoint files: plain dicts loaded with ``weights_only=True``, written atomically, pruned; sharded directories.

A training checkpoint holds ``model`` (state dict), ``optimizer``, ``scaler``, ``epoch`` (the last completed
epoch), ``args`` (the run's resolved settings), ``rng`` (python/numpy/torch states, one entry per rank),
``generators`` (states of the model's own ``torch.Generator``s) and ``extra`` (best accuracy, EMA weights, ...).
A mid-epoch checkpoint adds ``position``: the epoch it stopped inside, the training images of it already used
(all ranks together) and each rank's running meters. What the model *is* (encoder architecture, registered model
name and settings) is added by the caller from ``models.formats``.

A sharded model (FSDP2) is saved with ``torch.distributed.checkpoint`` instead: ``checkpoint-<epoch>.dcp/`` holds
every rank's shards of the model and optimiser (DCP's files) and ``meta.pt``, the rest of the dict above; the small
pointer ``checkpoint-last.json`` names the last committed one. DCP reshards on load, so a run resumes with any
number of ranks, and ``consolidate`` turns such a directory into a single-file checkpoint.

The run's lifecycle around these files (start, commit, resume, finish) is ``util.run``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from util.distributed import barrier, gather_objects, is_dist, is_main_process, is_sharded
from util.errors import UserError
from util.parallel import full_state_dict
from util.paths import inside
from util.rng import rng_state
from util.safe_dcp import SafePlanner, SafeReader, load_failure, read_metadata

POINTER = "checkpoint-last.json"  # names the last committed sharded checkpoint
META = "meta.pt"


def sharded_dir(path: str) -> str | None:
    """The sharded checkpoint directory that ``path`` (a ``.dcp`` directory or a pointer file) designates."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, META)):
        return path
    if path.endswith(".json") and os.path.isfile(path):
        try:
            with open(path) as f:
                name = json.load(f)["checkpoint"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read checkpoint pointer {path}: {type(e).__name__}: {e}") from None
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UserError(f"checkpoint pointer {path} names {name!r}, not a directory beside it", every_rank=True)
        return inside(os.path.dirname(path), name, f"{name} (named by {path})")
    return None


def sharded_weights(directory: str) -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint as plain CPU tensors, read in this process alone (no process
    group; DCP assembles the shards of any number of ranks). The optimiser state is not read."""
    metadata = _sharded_metadata(directory).state_dict_metadata
    weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in metadata.items() if k.startswith("model.")}
    _dcp_load({"model": weights}, directory, alone=True)
    return weights


def _sharded_metadata(directory: str):
    """The DCP index of a sharded checkpoint, read without running anything it holds (``util.safe_dcp``)."""
    try:
        return read_metadata(directory)
    except OSError as e:
        raise UserError(f"cannot read sharded checkpoint {directory}: {type(e).__name__}: {e}", every_rank=True) \
            from None


def _dcp_load(state: dict, directory: str, alone: bool) -> None:
    """dcp.load in place, through the safe reader and planner; ``alone``: this process reads every part itself,
    with no process group. A missing or torn shard is one error on every rank (DCP gathers the ranks' failures)."""
    with warnings.catch_warnings():  # reading alone is the intent here, which DCP warns about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=SafeReader(directory), planner=SafePlanner(), no_dist=alone)
        except (Exception, CheckpointException) as e:  # torn or missing shards, refused items (every rank)
            raise UserError(f"cannot read sharded checkpoint {directory}: {load_failure(_first_failure(e))}",
                            every_rank=True) from None


def _first_failure(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (a BaseException that wraps every failing
    rank's)."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def load_file(path: str, weights: bool = True) -> dict:
    """torch.load with weights_only=True and one clear error for a missing or unreadable file. A sharded
    checkpoint (its directory or the pointer to it) gives its ``meta.pt`` plus ``sharded_dir``, and its whole
    model under ``model`` unless ``weights`` is False (resuming reads the shards themselves, see :func:`resume`)."""
    directory = sharded_dir(path)
    if directory is not None:
        if not os.path.isfile(os.path.join(directory, META)):
            raise UserError(f"checkpoint not found: {directory} (named by {path})")
        meta = {**load_file(inside(directory, META, os.path.join(directory, META))), "sharded_dir": directory}
        return {**meta, "model": sharded_weights(directory)} if weights else meta
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        # official MAE/DeiT/Scala files pickle their flags as an argparse.Namespace: allow that one class
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a TorchScript file is refused below; torch's warning that it would run it instead is not the news
            warnings.filterwarnings("ignore", message="'torch.load' received a zip file that looks like a TorchScript")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise UserError(f"cannot read checkpoint {path}: {load_failure(e)}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def consolidate(directory: str) -> dict:
    """A sharded checkpoint as one single-file checkpoint: its settings and records and the whole model, without
    the optimiser state (what fine-tuning, probing and the timm export read)."""
    ckpt = load_file(directory)
    return {k: v for k, v in ckpt.items() if k != "sharded_dir"}


def write_failure(path: str, error: BaseException, every_rank: bool = False) -> UserError:
    """A failed write (a full disk, an unwritable file) as the one line the user sees: the file, why, and the
    space left on its filesystem."""
    try:
        free_bytes = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        free = f"{free_bytes / 2**20:.1f} MiB free there"
    except OSError:
        free_bytes, free = None, "free space unknown"
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    elif free_bytes is not None and free_bytes < 2**20:  # torch.save's zip writer reports a short write
        reason = "No space left on device (the write stopped short)"
    else:
        reason = " ".join(str(error).split())[:200]
    return UserError(f"cannot write {path}: {reason} ({free}); the partial file was removed and the last "
                     "committed checkpoint is untouched", every_rank=every_rank)


@contextlib.contextmanager
def _replaced_atomically(path: str):
    """Yields a temporary name in ``path``'s directory, renamed to ``path`` once written: a killed job never
    leaves a torn file. A failed write removes the temporary file and is one UserError (:func:`write_failure`)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_failure(path, e) from None


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to ``path`` atomically (temporary file, then rename)."""
    with _replaced_atomically(path) as tmp:
        torch.save(obj, tmp)


def save_json_atomic(obj: dict | list, path: str) -> None:
    """``save_atomic`` for a small JSON file (args.json, done.json, checkpoint-last.json, classes.json)."""
    with _replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_text_atomic(text: str, path: str) -> None:
    """``save_atomic`` for a text file (a suite's table)."""
    with _replaced_atomically(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """The model's own ``torch.Generator`` attributes (e.g. XTRA's order choice), by module path. Their states
    go into checkpoints next to the global RNG states, so that a resumed run continues their sequences."""
    return {f"{path}.{attr}" if path else attr: value for path, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Generator)}


@dataclass(frozen=True)
class Position:
    """Where a run continues: ``epoch``, and ``images`` of it already used by all ranks together (0: its start),
    with each rank's running meters (``meters``, by rank) when a mid-epoch checkpoint holds them."""

    epoch: int
    images: int = 0
    meters: tuple[dict, ...] = ()


def training_state(model: nn.Module, epoch: int, settings: dict, optimizer: torch.optim.Optimizer | None = None,
                   scaler_state: dict | None = None, extra: dict | None = None,
                   position: dict | None = None) -> dict:
    """Everything needed to continue training after ``epoch``, or, with ``position`` (``epoch``, ``images`` and
    this rank's ``meters``), from inside the next epoch. Every rank must call it (RNG states and meters are
    gathered); only rank 0's result is written, except a sharded model's ``sharded`` part (every rank's shards)."""
    state = {"epoch": epoch, "args": dict(settings), "scaler": scaler_state or {}, "rng": gather_objects(rng_state()),
             "generators": {k: g.get_state() for k, g in module_generators(model).items()}, "extra": extra or {}}
    if position is not None:
        state["position"] = {**position, "meters": gather_objects(position["meters"])}
    if is_sharded(model):
        return {**state, "model": None, "optimizer": None, "sharded": _dcp_state(model, optimizer)}
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None}


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """``{"model": ..., "optim": ...}`` as DCP saves and loads them: keyed by parameter name, this rank's shards of
    a sharded model (no ``optim`` without an optimiser)."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def weights_only_state(state: dict, model: nn.Module) -> dict:
    """``state`` as a single file with the whole model and no optimiser state (checkpoint-best.pth). Under FSDP a
    collective: every rank must call it."""
    return {**{k: v for k, v in state.items() if k != "sharded"}, "model": full_state_dict(model),
            "optimizer": None}


def is_due(epoch: int, epochs: int, save_freq: int) -> bool:
    """Whether ``epoch`` keeps a numbered checkpoint (and pretraining its encoder.pth): every ``save_freq`` epochs
    and the last one."""
    return (epoch + 1) % save_freq == 0 or epoch + 1 == epochs


def save_checkpoint(state: dict, output_dir: str, epoch: int, epochs: int, save_freq: int, keep_last: int) -> None:
    """``checkpoint-<epoch>.pth`` every ``save_freq`` epochs and at the last epoch (only the ``keep_last`` newest
    numbered ones are kept; 0 = all), then ``checkpoint-last.pth``, which commits the epoch. Rank 0 writes; a
    sharded state (every rank calls this) goes to :func:`save_sharded`."""
    if not output_dir:
        return
    if "sharded" in state:
        return save_sharded(state, output_dir, epoch, lambda e: is_due(e, epochs, save_freq), keep_last)
    if not is_main_process():
        return
    if is_due(epoch, epochs, save_freq):
        save_atomic(state, os.path.join(output_dir, f"checkpoint-{epoch}.pth"))
        _prune(_numbered(output_dir, "pth"), keep_last)
    save_atomic(state, os.path.join(output_dir, "checkpoint-last.pth"))


def save_mid_epoch(state: dict, output_dir: str, step: int) -> str:
    """Commit a mid-epoch ``state`` (with its ``position``; ``step``: the micro-step it stopped after, for the
    sharded directory's name) as the run's last checkpoint and return where it went: ``checkpoint-last.pth``
    (rank 0), or, sharded, ``checkpoint-<epoch>-step<step>.dcp`` behind the pointer, the previous mid-epoch
    directory then removed. Numbered checkpoints are left alone: only the newest mid-epoch state is kept."""
    if "sharded" in state:
        name = f"checkpoint-{state['position']['epoch']}-step{step}.dcp"
        _commit_sharded(state, output_dir, name, state["epoch"])
        if is_main_process():
            _prune_mid_epoch(output_dir, keep=name)
        barrier()
        return os.path.join(output_dir, name)
    path = os.path.join(output_dir, "checkpoint-last.pth")
    if is_main_process():
        save_atomic(state, path)
    return path


def _numbered(output_dir: str, ext: str) -> list[tuple[int, str]]:
    """(epoch, path) of the numbered checkpoints with this extension, oldest first."""
    paths = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    found = [(re.search(rf"checkpoint-(\d+)\.{ext}$", p), p) for p in paths]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _prune(numbered: list[tuple[int, str]], keep_last: int) -> None:
    for _, old in numbered[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def _prune_mid_epoch(output_dir: str, keep: str = "") -> None:
    """Remove the sharded mid-epoch directories other than ``keep``, once the pointer names a newer state."""
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*-step*.dcp")):
        if os.path.basename(path) != keep:
            shutil.rmtree(path)


def _commit_sharded(state: dict, output_dir: str, name: str, epoch: int) -> None:
    """Every rank writes its shards into ``<name>.tmp``; once all have, rank 0 adds ``meta.pt``, renames the
    directory into place and points ``checkpoint-last.json`` at it, each step atomic, so that a torn save never
    replaces the last good checkpoint."""
    final = os.path.join(output_dir, name)
    tmp = final + ".tmp"
    if is_main_process() and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    try:
        dcp.save(state["sharded"], checkpoint_id=tmp)
    except (Exception, CheckpointException) as e:  # every rank: DCP gathers the ranks' failures
        # described while the partial directory still fills the disk: DCP passes each rank's failure on pickled,
        # without the OSError behind the zip writer's "unexpected pos", so the free space is what tells
        failure = write_failure(tmp, _first_failure(e), every_rank=True)
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure from None
    barrier()
    if is_main_process():
        save_atomic({k: v for k, v in state.items() if k != "sharded"}, os.path.join(tmp, META))
        if os.path.exists(final):  # an uncommitted directory of this name, from a run killed before its pointer
            shutil.rmtree(final)
        os.rename(tmp, final)
        save_json_atomic({"checkpoint": name, "epoch": epoch}, os.path.join(output_dir, POINTER))


def save_sharded(state: dict, output_dir: str, epoch: int, due: Callable[[int], bool], keep_last: int) -> None:
    """Commit ``checkpoint-<epoch>.dcp`` (:func:`_commit_sharded`). Then the mid-epoch directories go, and so do
    the directories of epochs that are not ``due`` to stay, except this one; of the due ones only the
    ``keep_last`` newest stay (0 = all)."""
    name = f"checkpoint-{epoch}.dcp"
    _commit_sharded(state, output_dir, name, epoch)
    if is_main_process():
        _prune_mid_epoch(output_dir)
        numbered = _numbered(output_dir, "dcp")
        for e, path in numbered:
            if e != epoch and not due(e):
                shutil.rmtree(path)
        final = os.path.join(output_dir, name)
        _prune([(e, p) for e, p in numbered if due(e) and e != epoch] + ([(epoch, final)] if due(epoch) else []),
               keep_last)
    barrier()


def resume_path(resume: str, output_dir: str, auto_resume: bool) -> str:
    """--resume, else the last committed checkpoint in output_dir when auto-resume is on (checkpoint-last.pth,
    or checkpoint-last.json for a sharded run; the newer if both exist), else ''."""
    if resume:
        return resume
    if not (auto_resume and output_dir):
        return ""
    found = [p for p in (os.path.join(output_dir, n) for n in ("checkpoint-last.pth", POINTER)) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else ""


def load_sharded(directory: str, path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint into ``model`` (sharded or not, with any number of ranks: DCP reads each rank's
    part) and ``optimizer``. Strict: the checkpoint must hold exactly the model's tensors, with their shapes."""
    state = _dcp_state(model, optimizer)
    model_sd = state["model"]
    stored = {k[len("model."):]: m for k, m in _sharded_metadata(directory).state_dict_metadata.items()
              if k.startswith("model.")}
    missing, unexpected = sorted(set(model_sd) - set(stored)), sorted(set(stored) - set(model_sd))
    shapes = [f"{k}: {tuple(stored[k].size)} vs {tuple(v.shape)}" for k, v in model_sd.items()
              if k in stored and tuple(stored[k].size) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise UserError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                        f"shapes differ {shapes[:5]}")
    _dcp_load(state, directory, alone=not is_dist())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
