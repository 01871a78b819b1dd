"""Does it learn? For each pretraining method: pretrain a tiny model on the embedded digits for a fixed budget
on CPU with the kNN monitor on every epoch, probe it (linear and attentive), and probe and kNN-evaluate a randomly
initialised copy the same way; plot kNN top-1 and the loss against the epoch (PNG, one line per method). For a
slimmable model (Scala): train it, then each of its widths alone with the same recipe, and compare top-1 per
width.

    python -m benchmarks.learning_evidence                      # every pretraining method and Scala, default budget
    python -m benchmarks.learning_evidence --methods xtra_vit_tiny --pretrain_epochs 20
    python -m benchmarks.learning_evidence --methods scala_vit_tiny --slimmable_epochs 50

Every number in the printed table comes from the runs this script launches (entry scripts as subprocesses,
outputs under --work_dir).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import models
from engine_monitors import dataset_features, encoder_features, knn_top1
from models.formats import encoder_record, load_checkpoint, model_from_checkpoint, plain_config
from models.registry import MODELS, create_model, model_names
from models.stand_ins import tiny_model_names
from util.checkpoint import save_atomic
from util.datasets import build_dataset, build_transform

assert models  # importing the package registers every method
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_MODELS, SLIMMABLE_MODELS = model_names("pretrain"), model_names("slimmable")

COMMON = ["--dataset", "digits", "--num_workers", "0", "--print_freq", "100000", "--device", "cpu"]


def run(script: str, *args) -> float:
    start = time.time()
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def best_acc(output_dir: Path) -> float:
    lines = (output_dir / "log.txt").read_text().splitlines()
    return max(json.loads(line)["test_acc1"] for line in lines)


def random_init_checkpoint(name: str, extra: dict, path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, **extra)
    save_atomic({"model": model.state_dict(), **encoder_record(model.encoder, "encoder.", model.encoder_mask),
                 "model_name": name, "model_config": plain_config(model.config), "epoch": -1}, path)


def random_init_knn(ckpt: Path) -> float:
    """kNN top-1 (%) of a checkpoint's encoder as the monitor computes it: every digits training image as the bank,
    the 359 validation images as queries, k 20, T 0.07."""
    ckpt_dict = load_checkpoint(str(ckpt))
    model = model_from_checkpoint(ckpt_dict)
    model.load_state_dict(ckpt_dict["model"])
    features = encoder_features(model, "off", torch.device("cpu"))
    size = model.config.input_size
    evaluation = build_transform(size, is_train=False)
    bank, bank_labels = dataset_features(features, build_dataset("digits", "train", evaluation, size), 64, 0,
                                         torch.device("cpu"))
    queries, labels = dataset_features(features, build_dataset("digits", "val", evaluation, size), 64, 0,
                                       torch.device("cpu"))
    return knn_top1(bank, bank_labels, queries, labels, 10, 20, 0.07)


def plot_curves(rows: list[dict], path: Path) -> None:
    """kNN top-1 and the training loss (÷ its first epoch's) against the epoch, one line per method; each
    method's random-init kNN as a dotted line of its colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=80)
    knn_axes, loss_axes = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        epochs = range(len(r["knn"]))
        knn_axes.plot(epochs, r["knn"], color=colour, label=r["method"])
        knn_axes.axhline(r["knn_random"], color=colour, linestyle=":", linewidth=1)
        loss_axes.plot(epochs, [v / r["loss"][0] for v in r["loss"]], color=colour, label=r["method"])
    knn_axes.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN top-1 on the digits (dotted: random init)")
    loss_axes.set(xlabel="epoch", ylabel="train loss / epoch-0 loss", title="training loss (relative)")
    for axes in (knn_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def probe(ckpt: Path, kind: str, out: Path, args: argparse.Namespace) -> float:
    # Both probes with AdamW at one fixed lr (XTRA's probe optimiser): LARS needs far larger batches than 64.
    augment = ["--aa", "none", "--reprob", 0] if kind == "attentive" else []  # the linear probe has none
    run("main_linprobe.py", *COMMON, "--finetune", ckpt, "--probe", kind, "--optimizer", "adamw",
        "--epochs", args.probe_epochs, "--batch_size", 64, "--warmup_epochs", 1, "--lr", args.probe_lr,
        "--weight_decay", 0.05, *augment, "--crop_scale", 0.6, 1, "--output_dir", out, "--auto_resume", "false")
    return best_acc(out)


def slimmable_run(name: str, args: argparse.Namespace, out: Path, smallest: float, largest: float,
                  full_warm: int) -> list[dict]:
    """One main_slimmable.py run; the rows of its final all-widths table (the last epoch's model)."""
    wall = run("main_slimmable.py", *COMMON, "--model", name, "--input_size", 32, "--batch_size", 64,
               "--lr", args.slimmable_lr, "--warmup_epochs", 3, "--epochs", args.slimmable_epochs, "--full_warm_epochs",
               full_warm, "--smallest_ratio", smallest, "--largest_ratio", largest, "--granularity", 0.25,
               "--mixup", 0, "--cutmix", 0, "--aa", "none", "--reprob", 0, "--teacher", args.teacher,
               "--throughput_iters", 2, "--output_dir", out, "--auto_resume", "false")
    table = next(json.loads(line)["eval_table"] for line in (out / "log.txt").read_text().splitlines()
                 if "eval_table" in line)
    return [dict(row, wall_s=wall) for row in table]


def slimmable_evidence(name: str, args: argparse.Namespace, work: Path) -> None:
    """The slimmable model (ε = 1/4: widths 0.25/0.5/0.75/1 every step after the full-width warm-up) against each
    width trained alone: the same model slice, recipe, teacher and epochs, full-width steps only."""
    method = MODELS[name][0].name
    slim = slimmable_run(name, args, work / name, 0.25, 1.0, 3)
    alone = [slimmable_run(name, args, work / f"{name}_alone_{r['ratio']:g}", r["ratio"], r["ratio"],
                           args.slimmable_epochs)[0] for r in slim]
    print(f"\n{method} on digits, CPU, {name} at 32 px, {args.slimmable_epochs} epochs (lr {args.slimmable_lr}, "
          f"warmup 3, {method}'s first 3 epochs full width only), teacher {args.teacher}; top-1 (%) of the last "
          f"epoch's model on 359 val images\n")
    print(f"| ratio | width | params | {method} top-1 | trained alone | Δ |")
    print("|---|---|---|---|---|---|")
    for s, a in zip(slim, alone):
        print(f"| {s['ratio']:g} | {s['width']} | {s['params']:,} | {s['acc1']:.1f} | {a['acc1']:.1f} | "
              f"{s['acc1'] - a['acc1']:+.1f} |")
    walls = ", ".join(f"{a['wall_s']:.0f}" for a in alone)
    print(f"\nwall time: {method} {slim[0]['wall_s']:.0f} s (one model, every width); trained alone "
          f"{sum(a['wall_s'] for a in alone):.0f} s in total ({walls})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="tiny pretraining and/or slimmable presets (default: all of them)")
    parser.add_argument("--pretrain_epochs", type=int, default=30)
    parser.add_argument("--probe_epochs", type=int, default=15)
    parser.add_argument("--pretrain_lr", type=float, default=1e-3, help="absolute lr of every method's pretraining")
    parser.add_argument("--pretrain_warmup", type=float, default=3, help="warmup epochs of every method")
    parser.add_argument("--probe_lr", type=float, default=1e-3)
    parser.add_argument("--slimmable_epochs", type=int, default=30)
    parser.add_argument("--slimmable_lr", type=float, default=2e-3)
    parser.add_argument("--teacher", default="",
                        help="teacher checkpoint of the methods that need one and of the slimmable models, a 32-px "
                             "classifier (default: trained here first)")
    parser.add_argument("--work_dir", default="out/learning_evidence")
    args = parser.parse_args()
    work = ROOT / args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    names = args.methods or sorted([*tiny_model_names("pretrain"), *tiny_model_names("slimmable")])
    for n in names:
        if n not in PRETRAIN_MODELS and n not in SLIMMABLE_MODELS:
            parser.error(f"unknown preset {n!r}; use tiny pretraining or slimmable presets")

    if any(MODELS[n][0].needs_teacher or n in SLIMMABLE_MODELS for n in names) and not args.teacher:
        teacher = work / "teacher"
        run("main_finetune.py", *COMMON, "--model", "vit_tiny_patch4", "--input_size", 32, "--epochs", 15,
            "--batch_size", 32, "--blr", 5e-3, "--warmup_epochs", 1, "--layer_decay", 1, "--aa", "none",
            "--reprob", 0, "--output_dir", teacher, "--auto_resume", "false")
        args.teacher = str(teacher / "checkpoint-best.pth")
    rows = []
    for name in [n for n in names if n in PRETRAIN_MODELS]:
        flags = ["--teacher", args.teacher] if MODELS[name][0].needs_teacher else []
        out = work / name
        # One optimisation budget for every method: the recipes' blr rule gives 20× smaller lrs than XTRA's
        # absolute 1e-3 at batch 64, and their 30-40 warmup epochs would cover the whole run.
        wall = run("main_pretrain.py", *COMMON, "--model", name, "--epochs", args.pretrain_epochs, "--batch_size", 64,
                   "--lr", args.pretrain_lr, "--warmup_epochs", args.pretrain_warmup, "--knn_every", 1,
                   "--output_dir", out / "pretrain", "--auto_resume", "false", *flags)
        log = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
        rand = out / "random_init.pth"
        random_init_checkpoint(name, {"teacher": args.teacher} if flags else {}, rand)
        row = {"method": name, "epochs": args.pretrain_epochs, "wall_s": wall, "loss": [r["train_loss"] for r in log],
               "knn": [r["knn_acc1"] for r in log], "knn_random": random_init_knn(rand)}
        for kind in ("linear", "attentive"):
            row[f"{kind}"] = probe(out / "pretrain" / "checkpoint-last.pth", kind, out / f"probe_{kind}", args)
            row[f"{kind}_random"] = probe(rand, kind, out / f"probe_{kind}_random", args)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if rows:
        print_pretrain_table(rows, args)
        plot_curves(rows, work / "curves.png")
        print(f"\nwrote {work / 'curves.png'}")
    for name in [n for n in names if n in SLIMMABLE_MODELS]:
        slimmable_evidence(name, args, work)


def print_pretrain_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\ndigits, CPU ({os.cpu_count()} cores), pretrain {args.pretrain_epochs} epochs (lr {args.pretrain_lr}, "
          f"warmup {args.pretrain_warmup}), probes "
          f"{args.probe_epochs} epochs; accuracies are the best val top-1 (%) over the probe epochs; kNN top-1 (%) "
          f"after the first and the last epoch, and of the random-init encoder\n")
    print("| method | epochs | pretrain wall (s) | loss first → last | kNN first → last | kNN (random init) | "
          "linear | linear (random init) | attentive | attentive (random init) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['epochs']} | {r['wall_s']:.0f} | {r['loss'][0]:.3f} → {r['loss'][-1]:.3f} | "
              f"{r['knn'][0]:.1f} → {r['knn'][-1]:.1f} | {r['knn_random']:.1f} | "
              f"{r['linear']:.1f} ({r['linear'] - r['linear_random']:+.1f}) | {r['linear_random']:.1f} | "
              f"{r['attentive']:.1f} ({r['attentive'] - r['attentive_random']:+.1f}) | {r['attentive_random']:.1f} |")


if __name__ == "__main__":
    main()
