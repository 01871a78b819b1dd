"""The training loop every engine shares, in one place: precision, the optimiser update (accumulation, clipping,
the fp16 scaler), the checks that stop every rank together, progress lines and TensorBoard, and the mid-epoch
checkpoints and stop signals of long runs.

An engine's epoch reads, for any method::

    for batch in epoch:                                   # a TrainingEpoch: lr schedule, data on the device
        with epoch.gradient_sync(model, batch.update):    # DDP / FSDP reduce gradients on an update only
            with epoch.autocast():
                loss, metrics = model(batch.images)
            epoch.backward(loss)
        epoch.step(loss=loss, **metrics)                  # after an accumulation group: agree, clip, update
        epoch.save_if_agreed()                            # the mid-epoch checkpoint (and stop) the ranks agreed on
    return epoch.end(model, loss_of_last_batch)

The host waits for the device once per optimiser update, in :meth:`TrainingEpoch.step`: one read that carries the
finiteness of every micro-step's loss and of the gradient norm, the unreadable images, the ranks' votes on saving
and stopping, and the values logged for the update's micro-steps.

Members: the optimiser's param groups may name a ``member``, one of several independent models trained side by
side on one forward (the heads of an lr sweep). The loss is then one value per member, each member follows its own
lr schedule (its groups' ``peak_lr``), is clipped on its own, and logs its own values (``loss/<member>``); a member
whose loss or gradient norm is not finite is frozen (its groups' ``diverged`` says where: its weights stay as they
were, its later gradients are dropped) and the others go on. The run stops only when every member has diverged.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from util.checkpoint import Position, save_mid_epoch
from util.config import OptimSettings
from util.distributed import (
    all_reduce,
    barrier,
    device_values,
    full,
    get_rank,
    get_world_size,
    launch_world_size,
    local,
    print0,
    unwrap,
)
from util.errors import RunStopped, UserError
from util.images import device_images
from util.lr_sched import adjust_learning_rate
from util.metrics import MetricLogger, SmoothedValue, log_step
from util.rng import forked_rng


def autocast_context(device: torch.device | str, amp: str):
    """Autocast for --amp bf16/fp16 on the given device; a no-op for --amp off, and for auto (bf16 on CUDA) on other
    devices."""
    device_type = torch.device(device).type
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def configure_kernels(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """--tf32 (CUDA float32 matmuls and convolutions on the tensor cores) and --deterministic (PyTorch's
    deterministic algorithms, with a warning naming any operation that has none; cuDNN deterministic and not
    benchmarking; cuBLAS's fixed workspace, set before its first call)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused implementation: one kernel over all parameters instead of a loop per tensor (measured
    on the 2-core CPU for the 94M-parameter xtra_vit_small_patch16: 0.07 vs 0.47 s per step)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def clip_gradients(params: list[torch.nn.Parameter], clip_grad: float | None, device: torch.device) -> torch.Tensor:
    """Clip the total gradient norm of ``params`` to ``clip_grad`` (none: no clipping) and return the norm before
    clipping, on ``device``, without reading it (under FSDP the norm of the whole sharded gradient)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    return full(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """Apply the gradients (through the fp16 scaler, which skips a step with non-finite ones) and zero them."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def verify_update(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], epoch: int,
                  frozen: Sequence[torch.nn.Parameter] = ()) -> None:
    """Before an epoch's results are written, on every rank: the weights (but the ``frozen`` ones of diverged
    members) are finite and give a finite loss on the epoch's last batch, recomputed in eval mode on a forked RNG
    (training randomness is untouched). Otherwise every rank stops and nothing of the epoch is written, so the last
    checkpoint stays the last good one."""
    raw = unwrap(model)
    training = raw.training
    raw.eval()
    with forked_rng():
        loss = loss_of(raw)
    raw.train(training)
    skipped = {id(p) for p in frozen}
    weights = [local(p) for p in raw.parameters() if p.is_floating_point() and id(p) not in skipped]
    finite = torch.stack([torch.isfinite(t).all() for t in [loss.detach(), *weights]]).all()
    if all_reduce((~finite).double().reshape(1)).item() > 0:
        raise UserError(f"the weights after epoch {epoch} are non-finite or give a non-finite loss on its last "
                        "batch: nothing of that epoch was written and the last checkpoint stays the last good one "
                        "(try a lower lr, --clip_grad, or --amp off)", every_rank=True)


