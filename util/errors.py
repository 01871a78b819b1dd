"""The exceptions that end a run without a traceback, and the command-line wrapper that turns them into one line."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(ValueError):
    """A setting, path, checkpoint or data problem the user can fix. The command-line wrapper prints its message as
    one ``error:`` line and exits with code 2; every other exception is a bug and keeps its traceback.

    ``every_rank``: every rank of a distributed run raises it together (it follows a collective, or all ranks read
    the same file), so only rank 0 prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class RunStopped(Exception):
    """A training run that stopped on a signal after committing a resumable checkpoint (every rank raises it
    together). The command-line wrapper prints its message as one ``stopped:`` line and exits with 128 + the
    signal's number, as a shell reports a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
    """Run ``main(sys.argv[1:])``. Input the user can fix (a :class:`UserError`: unknown or foreign flags,
    impossible settings, missing files, corrupt checkpoints, unreadable data, a diverged run) ends with one
    ``error: ...`` line and exit code 2; a run stopped by a signal (:class:`RunStopped`, its checkpoint committed) is
    one ``stopped: ...`` line and exit code 128 + the signal's number; any other exception is a bug and keeps its
    traceback."""
    from util.distributed import cleanup_distributed, is_main_process  # lazily: util.distributed imports this module

    try:
        main(sys.argv[1:])
    except UserError as e:
        if not e.every_rank or is_main_process():  # the same error on every rank: said once
            print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        raise SystemExit(2) from None
    except RunStopped as e:
        if is_main_process():
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        raise SystemExit(128 + e.signum) from None
