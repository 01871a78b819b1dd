"""The command-line wrapper of every entry script and tool."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from util.distributed import cleanup_distributed, is_main_process


def run_cli(main: Callable[[Sequence[str]], None]) -> None:
    """Run ``main(sys.argv[1:])``; bad input (unknown or foreign flags, impossible settings, missing files, corrupt
    checkpoints, unknown names) ends with one 'error: ...' line and exit code 2 instead of a traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if not getattr(e, "every_rank", False) or is_main_process():  # the same error on every rank: said once
            print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup_distributed()
        raise SystemExit(2) from None
