"""The one exception type for input the user can fix."""
from __future__ import annotations


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
