#!/usr/bin/env bash
# Scala training recipes of the official code, on NPROC processes (default 4 GPUs):  bash run.sh small|base|tiny [flags]
#   small / base: Scala-S (DeiT-S, 100 epochs, 4 × 256) and Scala-B (DeiT-B, 300 epochs, 4 × 128); the recipes are the
#   presets' defaults (main_slimmable.py --model scala_deit_small_patch16 --help shows them)
#     IMAGENET=/path/to/imagenet   ImageFolder root with train/ and val/
#     TEACHER=/path/to/weights     local DeiT weights of the teacher (deit_small_patch16_224-cd65a155.pth for Scala-S,
#                                  deit_base_patch16_224-b5f2ef4d.pth for Scala-B); nothing is downloaded
#   tiny: a CPU demo on the embedded digits; TEACHER = a 16-px classifier checkpoint of main_finetune.py
# Extra flags are passed on (e.g. --epochs 1 --output_dir out/x). PYTHON picks the interpreter (default: the
# project's .venv, else python3); the launcher is that interpreter's own torch.distributed.run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
: "${TEACHER:?set TEACHER}"
case "${1:-}" in
  small) args=(--model scala_deit_small_patch16 --teacher deit_small_patch16_224 --teacher_weights "$TEACHER"
               --data_path "${IMAGENET:?set IMAGENET}") ;;
  base)  args=(--model scala_deit_base_patch16 --teacher deit_base_patch16_224 --teacher_weights "$TEACHER"
               --data_path "${IMAGENET:?set IMAGENET}") ;;
  tiny)  args=(--model scala_vit_tiny --teacher "$TEACHER" --dataset digits --input_size 16 --batch_size 32
               --lr 4e-3 --warmup_epochs 1 --epochs 10 --full_warm_epochs 2 --mixup 0 --cutmix 0 --aa none --reprob 0
               --num_workers 0 --device cpu) ;;
  *) echo "error: usage: bash run.sh small|base|tiny [flags]" >&2; exit 2 ;;
esac
args+=(--output_dir "out/scala_$1" "${@:2}")
# settings first, in one process: a bad flag or checkpoint is one error line, before any process group starts
"$PYTHON" main_slimmable.py "${args[@]}" --print_config > /dev/null || exit 2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-4}" main_slimmable.py "${args[@]}"
