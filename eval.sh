#!/usr/bin/env bash
# Evaluate a Scala checkpoint at every trained width (or --eval_ratios 0.5 ...) and print one table:
# ratio, width, parameters, GFLOPs, top-1, images/s.   bash eval.sh small|base CHECKPOINT [extra flags]
# s, l and ε are read from the checkpoint's args when it has them (give --smallest_ratio etc. otherwise).
set -euo pipefail
: "${IMAGENET:?set IMAGENET}"
model=scala_deit_small_patch16; [ "${1:-}" = base ] && model=scala_deit_base_patch16
torchrun --nproc_per_node 4 main_slimmable.py --eval --model "$model" --resume "${2:?checkpoint}" \
    --data_path "$IMAGENET" --batch_size 256 --eval_ratios all --output_dir "" "${@:3}"
