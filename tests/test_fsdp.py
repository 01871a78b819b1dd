"""FSDP2 (--fsdp), activation checkpointing (--grad_ckpt) and sharded checkpoints, on the CPU with gloo and two
ranks: the same losses as DDP for every registered method, the same with and without recomputation, sharded resume
after a kill (bit-identical) and with another number of ranks, consolidation for fine-tuning, the README's
multi-node recipe at tiny size, and the blocks a model names through ``transformer_blocks()``.

One torchrun launch runs every training run of the comparisons (tests/run_sequence.py), to pay its start-up once.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.fsdp import FSDPModule

import main_pretrain
from models import registry
from models.registry import Method, PretrainingModel, model_names, register_method
from models.stand_ins import stand_in_teacher, tiny_model_names
from models.vit import Block, EncoderConfig
from tests.helpers import ROOT, read_log, run_script, run_sequence
from util.checkpoint import POINTER
from util.distributed import Dist
from util.errors import run_cli
from util.parallel import parallelize

# Every run: synthetic images (a pure function of the index, so any split over ranks sees the same batches), a few
# optimiser steps, clipping and accumulation on.
COMMON = ["--dataset", "synthetic", "--num_workers", "0", "--device", "cpu", "--print_freq", "1000",
          "--batch_size", "16", "--warmup_epochs", "1", "--lr", "1e-3", "--save_freq", "1"]
PRETRAIN = [*COMMON, "--synthetic_size", "128", "--accum_iter", "2", "--clip_grad", "1.0", "--save_encoder", "true"]
# 97 images: training drops the odd one; evaluation gives the ranks 49 and 48 images (4 and 3 batches)
SUPERVISED = [*COMMON, "--synthetic_size", "97", "--aa", "none", "--reprob", "0", "--clip_grad", "1.0"]
PRETRAIN_MODELS, SLIMMABLE_MODELS = tiny_model_names("pretrain"), tiny_model_names("slimmable")  # every method
MODES = {"ddp": [], "fsdp": ["--fsdp"]}
CHECKPOINTED = "xtra_vit_tiny"  # also trained with --fsdp --grad_ckpt
XTRA_EPOCHS = 3  # the XTRA runs also serve the resume tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every comparison run, two ranks: each registered method's tiny preset and fine-tuning under DDP and FSDP, and
    XTRA under FSDP + activation checkpointing too (that --grad_ckpt changes no bit is shown for every method
    without FSDP by test_activation_checkpointing_without_fsdp_changes_nothing). A method that needs a teacher gets
    its stand-in (a random one of the right shape); the slimmable models' teacher is the DDP fine-tuned
    classifier."""
    root = tmp_path_factory.mktemp("fsdp")
    sequence = []
    for model in PRETRAIN_MODELS:
        epochs = XTRA_EPOCHS if model == "xtra_vit_tiny" else 2
        teacher = stand_in_teacher(model, str(root / f"{model}-teacher.pth"))
        extra = [word for name, value in teacher.items() for word in (f"--{name}", value)]
        modes = {**MODES, "fsdp_ckpt": ["--fsdp", "--grad_ckpt"]} if model == CHECKPOINTED else MODES
        for mode, flags in modes.items():
            sequence.append(("main_pretrain", ["--model", model, *PRETRAIN, "--epochs", epochs, *extra, *flags,
                                               "--output_dir", root / f"{model}-{mode}"]))
    for mode, flags in MODES.items():
        sequence.append(("main_finetune", [*SUPERVISED, "--finetune", root / "xtra_vit_tiny-ddp" / "encoder.pth",
                                           "--epochs", 2, *flags, "--output_dir", root / f"finetune-{mode}"]))
    for model in SLIMMABLE_MODELS:
        for mode, flags in MODES.items():
            sequence.append(("main_slimmable", [
                "--model", model, *SUPERVISED, "--epochs", 2, "--full_warm_epochs", 1, "--mixup", 0,
                "--cutmix", 0, "--teacher", root / "finetune-ddp" / "checkpoint-last.pth", "--eval_ratios", 0.25, 1,
                "--throughput_iters", 1, *flags, "--output_dir", root / f"{model}-{mode}"]))
    run_sequence(sequence, nproc=2, workdir=root)
    return root


