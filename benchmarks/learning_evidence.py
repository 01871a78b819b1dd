"""Does it learn? For each pretraining method and each of several seeds: pretrain a tiny model on the embedded
digits for a fixed budget on CPU with the kNN monitor on every epoch, then evaluate it and a randomly initialised
copy alike: the kNN probe, and an lr sweep of the linear and of the attentive probe (each judged by its best head,
not at one lr); report mean ± standard deviation over the seeds, and plot the mean kNN top-1 and loss against the
epoch (PNG, one line per method). For a slimmable model (Scala): train it, then each of its widths alone with the
same recipe, and compare top-1 per width.

    python -m benchmarks.learning_evidence                      # every pretraining method (3 seeds) and Scala
    python -m benchmarks.learning_evidence --methods xtra_vit_tiny --pretrain_epochs 20 --seeds 0
    python -m benchmarks.learning_evidence --methods scala_vit_tiny --slimmable_epochs 50

Every number in the printed table comes from the runs this script launches (entry scripts as subprocesses,
outputs under --work_dir).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import models
from models.registry import MODELS, model_names
from models.stand_ins import random_init_checkpoint, tiny_model_names
from util.checkpoint import save_json_atomic
from util.run import finished
from util.suite import run_result

assert models  # importing the package registers every method
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_MODELS, SLIMMABLE_MODELS = model_names("pretrain"), model_names("slimmable")

TEACHER_EPOCHS = 15
COMMON = ["--dataset", "digits", "--num_workers", "0", "--print_freq", "100000", "--device", "cpu"]


def run(script: str, *args) -> float:
    start = time.time()
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def knn_probe(ckpt: Path, out: Path) -> float:
    """kNN top-1 (%) of a checkpoint's encoder (main_linprobe.py --probe knn): every digits training image votes
    for each of the 359 validation images, k 20, T 0.07, on the features the monitor reads."""
    run("main_linprobe.py", *COMMON, "--finetune", ckpt, "--probe", "knn", "--knn_ks", 20, "--output_dir", out,
        "--auto_resume", "false")
    return run_result(str(out))["acc1"]


def plot_curves(rows: list[dict], path: Path) -> None:
    """kNN top-1 and the training loss (÷ its first epoch's), each the mean over the seeds, against the epoch, one
    line per method; each method's random-init kNN as a dotted line of its colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=80)
    knn_axes, loss_axes = fig.subplots(1, 2)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        knn, loss = ([statistics.mean(values) for values in zip(*(run[key] for run in r["runs"]))]
                     for key in ("knn", "loss"))
        epochs = range(len(knn))
        knn_axes.plot(epochs, knn, color=colour, label=r["method"])
        knn_axes.axhline(statistics.mean(run["knn_probe_random"] for run in r["runs"]), color=colour, linestyle=":",
                         linewidth=1)
        loss_axes.plot(epochs, [v / loss[0] for v in loss], color=colour, label=r["method"])
    knn_axes.set(xlabel="epoch", ylabel="kNN top-1 (%)",
                 title="kNN top-1 on the digits, mean over seeds (dotted: random init)")
    loss_axes.set(xlabel="epoch", ylabel="train loss / epoch-0 loss", title="training loss (relative)")
    for axes in (knn_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def probe_sweep(ckpt: Path, kind: str, out: Path, seed: int, args: argparse.Namespace) -> float:
    """The best validation top-1 (%) of an lr sweep (every head of --probe_lrs, every epoch: what its
    checkpoint-best.pth holds)."""
    # Both probes with AdamW (XTRA's probe optimiser): LARS needs far larger batches than 64.
    augment = ["--aa", "none", "--reprob", 0] if kind == "attentive" else []  # the linear probe has none
    run("main_linprobe.py", *COMMON, "--finetune", ckpt, "--probe", kind, "--optimizer", "adamw",
        "--epochs", args.probe_epochs, "--batch_size", 64, "--warmup_epochs", 1,
        "--lrs", ",".join(map(repr, args.probe_lrs)), "--weight_decay", 0.05, *augment, "--crop_scale", 0.6, 1,
        "--seed", seed, "--output_dir", out, "--auto_resume", "false")
    return run_result(str(out))["acc1"]


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
    parser.add_argument("--probe_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
                        help="the probes' lr sweep (on the digits the best lr lay inside it in 46 of 48 sweeps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one pretraining, random initialisation and probe seed each")
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
        if not finished(str(teacher), TEACHER_EPOCHS):  # a finished teacher is reused by a rerun
            run("main_finetune.py", *COMMON, "--model", "vit_tiny_patch4", "--input_size", 32, "--epochs",
                TEACHER_EPOCHS, "--batch_size", 32, "--blr", 5e-3, "--warmup_epochs", 1, "--layer_decay", 1, "--aa",
                "none", "--reprob", 0, "--output_dir", teacher, "--auto_resume", "false")
        args.teacher = str(teacher / "checkpoint-best.pth")
    rows = []
    for name in [n for n in names if n in PRETRAIN_MODELS]:
        flags = ["--teacher", args.teacher] if MODELS[name][0].needs_teacher else []
        runs = []
        for seed in args.seeds:
            out = work / name / f"seed{seed}"
            if (out / "result.json").exists():  # a seed already measured (a rerun, or another process's share)
                runs.append(json.loads((out / "result.json").read_text()))
                continue
            # One optimisation budget for every method: the recipes' blr rule gives 20× smaller lrs than XTRA's
            # absolute 1e-3 at batch 64, and their 30-40 warmup epochs would cover the whole run.
            wall = run("main_pretrain.py", *COMMON, "--model", name, "--epochs", args.pretrain_epochs, "--batch_size",
                       64, "--lr", args.pretrain_lr, "--warmup_epochs", args.pretrain_warmup, "--knn_every", 1,
                       "--seed", seed, "--output_dir", out / "pretrain", "--auto_resume", "false", *flags)
            log = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
            rand = out / "random_init.pth"
            random_init_checkpoint(name, str(rand), seed, **({"teacher": args.teacher} if flags else {}))
            row = {"seed": seed, "wall_s": wall, "loss": [r["train_loss"] for r in log],
                   "knn": [r["knn_acc1"] for r in log]}
            start = time.time()
            for encoder, ckpt in (("", out / "pretrain" / "checkpoint-last.pth"), ("_random", rand)):
                row[f"knn_probe{encoder}"] = knn_probe(ckpt, out / f"knn{encoder}")
                for kind in ("linear", "attentive"):
                    row[f"{kind}{encoder}"] = probe_sweep(ckpt, kind, out / f"{kind}{encoder}", seed, args)
            row["eval_wall_s"] = time.time() - start
            runs.append(row)
            save_json_atomic(row, str(out / "result.json"))
            print(json.dumps({"method": name, **row}), flush=True)
        rows.append({"method": name, "runs": runs})

    if rows:
        print_pretrain_table(rows, args)
        plot_curves(rows, work / "curves.png")
        print(f"\nwrote {work / 'curves.png'}")
    for name in [n for n in names if n in SLIMMABLE_MODELS]:
        slimmable_evidence(name, args, work)


def mean_std(values: list[float], digits: int = 1) -> str:
    """mean ± sample standard deviation (the mean alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def with_gain(runs: list[dict], key: str) -> str:
    """The cell of ``key`` and, in brackets, how far its mean is above the random-init encoder's."""
    delta = statistics.mean(run[key] for run in runs) - statistics.mean(run[f"{key}_random"] for run in runs)
    return f"{mean_std([run[key] for run in runs])} ({delta:+.1f})"


def print_pretrain_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\ndigits, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), pretrain "
          f"{args.pretrain_epochs} epochs (lr {args.pretrain_lr}, warmup {args.pretrain_warmup}); kNN probe k 20; "
          f"probe sweeps of lrs {', '.join(map(repr, args.probe_lrs))}, {args.probe_epochs} epochs, judged by their "
          f"best head and epoch; top-1 (%), mean ± standard deviation over seeds {', '.join(map(str, args.seeds))} "
          f"(Δ: the difference of the means)\n")
    print("| method | loss first → last | kNN monitor first → last | kNN probe (Δ) | kNN, random init | "
          "linear sweep (Δ) | linear, random init | attentive sweep (Δ) | attentive, random init | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        runs = r["runs"]
        first, last = ([run[key][i] for run in runs] for key, i in (("loss", 0), ("loss", -1)))
        knn_first, knn_last = ([run["knn"][i] for run in runs] for i in (0, -1))
        wall = sum(run["wall_s"] + run["eval_wall_s"] for run in runs)
        print(f"| {r['method']} | {mean_std(first, 3)} → {mean_std(last, 3)} | {mean_std(knn_first)} → "
              f"{mean_std(knn_last)} | {with_gain(runs, 'knn_probe')} | "
              f"{mean_std([run['knn_probe_random'] for run in runs])} | "
              f"{with_gain(runs, 'linear')} | {mean_std([run['linear_random'] for run in runs])} | "
              f"{with_gain(runs, 'attentive')} | {mean_std([run['attentive_random'] for run in runs])} | "
              f"{wall:.0f} |")

if __name__ == "__main__":
    main()
