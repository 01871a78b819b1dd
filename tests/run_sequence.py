"""Run several entry-script commands one after another in one launch (each a whole run: its process group is set
up and torn down), so that a test pays for the interpreter and torchrun start-up once:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/run_sequence.py RUNS.json

RUNS.json lists ``[module, [argument, ...]]`` pairs, e.g. ``["main_pretrain", ["--model", "xtra_vit_tiny"]]``.
The process group is this script's, kept across the runs: a group torn down and set up again in one torchrun
worker would find the previous group's keys in the launcher's store.
"""
import importlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for module, argv in json.loads(Path(sys.argv[1]).read_text()):
        print(f"=== {module} {' '.join(argv)}", flush=True)
        importlib.import_module(module).main(argv)
    dist.destroy_process_group()