# ---------------------------------------------------------------------------------------------------
# Stop signals: SIGTERM (schedulers, torchrun's forward), SIGUSR1 (SLURM's --signal=USR1@<s>) and SIGINT (Ctrl-C)
# ask the run to stop at its next optimiser step, once every rank has committed a mid-epoch checkpoint. Handlers
# are process-wide, and so is what they record.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: list[int] = []


def request_stop(signum: int, frame=None) -> None:
    """The stop signals' handler: record the signal; the training loop acts on it (further signals add nothing)."""
    if not _received and get_rank() == 0:  # said once (the stop line comes from rank 0 whichever rank was signalled)
        print(f"received {signal.Signals(signum).name}: stopping at the next optimiser step, after a checkpoint",
              file=sys.stderr, flush=True)
    _received.append(signum)


def stop_signal() -> int | None:
    """The first stop signal this process received, if any."""
    return _received[0] if _received else None


class MidEpochSaves:
    """Resumable checkpoints inside an epoch: ``every_minutes`` after the last commit (0: never), and at once, followed
    by a stop (:class:`RunStopped`), after a stop signal. At every optimiser update the ranks agree (a MAX over their
    votes, :meth:`TrainingEpoch.step`): every rank saves if any rank's clock says a save is due, and stops if any rank
    received a stop signal; never at an epoch's last step, which commits the epoch anyway. Used as a context: the
    stop signals' handlers are installed inside it only.

    ``state_after(epoch, position)`` is the run's checkpoint after ``epoch`` plus ``position`` (a collective);
    ``start`` is where the run continues (:func:`util.run.resume`)."""

    def __init__(self, every_minutes: float, output_dir: str, start: Position,
                 state_after: Callable[[int, dict], dict]):
        self.every_s = every_minutes * 60
        self.output_dir = output_dir
        self.start = start
        self.state_after = state_after
        self.restart_clock()
        self.due = False
        self.signum = 0  # the stop signal the ranks agreed on (0: none)
        self._handlers: dict = {}

    def __enter__(self) -> MidEpochSaves:
        self._handlers = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        _received.clear()  # acted on (or the run ended first)

    def restart_clock(self) -> None:
        self.last_save = time.monotonic()

    def votes(self) -> list[float]:
        """This rank's votes: whether a save is due by its clock, and the stop signal it received (0: none)."""
        due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        return [float(due), float(stop_signal() or 0)]

    def agree(self, due: float, signum: float) -> None:
        """The ranks' votes, each the largest over the ranks: a save is due on some rank; the stop signal with the
        largest number that some rank received (SIGTERM over SIGUSR1 over SIGINT)."""
        self.due, self.signum = due > 0, int(signum)

    def commit(self, epoch: int, step: int, steps: int, images: int, meters: dict) -> None:
        """Write the checkpoint inside ``epoch`` after micro-step ``step`` (``images`` of it used by all ranks)
        on every rank; after a stop signal, then stop every rank together."""
        where = "nothing was saved (no --output_dir)"
        if self.output_dir:
            state = self.state_after(epoch - 1, {"epoch": epoch, "images": images, "meters": meters})
            where = save_mid_epoch(state, self.output_dir, step) + " holds it"
            print0(f"saved a checkpoint inside epoch {epoch} after step {step} of {steps}: {where}")
        self.restart_clock()
        if self.signum:
            barrier()  # no rank exits (and makes torchrun kill the others) before every rank has saved
            raise RunStopped(f"{signal.Signals(self.signum).name} at epoch {epoch}, step {step} of {steps}; {where}: "
                             "rerun the same command to continue from there", self.signum)


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One micro-step of an epoch: its index, the fractional epoch, the images (normalised, on the device) and
    targets, and whether the optimiser updates after it (the last micro-step of an accumulation group)."""

    step: int
    epoch: float
    images: torch.Tensor
    targets: torch.Tensor
    update: bool


class Trainer:
    """How a run trains, built once by its entry script: the optimiser with its lr schedule, the parameters it
    updates (``model``'s trainable ones, in module order), --amp (a GradScaler for fp16 only), --accum_iter and
    --clip_grad, the unreadable images allowed, progress lines every ``print_freq`` steps and TensorBoard
    (``log_writer``). ``scaler_state``: the GradScaler's state of a resumed run. :meth:`epoch` gives one training
    epoch. The optimiser's param groups may name members (see the module's docstring); a resumed optimiser brings
    back which of them diverged."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim: OptimSettings,
                 device: torch.device, print_freq: int, max_unreadable: int = 0, log_writer=None,
                 scaler_state: dict | None = None):
        self.optimizer, self.device, self.print_freq = optimizer, device, print_freq
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.amp, self.accum_iter, self.clip_grad, self.batch_size = optim.amp, optim.accum_iter, optim.clip_grad, \
            optim.batch_size
        groups = optimizer.param_groups
        self.schedules = [optim.schedule(launch_world_size(), g.get("peak_lr")) for g in groups]
        self.members = list(dict.fromkeys(g["member"] for g in groups if "member" in g))
        owned = [{id(p) for g in groups if g.get("member") == m for p in g["params"]} for m in self.members]
        # what is clipped together: each member's parameters (in module order), else all of them
        self.clip_groups = [[p for p in self.params if id(p) in ids] for ids in owned] or [self.params]
        self.live = [not any(g.get("diverged") for g in groups if g.get("member") == m) for m in self.members]
        self.live_mask = device_values(self.live, torch.bool) if self.members else None
        self.max_unreadable, self.log_writer = max_unreadable, log_writer
        self.scaler = torch.amp.GradScaler(device.type) if optim.amp == "fp16" else None
        if self.scaler and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    def live_losses(self, loss: torch.Tensor) -> torch.Tensor:
        """The members' losses with a frozen member's set to 0 (its value may not be finite); a plain loss as it is."""
        return torch.where(self.live_mask, loss, 0.0) if self.members else loss

    def freeze(self, member: int, where: str) -> None:
        """Member ``member`` diverged at ``where``: its groups record it and it is updated no more."""
        self.live[member] = False
        self.live_mask = device_values(self.live, torch.bool)
        for g in self.optimizer.param_groups:
            if g.get("member") == self.members[member]:
                g["diverged"] = where

    def frozen_params(self) -> list[torch.nn.Parameter]:
        return [p for params, live in zip(self.clip_groups, self.live) if not live for p in params] \
            if self.members else []

    def current_lr(self) -> float | list[float]:
        """The lr to log: the largest of the groups' (the head's under layer decay), or each member's."""
        groups = self.optimizer.param_groups
        if not self.members:
            return max(g["lr"] for g in groups)
        return [max(g["lr"] for g in groups if g.get("member") == m) for m in self.members]

    def per_member(self, name: str, value):
        """A logged value as meters: ``name`` for a number, ``name/<member>`` for each of a list (None for a frozen
        member: meters and TensorBoard skip it)."""
        if not isinstance(value, list):
            return {name: value}
        return {f"{name}/{m}": v if live else None for m, v, live in zip(self.members, value, self.live)}

    def epoch(self, loader, epoch: int, saves: MidEpochSaves) -> TrainingEpoch:
        return TrainingEpoch(self, loader, epoch, saves)

    def state_dict(self) -> dict:
        """The GradScaler's state (fp16), for checkpoints."""
        return self.scaler.state_dict() if self.scaler else {}


