"""python -m benchmarks.throughput runs from a clean checkout and prints its table (one quick round: no timing asserts)."""
from tests.helpers import run_script


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {row["model"]: row for row in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                          for line in lines[1:])}


def test_throughput_table_counts_the_methods_extra_arithmetic():
    proc = run_script("benchmarks.throughput", "--models", "xtra_vit_tiny", "saim_vit_tiny", "scala_vit_tiny",
                      "--scala_ratios", "0.5", "1", "--batch_size", "4", "--iters", "1", "--rounds", "1",
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
