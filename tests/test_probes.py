"""Evaluating an encoder (docs/evaluation.md): an lr sweep trains every head as its own run would, on one frozen
forward, and a head that diverges is frozen and named while the others go on; the best head's checkpoint is a single
probe that --eval reads; the kNN probe is DINO's vote on the probe's features; a suite runs a manifest's benchmarks
in one process (one process group under torchrun), continues where a kill stopped it and writes its table; bad input
is one error line before anything is written."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageOps

import main_linprobe
from engine_monitors import knn_accuracies, knn_top1
from models.formats import load_checkpoint, load_encoder_weights
from models.probes import pooled_features
from models.registry import create_model
from models.stand_ins import random_init_checkpoint
from models.vit import VisionTransformer
from tests.helpers import FAST, ROOT, kill_inside_epoch, one_error_line, read_log, run_script, tensorboard_scalars
from tests.test_device import count_host_reads
from tests.test_monitors import _reference_knn
from util.datasets import DigitsDataset, build_dataset, build_transform
from util.decoding import TensorCrop
from util.images import device_images

SWEEP = ["--batch_size", "64", "--epochs", "1", "--warmup_epochs", "0.5", "--optimizer", "adamw", "--clip_grad", "0.3",
         "--min_lr", "1e-4", "--accum_iter", "2"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A randomly initialised xtra_vit_tiny encoder (32 px, its block-causal mask kept by the probes)."""
    path = tmp_path_factory.mktemp("encoder") / "encoder.pth"
    random_init_checkpoint("xtra_vit_tiny", str(path), seed=0)
    return path


# --- the lr sweep ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["linear", "attentive"])
def test_every_head_of_a_sweep_trains_as_its_own_run_and_a_diverged_one_is_frozen(encoder, tmp_path, probe):
    """Three heads on one frozen forward (accumulation 2, clipping, warmup from lr/10, cosine to a floor): each
    logs, evaluates and ends with the weights of a run at its lr alone. The third lr diverges: alone, its run stops
    with an error; in the sweep it is frozen and named, and the others go on. checkpoint-best.pth is the best head as
    a single probe, which --eval evaluates."""
    args = [*FAST, "--finetune", encoder, "--probe", probe, *SWEEP,
            *(["--aa", "none", "--reprob", "0"] if probe == "attentive" else [])]
    run_script("main_linprobe.py", *args, "--lrs", "1e-3,1e-2,1e38", "--output_dir", tmp_path / "sweep")
    sweep = read_log(tmp_path / "sweep")
    heads = torch.load(tmp_path / "sweep" / "checkpoint-last.pth", weights_only=True)["model"]
    for i, lr in enumerate(["1e-3", "1e-2"]):
        name = f"lr{float(lr)!r}"
        run_script("main_linprobe.py", *args, "--lr", lr, "--log_dir", "", "--output_dir", tmp_path / lr)
        for together, alone in zip(sweep, read_log(tmp_path / lr), strict=True):
            for key in ("train_lr", "train_loss", "train_grad_norm"):
                assert together[f"{key}/{name}"] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), (lr, key)
            for key in ("acc1", "acc5", "loss"):
                assert together[f"test_{key}/{name}"] == pytest.approx(alone[f"test_{key}"], rel=1e-6), (lr, key)
        own = torch.load(tmp_path / lr / "checkpoint-last.pth", weights_only=True)["model"]
        for key, value in own.items():
            if key.startswith("head.") and value.is_floating_point():
                torch.testing.assert_close(heads[f"head.{i}.{key[5:]}"], value, rtol=1e-6, atol=1e-7)
    alone = run_script("main_linprobe.py", *args, "--lr", "1e38", "--output_dir", tmp_path / "1e38", check=False)
    assert "non-finite" in one_error_line(alone)
    assert all(r["diverged/lr1e+38"].startswith("epoch 0, step ") for r in sweep)
    assert sweep[-1]["test_lr"] in (1e-3, 1e-2)  # a diverged head is never the best
    assert [e.value for e in tensorboard_scalars(tmp_path / "sweep")["perf/test_acc1/lr0.001"]] == \
        pytest.approx([r["test_acc1/lr0.001"] for r in sweep])

    best_epoch = max(sweep, key=lambda r: r["test_acc1"])
    best = torch.load(tmp_path / "sweep" / "checkpoint-best.pth", weights_only=True)
    assert (best["epoch"], best["args"]["lr"], best["args"]["lrs"]) == (best_epoch["epoch"], best_epoch["test_lr"], "")
    assert not any(k.startswith("head.0.") for k in best["model"]) and best["optimizer"] is None
    proc = run_script("main_linprobe.py", "--eval", "--resume", tmp_path / "sweep" / "checkpoint-best.pth",
                      "--output_dir", "", *FAST)
    assert f"* Acc@1 {best_epoch['test_acc1']:.3f}" in proc.stdout
    exported = run_script("models.convert", "--export_timm", tmp_path / "sweep" / "checkpoint-best.pth",
                          tmp_path / "timm.pth")
    assert "wrote" in exported.stdout and (tmp_path / "timm.pth").is_file()


