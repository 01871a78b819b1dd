"""What a GPU run needs, checked on the CPU: collectives on the run's device, one GPU per process, the CUDA RNG state
of this device only, one host read per optimiser update, uint8 batches normalised on the device (bit for bit as the
host normalisation was), loader workers that outlive an epoch, DDP without buffer broadcasts, FSDP units beyond the
blocks, the teacher in the run's precision, the kernel settings, and an output directory every rank sees."""
from __future__ import annotations

import datetime
import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.distributed.fsdp import FSDPModule
from torch.overrides import TorchFunctionMode

import main_finetune
import main_pretrain
import main_slimmable
import models
from models.registry import create_model
from models.stand_ins import stand_in_teacher, tiny_model_names
from models.teacher import load_teacher, teacher_tokens
from tests.helpers import FAST, ROOT, read_log, run_script
from util import distributed
from util.config import AugmentSettings
from util.datasets import build_dataset, build_loader, build_transform
from util.distributed import Dist, cuda_device, init_distributed, reduced_values
from util.errors import UserError
from util.images import device_images
from util.metrics import MetricLogger
from util.parallel import parallelize, wrap_model
from util.rng import rng_state, seeded_cpu_rng, set_rng_state
from util.train_loop import configure_kernels

assert models


@pytest.fixture
def group_of_one():
    """A gloo process group of one, made as a run makes it (init_distributed), torn down after."""
    info = init_distributed("cpu", process_group=True)
    yield info
    distributed.cleanup_distributed()


# --- collectives --------------------------------------------------------------------------------------
def test_the_meters_and_host_values_are_reduced_on_the_runs_device_whatever_the_default_device(group_of_one):
    """NCCL serves CUDA tensors only: a tensor that a collective gets must be built on the run's device, never on
    a default one (the meters' sync built a CPU tensor, which NCCL refuses after a whole epoch of compute). Under a
    meta default device, a tensor made without an explicit device lands on meta and cannot be read back."""
    meters = MetricLogger()
    meters.update(n=4, loss=0.5)
    with torch.device("meta"):
        meters.synchronize_between_processes()
        assert reduced_values([2.0, 3.0], "max") == [2.0, 3.0]
    assert meters.meters["loss"].global_avg == 0.5 and meters.meters["loss"].count == 4


def test_a_tensor_on_another_device_is_refused_by_name(group_of_one):
    with pytest.raises(RuntimeError, match="a collective got a tensor on meta; this run's collectives take tensors "
                                           "on cpu"):
        distributed.all_reduce(torch.zeros(2, device="meta"))


def test_every_collective_goes_through_util_distributed():
    """One home for collectives, where the device rule is kept: no other file calls torch.distributed's."""
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_object|broadcast|barrier|reduce|gather|"
                         r"scatter|reduce_scatter|all_to_all|broadcast_object_list)\(")
    offenders = [f"{path.relative_to(ROOT)}:{i}" for path in ROOT.rglob("*.py")
                 if ".venv" not in path.parts and path.parts[-2] != "tests" and path.name != "distributed.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_the_process_group_gets_the_timeout_and_is_bound_to_a_gpu_only_on_cuda(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_distributed("cpu", timeout_minutes=7)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(minutes=7)
    assert seen["device_id"] is None
    distributed._OWN_GROUP.clear()


# --- one GPU per process ------------------------------------------------------------------------------
@pytest.mark.parametrize("requested, local_rank, local_world, visible, expected", [
    ("cuda", 3, 8, 8, "cuda:3"),   # torchrun --nproc_per_node 8, every GPU visible
    ("cuda", 0, 1, 1, "cuda:0"),   # SLURM binds one GPU to each task: one torchrun process per task
    ("cuda", 2, 4, 4, "cuda:2"),   # 2 nodes × 4
    ("cuda:1", 0, 1, 2, "cuda:1"),  # one process, an explicit GPU
])
def test_each_process_takes_a_gpu_of_its_own(requested, local_rank, local_world, visible, expected):
    assert cuda_device(requested, local_rank, local_world, visible) == torch.device(expected)


@pytest.mark.parametrize("requested, local_rank, local_world, visible, message", [
    ("cuda", 1, 8, 1, "8 processes on this node, but each sees only 1 GPU"),
    ("cuda:0", 1, 8, 8, "--device cuda:0 puts all 8 processes of this node on GPU 0"),
    ("cuda:2", 0, 1, 1, "this process sees 1 GPU"),
    ("cuda", 0, 1, 0, "CUDA is not available"),
])
def test_processes_that_would_share_a_gpu_are_one_error_line(requested, local_rank, local_world, visible, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cuda_device(requested, local_rank, local_world, visible)


def test_the_cuda_rng_state_is_the_current_devices_alone(monkeypatch):
    """A run saved with 8 GPUs visible per process resumes with one bound to each task: the checkpoint holds this
    process's device's generator only, and it is restored into the current device."""
    state, restored = torch.ByteTensor([7, 7, 7]), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone()] * 8)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    saved = rng_state()
    assert torch.equal(saved["cuda"], state)
    set_rng_state(saved)
    assert len(restored) == 1 and torch.equal(restored[0], state)
    set_rng_state({**saved, "cuda": []})  # a checkpoint of a CPU run restores nothing into CUDA
    assert len(restored) == 1