def _train_values(log: list[dict]) -> list[tuple[int, str, float]]:
    """Every number a run logged per epoch (losses, gradient norms, metrics, accuracies)."""
    return [(r["epoch"], k, v) for r in log for k, v in sorted(r.items())
            if k.startswith(("train_", "test_")) and isinstance(v, float)]


def _assert_close(a: Path, b: Path, rel: float) -> None:
    va, vb = _train_values(read_log(a)), _train_values(read_log(b))
    assert [x[:2] for x in va] == [x[:2] for x in vb] and va
    for (epoch, key, x), (_, _, y) in zip(va, vb):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-12), f"{a.name} vs {b.name}: epoch {epoch} {key}: {x} {y}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*PRETRAIN_MODELS, "finetune", *SLIMMABLE_MODELS])
def test_fsdp_gives_the_losses_of_ddp_and_activation_checkpointing_changes_nothing(runs, name):
    _assert_close(runs / f"{name}-ddp", runs / f"{name}-fsdp", rel=1e-5)
    if name == CHECKPOINTED:
        assert _train_values(read_log(runs / f"{name}-fsdp")) == _train_values(read_log(runs / f"{name}-fsdp_ckpt"))


@pytest.mark.slow
def test_fsdp_with_compile_compiles_each_block_and_trains_as_ddp(runs, tmp_path):
    """--fsdp --compile: activation checkpointing, then each block compiled, then fully_shard (torchtitan's order);
    the losses are DDP's eager ones (to the same 1e-5 as FSDP alone, on the CPU in float32)."""
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", XTRA_EPOCHS, "--fsdp",
                      "--compile", "--output_dir", tmp_path, nproc=2, timeout=900)
    assert "memory: 3 blocks compiled; FSDP2 over 2 ranks, 3 blocks + 2 other modules + root" in proc.stdout
    _assert_close(runs / "xtra_vit_tiny-ddp", tmp_path, rel=1e-5)


@pytest.mark.slow
def test_fsdp_runs_write_sharded_checkpoints_atomically_named_by_a_pointer(runs):
    out = runs / "xtra_vit_tiny-fsdp"
    assert json.loads((out / POINTER).read_text())["epoch"] == XTRA_EPOCHS - 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == \
        sorted([POINTER] + [f"checkpoint-{e}.dcp" for e in range(XTRA_EPOCHS)])
    assert not list(out.glob("*.tmp*")) and (out / "done.json").is_file()
    assert {p.name for p in (out / "checkpoint-2.dcp").iterdir()} == {"__0_0.distcp", "__1_0.distcp", ".metadata",
                                                                      "meta.pt"}
    # the plain files of a sharded run hold whole tensors, equal to the DDP run's to round-off
    ddp, fsdp = (torch.load(runs / f"xtra_vit_tiny-{m}" / "encoder.pth", weights_only=True)["model"]
                 for m in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)
    best = torch.load(runs / "finetune-fsdp" / "checkpoint-best.pth", weights_only=True)
    assert best["optimizer"] is None and all(not hasattr(t, "placements") for t in best["model"].values())


@pytest.mark.slow
@pytest.mark.parametrize("model", [n for n in PRETRAIN_MODELS if registry.MODELS[n][0].needs_teacher])
def test_the_frozen_teacher_is_neither_sharded_nor_trained(runs, model):
    directory = runs / f"{model}-fsdp" / "checkpoint-1.dcp"
    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata.keys()
    assert any(k.startswith("optim.state.") for k in keys) and not any("teacher" in k for k in keys)