def test_a_sweep_reads_the_device_once_per_optimiser_update(encoder, tmp_path, monkeypatch):
    """Three heads, each with its own finiteness flags, gradient norm and logged values: still one host read per
    update (tests/test_device.py counts those of every method's run the same way)."""
    counts = count_host_reads(monkeypatch, main_linprobe)
    run_script("main_linprobe.py", *FAST, "--num_workers", "2", "--finetune", encoder, "--probe", "linear",
               "--lrs", "1e-3,1e-2,1e38", "--optimizer", "adamw", "--batch_size", "64", "--epochs", "1",
               "--warmup_epochs", "0", "--log_dir", "", "--output_dir", tmp_path)
    updates = 1438 // 64
    assert len(counts) == 1 and updates <= counts[0] <= updates + 4, (counts, updates)


# --- the kNN probe -----------------------------------------------------------------------------------------------
def test_knn_accuracies_of_several_k_are_each_ks_vote():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    bank_labels, query_labels = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (50,), generator=g)
    ks = [1, 5, 20, 500]  # more neighbours than the bank holds: all of it
    together = knn_accuracies(bank, bank_labels, queries, query_labels, 4, ks, 0.1, chunk=16)
    assert together == [knn_top1(bank, bank_labels, queries, query_labels, 4, k, 0.1) for k in ks]


@pytest.mark.parametrize("decode", ["pil", "fast"])
def test_the_knn_probes_bank_is_read_as_its_queries(encoder, tmp_path, monkeypatch, decode):
    """The training images that vote are decoded and resized as the validation images (--decode, --crop_pct)."""
    seen = {}
    monkeypatch.setattr(main_linprobe, "knn_probe", lambda s, model, bank, queries, *rest: seen.update(
        bank=bank.transform, queries=queries.transform))
    run_script("main_linprobe.py", *FAST, "--finetune", encoder, "--probe", "knn", "--decode", decode,
               "--crop_pct", "0.9", "--output_dir", tmp_path)

    def described(transform) -> str:  # the PIL transform's steps with their sizes, and whether tensors take them
        return f"tensor {transform.pil!r}" if isinstance(transform, TensorCrop) else repr(transform)

    assert described(seen["bank"]) == described(seen["queries"])
    assert described(seen["bank"]).startswith("tensor") == (decode == "fast") and "size=35" in described(seen["bank"])


