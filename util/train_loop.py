"""The training step and the epoch loop head shared by every engine: autocast, backward and the update (accumulation,
clipping, scaler), the non-finite and unreadable-data checks, the iterator every training epoch runs, and the
mid-epoch checkpoints and stop signals of long runs."""
from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from util.config import OptimSettings
from util.distributed import (
    all_reduce_sum,
    full,
    get_rank,
    get_world_size,
    is_dist,
    launch_world_size,
    local,
    print0,
    unwrap,
)
from util.errors import RunStopped, UserError
from util.lr_sched import Schedule, adjust_learning_rate
from util.misc import MetricLogger, SmoothedValue, forked_rng
from util.train_state import Position, save_mid_epoch


def autocast_context(device: torch.device | str, amp: str):
    """Autocast for --amp bf16/fp16 on the given device; a no-op for --amp off, and for auto (bf16 on CUDA) on other
    devices."""
    device_type = torch.device(device).type
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


class OptimizerStep:
    """Backward of each micro-step, and every ``accum_iter`` micro-steps the update: unscale, clip, step, zero_grad.

    A GradScaler exists only for fp16. ``backward`` divides the loss by ``accum_iter``, so an update applies the
    mean gradient of its micro-steps; a step that backpropagates several losses (Scala's widths) calls
    ``backward`` once per loss and ``update`` once. DDP gradient sync is skipped on micro-steps with ``no_sync``
    (the caller wraps the forward and backward in ``self.sync_context(model, sync)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, amp: str, accum_iter: int = 1,
                 clip_grad: float | None = None, device: torch.device | str = "cpu"):
        self.optimizer = optimizer
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None

    def is_update_step(self, step: int) -> bool:
        return (step + 1) % self.accum_iter == 0

    @staticmethod
    def sync_context(model: torch.nn.Module, sync: bool):
        """Gradients are reduced only by the backward that precedes an update: DDP's ``no_sync`` unless ``sync``,
        FSDP2's ``set_requires_gradient_sync``."""
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)
        elif hasattr(model, "no_sync") and not sync:
            return model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        """Unscale, clip to ``clip_grad`` (when set), step and zero the gradients; returns the total gradient norm
        before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in params if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else math.inf
        norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else torch.zeros(())
        if self.scaler is None and not torch.isfinite(norm):  # fp16: the scaler skips such steps by itself
            raise UserError(f"non-finite gradient norm ({norm.item()}): the update was not applied; stopping all "
                            "ranks (try a lower lr, --clip_grad, or --amp off)", every_rank=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def __call__(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], step: int) -> torch.Tensor | None:
        """``backward``, then ``update`` on the last micro-step of an accumulation group (its gradient norm),
        else None."""
        self.backward(loss)
        return self.update(params) if self.is_update_step(step) else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def check_finite(loss: torch.Tensor, epoch: int, step: int, dataset=None, max_unreadable: int = 0,
                 votes: Sequence[float] = ()) -> list[float]:
    """Stop every rank together (one all-reduce: a per-rank exit would hang the others) on a non-finite loss, and
    on more than ``max_unreadable`` unreadable images in ``dataset`` (an ``ImageFiles``; the files are listed).
    ``votes`` ride on the same all-reduce; their sums over the ranks are returned."""
    unreadable = getattr(dataset, "unreadable", None)
    flags = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0,
                          float(unreadable.sum()) if unreadable is not None else 0.0, *votes], device=loss.device)
    nonfinite, bad_images, *summed = all_reduce_sum(flags).tolist()
    if nonfinite > 0:
        raise UserError(f"non-finite loss on {int(nonfinite)} rank(s) at epoch {epoch}, step {step} (rank 0: "
                        f"{loss.item()}); stopping all ranks (try --amp bf16/off, a lower lr or --clip_grad)",
                        every_rank=True)
    if bad_images > max_unreadable:
        paths = dataset.unreadable_paths()
        listed = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
        raise UserError(f"{int(bad_images)} unreadable training images, more than --max_unreadable allows "
                        f"({max_unreadable}); on rank 0: {listed or 'none'}", every_rank=True)
    return summed


@torch.no_grad()
def verify_update(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], epoch: int) -> None:
    """Before an epoch's results are written, on every rank: the weights are finite and give a finite loss on the
    epoch's last batch, recomputed in eval mode on a forked RNG (training randomness is untouched). Otherwise
    every rank stops and nothing of the epoch is written, so the last checkpoint stays the last good one."""
    raw = unwrap(model)
    training = raw.training
    raw.eval()
    with forked_rng():
        loss = loss_of(raw)
    raw.train(training)
    weights = [local(p) for p in raw.parameters() if p.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in [loss.detach(), *weights]]).all()
    if all_reduce_sum((~finite).float().reshape(1)).item() > 0:
        raise UserError(f"the weights after epoch {epoch} are non-finite or give a non-finite loss on its last "
                        "batch: nothing of that epoch was written and the last checkpoint stays the last good one "
                        "(try a lower lr, --clip_grad, or --amp off)", every_rank=True)


@dataclass(frozen=True)
class Loop:
    """What every training epoch needs besides the model, the data and the optimiser step."""

    device: torch.device
    amp: str
    accum_iter: int
    print_freq: int
    batch_size: int  # per process, for the img/s of the progress line
    schedule: Schedule
    max_unreadable: int = 0  # unreadable training images allowed before the run stops


def make_loop(optim: OptimSettings, device: torch.device, print_freq: int, max_unreadable: int) -> Loop:
    """The loop of a run with these optimisation settings on the launched ranks."""
    return Loop(device, optim.amp, optim.accum_iter, print_freq, optim.batch_size,
                optim.schedule(launch_world_size()), max_unreadable)


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
    by a stop (:class:`RunStopped`), after a stop signal. All ranks decide together at an update step (their votes
    ride on :func:`check_finite`'s all-reduce), so they save the same step; never at an epoch's last step, which
    commits the epoch anyway. Used as a context: the stop signals' handlers are installed inside it only.

    ``state_after(epoch, position)`` is the run's checkpoint after ``epoch`` plus ``position`` (a collective);
    ``start`` is where the run continues (:func:`util.train_state.resume`)."""

    def __init__(self, every_minutes: float, output_dir: str, start: Position,
                 state_after: Callable[[int, dict], dict]):
        self.every_s = every_minutes * 60
        self.output_dir = output_dir
        self.start = start
        self.state_after = state_after
        self.restart_clock()
        self.due = self.stopping = False
        self.signum = signal.SIGTERM
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
        """This rank's votes: a save is due; a stop signal arrived (and which)."""
        due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        signum = stop_signal()
        return [float(due), float(signum is not None), float(signum or 0), float(signum or 0) ** 2]

    def agree(self, due: float, stopping: float, signums: float, squares: float) -> None:
        """The ranks' summed votes: every rank saves (and stops) if any rank asked to. The signal is the one the
        stopping ranks received (its sum squared is the count times the sum of squares only when they all received
        the same one; otherwise SIGTERM stands for them)."""
        self.due, self.stopping = due > 0, stopping > 0
        if self.stopping:
            self.signum = int(signums / stopping) if signums ** 2 == stopping * squares else signal.SIGTERM

    def commit(self, epoch: int, step: int, steps: int, images: int, meters: dict) -> None:
        """Write the checkpoint inside ``epoch`` after micro-step ``step`` (``images`` of it used by all ranks)
        on every rank; after a stop signal, then stop every rank together."""
        where = "nothing was saved (no --output_dir)"
        if self.output_dir:
            state = self.state_after(epoch - 1, {"epoch": epoch, "images": images, "meters": meters})
            where = save_mid_epoch(state, self.output_dir, step) + " holds it"
            print0(f"saved a checkpoint inside epoch {epoch} after step {step} of {steps}: {where}")
        self.restart_clock()
        if self.stopping:
            if is_dist():
                dist.barrier()  # no rank exits (and makes torchrun kill the others) before every rank has saved
            raise RunStopped(f"{signal.Signals(self.signum).name} at epoch {epoch}, step {step} of {steps}; {where}: "
                             "rerun the same command to continue from there", self.signum)


