"""A suite of probe benchmarks (``main_linprobe.py --suite``): its manifest, each benchmark's command line, and
the table of results at the end. Running the benchmarks is main_linprobe.py's.

A manifest is a JSON file::

    {"description": "...",                                   # optional
     "settings": {"epochs": 100, "amp": "bf16"},              # optional: every benchmark's, under its own
     "benchmarks": [{"name": "cifar10", "path": "cifar10", "probe": "attentive", "lrs": [1e-4, 3e-4],
                     "settings": {"batch_size": 512}, "average": true, "note": "..."}]}

``settings`` take the flags' names without the dashes and their values as JSON (a list for a flag of several
words, null for none); the suite's command line comes after them, so a flag given there applies to every
benchmark. ``path`` (default: the name) is the benchmark's folder under --data_root; ``lrs`` is the lr sweep of a
linear or attentive probe (a kNN probe has none); ``average`` false leaves the benchmark out of the suite's average
(XTRA's in1k_linear beside the 15 benchmarks); ``note`` is for the reader.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from util.checkpoint import save_json_atomic, save_text_atomic
from util.errors import UserError

# what the suite's command line sets for each benchmark, or what belongs to the launch: no manifest sets them
SET_BY_THE_SUITE = ("probe", "lrs", "data_path", "output_dir", "log_dir", "finetune", "num_heads", "resume",
                    "auto_resume", "eval", "print_config", "suite", "data_root", "skip_missing", "device", "dist_url",
                    "dist_timeout")
ENTRY_KEYS = {"name", "path", "probe", "lrs", "settings", "average", "note"}


@dataclass(frozen=True)
class Benchmark:
    """One entry of a manifest: its settings are the manifest's shared ones under its own."""

    name: str
    path: str
    probe: str
    lrs: tuple[float, ...]
    settings: dict
    average: bool = True


def load_manifest(path: str) -> list[Benchmark]:
    """The benchmarks of a manifest, in order; anything malformed is one UserError that names the manifest."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the suite manifest {path}: {type(e).__name__}: {e}", every_rank=True) from None

    def fail(what: str) -> UserError:  # every rank reads the same manifest: rank 0 says it
        return UserError(f"{path}: {what}", every_rank=True)

    if not isinstance(manifest, dict) or set(manifest) - {"description", "settings", "benchmarks"}:
        raise fail('expected {"benchmarks": [...]} with optional "settings" and "description"')
    entries, shared = manifest.get("benchmarks"), _settings(manifest.get("settings", {}), "settings", fail)
    if not isinstance(entries, list) or not entries:
        raise fail('"benchmarks" must be a non-empty list')
    benchmarks = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise fail(f"benchmark {i + 1} must be an object with a \"name\"")
        name = entry["name"]
        where = f"benchmark {name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise fail(f"{where}: a name is one folder name (letters, digits, '_', '.', '-')")
        if name in {b.name for b in benchmarks}:
            raise fail(f"{where}: named twice")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise fail(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; an entry has "
                       f"{', '.join(sorted(ENTRY_KEYS))}")
        probe, lrs = entry.get("probe"), entry.get("lrs")
        if not isinstance(probe, str):
            raise fail(f"{where}: \"probe\" must name the probe (linear, attentive or knn)")
        if (probe == "knn") != (lrs is None):
            raise fail(f"{where}: " + ("a kNN probe trains nothing: no \"lrs\"" if probe == "knn" else
                                       "give the lr sweep as \"lrs\": [...]"))
        if lrs is not None and (not isinstance(lrs, list) or not lrs or
                                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lrs)):
            raise fail(f"{where}: \"lrs\" must be a non-empty list of numbers")
        path_in_root = entry.get("path", name)
        if not isinstance(path_in_root, str) or not path_in_root or os.path.isabs(path_in_root):
            raise fail(f"{where}: \"path\" must be a folder under --data_root")
        if not isinstance(entry.get("average", True), bool):
            raise fail(f"{where}: \"average\" is true or false")
        own = _settings(entry.get("settings", {}), f"{where}: settings", fail)
        benchmarks.append(Benchmark(name, path_in_root, probe, tuple(float(v) for v in lrs or ()), {**shared, **own},
                                    entry.get("average", True)))
    return benchmarks


def _settings(settings, where: str, fail) -> dict:
    if not isinstance(settings, dict):
        raise fail(f"{where} must be an object of flag names without the dashes")
    for name, value in settings.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise fail(f"{where}: {name!r} is not a flag's name without the dashes (e.g. \"batch_size\")")
        if name in SET_BY_THE_SUITE:
            raise fail(f"{where}: {name} is not a benchmark's setting (the suite's command line sets it)")
        values = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise fail(f"{where}: {name} must be a number, a string, a boolean, null or a list of them")
    return dict(settings)


def flag_words(settings: dict) -> list[str]:
    """Settings as command-line words: ``--name value`` (a list as several words, null as none, a boolean as
    true or false)."""
    words = []
    for name, value in settings.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{name}", *("none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                                 for v in values)]
    return words


def run_result(output_dir: str) -> dict:
    """A finished benchmark's results from its log.txt: the best top-1 over its epochs (what its
    checkpoint-best.pth holds: the best head, or the best k) with what chose it, and the last epoch's."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    best, last = max(lines, key=lambda r: r["test_acc1"]), lines[-1]

    def chosen(r: dict) -> str:
        return f"lr {r['test_lr']!r}" if "test_lr" in r else f"k {r['test_k']}"

    return {"acc1": best["test_acc1"], "acc5": best.get("test_acc5"), "chosen": chosen(best), "epoch": best["epoch"],
            "last_acc1": last["test_acc1"], "last_chosen": chosen(last), "epochs": len(lines)}


def write_summary(output_dir: str, manifest: str, checkpoint: str, rows: list[dict], skipped: list[str]) -> None:
    """``suite.json`` and ``suite.md`` in ``output_dir``: each benchmark's results (``rows``: name, probe, average
    and :func:`run_result`'s fields) and the averages over the benchmarks that ran and count in the average."""
    averaged = [r for r in rows if r["average"]]

    def mean(key: str) -> float | None:
        return sum(r[key] for r in averaged) / len(averaged) if averaged else None

    summary = {"manifest": manifest, "checkpoint": checkpoint, "benchmarks": rows, "average_acc1": mean("acc1"),
               "average_last_acc1": mean("last_acc1"), "skipped": skipped}
    save_json_atomic(summary, os.path.join(output_dir, "suite.json"))
    lines = [f"# Probe suite: {manifest}", "", f"Checkpoint: {checkpoint}", "",
             "| benchmark | probe | best top-1 | top-5 | chosen | epoch | last epoch top-1 | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top5 = f"{r['acc5']:.2f}" if r["acc5"] is not None else "—"
        name = r["name"] if r["average"] else f"{r['name']} (not averaged)"
        lines.append(f"| {name} | {r['probe']} | {r['acc1']:.2f} | {top5} | {r['chosen']} | {r['epoch']} | "
                     f"{r['last_acc1']:.2f} | {r['last_chosen']} |")
    if averaged:
        lines.append(f"| **average of {len(averaged)}** | | **{summary['average_acc1']:.2f}** | | | | "
                     f"**{summary['average_last_acc1']:.2f}** | |")
    if skipped:
        lines += ["", f"Skipped (folder missing, --skip_missing): {', '.join(skipped)}; the averages leave them out."]
    save_text_atomic("\n".join(lines) + "\n", os.path.join(output_dir, "suite.md"))