def test_the_knn_probe_is_dinos_vote_on_the_features_the_linear_probe_reads(encoder, tmp_path):
    """--probe knn against the vote written out (tests/test_monitors.py) on the encoder's features computed here:
    the mean over the tokens of its last block, under its block-causal mask, of every digit (evaluation
    transform). Nothing is trained; one log.txt line and done.json."""
    run_script("main_linprobe.py", *FAST, "--finetune", encoder, "--probe", "knn", "--output_dir", tmp_path)
    (record,) = read_log(tmp_path)
    ckpt = load_checkpoint(str(encoder))
    backbone = VisionTransformer(**{**ckpt["vit_config"], "num_classes": 0})
    load_encoder_weights(backbone, ckpt)
    mask = create_model("xtra_vit_tiny").encoder_mask.build(backbone.grid_size, backbone.num_prefix_tokens)
    transform = build_transform(32, is_train=False)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = build_dataset("digits", split, transform, 32)
        images = device_images(torch.stack([data[i][0] for i in range(len(data))]), torch.device("cpu"))
        with torch.no_grad():
            feats = pooled_features(backbone.eval(), images, mask, "avg")
        return feats.numpy(), np.array([data[i][1] for i in range(len(data))])

    (bank, bank_labels), (queries, labels) = features("train"), features("val")
    for k in (10, 20, 100, 200):
        assert record[f"test_acc1/k{k}"] == pytest.approx(_reference_knn(bank, bank_labels, queries, labels, 10, k,
                                                                         0.07)), k
    assert record["test_acc1"] == max(record[f"test_acc1/k{k}"] for k in (10, 20, 100, 200)) > 20  # chance: 10 %
    assert (record["test_n"], record["train_n"]) == (359, 1438)
    assert json.loads((tmp_path / "done.json").read_text()) == {"epochs": 1}
    assert not list(tmp_path.glob("checkpoint*"))


# --- the suite ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> Path:
    """Three benchmarks as ImageFolders (train/ and val/, 32-px PNGs): the digits, the digits colour-inverted, and
    the digits of classes 0-4."""
    root = tmp_path_factory.mktemp("benchmarks")
    for name, invert, classes in [("digits", False, 10), ("inverted", True, 10), ("five", False, 5)]:
        for split in ("train", "val"):
            data = DigitsDataset(split, 32)
            for i, (image, label) in enumerate(zip(data.images, data.targets)):
                if label < classes:
                    folder = root / name / split / str(label)
                    folder.mkdir(parents=True, exist_ok=True)
                    (ImageOps.invert(image) if invert else image).save(folder / f"{i}.png")
    return root


def _manifest(path: Path, benchmarks: list[dict], settings: dict | None = None) -> Path:
    path.write_text(json.dumps({"settings": settings or {}, "benchmarks": benchmarks}))
    return path


SUITE = [{"name": "digits", "probe": "attentive", "lrs": [1e-3, 1e-2], "settings": {"aa": "none", "reprob": 0}},
         {"name": "inverted", "probe": "linear", "lrs": [1e-3, 1e-2, 1e38], "settings": {"epochs": 3}},
         {"name": "five", "probe": "knn", "settings": {"knn_ks": [10, 20]}}]
SHARED = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0.5, "optimizer": "adamw"}


