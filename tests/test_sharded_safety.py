"""Sharded checkpoints (--fsdp runs) load as safely as weights_only=True files: a hostile ``.metadata`` or byte item
never runs code on any loading path, no file outside the directory is read, a forged shape allocates nothing, and a
missing or torn shard is one error line on rank 0 with every rank exiting.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex

from tests.helpers import FAST, read_log, run_script
from util.checkpoint import META, POINTER
from util.safe_dcp import METADATA_FILE, read_metadata

PT = [*FAST, "--dataset", "synthetic", "--synthetic_size", "32", "--batch_size", "16", "--warmup_epochs", "1",
      "--save_freq", "1"]
XTRA = ["--model", "xtra_vit_tiny", *PT]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A real sharded run (one rank, --fsdp): checkpoint-0.dcp and checkpoint-last.json."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    run_script("main_pretrain.py", *XTRA, "--epochs", "1", "--fsdp", "--output_dir", out)
    assert (out / "checkpoint-0.dcp").is_dir() and (out / POINTER).is_file()
    return out


def _copy(genuine: Path, dest: Path) -> Path:
    """A copy of the run directory, without the files that would let a loader skip the sharded checkpoint."""
    shutil.copytree(genuine, dest)
    for name in ("checkpoint-last.pth", "done.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


def _hostile_metadata(run: Path, marker: Path) -> None:
    """``.metadata`` replaced by a pickle whose ``__reduce__`` runs a command."""
    (run / "checkpoint-0.dcp" / METADATA_FILE).write_bytes(pickle.dumps(Payload(marker)))


def _hostile_byte_item(run: Path, marker: Path, key: str) -> None:
    """The genuine metadata, but ``key`` declared a byte item whose bytes are a pickle that runs a command."""
    directory = run / "checkpoint-0.dcp"
    metadata = read_metadata(directory)
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    (directory / "evil.distcp").write_bytes(evil.getvalue())
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {i: s for i, s in metadata.storage_data.items() if i.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(evil.getvalue()))
    with open(directory / METADATA_FILE, "wb") as f:
        pickle.dump(metadata, f)


def _loading_commands(run: Path, out: Path) -> dict[str, tuple[str, list]]:
    """Every path that reads a sharded checkpoint, pointed at ``run``'s."""
    dcp_dir = run / "checkpoint-0.dcp"
    ft = [*FAST, "--model", "vit_tiny_patch4", "--input_size", "32", "--epochs", "1", "--output_dir", out]
    return {
        "resume": ("main_pretrain.py", [*XTRA, "--epochs", "2", "--resume", run / POINTER, "--output_dir", out]),
        "auto_resume": ("main_pretrain.py", [*XTRA, "--epochs", "2", "--output_dir", run]),
        "finetune": ("main_finetune.py", [*ft, "--finetune", dcp_dir]),
        "linear_probe": ("main_linprobe.py", [*ft, "--finetune", dcp_dir, "--probe", "linear"]),
        "attentive_probe": ("main_linprobe.py", [*ft, "--finetune", dcp_dir, "--probe", "attentive"]),
        "teacher": ("main_pretrain.py", ["--model", "digpt_vit_tiny", *PT, "--epochs", "1", "--teacher", run / POINTER,
                                         "--output_dir", out]),
        "teacher_directory": ("main_pretrain.py", ["--model", "digpt_vit_tiny", *PT, "--epochs", "1", "--teacher",
                                                   dcp_dir, "--output_dir", out]),
        "init_from": ("main_slimmable.py", ["--model", "scala_vit_tiny", *FAST, "--epochs", "1", "--init_from",
                                            dcp_dir, "--output_dir", out]),
        "visualize": ("visualize.py", ["--checkpoint", dcp_dir, "--dataset", "digits", "--output", out / "v.png"]),
        "consolidate": ("models.convert", ["--consolidate", run / POINTER, out / "c.pth"]),
        "export_timm": ("models.convert", ["--export_timm", dcp_dir, out / "t.pth"]),
        "from": ("models.convert", ["--from", "xtra", dcp_dir, out / "x.pth"]),
    }


PATHS = list(_loading_commands(Path("r"), Path("o")))


