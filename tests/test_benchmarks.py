"""python -m benchmarks.throughput runs from a clean checkout and prints its table (one quick round: no timing asserts)."""
import json
from collections.abc import Callable, Hashable

import pytest

import models
from models.registry import METHODS
from tests.helpers import run_script

assert models  # importing the package registers every method


def table_rows(stdout: str, key: Callable[[dict], Hashable] = lambda row: row["model"]) -> dict:
    """The rows of the first markdown table in ``stdout`` (cells by column name), by ``key`` (default: model)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {key(row): row for row in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
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


@pytest.mark.slow
def test_memory_table_shows_fsdp_state_falling_as_one_over_n_and_measures_each_mode():
    """The counted table for every method, and three two-rank launches of the measured one (each rank writes its
    own result file, which each launch reads back: two ranks printing into one pipe used to merge their lines)."""
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


@pytest.mark.slow
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


def test_gpu_check_reduced_cpu_form_gives_every_section_a_row_and_no_failure(tmp_path):
    from benchmarks.gpu_check import SECTIONS, TINY

    report = tmp_path / "gpu_check.json"
    proc = run_script("benchmarks.gpu_check", "--device", "cpu", "--json", report, "--out", tmp_path / "runs")
    rows = table_rows(proc.stdout, key=lambda row: (row["section"], row["check"]))
    data = json.loads(report.read_text())
    assert data["status"] == "ok" and [(r["section"], r["check"]) for r in data["rows"]] == list(rows)
    assert {section for section, _ in rows} == set(SECTIONS) and set(data["seconds"]) == set(SECTIONS)
    status = {key: row["status"] for key, row in rows.items()}
    assert all(s == "ok" or s.startswith("skip: ") for s in status.values()), status
    ran = [("versions", "torch"), ("correctness", "xtra_vit_tiny CPU fp32 (reference)"),
           ("correctness", "xtra_vit_tiny cpu bf16 eager"), ("throughput", "xtra_vit_tiny eager"),
           ("input", "CPU decode + augmentation, 0 loader workers"), *(("sdpa", p) for p in TINY)]
    assert all(status[key] == "ok" for key in ran), status
    for key in [("versions", "GPU"), ("syncs", "xtra_vit_tiny host syncs per update"),
                ("h14", "xtra_vit_huge_patch14 batch 32"), ("input", "GPU decode_jpeg")]:
        assert status[key] == "skip: no CUDA"
    assert status[("compile", "graph breaks, recompiles")].startswith("skip: slow on CPU")
    # bf16 against fp32 on the same seed, within the tolerance the row states; the CPU's fused attention kernel
    bf16 = rows[("correctness", "xtra_vit_tiny cpu bf16 eager")]
    assert bf16["expected"].startswith("≤ 0.01 rel.") and float(bf16["value"].rsplit(": ", 1)[1]) <= 0.01
    assert all("flash_attention_for_cpu_backward" in rows[("sdpa", p)]["value"] for p in TINY)
    # the runs are the entry script's own, with their output directory and command output under --out
    assert (tmp_path / "runs" / "xtra_vit_tiny-cpu-bf16-eager" / "done.json").is_file()
    assert "main_pretrain.py --model xtra_vit_tiny" in (tmp_path / "runs" / "xtra_vit_tiny-cpu-bf16-eager.txt").read_text()


def test_gpu_check_stops_at_the_first_failure_with_the_table_and_the_json(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setitem(gpu_check.SECTION_RUNNERS, "versions",
                        lambda check: check.add("versions", "torch", "FAIL", "broken", "works"))
    argv = ["--device", "cpu", "--sections", "versions", "input", "--json", tmp_path / "r.json"]
    for keep_going, sections in (([], ["versions"]), (["--keep_going"], ["versions", "input", "input"])):
        proc = run_script("benchmarks.gpu_check", *argv, *keep_going, "--out", tmp_path / str(keep_going),
                          check=False)
        data = json.loads((tmp_path / "r.json").read_text())
        assert proc.returncode == 1 and data["status"] == "FAIL"
        assert [r["section"] for r in data["rows"]] == sections
        assert "| versions | torch | FAIL | broken | works |" in proc.stdout
        assert (tmp_path / str(keep_going)).is_dir()  # kept for reading after a failure


def test_gpu_check_refuses_an_unknown_section():
    proc = run_script("benchmarks.gpu_check", "--device", "cpu", "--sections", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


def test_decode_difference_counts_every_value_of_the_crops():
    proc = run_script("benchmarks.decode_difference", "--crops", "4", "--sizes", "32")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith(("| 4 training", "| 2 evaluation"))]
    assert [r[2] for r in rows] == [str(4 * 3 * 32 * 32), str(2 * 3 * 32 * 32)]
    for row in rows:
        assert abs(sum(float(v) for v in row[3:6]) - 100) < 0.01 and int(row[6]) <= 10
