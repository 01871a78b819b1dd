"""python -m benchmarks.throughput runs from a clean checkout and prints its table (one quick round: no timing asserts)."""
import json

import models
from models.registry import METHODS
from tests.helpers import run_script

assert models  # importing the package registers every method


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {row["model"]: row for row in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                          for line in lines[1:])}


def test_throughput_table_counts_the_methods_extra_arithmetic():
    proc = run_script("benchmarks.throughput", "--models", "xtra_vit_tiny", "saim_vit_tiny", "scala_vit_tiny",
                      "--slimmable_ratios", "0.5", "1", "--batch_size", "4", "--iters", "1", "--rounds", "1",
                      "--warmup", "0", "--device", "cpu")
    rows = table_rows(proc.stdout)
    step = "scala_vit_tiny (4-width step)"
    assert set(rows) == {"xtra_vit_tiny", "saim_vit_tiny", "scala_vit_tiny@0.5", "scala_vit_tiny@1", step}
    for name in ("xtra_vit_tiny", "saim_vit_tiny"):
        # the heads, target and loss outside the blocks are extra arithmetic; the masks are replayed
        assert float(rows[name]["flop_ratio"]) > 1.05 and float(rows[name]["masked_img_s"]) > 0
    for name in ("scala_vit_tiny@0.5", "scala_vit_tiny@1", step):
        # a sliced sub-network does exactly the arithmetic of the standalone DeiT of its width
        assert rows[name]["flop_ratio"] == "1.00" and rows[name]["mask_cost"] == "–"
    assert float(rows["scala_vit_tiny@0.5"]["params_M"]) < float(rows["scala_vit_tiny@1"]["params_M"])


def test_throughput_rejects_an_unknown_preset():
    proc = run_script("benchmarks.throughput", "--models", "xtra_vit_nope", check=False)
    assert proc.returncode == 2 and "unknown preset 'xtra_vit_nope'" in proc.stderr


def _tables(stdout: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table of the output, each as rows keyed by their model column."""
    blocks = [b for b in stdout.split("\n\n") if b.lstrip().startswith("| ")]
    return [table_rows(b) for b in blocks]


def test_memory_table_shows_fsdp_state_falling_as_one_over_n_and_measures_each_mode():
    proc = run_script("benchmarks.memory", "--measure", "xtra_vit_tiny", "--steps", "1", "--batch_size", "4",
                      "--device", "cpu")
    counted, measured = _tables(proc.stdout)
    assert {"xtra_vit_huge_patch14", "mae_vit_huge_patch14", "scala_deit_base_patch16*"} <= counted.keys()
    # every method's two sizes, as its method file declares them
    assert sorted(row["method"] for row in counted.values()) == sorted(k for k in METHODS for _ in range(2))
    for name, row in counted.items():
        ddp, *fsdp = (float(row[c].split()[0]) for c in ("DDP", "FSDP 1 GPU", "FSDP 8 GPU", "FSDP 64 GPU"))
        assert fsdp[0] == ddp > 0, name
        for n, value in zip((8, 64), fsdp[1:]):  # 1/N, plus the padding of each tensor's first dimension
            assert ddp / n - 0.01 <= value <= ddp / n * 1.05 + 0.01, (name, n, value)
    xtra = measured["xtra_vit_tiny"]
    assert all(float(xtra[f"{mode} {unit}"]) > 0 for mode in ("DDP", "FSDP", "FSDP + grad_ckpt")
               for unit in ("peak MB", "img/s"))


def test_memory_workers_results_parse_on_every_launch(monkeypatch):
    """Each rank writes its own result file, so repeated two-rank launches always give one row per rank (two ranks
    printing JSON lines into one pipe used to merge them now and then; the table test above launches three more)."""
    import argparse

    from benchmarks.memory import measure
    from tests.helpers import ROOT

    monkeypatch.chdir(ROOT)
    args = argparse.Namespace(nproc=2, batch_size=2, steps=1, amp="off", device="cpu", overrides="{}")
    for _ in range(2):
        rows = measure("xtra_vit_tiny", [], args)
        assert [r["rank"] for r in rows] == [0, 1]
        assert all(r["peak_MB"] > 0 and r["img_s"] > 0 for r in rows)


def test_checkpoint_cost_writes_both_formats_and_times_them():
    proc = run_script("benchmarks.checkpoint_cost", "--models", "mae_vit_tiny", "--repeats", "1", "--steps", "1")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| mae_vit_tiny")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [r[2] for r in rows] == ["single file", "DCP, 1 rank"]
    for _, params, _, on_disk, save_s, step_s, _, share in rows:
        # the state is the weights plus AdamW's two moments: about 12 bytes per parameter
        assert 11 < float(on_disk) * 2**20 / (float(params) * 1e6) < 16
        assert float(save_s) > 0 and float(step_s) > 0 and float(share) >= 0


def test_monitor_cost_gives_each_monitor_a_share_of_an_epoch():
    proc = run_script("benchmarks.monitor_cost", "--models", "mae_vit_tiny", "--batch_size", "4", "--repeats", "1")
    row = table_rows(proc.stdout)["mae_vit_tiny"]
    per_image = {k: float(row[f"{k}_ms_per_img"]) for k in ("train", "features", "probe")}
    assert all(v > 0 for v in per_image.values())
    # the kNN images are a larger share of the small dataset's epoch; the probe's share does not depend on it
    assert float(row["knn_digits_%"]) > float(row["knn_ImageNet-1k_%"]) > 0
    assert row["probe_steps_digits_%"] == row["probe_steps_ImageNet-1k_%"]


def test_input_pipeline_reads_the_same_jpegs_from_a_folder_and_from_shards_with_each_decode(tmp_path):
    rates = tmp_path / "rates.json"
    proc = run_script("benchmarks.input_pipeline", "--dirs", tmp_path, "--images", "40", "--samples_per_shard", "10",
                      "--workers", "0", "1", "--models", "--json", rates)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith(("| ImageFolder", "| shards"))]
    runs = [(source, decode, workers) for source in ("ImageFolder", "shards") for decode in ("pil", "fast")
            for workers in (0, 1)]
    assert [(r[0], r[1], int(r[3])) for r in rows] == runs
    assert all(float(r[4]) > 0 for r in rows) and {r[6] for r in rows if r[1] == "pil"} == {"1.00"}
    written = json.loads(rates.read_text())
    assert [(r["source"], r["decode"], r["workers"]) for r in written] == runs
    assert all(abs(r["img_s"] - float(row[4])) <= 1 for r, row in zip(written, rows))
    index = (tmp_path / "input_pipeline_40_10" / "shards" / "train" / "index.json").read_text()
    assert '"samples": 40' in index and "GPU JPEG decoding" in proc.stdout


def test_decode_difference_counts_every_value_of_the_crops():
    proc = run_script("benchmarks.decode_difference", "--crops", "4", "--sizes", "32")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith(("| 4 training", "| 2 evaluation"))]
    assert [r[2] for r in rows] == [str(4 * 3 * 32 * 32), str(2 * 3 * 32 * 32)]
    for row in rows:
        assert abs(sum(float(v) for v in row[3:6]) - 100) < 0.01 and int(row[6]) <= 10