def _assert_refused(proc: subprocess.CompletedProcess, marker: Path, out: Path, why: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    assert not out.exists() or not any(out.iterdir()), "something was written"


@pytest.mark.parametrize("path", PATHS)
def test_a_hostile_metadata_file_is_refused_before_it_runs(genuine, tmp_path, path):
    run, marker, out = _copy(genuine, tmp_path / "evil"), tmp_path / "marker", tmp_path / "out"
    _hostile_metadata(run, marker)
    script, argv = _loading_commands(run, out)[path]
    _assert_refused(run_script(script, *argv, check=False), marker, out, "posix.system is not part of DCP's metadata")


@pytest.mark.parametrize("path", ["resume", "finetune", "consolidate"])
def test_a_tensor_declared_as_a_pickled_byte_item_is_refused(genuine, tmp_path, path):
    run, marker, out = _copy(genuine, tmp_path / "evil"), tmp_path / "marker", tmp_path / "out"
    _hostile_byte_item(run, marker, "model.encoder.pos_embed")
    script, argv = _loading_commands(run, out)[path]
    _assert_refused(run_script(script, *argv, check=False), marker, out,
                    "declares 'model.encoder.pos_embed' as a byte item")


def test_a_pickled_optimiser_byte_item_is_read_with_weights_only(genuine, tmp_path):
    """Byte items where the project writes them (the optimiser's param_groups) are unpickled with weights_only."""
    run, marker, out = _copy(genuine, tmp_path / "evil"), tmp_path / "marker", tmp_path / "out"
    _hostile_byte_item(run, marker, "optim.param_groups.0.lr")
    script, argv = _loading_commands(run, out)["resume"]
    _assert_refused(run_script(script, *argv, check=False), marker, out, "refusing byte item 'optim.param_groups.0.lr'")


_opened: list[str] | None = None  # the paths this process opens while a test records them


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)  # sees every open: builtins, os.open, pathlib, torch.load, DCP's reader


@contextlib.contextmanager
def _recording_opens() -> Iterator[set[str]]:
    """The files this process opens in the block, links resolved (filled in as the block ends)."""
    global _opened
    _opened, resolved = [], set()
    try:
        yield resolved
    finally:
        resolved.update(os.path.realpath(p) for p in _opened)
        _opened = None


# the paths that opened a linked shard before it was checked (auto-resume with --fsdp)
LINK_PATHS = ["consolidate", "export_timm", "linear_probe", "finetune", "teacher", "auto_resume"]


@pytest.mark.parametrize("path", LINK_PATHS)
def test_a_shard_linked_to_a_file_outside_the_directory_is_refused_unread(genuine, tmp_path, path):
    """The genuine shard moved out of the directory and linked back: it would load as it is, but it is not the
    directory's own file; refused with one line naming it, and never opened."""
    run, out, outside = _copy(genuine, tmp_path / "run"), tmp_path / "out", tmp_path / "elsewhere.distcp"
    shard = next((run / "checkpoint-0.dcp").glob("*.distcp"))
    shard.rename(outside)
    shard.symlink_to(outside)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    script, argv = _loading_commands(run, out)[path]
    with _recording_opens() as opened:
        proc = run_script(script, *argv, *(["--fsdp"] if path == "auto_resume" else []), check=False)
    _assert_refused(proc, tmp_path / "marker", out, f"{shard} lies outside {shard.parent}")
    assert str(outside) not in opened, "the file outside was read"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", [METADATA_FILE, META])
def test_an_index_or_meta_file_linked_outside_the_directory_is_refused_unread(genuine, tmp_path, name):
    run, out, outside = _copy(genuine, tmp_path / "run"), tmp_path / "out", tmp_path / "elsewhere"
    linked = run / "checkpoint-0.dcp" / name
    linked.rename(outside)
    linked.symlink_to(outside)
    script, argv = _loading_commands(run, out)["consolidate"]
    with _recording_opens() as opened:
        proc = run_script(script, *argv, check=False)
    _assert_refused(proc, tmp_path / "marker", out, f"{linked} lies outside {linked.parent}")
    assert str(outside) not in opened, "the file outside was read"


def _forged_shape(run: Path, forgery: str) -> None:
    """``model.encoder.pos_embed`` declared 100000 x 100000 x 64 (2.5 TB of float32): the shape alone, also its
    chunk, or also the bytes stored for that chunk."""
    directory, key = run / "checkpoint-0.dcp", "model.encoder.pos_embed"
    metadata = read_metadata(directory)
    item, huge = metadata.state_dict_metadata[key], torch.Size([100000, 100000, 64])
    item.size = huge
    if forgery in ("chunk", "bytes"):
        item.chunks = [ChunkStorageMetadata(torch.Size([0, 0, 0]), huge)]
    if forgery == "bytes":
        metadata.storage_data[MetadataIndex(key, torch.Size([0, 0, 0]))].length = huge.numel() * 4
    with open(directory / METADATA_FILE, "wb") as f:
        pickle.dump(metadata, f)


@pytest.mark.parametrize("path", ["consolidate", "finetune"])
@pytest.mark.parametrize("forgery, why", [("shape", "do not cover its declared shape (100000, 100000, 64)"),
                                          ("chunk", "needs 2560000000000 bytes"),
                                          ("bytes", "which do not fit the")])
def test_a_forged_shape_is_refused_before_anything_is_allocated(genuine, tmp_path, path, forgery, why):
    run, out = _copy(genuine, tmp_path / "run"), tmp_path / "out"
    _forged_shape(run, forgery)
    script, argv = _loading_commands(run, out)[path]
    _assert_refused(run_script(script, *argv, check=False), tmp_path / "marker", out, why)


