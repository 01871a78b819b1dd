#!/usr/bin/env bash
# Evaluate a Scala checkpoint at every trained width (or --eval_ratios 0.5 ...) and print one table: ratio, width,
# parameters, GFLOPs, top-1, images/s.    bash eval.sh small|base|tiny CHECKPOINT [flags]
# The width space (s, l, ε) and the data settings come from the checkpoint; a flag still wins. A checkpoint of
# another preset is refused. IMAGENET=/path/to/imagenet for small/base; tiny evaluates on the embedded digits.
# NPROC processes (default 4), PYTHON as in run.sh.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
case "${1:-}" in
  small) args=(--model scala_deit_small_patch16 --data_path "${IMAGENET:?set IMAGENET}" --batch_size 256) ;;
  base)  args=(--model scala_deit_base_patch16 --data_path "${IMAGENET:?set IMAGENET}" --batch_size 256) ;;
  tiny)  args=(--model scala_vit_tiny --dataset digits --num_workers 0 --device cpu) ;;
  *) echo "error: usage: bash eval.sh small|base|tiny CHECKPOINT [flags]" >&2; exit 2 ;;
esac
args+=(--eval --resume "${2:?checkpoint}" --eval_ratios all --output_dir "" "${@:3}")
# settings first, in one process: a wrong preset or a bad checkpoint is one error line, before any process group
"$PYTHON" main_slimmable.py "${args[@]}" --print_config > /dev/null || exit 2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-4}" main_slimmable.py "${args[@]}"