# --- one host read per optimiser update -------------------------------------------------------------------
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "equal", "numpy", "cpu", "nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (each one a wait for the device on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


def count_host_reads(monkeypatch, main) -> list[int]:
    """Patches ``main.train_one_epoch`` to count each epoch's host reads; the counts fill the list returned."""
    counts, original = [], main.train_one_epoch

    def counted(*args, **kwargs):
        with HostReads() as reads:
            stats = original(*args, **kwargs)
        counts.append(reads.count)
        return stats

    monkeypatch.setattr(main, "train_one_epoch", counted)
    return counts


@pytest.mark.parametrize("main, model, extra", [
    *[pytest.param(main_pretrain, m, ["--epochs", "1"], marks=[] if m == "xtra_vit_tiny" else pytest.mark.slow)
      for m in tiny_model_names("pretrain")],
    (main_pretrain, "mae_vit_tiny", ["--epochs", "1", "--accum_iter", "2"]),
    (main_finetune, "vit_tiny_patch4", ["--epochs", "1", "--input_size", "32", "--aa", "none", "--reprob", "0",
                                        "--mixup", "0.8"]),
    pytest.param(main_slimmable, "scala_vit_tiny", ["--epochs", "2", "--full_warm_epochs", "1"],
                 marks=pytest.mark.slow),
])
def test_an_epoch_reads_the_device_once_per_optimiser_update(main, model, extra, tmp_path, monkeypatch):
    """Inside the training loop the host waits for the device once per update (the finiteness checks, the votes
    on saving and stopping and the logged values in one read), plus a few reads per epoch (the data order, the
    closing check of the weights). Counted on the CPU by intercepting every tensor read of the training process
    (the images are read and augmented by two loader workers, as on a GPU node)."""
    teacher = stand_in_teacher(model, str(tmp_path / "teacher.pth")) if main is main_pretrain else {}
    counts = count_host_reads(monkeypatch, main)
    run_script(f"{main.__name__}.py", *FAST, "--num_workers", "2", "--model", model, "--batch_size", "64", *extra,
               *[w for k, v in teacher.items() for w in (f"--{k}", v)], "--output_dir", tmp_path / "run")
    accum = int(extra[extra.index("--accum_iter") + 1]) if "--accum_iter" in extra else 1
    updates = 1438 // 64 // accum  # the digits' training images, whole batches, whole groups
    for reads in counts:
        assert updates <= reads <= updates + 4, (reads, updates)
    assert len(counts) == int(extra[extra.index("--epochs") + 1])