@pytest.mark.slow
def test_a_suite_of_three_benchmarks_under_torchrun(encoder, digit_folders, tmp_path):
    """The three benchmarks (an attentive sweep, a linear sweep with a diverging lr, a kNN probe) and one whose
    folder is missing, skipped with --skip_missing, in one torchrun launch of two processes: each benchmark an
    ordinary run directory, then suite.md and suite.json with each one's best top-1, what chose it, and the average."""
    manifest = _manifest(tmp_path / "suite.json", [*SUITE, {"name": "absent", "probe": "knn"}], SHARED)
    out = tmp_path / "out"
    proc = run_script("main_linprobe.py", "--suite", manifest, "--data_root", digit_folders, "--finetune", encoder,
                      "--output_dir", out, "--num_workers", "0", "--device", "cpu", "--print_freq", "1000",
                      "--skip_missing", nproc=2, timeout=900)
    assert "skipping 1 benchmark(s) whose folder is missing: absent" in proc.stdout
    summary = json.loads((out / "suite.json").read_text())
    assert [r["name"] for r in summary["benchmarks"]] == ["digits", "inverted", "five"]
    assert summary["skipped"] == ["absent"] and not (out / "absent").exists()
    for row, expected_epochs in zip(summary["benchmarks"], (1, 3, 1)):
        log = read_log(out / row["name"])
        assert len(log) == expected_epochs and (out / row["name"] / "done.json").is_file()
        assert row["acc1"] == max(r["test_acc1"] for r in log) and row["acc1"] > 20, row  # chance: 10 or 20 %
    digits, inverted, five = summary["benchmarks"]
    assert digits["chosen"] in ("lr 0.001", "lr 0.01") and five["chosen"] in ("k 10", "k 20")
    assert read_log(out / "five")[0]["test_n"] == sum(1 for _ in (digit_folders / "five" / "val").rglob("*.png"))
    assert "diverged/lr1e+38" in read_log(out / "inverted")[-1]
    best = torch.load(out / "inverted" / "checkpoint-best.pth", weights_only=True)
    assert best["args"]["lr"] in (1e-3, 1e-2) and best["args"]["lrs"] == ""
    assert summary["average_acc1"] == pytest.approx(sum(r["acc1"] for r in summary["benchmarks"]) / 3)
    table = (out / "suite.md").read_text()
    assert "| **average of 3** |" in table and "Skipped (folder missing, --skip_missing): absent" in table


@pytest.mark.slow
def test_a_suite_killed_in_its_second_benchmark_continues_there(encoder, digit_folders, tmp_path):
    """Checkpoints inside every epoch; SIGKILL once the second benchmark (a sweep whose third head diverged in its
    first epoch) has committed one inside its second epoch. The same command again skips the first benchmark,
    continues the second at the step where it stopped, and ends with the uninterrupted suite's files, byte for
    byte."""
    manifest = _manifest(tmp_path / "suite.json", SUITE, SHARED)
    argv = ["--suite", manifest, "--data_root", digit_folders, "--finetune", encoder, "--num_workers", "0",
            "--device", "cpu", "--print_freq", "1000", "--save_every_minutes", "0.0001", "--log_dir", ""]
    run_script("main_linprobe.py", *argv, "--output_dir", tmp_path / "straight")

    killed = tmp_path / "killed"
    kill_inside_epoch("main_linprobe.py", [*argv, "--output_dir", killed], killed / "inverted" / "checkpoint-last.pth",
                      1, 300)
    assert (killed / "digits" / "done.json").is_file() and not (killed / "inverted" / "done.json").exists()
    rerun = run_script("main_linprobe.py", *argv, "--output_dir", killed)
    assert "suite: digits is finished" in rerun.stdout and "continuing at epoch 1, step " in rerun.stdout
    for name in ("digits", "inverted", "five"):
        assert (killed / name / "log.txt").read_bytes() == (tmp_path / "straight" / name / "log.txt").read_bytes()
    ours, theirs = (json.loads((d / "suite.json").read_text()) for d in (killed, tmp_path / "straight"))
    assert ours == theirs


