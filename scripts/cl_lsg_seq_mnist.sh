#!/usr/bin/env bash
# CL-LSG on seq-mnist (CPU): scratch, grow, CL-LSG and the Table-8 ablation rows, seeds given as args.
# Usage: scripts/cl_lsg_seq_mnist.sh OUT_ROOT SEED...   (docs/results/cl-lsg.md)
set -euo pipefail
out=$1; shift
run() { local name=$1 seed=$2; shift 2
  [ -f "$out/$name-s$seed/result.json" ] && grep -q '"complete": true' "$out/$name-s$seed/result.json" && return
  OMP_NUM_THREADS=1 sparsecl run --data-dir ../shared/data --device cpu --seed "$seed" --out "$out/$name-s$seed" --quiet "$@"; }
for s in "$@"; do
  run scratch "$s" --preset seq-mnist-scratch
  run grow "$s" --preset seq-mnist-grow
  run cl-lsg "$s" --preset seq-mnist-cl-lsg
  run abl-sel "$s" --preset seq-mnist-cl-lsg -o growth=always -o attentive=false -o retrain_released=false
  run abl-lsg "$s" --preset seq-mnist-cl-lsg -o growth=always -o retrain_released=false
  run abl-retrain "$s" --preset seq-mnist-cl-lsg -o growth=always
done
# Sensitivity: mask learning rate 0.01 instead of the paper's 5e-4 (kernel gates can close in 4 epochs).
if [ "${MASK_LR_SWEEP:-0}" = 1 ]; then
  for s in "$@"; do run cl-lsg-mlr0.01 "$s" --preset seq-mnist-cl-lsg -o mask_lr=0.01; done
fi
