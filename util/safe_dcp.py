"""Reading sharded checkpoints (``torch.distributed.checkpoint`` directories) as safely as ``weights_only=True``.

DCP's own ``FileSystemReader`` unpickles the ``.metadata`` file with plain ``pickle``, and its ``DefaultLoadPlanner``
reads byte items with ``torch.load(weights_only=False)``: a directory received from someone else could run code as
it is loaded. Every read of a sharded checkpoint goes through :class:`SafeReader` and :class:`SafePlanner` instead:

* the metadata is unpickled with an allow-list of exactly the classes DCP's metadata is made of;
* it must describe this project's layout: tensors everywhere, byte items only for the optimiser's
  ``param_groups`` (plain numbers, flags and names), each stored in a file inside the directory;
* byte items are read with ``torch.load(weights_only=True)``; tensors already are, by DCP.
"""
from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from util.errors import UserError

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
    layout. Raises FileNotFoundError when it is missing, UnsafeCheckpoint when it cannot be trusted."""
    path = os.path.join(directory, METADATA_FILE)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # refused globals, a torn or foreign file
            raise UnsafeCheckpoint(f"{path} is not a sharded-checkpoint index this project can read safely: "
                                   f"{type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata) and not key.startswith(BYTES_PREFIX):
            raise UnsafeCheckpoint(f"{path} declares {key!r} as a byte item; only tensors are expected there")
        if not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            raise UnsafeCheckpoint(f"{path}: {key!r} has unknown metadata {type(item).__name__}")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UnsafeCheckpoint(f"{path} points outside its directory: {name!r}")
    return metadata


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
            raise UnsafeCheckpoint(f"refusing byte item {fqn!r}: {' '.join(str(e).split())[:200]}") from None
        # the parent class unpickles again without weights_only; what it gets is only what weights_only accepted
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)