def test_a_suite_sets_up_one_process_group_for_all_its_benchmarks(encoder, tmp_path, monkeypatch):
    """In torchrun's environment (one rank here, in this process), the suite's process group is set up once and
    torn down once, around all its benchmarks: no run inside sets one up or tears it down."""
    calls = []
    for name in ("init_process_group", "destroy_process_group"):
        original = getattr(torch.distributed, name)
        monkeypatch.setattr(torch.distributed, name,
                            lambda *a, _name=name, _original=original, **k: (calls.append(_name), _original(*a, **k))[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    manifest = _manifest(tmp_path / "suite.json", [{"name": "linear", "probe": "linear", "lrs": [1e-3, 1e-2]},
                                                   {"name": "knn", "probe": "knn"}],
                         {"dataset": "digits", "epochs": 1, "batch_size": 64, "optimizer": "adamw"})
    proc = run_script("main_linprobe.py", "--suite", manifest, "--finetune", encoder, "--num_workers", "0",
                      "--device", "cpu", "--log_dir", "", "--output_dir", tmp_path / "out")
    assert calls == ["init_process_group", "destroy_process_group"]
    assert proc.stdout.count("distributed: True (world size 1") == 3  # the suite's, then each run's, kept
    assert json.loads((tmp_path / "out" / "suite.json").read_text())["benchmarks"][1]["chosen"].startswith("k ")


def test_the_xtra_manifest_is_the_official_protocol(encoder, tmp_path):
    """configs/xtra_15.json against the official configs (config/eval/xtra_h: batch × accumulation, warmup, lr
    grid; with warmup 0 the official schedule peaks at a tenth of each label), and every benchmark resolves:
    --print_config shows them all without any data; without the data, one line names every missing folder."""
    official = {"in1k": (1024, 4, 10, 7), "in1k_linear": (1024, 4, 10, 7), "inat18": (1024, 4, 10, 10),
                "cifar10": (512, 1, 0, 9), "cifar100": (512, 1, 0, 9), "food101": (512, 1, 0, 9),
                "dtd": (128, 1, 0, 9), "pets": (128, 1, 0, 9), "cars": (128, 1, 0, 10), "iwildcam": (512, 1, 0, 9),
                "camelyon17": (512, 1, 0, 9), "pcam": (1024, 4, 0, 9), "rxrx1": (512, 1, 0, 9),
                "eurosat": (512, 1, 0, 9), "fmow": (512, 1, 0, 9), "infograph": (256, 1, 0, 10)}
    labels = [1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3, 8e-3, 1e-2, 1e-1]
    manifest = json.loads((ROOT / "configs" / "xtra_15.json").read_text())
    assert manifest["settings"] == {"epochs": 100, "optimizer": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.1,
                                    "min_lr": 1e-5, "warmup_lr": None, "clip_grad": 3.0, "amp": "bf16",
                                    "crop_pct": 0.875}
    entries = {b["name"]: b for b in manifest["benchmarks"]}
    assert list(entries) == list(official)
    for name, (batch, accum, warmup, n_lrs) in official.items():
        b = entries[name]
        s = b["settings"]
        assert (s["batch_size"], s["global_batch"], s["warmup_epochs"]) == (batch, batch * accum, warmup), name
        assert b["lrs"] == pytest.approx([lr / 10 if warmup == 0 else lr for lr in labels[:n_lrs]]), name
        assert s["n_last_blocks"] == (1 if name == "in1k_linear" else 6), name
        if b["probe"] == "attentive":
            assert (s["probe_heads"], s["aa"], s["reprob"]) == (16, "rand-m9-mstd0.5-inc1", 0.25), name
    assert [n for n, b in entries.items() if b.get("average", True) is False] == ["in1k_linear"]

    flags = ["--suite", ROOT / "configs" / "xtra_15.json", "--finetune", encoder, "--data_root", tmp_path / "none",
             "--output_dir", tmp_path / "out"]
    proc = run_script("main_linprobe.py", *flags, "--print_config")
    assert proc.stdout.count("resolved settings") == 16 and "benchmark pcam (--probe attentive)" in proc.stdout
    assert proc.stdout.count("accum_iter         = 4   [--global_batch]") == 4  # in1k, in1k_linear, inat18, pcam
    line = one_error_line(run_script("main_linprobe.py", *flags, check=False))
    assert all(f"{name} (" in line for name in official) and "--skip_missing" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("manifest, extra, message", [
    ([{"name": "b", "probe": "attentive", "lrs": [1e-3], "settings": {"epochz": 3}}], [],
     "benchmark b: --epochz is not a setting of --probe attentive"),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3], "settings": {"aa": "none"}}], [],
     "benchmark b: --aa (a setting of --probe attentive) is not a setting of --probe linear"),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3], "settings": {"output_dir": "x"}}], [],
     "benchmark b: settings: output_dir is not a benchmark's setting"),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3], "settings": {"--epochs": 3}}], [],
     "'--epochs' is not a flag's name without the dashes"),
    ([{"name": "b", "probe": "linear"}], [], "benchmark b: give the lr sweep"),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3], "colour": 1}], [], "benchmark b: unknown key(s) colour"),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3]}, {"name": "missing", "probe": "knn"}], [],
     "no train/ and val/ folders for missing ("),
    ([{"name": "b", "probe": "linear", "lrs": [1e-3]}], ["--lrs", "1e-3"], "--lrs: the manifest sets these"),
])
def test_a_bad_suite_is_one_error_line_before_anything_runs(encoder, tmp_path, manifest, extra, message):
    (tmp_path / "root" / "b" / "train" / "0").mkdir(parents=True)
    (tmp_path / "root" / "b" / "val" / "0").mkdir(parents=True)
    path = _manifest(tmp_path / "suite.json", manifest)
    proc = run_script("main_linprobe.py", "--suite", path, "--data_root", tmp_path / "root", "--finetune", encoder,
                      "--output_dir", tmp_path / "out", *extra, "--num_workers", "0", "--device", "cpu", check=False)
    line = one_error_line(proc)
    assert message in line and (str(path) in line or "manifest" in line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--probe", "linear", "--lrs", "1e-4,abc"], "--lrs takes distinct positive learning rates"),
    (["--probe", "linear", "--lrs", "1e-4,1e-4"], "--lrs takes distinct positive learning rates"),
    (["--probe", "attentive", "--lrs", "0,1e-3"], "--lrs takes distinct positive learning rates"),
    (["--probe", "linear", "--lrs", "1e-4,1e-3", "--lr", "1e-3"], "--lrs gives every head its peak lr: drop --lr"),
    (["--probe", "knn", "--lrs", "1e-3"], "--probe knn trains nothing"),
])
def test_bad_lrs_are_one_error_line_before_anything_is_written(encoder, tmp_path, flags, message):
    proc = run_script("main_linprobe.py", *FAST, "--finetune", encoder, *flags, "--output_dir", tmp_path / "out",
                      check=False)
    assert message in one_error_line(proc)
    assert not (tmp_path / "out").exists()