@pytest.mark.parametrize("kind", ["meta.pt", "single file", "TorchScript file"])
def test_a_pickled_object_in_a_checkpoint_file_is_one_line_without_the_unsafe_advice(genuine, tmp_path, kind):
    """torch's refusal spans lines and advises loading with weights_only=False; the user sees one line that says
    what the file holds."""
    run, marker, out = _copy(genuine, tmp_path / "run"), tmp_path / "marker", tmp_path / "out"
    target = run / "checkpoint-0.dcp" / META if kind == "meta.pt" else tmp_path / "evil.pth"
    if kind == "TorchScript file":
        with warnings.catch_warnings():  # torch.jit is deprecated; users still have such files
            warnings.simplefilter("ignore")
            torch.jit.script(torch.nn.Linear(2, 2)).save(target)
    else:
        torch.save({"epoch": 0, "model": Payload(marker)}, target)
    script, argv = _loading_commands(run, out)["finetune"]
    if kind != "meta.pt":
        argv = [*argv[:-1], target]
    proc = run_script(script, *argv, check=False)
    named = "" if kind == "TorchScript file" else " (posix.system)"
    _assert_refused(proc, marker, out, f"cannot read checkpoint {target}: it holds objects other than tensors and "
                                       f"plain values{named}, so it was not loaded")
    assert "weights_only" not in proc.stderr


@pytest.mark.parametrize("name", ["../elsewhere/checkpoint-0.dcp", "/tmp/checkpoint-0.dcp"])
def test_a_pointer_that_names_a_directory_elsewhere_is_refused(genuine, tmp_path, name):
    """checkpoint-last.json names a directory beside it, never one elsewhere on the machine."""
    elsewhere = _copy(genuine, tmp_path / "elsewhere")
    run, out = _copy(genuine, tmp_path / "run"), tmp_path / "out"
    (run / POINTER).write_text(json.dumps({"checkpoint": name, "epoch": 0}))
    proc = run_script("models.convert", "--consolidate", run / POINTER, out / "c.pth", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint pointer {run / POINTER} names {name!r}, not a directory beside it"], proc.stderr
    assert not out.exists() and (elsewhere / "checkpoint-0.dcp").is_dir()


def test_genuine_sharded_checkpoints_still_resume_and_consolidate(genuine, tmp_path):
    run = _copy(genuine, tmp_path / "run")
    run_script("main_pretrain.py", *XTRA, "--epochs", "2", "--fsdp", "--output_dir", run)
    assert [r["epoch"] for r in read_log(run)] == [0, 1]
    run_script("models.convert", "--consolidate", run / POINTER, tmp_path / "c.pth")
    consolidated = torch.load(tmp_path / "c.pth", weights_only=True)
    assert consolidated["epoch"] == 1 and "encoder.pos_embed" in consolidated["model"]
    # a sharded run's directory is a D-iGPT teacher as it stands
    run_script("main_pretrain.py", "--model", "digpt_vit_tiny", *PT, "--epochs", "1", "--teacher",
               run / "checkpoint-1.dcp", "--output_dir", tmp_path / "digpt")
    assert [r["epoch"] for r in read_log(tmp_path / "digpt")] == [0]


@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_a_missing_or_torn_shard_is_one_error_line_in_one_process(genuine, tmp_path, fault):
    run, out = _copy(genuine, tmp_path / "run"), tmp_path / "out"
    shard = next((run / "checkpoint-0.dcp").glob("*.distcp"))
    shard.unlink() if fault == "missing" else shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 10])
    for path in ("finetune", "consolidate"):
        script, argv = _loading_commands(run, out)[path]
        _assert_refused(run_script(script, *argv, check=False), tmp_path / "marker", out,
                        "cannot read sharded checkpoint")


@pytest.mark.slow
def test_under_torchrun_a_torn_shard_or_hostile_index_is_one_line_and_every_rank_exits(genuine, tmp_path):
    """Auto-resume of a sharded run by two ranks: each fault is one error line (rank 0's), exit 2, the committed
    files untouched."""
    for fault in ("missing", "hostile"):
        run, marker = _copy(genuine, tmp_path / fault), tmp_path / f"marker-{fault}"
        if fault == "missing":
            next((run / "checkpoint-0.dcp").glob("*.distcp")).unlink()
        else:
            _hostile_metadata(run, marker)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        proc = run_script("main_pretrain.py", *XTRA, "--epochs", "2", "--fsdp", "--output_dir", run, nproc=2,
                          check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        # torchrun reports the failed workers with its own traceback; none comes from the project's code
        assert not re.search(r'File ".*/(main_\w+\.py|util/|models/)', proc.stderr), proc.stderr[-3000:]
        assert not marker.exists()
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        assert json.loads((run / POINTER).read_text())["epoch"] == 0


def test_the_metadata_allow_list_reads_a_real_index_without_plain_pickle(genuine, monkeypatch):
    """The safe reader needs no class outside its allow-list for what DCP writes (plain pickle would fail here)."""
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("plain pickle.load was used"))
    metadata = read_metadata(genuine / "checkpoint-0.dcp")
    assert "model.encoder.pos_embed" in metadata.state_dict_metadata