# --- images on the device ----------------------------------------------------------------------------------
def test_uint8_batches_normalised_on_the_device_equal_the_host_normalisation_bit_for_bit():
    """The crop-only transforms end in uint8 pixels; util.images.device_images gives exactly what torchvision's
    ToTensor + Normalize gave on the host (the same float32 operations), so every method's numbers are unchanged."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
    for is_train in (True, False):
        ours = build_transform(32, is_train=is_train, crop_scale=(0.2, 1.0))
        kwargs = dict(scale=(0.2, 1.0), color_jitter=None) if is_train else {}
        host = create_transform(32, is_training=is_train, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                                std=IMAGENET_DEFAULT_STD, **kwargs)
        with seeded_cpu_rng(5):
            pixels = torch.stack([ours(img) for img in images])
        with seeded_cpu_rng(5):
            expected = torch.stack([host(img) for img in images])
        assert pixels.dtype == torch.uint8
        assert torch.equal(device_images(pixels, torch.device("cpu")), expected)
    # timm's supervised recipe ends with random erasing, which fills normalised pixels: it normalises on the host
    assert build_transform(32, is_train=True, augment=AugmentSettings())(images[0]).dtype == torch.float32


def test_loader_workers_outlive_an_epoch_and_see_each_epochs_order(tmp_path):
    """persistent_workers: the sampler hands each epoch's order to the workers; tar shards, read by the workers
    themselves, get the epoch through memory they share. Each epoch's batches equal those of workers started for
    that epoch alone."""
    run_script("util.make_shards", "--dataset", "digits", tmp_path, "--samples_per_shard", "200", "--workers", "1")
    transform = build_transform(16, is_train=True)
    for source in (build_dataset("digits", "train", transform, 16),
                   build_dataset("imagefolder", "train", transform, 16, str(tmp_path))):
        def epoch_batches(loader, epoch):
            order = loader.dataset if isinstance(loader.dataset, torch.utils.data.IterableDataset) else \
                loader.sampler
            order.set_epoch(epoch)
            return [targets for _, (_, targets) in zip(range(3), loader)]

        persistent = build_loader(source, 64, 2, is_train=True, seed=3)
        assert persistent.persistent_workers
        kept = [epoch_batches(persistent, epoch) for epoch in (0, 1)]
        fresh = [epoch_batches(build_loader(source, 64, 2, is_train=True, seed=3), epoch) for epoch in (0, 1)]
        for a, b in zip(kept, fresh):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(*kept))


# --- the model's parallel wrappers -------------------------------------------------------------------------
def test_ddp_broadcasts_buffers_only_when_a_module_updates_its_own(group_of_one):
    xtra = wrap_model(create_model("xtra_vit_tiny"), group_of_one)
    assert xtra.broadcast_buffers is False  # XTRA's buffers are constants
    probe = wrap_model(torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)), group_of_one)
    assert probe.broadcast_buffers is True  # running BatchNorm statistics


def test_xtras_pixel_heads_are_fsdp_units_of_their_own(group_of_one):
    model = create_model("xtra_vit_tiny")
    line = parallelize(model, Dist(True, 0, 1, torch.device("cpu")), fsdp=True, grad_ckpt=False, amp="off")
    assert line.endswith("3 blocks + 2 other modules + root"), line
    assert isinstance(model.proj, FSDPModule) and all(isinstance(h, FSDPModule) for h in model.aim_proj)
    loss, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()


# --- precision ---------------------------------------------------------------------------------------------
def test_the_teacher_runs_in_the_callers_precision(tmp_path, monkeypatch):
    """D-iGPT's teacher adds no autocast of its own: with --amp off it computes in float32 on a GPU too."""
    overrides = stand_in_teacher("digpt_vit_tiny", str(tmp_path / "teacher.pth"))
    teacher = load_teacher(str(overrides["teacher"]))
    contexts = []
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contexts.append((args, kwargs)))
    cls, patches = teacher_tokens(teacher, torch.randn(2, 3, 32, 32))
    assert not contexts and cls.dtype == patches.dtype == torch.float32


def test_tf32_and_deterministic_kernels_are_set_for_the_run():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        configure_kernels(torch.device("cuda", 0), tf32=True, deterministic=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled()
        configure_kernels(torch.device("cuda", 0), tf32=False, deterministic=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        configure_kernels(torch.device("cpu"), tf32=True, deterministic=False)
        assert not torch.backends.cuda.matmul.allow_tf32  # a CPU run leaves the CUDA settings alone
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[4:]


def test_a_deterministic_run_trains_as_the_default_one_on_the_cpu(tmp_path):
    args = [*FAST, "--model", "xtra_vit_tiny", "--epochs", "1"]
    run_script("main_pretrain.py", *args, "--output_dir", tmp_path / "default")
    try:
        run_script("main_pretrain.py", *args, "--deterministic", "--output_dir", tmp_path / "deterministic")
    finally:
        torch.use_deterministic_algorithms(False)
    assert read_log(tmp_path / "default") == read_log(tmp_path / "deterministic")


# --- the output directory ----------------------------------------------------------------------------------
NODE_LOCAL = """
import os, runpy, sys
os.makedirs(f"node{os.environ['RANK']}", exist_ok=True)
os.chdir(f"node{os.environ['RANK']}")  # each rank its own directory under the same relative path
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_an_output_directory_that_not_every_rank_sees_is_one_error_line(tmp_path):
    """Two ranks whose relative --output_dir lands in a directory of their own, as a node-local path does."""
    wrapper = tmp_path / "node_local.py"
    wrapper.write_text(NODE_LOCAL)
    proc = run_script(str(wrapper), str(ROOT), str(ROOT / "main_pretrain.py"), *FAST, "--model", "xtra_vit_tiny",
                      "--epochs", "1", "--output_dir", "run", nproc=2, check=False, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [
        "error: --output_dir run is not one directory that every rank sees: rank(s) 1 of 2 do not see the file "
        "rank 0 wrote there; put it on a filesystem that every node shares"], proc.stderr
    assert not any((tmp_path / f"node{r}" / "run").exists() for r in (0, 1))  # the check leaves nothing behind


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
