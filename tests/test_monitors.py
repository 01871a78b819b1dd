"""The kNN monitor and the online linear probe: DINO's weighted vote, above-chance accuracies on the digits that
leave training bit for bit unchanged, features sharded across ranks and gathered (DDP and FSDP), and one error
line for unlabelled data."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from engine_monitors import dataset_features, encoder_features, knn_top1
from models.formats import load_checkpoint, model_from_checkpoint
from tests.helpers import FAST, read_log, run_script, run_sequence, tensorboard_events
from util.datasets import build_dataset, build_transform

MAE = [*FAST, "--model", "mae_vit_tiny", "--log_dir", ""]
MONITORS = ["--knn_every", "1", "--online_probe"]


def _reference_knn(bank, bank_labels, queries, query_labels, num_classes, k, temperature) -> float:
    """The vote written out, one query at a time."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    correct = 0
    for query, label in zip(queries / np.linalg.norm(queries, axis=1, keepdims=True), query_labels):
        similarity = bank @ query
        votes = np.zeros(num_classes)
        for i in np.argsort(-similarity)[:k]:
            votes[bank_labels[i]] += np.exp(similarity[i] / temperature)
        correct += votes.argmax() == label
    return 100.0 * correct / len(queries)


def test_knn_top1_is_the_weighted_vote_of_the_nearest_bank_images():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    bank_labels, query_labels = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (70,), generator=g)
    for k, temperature in [(20, 0.07), (5, 1.0), (1, 0.5)]:
        ours = knn_top1(bank, bank_labels, queries, query_labels, 5, k, temperature, chunk=32)
        assert ours == pytest.approx(_reference_knn(bank.numpy(), bank_labels.numpy(), queries.numpy(),
                                                    query_labels.numpy(), 5, k, temperature))
    # weights matter: two far neighbours of class 1 lose to one close neighbour of class 0 at a low temperature
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_top1(bank, torch.tensor([0, 1, 1]), query, torch.tensor([0]), 2, k=3, temperature=0.07) == 100.0
    assert knn_top1(bank, torch.tensor([0, 1, 1]), query, torch.tensor([0]), 2, k=3, temperature=100.0) == 0.0


def test_the_monitors_see_learning_and_leave_training_unchanged(tmp_path):
    """mae_vit_tiny, 3 epochs on the digits: kNN and the online probe are above chance (10 classes), and every
    per-epoch training number and the final weights are those of the unmonitored run, bit for bit."""
    run_script("main_pretrain.py", *MAE, "--epochs", "3", "--output_dir", tmp_path / "plain")
    run_script("main_pretrain.py", *MAE, "--epochs", "3", *MONITORS, "--visualize_every", "3", "--log_dir",
               tmp_path / "tb", "--output_dir", tmp_path / "monitored")
    plain, monitored = read_log(tmp_path / "plain"), read_log(tmp_path / "monitored")
    for a, b in zip(plain, monitored):
        assert {k: v for k, v in b.items() if k not in ("knn_acc1", "online_probe_acc1")} == a
    assert all(r["knn_acc1"] > 30 and r["online_probe_acc1"] > 15 for r in monitored), monitored
    ours, theirs = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True) for d in ("monitored", "plain"))
    assert all(torch.equal(ours["model"][k], v) for k, v in theirs["model"].items())
    assert set(ours["extra"]["online_probe"]) == {"head", "optimizer"} and "online_probe" not in theirs["extra"]
    # TensorBoard: both monitors per epoch; the labelled figure at --visualize_every
    events = tensorboard_events(tmp_path / "tb", images=True)
    for name in ("knn_acc1", "online_probe_acc1"):
        assert [(e.step, e.value) for e in events.Scalars(f"monitor/{name}")] == \
            [(r["epoch"], pytest.approx(r[name])) for r in monitored]
    (figure,) = events.Images("visualize/panels")
    assert figure.step == 2 and figure.width >= 400 and figure.height > figure.width  # 8 rows of 4 panels


@pytest.mark.slow
def test_under_torchrun_the_features_are_sharded_gathered_and_give_the_one_process_knn(tmp_path):
    """Two ranks, DDP and FSDP: the logged knn_acc1 is what one process computes from the saved weights over all
    1438 training and 359 validation images (to within one image: batches differ between the two)."""
    runs = {mode: ["main_pretrain", [*MAE, "--epochs", "1", *MONITORS, *flags, "--output_dir", tmp_path / mode]]
            for mode, flags in {"ddp": [], "fsdp": ["--fsdp"]}.items()}
    out = run_sequence(list(runs.values()), nproc=2, workdir=tmp_path)
    assert out.count("monitors: kNN every 1 epoch(s) (1438 training images, 359 validation images") == 2
    evaluation = build_transform(32, is_train=False)
    bank_set, query_set = (build_dataset("digits", split, evaluation, 32) for split in ("train", "val"))
    for mode in runs:
        ckpt = load_checkpoint(str(tmp_path / mode / "checkpoint-last.json" if mode == "fsdp" else
                                   tmp_path / mode / "checkpoint-last.pth"))
        model = model_from_checkpoint(ckpt)
        model.load_state_dict(ckpt["model"])
        features = encoder_features(model, "off", torch.device("cpu"))
        bank, bank_labels = dataset_features(features, bank_set, 64, 0, torch.device("cpu"))
        queries, query_labels = dataset_features(features, query_set, 64, 0, torch.device("cpu"))
        expected = knn_top1(bank, bank_labels, queries, query_labels, 10, 20, 0.07)
        logged = read_log(tmp_path / mode)[0]["knn_acc1"]
        assert abs(logged - expected) <= 100 / 359 + 1e-9, (mode, logged, expected)


def test_unlabelled_training_images_are_one_error_line_before_anything_is_written(tmp_path):
    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "all"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / f"{i}.png")
    proc = run_script("main_pretrain.py", "--model", "mae_vit_tiny", "--dataset", "imagefolder", "--data_path",
                      tmp_path / "data", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
                      "--knn_every", "1", "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: the kNN monitor and the online probe need "
                                                           "labelled images"), proc.stderr
    assert not (tmp_path / "out").exists()
    config = run_script("main_pretrain.py", "--model", "mae_vit_tiny", "--print_config").stdout
    assert re.search(r"knn_every\s+= 0\s+\[preset\]", config)  # the tiny presets: off
    assert re.search(r"knn_every\s+= 1\n", run_script("main_pretrain.py", "--model", "mae", "--print_config").stdout)
