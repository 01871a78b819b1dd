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