# --- the benchmarks ----------------------------------------------------------------------------------------------
def test_the_sweep_cost_benchmark_prints_its_table():
    proc = run_script("benchmarks.probe_sweep", "--model", "xtra_vit_tiny", "--heads", "3", "--steps", "2",
                      "--batch_size", "8")
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"probe", "linear", "attentive"}
    for probe in ("linear", "attentive"):
        cells = [float(c) for c in rows[probe].strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(c > 0 for c in cells), rows[probe]


@pytest.mark.slow
def test_the_learning_evidence_reports_the_mean_and_spread_over_seeds(tmp_path):
    """One method, two seeds, one epoch each: the kNN probe and both sweeps of the pretrained and the random-init
    encoder, as mean ± standard deviation. A rerun reuses the seeds already measured."""
    def evidence(*seeds: str) -> str:
        proc = run_script("benchmarks.learning_evidence", "--methods", "mae_vit_tiny", "--seeds", *seeds,
                          "--pretrain_epochs", "1", "--probe_epochs", "1", "--probe_lrs", "1e-3", "1e-2",
                          "--work_dir", tmp_path / "evidence", subprocess_run=True, timeout=900)
        (row,) = [line for line in proc.stdout.splitlines() if line.startswith("| mae_vit_tiny |")]
        return row

    row = evidence("0", "1")
    assert row.count("±") == 10, row  # every cell but the method and the wall time
    for seed in (0, 1):
        assert read_log(tmp_path / "evidence" / "mae_vit_tiny" / f"seed{seed}" / "linear_random")[0]["test_lr"] in \
            (1e-3, 1e-2)
    log = tmp_path / "evidence" / "mae_vit_tiny" / "seed1" / "pretrain" / "log.txt"
    written = log.stat().st_mtime_ns
    assert evidence("0", "1") == row and log.stat().st_mtime_ns == written