class TrainingEpoch:
    """The loop head shared by every training epoch. Iterating gives (step, fractional epoch, images, targets) on
    the loop's device; the lr is set at the start of each accumulation group, a trailing incomplete group is
    dropped (its gradients would leak into the next epoch), and after each update step the agreed mid-epoch
    checkpoint (and stop) happens. An epoch resumed in its middle starts at its saved step, with its meters.

    ``check(loss, step)`` is the per-micro-step :func:`check_finite`, which also carries the ranks' votes on
    saving and stopping; ``logger`` holds the epoch's meters."""

    def __init__(self, loader, optimizer: torch.optim.Optimizer, epoch: int, loop: Loop, saves: MidEpochSaves):
        self.loader, self.optimizer, self.epoch, self.loop, self.saves = loader, optimizer, epoch, loop, saves
        self.logger = MetricLogger()
        self.logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.3e}"))
        self.images_per_step = loop.batch_size * get_world_size()
        # the epoch's order: the sampler's, or, for tar shards, the stream's own (util.shards)
        self.order = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
        self.steps = self.order.num_samples // loop.batch_size // loop.accum_iter * loop.accum_iter
        self.first = 0
        saves.restart_clock()  # the interval counts from the last commit, an epoch's one included
        start = saves.start
        if start.epoch == epoch and start.images:
            self.first = min(start.images // self.images_per_step // loop.accum_iter * loop.accum_iter, self.steps)
            if self.first * self.images_per_step == start.images and len(start.meters) == get_world_size():
                self.logger.load_state_dict(start.meters[get_rank()])
            else:
                print0(f"warning: the checkpoint stopped {start.images} images into epoch {epoch}, written by "
                       f"{len(start.meters)} ranks; with {get_world_size()} ranks × {loop.batch_size} this epoch "
                       f"continues at step {self.first}, in another order than an uninterrupted run's, and its "
                       "averages cover only the steps after it")
        self.order.set_epoch(epoch, self.first * loop.batch_size)

    def check(self, loss: torch.Tensor, step: int) -> None:
        self.saves.agree(*check_finite(loss, self.epoch, step, self.loader.dataset, self.loop.max_unreadable,
                                       self.saves.votes()))

    def __iter__(self) -> Iterator:
        loop = self.loop
        progress = self.logger.log_every(self.loader, loop.print_freq, f"Epoch [{self.epoch}]", loop.batch_size,
                                         self.first)
        for step, (images, targets) in enumerate(progress, self.first):
            if step >= self.steps:
                break
            if step % loop.accum_iter == 0:
                adjust_learning_rate(self.optimizer, self.epoch + step / self.steps, loop.schedule)
            yield (step, self.epoch + step / self.steps, images.to(loop.device, non_blocking=True),
                   targets.to(loop.device, non_blocking=True))
            done = step + 1
            if done % loop.accum_iter == 0 and done < self.steps and (self.saves.due or self.saves.stopping):
                self.saves.commit(self.epoch, done, self.steps, done * self.images_per_step,
                                  self.logger.state_dict())


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused implementation: one kernel over all parameters instead of a loop per tensor (measured
    on the 2-core CPU for the 94M-parameter xtra_vit_small_patch16: 0.07 vs 0.47 s per step)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)
