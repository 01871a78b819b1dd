"""Files that a folder's own index names (a sharded checkpoint's shards, a tar-shard split's shards)."""
from __future__ import annotations

import os

from util.errors import UserError


def inside(folder: str | os.PathLike, name: str, what: str) -> str:
    """``folder``/``name``, which must lie inside ``folder`` once ``..`` and symbolic links are resolved: an index
    received from someone else must not make the reader open another file on the machine (``/etc/passwd``, another
    dataset). ``what``: the entry as the one-line refusal names it. Every rank reads the same index, so every rank
    refuses it."""
    path = os.path.join(folder, name)
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise UserError(f"{what} lies outside {folder} (it resolves to {real}); refusing to read it", every_rank=True)
    return path
