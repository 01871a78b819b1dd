#!/usr/bin/env bash
# Scala training recipes (spec scala.md §5, official run.sh), 4 GPUs:  bash run.sh small|base
#   IMAGENET=/path/to/imagenet   ImageFolder root with train/ and val/
#   TEACHER=/path/to/weights     local DeiT weights of the teacher (deit_small_patch16_224-cd65a155.pth for
#                                Scala-S, deit_base_patch16_224-b5f2ef4d.pth for Scala-B); nothing is downloaded
# The official "lr·batch/512" becomes --blr = lr/2 here (lr = blr·batch/256): peak 4e-3 (S) and 1e-3 (B).
# The official Scala-B command passes --discrete_ratio 0.0625, which its argparse rejects; --granularity 0.0625
# is what it meant.
set -euo pipefail
: "${IMAGENET:?set IMAGENET}" "${TEACHER:?set TEACHER}"
case "${1:-small}" in
  small) args=(--model scala_deit_small_patch16 --teacher deit_small_patch16_224 --batch_size 256 --epochs 100
               --blr 1e-3 --warmup_epochs 3 --aa rand-m1-mstd0.5-inc1) ;;
  base)  args=(--model scala_deit_base_patch16 --teacher deit_base_patch16_224 --batch_size 128 --epochs 300
               --blr 5e-4 --warmup_epochs 5 --aa rand-m4-mstd0.5-inc1) ;;
  *) echo "usage: bash run.sh small|base" >&2; exit 2 ;;
esac
torchrun --nproc_per_node 4 main_slimmable.py "${args[@]}" --teacher_weights "$TEACHER" \
    --data_path "$IMAGENET" --input_size 224 --warmup_lr 1e-6 --min_lr 1e-5 --weight_decay 0.05 \
    --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --reprob 0.25 \
    --smallest_ratio 0.25 --largest_ratio 1.0 --granularity 0.0625 --full_warm_epochs 10 \
    --transfer_type progressive --ce_coefficient 1.0 --distillation_alpha 0.5 \
    --output_dir "out/scala_${1:-small}" "${@:2}"