@pytest.mark.slow
def test_consolidated_checkpoint_equals_ddp_weights_and_fine_tunes(runs, tmp_path):
    src = runs / "xtra_vit_tiny-fsdp"
    out = tmp_path / "xtra.pth"
    proc = run_script("models.convert", "--consolidate", src / POINTER, out)
    assert "loads the encoder" in proc.stdout and "whole xtra_vit_tiny model" in proc.stdout
    merged = torch.load(out, weights_only=True)
    ddp = torch.load(runs / "xtra_vit_tiny-ddp" / "checkpoint-last.pth", weights_only=True)
    assert merged["optimizer"] is None and merged["epoch"] == ddp["epoch"] == XTRA_EPOCHS - 1
    assert merged["model"].keys() == ddp["model"].keys()
    for k, v in ddp["model"].items():
        torch.testing.assert_close(merged["model"][k], v, rtol=1e-4, atol=1e-5)
    assert run_script("models.convert", "--consolidate", out, tmp_path / "again.pth", check=False).returncode == 2
    # --finetune reads the consolidated file, and the sharded directory directly (the same weights)
    for init in (out, src / "checkpoint-2.dcp"):
        run_script("main_finetune.py", *SUPERVISED, "--finetune", init, "--epochs", 1,
                   "--output_dir", tmp_path / f"ft-{init.suffix}")
    assert read_log(tmp_path / "ft-.pth") == read_log(tmp_path / "ft-.dcp")
    run_script("models.convert", "--export_timm", src / "checkpoint-2.dcp", tmp_path / "timm.pth")


@pytest.mark.slow
def test_a_sharded_classifier_evaluates_in_one_process_as_its_run_did(runs):
    """--eval loads the last sharded checkpoint of the 2-rank FSDP fine-tuning into a plain model."""
    proc = run_script("main_finetune.py", "--eval", "--resume", runs / "finetune-fsdp" / POINTER, *SUPERVISED,
                      "--output_dir", "")
    acc = float(re.search(r"Acc@1 ([\d.]+)", proc.stdout).group(1))
    assert acc == pytest.approx(read_log(runs / "finetune-fsdp")[-1]["test_acc1"], abs=1e-3)


