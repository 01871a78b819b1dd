"""A training run's lifecycle on disk: what the first write checks and does, each epoch's commit, resuming, and the
record that the run is complete. The files themselves are ``util.checkpoint``'s.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn as nn

from util.checkpoint import (
    Position,
    load_sharded,
    module_generators,
    save_atomic,
    save_checkpoint,
    save_json_atomic,
    training_state,
    weights_only_state,
    write_failure,
)
from util.config import OptimSettings
from util.distributed import (
    Dist,
    barrier,
    cleanup_distributed,
    gather_objects,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    is_sharded,
    print0,
)
from util.errors import UserError
from util.metrics import log_epoch, make_log_writer
from util.parallel import wrap_model
from util.rng import seed_everything, set_rng_state
from util.settings import Settings
from util.train_loop import MidEpochSaves, Trainer, TrainingEpoch, configure_kernels

# ---------------------------------------------------------------------------------------------------
# A run's files survive a kill at any point. Each epoch writes, in this order: its log.txt line, its other files
# (encoder.pth, checkpoint-best.pth, checkpoint-<epoch>.pth), then checkpoint-last.pth, which commits the epoch;
# after the last epoch and whatever follows it, done.json says the run is complete. A rerun removes torn
# temporary files, drops log lines of epochs that were not committed, redoes the first uncommitted epoch, and
# finishes whatever is missing.
DONE = "done.json"


def write_json_line(output_dir: str, record: dict) -> None:
    """Append one line to log.txt, durably; a failed append is cut off again (no torn last line) and is one
    UserError."""
    if output_dir and is_main_process():
        path = os.path.join(output_dir, "log.txt")
        with open(path, "a") as f:
            committed = f.tell()
            try:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.truncate(committed)
                raise write_failure(path, e) from None


def clean_start(output_dir: str, last_committed: int) -> None:
    """On rank 0 before a run writes anything: remove this project's torn temporary files and the log lines of
    epochs after ``last_committed`` (-1: none), so that log.txt and the checkpoints agree."""
    if not output_dir or not is_main_process() or not os.path.isdir(output_dir):
        return
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp.*")) + glob.glob(os.path.join(output_dir, ".shared-check-*")):
        os.remove(tmp)
    for tmp in glob.glob(os.path.join(output_dir, "*.dcp.tmp")):  # a sharded save that did not complete
        shutil.rmtree(tmp)
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


def check_shared_output(output_dir: str) -> None:
    """Under several ranks, before they read or write ``output_dir`` together: every rank must see a file that rank 0
    writes there (sharded checkpoints write every rank's shards there, and every rank resumes from what it finds
    there; a node-local directory would silently miss shards). Otherwise one error line names the ranks that do not;
    the file, and the directory if the check made it, are removed again either way."""
    if not output_dir or get_world_size() == 1:
        return
    name = gather_objects(f".shared-check-{secrets.token_hex(8)}")[0]  # rank 0's name, on every rank
    path, created = os.path.join(output_dir, name), False
    if is_main_process():
        created = not os.path.isdir(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(name)
    barrier()
    try:
        with open(path) as f:
            sees = f.read() == name
    except OSError:
        sees = False
    blind = [rank for rank, saw in enumerate(gather_objects(sees)) if not saw]  # every rank has looked
    if is_main_process():
        os.remove(path)
        if created:
            os.rmdir(output_dir)
    if blind:
        raise UserError(f"--output_dir {output_dir} is not one directory that every rank sees: rank(s) "
                        f"{', '.join(map(str, blind))} of {get_world_size()} do not see the file rank 0 wrote there; "
                        "put it on a filesystem that every node shares", every_rank=True)


def start_output(output_dir: str, epochs: int, start_epoch: int, settings: dict) -> bool:
    """A run's first write, once everything is validated. False (nothing written) when ``output_dir`` holds a
    finished run of ``epochs`` epochs; else, on rank 0: create it, remove what a killed run left uncommitted
    (:func:`clean_start`) and write ``args.json`` (``settings``)."""
    if finished(output_dir, epochs) and start_epoch >= epochs:
        print0(f"{output_dir} holds a finished run of {epochs} epochs ({DONE}): nothing to do")
        return False
    if output_dir and is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        clean_start(output_dir, start_epoch - 1)
        save_json_atomic(settings, os.path.join(output_dir, "args.json"))
    return True


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
    """Record that the run completed all ``epochs`` and what follows them (written last). Every rank returns once
    rank 0 has written it: what comes next (another run in the same processes) finds every file in place."""
    if output_dir and is_main_process():
        save_json_atomic({"epochs": epochs}, os.path.join(output_dir, DONE))
    barrier()


def finished(output_dir: str, epochs: int) -> bool:
    """Whether done.json records a completed run of ``epochs`` epochs."""
    path = os.path.join(output_dir, DONE) if output_dir else ""
    if not path or not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("epochs") == epochs


def resume(ckpt: dict | None, path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
           ) -> tuple[Position, dict]:
    """Continue from a loaded training checkpoint: model (strict), optimizer (when given), the model's own generators
    and this rank's RNG state (the GradScaler's state, ``ckpt["scaler"]``, goes to util.train_loop.Trainer).
    Returns (where training continues, the checkpoint's ``extra``). A sharded checkpoint loads into a sharded or a
    plain model; a single-file one into a plain model only."""
    if ckpt is None:  # a fresh run
        return Position(0), {}
    if "sharded_dir" in ckpt and ckpt.get("model") is None:
        load_sharded(ckpt["sharded_dir"], path, model, optimizer)
    elif is_sharded(model):
        raise UserError(f"{path} is a single-file checkpoint; --fsdp resumes sharded checkpoints only (continue "
                        "this run without --fsdp)")
    else:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:  # another model's checkpoint, or other settings
            raise UserError(f"{path} does not fit this model: {' '.join(str(e).split())[:300]}") from None
        if optimizer is not None and ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
    for name, generator in module_generators(model).items():
        if name in ckpt.get("generators", {}):
            generator.set_state(ckpt["generators"][name])
    rng = ckpt.get("rng") or []
    if len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        print0(f"warning: checkpoint has RNG states for {len(rng)} ranks, running {get_world_size()}; not restored")
    position = ckpt.get("position")
    start = Position(ckpt["epoch"] + 1) if position is None else \
        Position(position["epoch"], position["images"], tuple(position["meters"]))
    return start, ckpt.get("extra", {})


def evaluate_only(ckpt: dict | None, path: str, model: nn.Module, evaluate: Callable[[], object]) -> None:
    """An ``--eval`` run: ``model`` with the checkpoint's weights (as built when there is none), ``evaluate()``,
    then the process group is torn down."""
    resume(ckpt, path, model)
    if ckpt is not None:
        print0(f"evaluating {path} (epoch {ckpt['epoch']})")
    evaluate()
    cleanup_distributed()


# ---------------------------------------------------------------------------------------------------
# One run per output directory: a lock file, held from the first write to the end of the run
LOCK = "run.lock"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` of this host started (clock ticks since boot), or None when there is no such process:
    with the pid, it tells a live holder from a later process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_is_gone(holder: dict) -> bool:
    """Whether the process that wrote a lock is gone; only known on its own host (False elsewhere)."""
    return holder.get("host") == socket.gethostname() and \
        _process_start(int(holder.get("pid", -1))) != holder.get("process_start")


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold ``output_dir/run.lock`` (host, pid, start time, command) while the run writes there: a second run into the
    same directory is one error line naming the holder, on every rank, before it writes anything. A lock left by a
    process that is gone, on this host, is taken over with a warning; on another host that cannot be known, so the
    error says how to remove it. The file is created with O_EXCL, which is atomic on local filesystems and on NFS
    (v3 and later); an advisory lock: it stops this project's runs, not other programs."""
    if not output_dir:
        yield
        return
    path, refusal, mine = os.path.join(output_dir, LOCK), None, None
    if is_main_process():
        me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.makedirs(output_dir, exist_ok=True)
        refusal = f"could not take {path}: another run took it over at the same time"
        for _ in range(2):  # a lock that turns out stale is taken over once
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                if holder and not _holder_is_gone(holder):
                    refusal = (f"{output_dir} is in use by another run: pid {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('started')} ({path}); wait for it to end "
                               f"or use another --output_dir (if that run is gone, remove {path})")
                    break
                print0(f"warning: taking over {path}, left by a run that is gone ({holder or 'unreadable'})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            mine, refusal = me, None
            break
    refusal = gather_objects(refusal)[0]
    if refusal is not None:
        raise UserError(refusal, every_rank=True)
    try:
        yield
    finally:
        if mine is not None:
            ours = False
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                ours = json.load(f) == mine
            if ours:
                os.remove(path)


# ---------------------------------------------------------------------------------------------------
# The skeleton every training script shares
def start_process(settings: Settings, process_group: bool, trains: bool) -> Dist:
    """This process's part of a run, before any model is built: the process group and its device (``process_group``:
    one even for a single process, as FSDP needs), the kernels' settings (--tf32, --deterministic), for a run that
    ``trains`` the check that every rank sees --output_dir, and the seeds (--seed + rank)."""
    dist_info = init_distributed(settings.device, settings.dist_url, process_group, settings.dist_timeout)
    configure_kernels(dist_info.device, settings.tf32, settings.deterministic)
    if trains:
        check_shared_output(settings.output_dir)
    seed_everything(settings.seed)
    return dist_info


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class EpochResult:
    """What an entry script adds to a trained epoch: ``record``, its fields of the epoch's log.txt line (besides the
    training averages); ``files``, name -> contents, written before the commit (encoder.pth); ``score``, the
    validation top-1 that keeps ``checkpoint-best.pth`` (None: the script keeps no best checkpoint); ``scalars``,
    TensorBoard's, against the epoch; ``best``: what ``checkpoint-best.pth`` holds, made from the epoch's
    weights-only checkpoint (None: all of it; an lr sweep keeps its best head alone)."""

    record: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    score: float | None = None
    scalars: dict = field(default_factory=dict)
    best: Callable[[dict], dict] | None = None


class TrainingRun:
    """One training run from its resume to its finish, the same for every training script: they build the settings,
    the model, the data and the optimiser, then hand them here.

    At construction the run resumes (model, optimiser, RNG, the model's generators, and ``states``: objects with
    ``state_dict``/``load_state_dict`` that every checkpoint holds by name, e.g. the EMA weights or an online probe;
    the best score is kept as ``best_acc1``). :meth:`fit` does the rest: the output lock, the first write, the epoch
    loop with its mid-epoch saves and stop signals (handled until the run has finished), each epoch's commit and
    ``checkpoint-best.pth``, TensorBoard, and done.json. ``describe()`` adds what the model *is* to every
    checkpoint (models.formats)."""

    def __init__(self, settings: Settings, dist_info: Dist, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ckpt: dict | None, ckpt_path: str, describe: Callable[[], dict],
                 states: dict[str, Stateful] | None = None):
        self.settings, self.dist_info, self.model, self.optimizer, self.describe = \
            settings, dist_info, model, optimizer, describe
        self.states = states or {}
        self.start, extra = resume(ckpt, ckpt_path, model, optimizer)
        for name, obj in self.states.items():
            if name in extra:
                obj.load_state_dict(extra[name])
        self.best: float | None = extra.get("best_acc1")
        self.scaler_state = (ckpt or {}).get("scaler")
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log_writer = None  # TensorBoard's, once fit() has made the first write
        self.trainer: Trainer | None = None
        if ckpt is not None:
            if self.start.images:
                per_step = settings.batch_size * get_world_size()
                step = self.start.images // per_step // settings.accum_iter * settings.accum_iter
                print0(f"resumed from {ckpt_path} (inside epoch {self.start.epoch}), continuing at epoch "
                       f"{self.start.epoch}, step {step} ({self.start.images} images into it)")
            else:
                print0(f"resumed from {ckpt_path} (epoch {self.start.epoch - 1}), continuing at epoch "
                       f"{self.start.epoch}")

    def state_after(self, epoch: int, position: dict | None = None) -> dict:
        """The checkpoint after ``epoch`` (with ``position``: inside the next one); a collective."""
        extra = {name: obj.state_dict() for name, obj in self.states.items()}
        if self.best is not None:
            extra["best_acc1"] = self.best
        return {**training_state(self.model, epoch, self.settings.as_dict(), self.optimizer, self.trainer.state_dict(),
                                 extra, position), **self.describe()}

    def fit(self, loader, train_images: int, train_epoch: Callable[[nn.Module, TrainingEpoch], dict],
            end_of_epoch: Callable[[int, dict], EpochResult], classes: Sequence[str] | None = None,
            closing: Callable[[], dict] | None = None) -> None:
        """Train from where the run resumed to --epochs: ``train_epoch(net, epoch)`` runs the engine on the wrapped
        model (DDP, compiled) and returns the epoch's averages; ``end_of_epoch(epoch, averages)`` evaluates and
        monitors. ``train_images``: the training set's size, which --max_unreadable is a fraction of; ``classes``:
        written to classes.json; ``closing()``: a last log.txt line after the last epoch (Scala's table of widths).
        Then done.json, and the process group is torn down."""
        s = self.settings
        with output_lock(s.output_dir), MidEpochSaves(s.save_every_minutes, s.output_dir, self.start,
                                                      self.state_after) as saves:
            if not start_output(s.output_dir, s.epochs, self.start.epoch, s.as_dict()):  # validated: the first write
                return cleanup_distributed()
            if classes is not None and s.output_dir and is_main_process():
                save_json_atomic(list(classes), os.path.join(s.output_dir, "classes.json"))
            net = wrap_model(self.model, self.dist_info, s.compile)
            self.log_writer = make_log_writer(s.output_dir, s.log_dir)
            self.trainer = Trainer(self.model, self.optimizer, s.of(OptimSettings), self.dist_info.device,
                                   s.print_freq, int(s.max_unreadable * train_images), self.log_writer,
                                   self.scaler_state)
            print0(f"{self.n_params / 1e6:.2f}M trainable parameters; training for {s.epochs} epochs from epoch "
                   f"{self.start.epoch}")
            start = time.time()
            for epoch in range(self.start.epoch, s.epochs):
                averages = train_epoch(net, self.trainer.epoch(loader, epoch, saves))
                result = end_of_epoch(epoch, averages)
                improved = result.score is not None and (self.best is None or result.score > self.best)
                if improved:
                    self.best = result.score
                state = self.state_after(epoch)
                if improved:
                    best = weights_only_state(state, self.model)
                    files = {**result.files, "checkpoint-best.pth": result.best(best) if result.best else best}
                else:
                    files = result.files
                record = {**{f"train_{k}": v for k, v in averages.items()}, **result.record, "epoch": epoch,
                          "n_parameters": self.n_params}
                commit_epoch(s.output_dir, epoch, record, state, s.epochs, s.save_freq, s.keep_last, files)
                if result.score is not None:
                    print0(f"validation top-1 {result.score:.2f}% (best {self.best:.2f}%)")
                log_epoch(self.log_writer, epoch, result.scalars)
            best = f"; best validation top-1 {self.best:.2f}%" if self.best is not None else ""
            print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}{best}")
            if closing is not None:  # its line carries epoch = epochs, so a rerun after a kill redoes it
                write_json_line(s.output_dir, {**closing(), "epoch": s.epochs})
            finish_run(s.output_dir, s.epochs)
            if self.log_writer is not None:
                self.log_writer.close()
        cleanup_distributed()