class TrainingEpoch:
    """One training epoch of a :class:`Trainer` (see the module's docstring for how an engine reads it).

    Iterating gives :class:`Batch`es: the lr is set at the start of each accumulation group, a trailing incomplete
    group is dropped (its gradients would leak into the next epoch), and an epoch resumed in its middle starts at its
    saved step, with its meters. ``meters`` holds the epoch's running averages."""

    def __init__(self, trainer: Trainer, loader, epoch: int, saves: MidEpochSaves):
        self.trainer, self.loader, self.epoch, self.saves = trainer, loader, epoch, saves
        self.meters = MetricLogger()
        for name in trainer.per_member("lr", trainer.current_lr()):
            self.meters.add_meter(name, SmoothedValue(window_size=1, fmt="{value:.3e}"))
        accum, batch_size = trainer.accum_iter, trainer.batch_size
        self.images_per_step = batch_size * get_world_size()
        # the epoch's order: the sampler's, or, for tar shards, the stream's own (util.shards)
        self.order = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
        self.steps = self.order.num_samples // batch_size // accum * accum
        self.first = 0
        saves.restart_clock()  # the interval counts from the last commit, an epoch's one included
        start = saves.start
        if start.epoch == epoch and start.images:
            self.first = min(start.images // self.images_per_step // accum * accum, self.steps)
            if self.first * self.images_per_step == start.images and len(start.meters) == get_world_size():
                self.meters.load_state_dict(start.meters[get_rank()])
            else:
                print0(f"warning: the checkpoint stopped {start.images} images into epoch {epoch}, written by "
                       f"{len(start.meters)} ranks; with {get_world_size()} ranks × {batch_size} this epoch "
                       f"continues at step {self.first}, in another order than an uninterrupted run's, and its "
                       "averages cover only the steps after it")
        self.order.set_epoch(epoch, self.first * batch_size)
        self.step_index = self.first  # the micro-step in progress
        self.nonfinite: torch.Tensor | None = None  # how many of this micro-step's losses are not finite (device)
        self.pending: list[tuple[torch.Tensor, dict]] = []  # this group's finished micro-steps: (non-finite, logged)
        self.agreed = False  # the last update's votes asked for a save (or a stop)

    # --- the loop ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        trainer = self.trainer
        progress = self.meters.log_every(self.loader, trainer.print_freq, f"Epoch [{self.epoch}]", trainer.batch_size,
                                         self.first)
        for step, (images, targets) in enumerate(progress, self.first):
            if step >= self.steps:
                break
            if step % trainer.accum_iter == 0:
                adjust_learning_rate(trainer.optimizer, self.epoch + step / self.steps, trainer.schedules)
            self.step_index = step
            yield Batch(step, self.epoch + step / self.steps, device_images(images, trainer.device),
                        targets.to(trainer.device, non_blocking=True), (step + 1) % trainer.accum_iter == 0)

    def autocast(self):
        """The forward's precision (--amp)."""
        return autocast_context(self.trainer.device, self.trainer.amp)

    @staticmethod
    def gradient_sync(model: torch.nn.Module, sync: bool):
        """Around a micro-step's forward and backward: gradients are reduced across the ranks only when ``sync``
        (DDP's ``no_sync`` otherwise; FSDP2's ``set_requires_gradient_sync``)."""
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        elif hasattr(model, "no_sync") and not sync:
            return model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` / accum_iter (scaled for fp16): an update applies the mean gradient of its group. A
        step that backpropagates several losses (Scala's widths) calls it once per loss; with members, ``loss``
        holds one per member (a frozen member's left out). Whether each loss is finite is recorded on the device
        and read at the update."""
        trainer = self.trainer
        flags = ~torch.isfinite(loss.detach())
        nonfinite = (flags if trainer.members else flags.any()).double().reshape(-1)
        self.nonfinite = nonfinite if self.nonfinite is None else self.nonfinite + nonfinite
        loss = trainer.live_losses(loss).sum() / trainer.accum_iter if trainer.members else loss / trainer.accum_iter
        (trainer.scaler.scale(loss) if trainer.scaler else loss).backward()

    def step(self, n: int | None = None, **logged: torch.Tensor | float) -> bool:
        """End a micro-step: ``logged`` (the loss and the method's metrics, tensors or numbers) goes to the meters and
        TensorBoard, weighted by ``n`` images (default: the batch). After the last micro-step of a group, the update:
        unscale (fp16), clip, then the one host read of the update, which stops every rank together on a non-finite
        loss or gradient norm or too many unreadable images (nothing applied), and agrees on saving and stopping;
        then the optimiser steps. Returns whether it did."""
        trainer = self.trainer
        nonfinite = self.nonfinite if self.nonfinite is not None else \
            torch.zeros(len(trainer.clip_groups), dtype=torch.float64, device=trainer.device)
        n = n if n is not None else trainer.batch_size
        self.meters.update(n=n, **trainer.per_member("lr", trainer.current_lr()))  # host numbers
        self.pending.append((nonfinite, {"n": n, **logged}))
        self.nonfinite = None
        if (self.step_index + 1) % trainer.accum_iter:
            return False
        if trainer.scaler:
            trainer.scaler.unscale_(trainer.optimizer)
        norms = torch.stack([clip_gradients(params, trainer.clip_grad, trainer.device)
                             for params in trainer.clip_groups])
        values, grad_norms = self._agree(norms)
        for p in trainer.frozen_params():  # a diverged member is not updated (nor decayed)
            p.grad = None
        optimizer_step(trainer.optimizer, trainer.scaler)
        self._log(values, grad_norms if trainer.members else grad_norms[0])
        return True

    def _agree(self, norms: torch.Tensor) -> tuple[list[dict], list[float]]:
        """The update's one host read: its micro-steps' non-finite flags and the unreadable images summed over the
        ranks, the votes on saving and stopping maximised over them, this rank's logged values and the gradient
        norms (one per member, else one). Raises (every rank together) when the update must not be applied, and
        freezes a member that diverged; returns the micro-steps' logged values as numbers (a list for a value per
        member), and the gradient norms."""
        trainer, pending = self.trainer, self.pending
        self.pending = []
        unreadable = getattr(self.loader.dataset, "unreadable", None)
        bad_images = float(unreadable.sum()) if unreadable is not None else 0.0  # host memory: no device wait
        flags = all_reduce(torch.cat([nonfinite for nonfinite, _ in pending] + [device_values([bad_images])]))
        votes = all_reduce(device_values(self.saves.votes()), "max")
        names = [[k for k, v in logged.items() if isinstance(v, torch.Tensor)] for _, logged in pending]
        tensors = [logged[k].detach().double().reshape(-1) for (_, logged), keys in zip(pending, names) for k in keys]
        read = torch.cat([flags, votes, *tensors, norms.detach().double()]).tolist()
        first = self.step_index - len(pending) + 1  # the group's first micro-step
        width = len(norms)  # flags per micro-step: one per member, else one
        nonfinite = [read[i * width:(i + 1) * width] for i in range(len(pending))]
        bad_images, due, signum = read[len(pending) * width:len(pending) * width + 3]
        numbers = iter(read[len(pending) * width + 3:])

        def number(v: torch.Tensor) -> float | list[float]:  # with members, a 1-D value holds one per member
            return [next(numbers) for _ in range(v.numel())] if trainer.members and v.ndim else next(numbers)

        values = [{k: number(v) if k in keys else v for k, v in logged.items()}
                  for (_, logged), keys in zip(pending, names)]
        grad_norms = [next(numbers) for _ in range(width)]
        self.saves.agree(due, signum)
        if trainer.members:
            self._freeze_diverged(nonfinite, grad_norms, first)
        else:
            bad = next((i for i, (count,) in enumerate(nonfinite) if count > 0), None)
            if bad is not None:
                loss = values[bad].get("loss", float("nan"))
                raise UserError(f"non-finite loss on {int(nonfinite[bad][0])} rank(s) at epoch {self.epoch}, step "
                                f"{first + bad} (rank 0: {loss}); stopping all ranks before the update (try --amp "
                                "bf16/off, a lower lr or --clip_grad)", every_rank=True)
            if not math.isfinite(grad_norms[0]) and trainer.scaler is None:  # fp16: the scaler skips such steps
                raise UserError(f"non-finite gradient norm ({grad_norms[0]}) at epoch {self.epoch}, step "
                                f"{self.step_index}: the update was not applied; stopping all ranks (try a lower lr, "
                                "--clip_grad, or --amp off)", every_rank=True)
        if bad_images > trainer.max_unreadable:
            paths = self.loader.dataset.unreadable_paths()
            listed = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
            raise UserError(f"{int(bad_images)} unreadable training images, more than --max_unreadable allows "
                            f"({trainer.max_unreadable}); on rank 0: {listed or 'none'}", every_rank=True)
        return values, grad_norms

    def _freeze_diverged(self, nonfinite: list[list[float]], grad_norms: list[float], first: int) -> None:
        """Freeze each live member whose loss (at some micro-step of this group) or gradient norm is not finite
        (fp16: only its loss; the scaler skips an update with an infinite gradient); every rank read the same
        flags and norms. Raises, every rank together, once no member is left."""
        trainer = self.trainer
        for i, name in enumerate(trainer.members):
            steps = [first + j for j, flags in enumerate(nonfinite) if flags[i] > 0]
            bad_norm = not math.isfinite(grad_norms[i]) and trainer.scaler is None
            if trainer.live[i] and (steps or bad_norm):
                where = f"epoch {self.epoch}, step {steps[0] if steps else self.step_index}"
                trainer.freeze(i, where)
                print0(f"warning: {name} diverged (non-finite {'loss' if steps else 'gradient norm'}) at {where}: "
                       f"frozen with its last weights, {sum(trainer.live)} of {len(trainer.live)} go on")
        if not any(trainer.live):
            raise UserError(f"every one of the {len(trainer.live)} members diverged (non-finite loss or gradient "
                            f"norm), the last at epoch {self.epoch}, step {self.step_index}; stopping all ranks (try "
                            "lower lrs, --clip_grad, or --amp off)", every_rank=True)

    def _log(self, values: list[dict], grad_norm: float | list[float]) -> None:
        """The update's micro-steps into the meters, in order (the first logged value, then the gradient norm with
        the last micro-step, then the rest: the order of the meters in the progress line and log.txt), and the
        update into TensorBoard: ``train_<name>`` of its last micro-step, ``lr`` and ``grad_norm`` (a value per
        member as ``<name>/<member>``)."""
        trainer = self.trainer
        for i, logged in enumerate(values):
            n = logged.pop("n")
            (first, value), *rest = logged.items()
            norm = grad_norm if i == len(values) - 1 else None
            self.meters.update(n=n, **trainer.per_member(first, value), **trainer.per_member("grad_norm", norm),
                               **{k: v for name, value in rest for k, v in trainer.per_member(name, value).items()})
        scalars = {**trainer.per_member("lr", trainer.current_lr()), **trainer.per_member("grad_norm", grad_norm),
                   **{k: v for name, value in values[-1].items()
                      for k, v in trainer.per_member(f"train_{name}", value).items()}}
        log_step(trainer.log_writer, self.epoch + self.step_index / self.steps,
                 **{k: v for k, v in scalars.items() if v is not None})
        self.agreed = self.saves.due or bool(self.saves.signum)

    def save_if_agreed(self) -> None:
        """After an update, the mid-epoch checkpoint the ranks agreed on (and the stop that follows a signal); never
        after an epoch's last step, whose commit follows."""
        done = self.step_index + 1
        if self.agreed and done < self.steps:
            self.saves.commit(self.epoch, done, self.steps, done * self.images_per_step, self.meters.state_dict())
        self.agreed = False

    def end(self, model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> dict[str, float]:
        """Close the epoch: :func:`verify_update` with ``loss_of`` (the loss on the last batch, under autocast), the
        meters averaged over the ranks and printed; returns the averages."""
        trainer = self.trainer
        with self.autocast():
            verify_update(model, lambda m: trainer.live_losses(loss_of(m)), self.epoch, trainer.frozen_params())
        self.meters.synchronize_between_processes()
        print0(f"Epoch [{self.epoch}] averaged stats: {self.meters}")
        return self.meters.averages()