@pytest.mark.slow
def test_resume_with_one_rank_continues_the_two_rank_trajectory(runs, tmp_path):
    """Saved by 2 ranks of 16 images, resumed by 1 rank of 32: the same batches and the same averaged gradient."""
    out = tmp_path / "one"
    run_script("main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", XTRA_EPOCHS, "--fsdp",
               "--batch_size", 32, "--resume", runs / "xtra_vit_tiny-fsdp" / "checkpoint-0.dcp", "--output_dir", out)
    two, one = read_log(runs / "xtra_vit_tiny-fsdp"), read_log(out)
    assert [r["epoch"] for r in one] == list(range(1, XTRA_EPOCHS))
    for a, b in zip(two[1:], one):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * a["train_loss"], (a, b)
    assert sorted(p.name for p in (out / f"checkpoint-{XTRA_EPOCHS - 1}.dcp").glob("*.distcp")) == ["__0_0.distcp"]
    # without --fsdp the sharded checkpoint loads into a plain model too (and the run goes on with single files)
    plain = tmp_path / "plain"
    run_script("main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", XTRA_EPOCHS, "--batch_size",
               32, "--resume", runs / "xtra_vit_tiny-fsdp" / "checkpoint-0.dcp", "--output_dir", plain)
    assert [r["train_loss"] for r in read_log(plain)] == pytest.approx([r["train_loss"] for r in one], rel=1e-5)
    assert (plain / "checkpoint-last.pth").is_file()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each in a session of its own) and wait until they are gone."""
    workers = _descendants(proc.pid)
    for pid in [proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_running(pid) for pid in workers):  # SIGKILL is asynchronous
        time.sleep(0.05)


def _torchrun(argv: list, nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, argv)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)


@pytest.mark.slow
def test_a_sharded_run_killed_anywhere_inside_an_epoch_resumes_there_bit_identically(runs, tmp_path):
    """Mid-epoch sharded checkpoints every update (--save_every_minutes 0.0001), two loader workers per rank; SIGKILL
    to both ranks once one is committed (the kill then lands anywhere: training, writing shards, renaming), plus a
    torn save; the same command again continues inside that epoch, and every epoch's numbers equal the
    uninterrupted run's (which had no workers). Only the newest mid-epoch directory is ever kept."""
    out = tmp_path / "killed"
    # with two loader workers per rank: the reference ran without (per-sample augmentation seeds: no difference)
    argv = ["main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", XTRA_EPOCHS, "--fsdp",
            "--num_workers", "2", "--save_every_minutes", "0.0001", "--output_dir", out]
    proc = _torchrun(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240

    def pointer() -> str:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((out / POINTER).read_text())["checkpoint"]
        return ""

    while "-step" not in pointer() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    _kill_all(proc)
    assert "-step" in pointer() and not (out / "done.json").exists()
    assert len(list(out.glob("checkpoint-*-step*.dcp"))) == 1
    torn = out / (pointer() + ".tmp")
    torn.mkdir(exist_ok=True)
    (torn / "__0_0.distcp").write_bytes(b"torn")
    rerun = run_script(*argv, nproc=2)
    assert re.search(r"continuing at epoch \d, step [1-9]", rerun.stdout), rerun.stdout[-2000:]
    assert read_log(out) == read_log(runs / "xtra_vit_tiny-fsdp") and (out / "done.json").is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint-*-step*.dcp"))


def _rank_of(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        env = dict(v.split("=", 1) for v in (Path(f"/proc/{pid}/environ").read_text().split("\0")) if "=" in v)
        return int(env["RANK"]) if "RANK" in env else None
    return None


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_one_checkpoint_and_the_rerun_is_exact(runs, tmp_path):
    """DDP with two loader workers per rank: SIGUSR1 to rank 1 alone. Both ranks finish the step, agree, commit one
    mid-epoch checkpoint and exit; rank 0 says where, once. The same command again ends as the uninterrupted run."""
    out = tmp_path / "stopped"
    argv = ["main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", XTRA_EPOCHS, "--num_workers", 2,
            "--output_dir", out]
    proc = _torchrun(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "log.txt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    rank1 = [pid for pid in _descendants(proc.pid) if _rank_of(pid) == 1 and "main_pretrain" in
             Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(min(rank1), signal.SIGUSR1)  # the rank's own process, not its loader workers
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and re.match(r"stopped: SIGUSR1 at epoch [12], step 2 of 4;", stopped[0]), err[-3000:]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["position"]["images"] == 2 * 16 * 2
    run_script(*argv, nproc=2)
    assert read_log(out) == read_log(runs / "xtra_vit_tiny-ddp")
    ours, theirs = (torch.load(d / "checkpoint-last.pth", weights_only=True)["model"]
                    for d in (out, runs / "xtra_vit_tiny-ddp"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("model", ["xtra_vit_tiny", "scala_vit_tiny"])
def test_activation_checkpointing_without_fsdp_changes_nothing(tmp_path, model):
    """One process (no FSDP): the same per-epoch numbers with and without --grad_ckpt (Scala: sliced widths)."""
    script, extra = ("main_slimmable.py", [*SUPERVISED, "--full_warm_epochs", 0, "--mixup", 0, "--cutmix", 0,
                                           "--eval_ratios", 1, "--throughput_iters", 1]) \
        if model in model_names("slimmable") else ("main_pretrain.py", PRETRAIN)
    for flags in ([], ["--grad_ckpt"]):
        run_script(script, "--model", model, *extra, "--epochs", 1, *flags, "--output_dir", tmp_path / str(flags))
    assert _train_values(read_log(tmp_path / "[]")) == _train_values(read_log(tmp_path / "['--grad_ckpt']"))


def test_a_non_finite_update_stops_a_sharded_run_before_its_checkpoint(tmp_path):
    proc = run_script("main_pretrain.py", "--model", "xtra_vit_tiny", *PRETRAIN, "--epochs", 2, "--lr", "1e10",
                      "--fsdp", "--output_dir", tmp_path, check=False)
    assert proc.returncode == 2 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "log.txt").exists()


@pytest.mark.slow
def test_the_readme_multi_node_recipe_runs_at_tiny_size(tmp_path):
    """The README's multi-node ViT-H/14 XTRA command, with its sizes made tiny and every other flag as written."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash multi-node\n(.*?)```", readme, re.S).group(1)
    words = block.replace("\\\n", " ").split()
    words = words[words.index("main_pretrain.py") + 1:]
    flags = {}  # flag -> value, or None for a bare boolean flag
    for i, w in enumerate(words):
        if w.startswith("--"):
            flags[w] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
    assert flags.get("--model") == "xtra_vit_huge_patch14" and {"--fsdp", "--grad_ckpt"} <= flags.keys(), block
    tiny = {"--model": "xtra_vit_tiny", "--batch_size": "16", "--output_dir": str(tmp_path), "--num_workers": "0"}
    argv = [w for k, v in flags.items() if k not in tiny and k != "--data_path" for w in ([k] if v is None else [k, v])]
    argv += [w for kv in tiny.items() for w in kv]
    argv += ["--dataset", "synthetic", "--synthetic_size", "128", "--device", "cpu", "--epochs", "2",
             "--warmup_epochs", "1"]
    run_script("main_pretrain.py", *argv, nproc=2)
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1] and all(0 < r["train_loss"] < 10 for r in log)
    assert (tmp_path / "checkpoint-1.dcp").is_dir() and (tmp_path / "done.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["main_pretrain.py", "--model", "xtra_vit_tiny", "--fsdp", "--amp", "fp16"], "--fsdp supports --amp"),
    (["main_pretrain.py", "--model", "saim_vit_tiny", "--fsdp", "--fuse_streams"], "--fuse_streams cannot run"),
    (["main_finetune.py", "--model", "vit_tiny_patch4", "--fsdp", "--model_ema"], "--model_ema is not supported"),
    (["main_linprobe.py", "--fsdp"], "--fsdp is not a setting of"),
])
def test_what_fsdp_cannot_do_is_refused_up_front(tmp_path, argv, message):
    proc = run_script(*argv, "--dataset", "digits", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "out").exists(), proc.stderr


class CountingBlock(Block):
    """A block that counts its forward calls (a recomputed block runs twice per training step)."""

    runs = 0

    def forward(self, *args, **kwargs):
        self.runs += 1
        return super().forward(*args, **kwargs)


class Layered(nn.Module):
    """Blocks in a list named ``layers``, which no naming convention finds: only ``transformer_blocks()`` says."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([CountingBlock(16, 2) for _ in range(2)])
        self.head = nn.Linear(16, 1)

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layers:
            x = blk(x)
        return self.head(x).mean()


def test_the_blocks_a_model_names_are_sharded_and_checkpointed_whatever_their_list_is_called():
    model = Layered()
    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    try:
        line = parallelize(model, Dist(True, 0, 1, torch.device("cpu")), fsdp=True, grad_ckpt=True, amp="off")
        assert line == "memory: activation checkpointing of 2 blocks; FSDP2 over 1 ranks, 2 blocks + root"
        assert all(isinstance(blk, FSDPModule) for blk in model.layers) and isinstance(model, FSDPModule)
        model(torch.randn(2, 5, 16)).backward()
        assert [blk.runs for blk in model.layers] == [2, 2]  # forward, then recomputed in the backward pass
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class BlocklessConfig(EncoderConfig):
    pass


class Blockless(PretrainingModel):
    """A pretraining model without transformer blocks."""

    def __init__(self, config: BlocklessConfig):
        super().__init__()
        self.config = config
        self.head = nn.Linear(2, 2)


@pytest.mark.parametrize("flags", [["--fsdp"], ["--grad_ckpt"], ["--fsdp", "--grad_ckpt"]])
def test_fsdp_or_grad_ckpt_on_a_model_without_blocks_is_one_error_line(flags, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    register_method(Method(key="blockless", name="Blockless", kind="pretrain", model_class=Blockless,
                           config_class=BlocklessConfig))
    monkeypatch.setattr(sys, "argv", ["main_pretrain.py", "--model", "blockless", "--device", "cpu", *flags,
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        run_cli(main_pretrain.main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: {' and '.join(flags)} cannot run on Blockless: it names no transformer blocks " \
                       "(transformer_blocks())"
    assert not (tmp_path / "out").exists() and not dist.is_initialized()
