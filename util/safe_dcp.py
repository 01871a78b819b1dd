"""Reading sharded checkpoints (``torch.distributed.checkpoint`` directories) as safely as ``weights_only=True``.

DCP's own ``FileSystemReader`` unpickles the ``.metadata`` file with plain ``pickle``, and its ``DefaultLoadPlanner``
reads byte items with ``torch.load(weights_only=False)``: a directory received from someone else could run code as
it is loaded. Every read of a sharded checkpoint goes through :class:`SafeReader` and :class:`SafePlanner` instead:

* the metadata is unpickled with an allow-list of exactly the classes DCP's metadata is made of;
* it must describe this project's layout: tensors everywhere, byte items only for the optimiser's
  ``param_groups`` (plain numbers, flags and names), each stored in a file inside the directory (symbolic links
  resolved);
* its sizes must fit the files: each file holds the byte ranges placed in it, each tensor's chunks tile its
  declared shape and each chunk is stored in at least the bytes of its values. So a load allocates at most what
  the files hold, however large a shape the index declares;
* byte items are read with ``torch.load(weights_only=True)``; tensors already are, by DCP.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from util.errors import UserError
from util.paths import inside

METADATA_FILE = ".metadata"
BYTES_PREFIX = "optim.param_groups."  # the only non-tensor values the project's sharded checkpoints hold

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global (a function to call, a class to build) is refused
    before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class UnsafeCheckpoint(UserError):
    """A sharded checkpoint whose contents are not what this project writes (possibly hostile). Every rank reads the
    same files, so every rank raises it."""

    def __init__(self, message: str):
        super().__init__(message, every_rank=True)


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """The ``.metadata`` of a sharded checkpoint, unpickled with the allow-list and checked against the project's
    layout and against the files it names. Raises OSError (FileNotFoundError) when it or a file it names is missing,
    UserError when it cannot be trusted."""
    path = inside(directory, METADATA_FILE, os.path.join(directory, METADATA_FILE))
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # refused globals, a torn or foreign file
            raise UnsafeCheckpoint(f"{path} is not a sharded-checkpoint index this project can read safely: "
                                   f"{type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    try:
        for key, item in metadata.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata) and not key.startswith(BYTES_PREFIX):
                raise UnsafeCheckpoint(f"{path} declares {key!r} as a byte item; only tensors are expected there")
            if not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
                raise UnsafeCheckpoint(f"{path}: {key!r} has unknown metadata {type(item).__name__}")
        _check_files(directory, path, metadata.storage_data)
        for key, item in metadata.state_dict_metadata.items():
            if isinstance(item, TensorStorageMetadata):
                _check_tensor(path, key, item, metadata.storage_data)
    except (AttributeError, TypeError) as e:  # a field missing or of another type than DCP writes
        raise UnsafeCheckpoint(f"{path} is malformed: {type(e).__name__}: {e}") from None
    return metadata


def _counts(values) -> bool:
    """Whether ``values`` is a shape, offsets or a byte range: a sequence of non-negative integers."""
    return isinstance(values, (tuple, list)) and all(isinstance(v, int) and v >= 0 for v in values)


def _check_files(directory: str | os.PathLike, path: str, storage: dict) -> None:
    """Every file the index names lies inside ``directory`` (links resolved) and holds the byte ranges the index
    places in it, none overlapping another."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for info in storage.values():
        name, span = info.relative_path, (info.offset, info.length)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UnsafeCheckpoint(f"{path} points outside its directory: {name!r}")
        if not _counts(span):
            raise UnsafeCheckpoint(f"{path} places a malformed byte range {span!r} in {name}")
        ranges.setdefault(name, []).append(span)
    for name, spans in ranges.items():
        size = os.path.getsize(inside(directory, name, os.path.join(directory, name)))
        spans.sort()
        ends = [offset + length for offset, length in spans]
        if any(end > next_offset for end, (next_offset, _) in zip(ends, spans[1:])) or ends[-1] > size:
            raise UnsafeCheckpoint(f"cannot read sharded checkpoint {directory}: {name} holds {size} bytes, which do "
                                   f"not fit the {len(spans)} items its index places there (a torn or foreign file)")


def _check_tensor(path: str, key: str, item: TensorStorageMetadata, storage: dict) -> None:
    """A tensor's chunks tile its declared shape and each is stored in at least the bytes of its values: with
    :func:`_check_files`, what the tensor needs in memory is bounded by the files' sizes."""
    size, dtype = item.size, item.properties.dtype
    if not (_counts(size) and isinstance(dtype, torch.dtype) and isinstance(item.chunks, list)
            and all(_counts(c.offsets) and _counts(c.sizes) and len(c.offsets) == len(c.sizes) == len(size)
                    for c in item.chunks)):
        raise UnsafeCheckpoint(f"{path}: {key!r} has a malformed shape, dtype or chunk list")
    if not _tiles(size, item.chunks):
        raise UnsafeCheckpoint(f"{path}: the chunks of {key!r} do not cover its declared shape {tuple(size)} exactly")
    for chunk in item.chunks:
        info = storage.get(MetadataIndex(key, chunk.offsets))
        needed = math.prod(chunk.sizes) * dtype.itemsize
        if info is None or info.length < needed:
            raise UnsafeCheckpoint(f"{path}: {key!r} at {tuple(chunk.offsets)} needs {needed} bytes for its "
                                   f"{tuple(chunk.sizes)} values but stores {info.length if info else 0}")


def _tiles(size: tuple[int, ...], chunks: list[ChunkStorageMetadata]) -> bool:
    """Whether ``chunks`` tile a tensor of ``size`` exactly: each inside it, no two overlapping, their volumes adding
    up to its volume."""
    if any(o + s > d for c in chunks for o, s, d in zip(c.offsets, c.sizes, size)):
        return False
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
        return False
    if not size:  # a scalar: one chunk of volume 1
        return True
    # sorted along the first dimension, a chunk can only overlap those whose span there reaches it: none of the
    # row blocks FSDP writes, so this stays fast with thousands of ranks
    reaching: list[ChunkStorageMetadata] = []
    for box in sorted((c for c in chunks if math.prod(c.sizes)), key=lambda c: tuple(c.offsets)):
        reaching = [c for c in reaching if c.offsets[0] + c.sizes[0] > box.offsets[0]]
        if any(all(a < b + t and b < a + s for a, s, b, t in zip(box.offsets, box.sizes, c.offsets, c.sizes))
               for c in reaching):
            return False
        reaching.append(box)
    return True


def load_failure(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line. A refusal says what the file holds, without
    PyTorch's advice to load it again with ``weights_only=False``, which would run whatever it holds."""
    message = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in message:
        named = re.search(r"GLOBAL (\S+)", message)  # the class or function the pickle names, if that was refused
        return ("it holds objects other than tensors and plain values" + (f" ({named.group(1)})" if named else "")
                + ", so it was not loaded")
    return f"{type(error).__name__}: {' '.join(message.split())[:300]}"


class SafeReader(FileSystemReader):
    """DCP's file-system reader with :func:`read_metadata` in place of its plain ``pickle.load``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, but byte items are unpickled with ``weights_only=True`` (and only where the project
    writes them)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        if not fqn.startswith(BYTES_PREFIX):
            raise UnsafeCheckpoint(f"refusing byte item {fqn!r}: only tensors are expected there")
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(f"refusing byte item {fqn!r}: {load_failure(e)}") from None
        # the parent class unpickles again without weights_only; what it gets is only what weights_only accepted
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)
