"""The command-line wrapper of every entry script and tool."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from util.distributed import cleanup_distributed, is_main_process
from util.errors import RunStopped, UserError


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
    """Run ``main(sys.argv[1:])``. Input the user can fix (a :class:`UserError`: unknown or foreign flags,
    impossible settings, missing files, corrupt checkpoints, unreadable data, a diverged run) ends with one
    ``error: ...`` line and exit code 2; a run stopped by a signal (:class:`RunStopped`, its checkpoint committed) is
    one ``stopped: ...`` line and exit code 128 + the signal's number; any other exception is a bug and keeps its
    traceback."""
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
