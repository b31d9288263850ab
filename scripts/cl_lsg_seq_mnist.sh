#!/usr/bin/env bash
# CL-LSG on seq-mnist (CPU): scratch, grow, CL-LSG for every seed given, and the Table-8 ablation
# rows for the first seed; one run at a time, one thread.
# Usage: scripts/cl_lsg_seq_mnist.sh DATA_DIR OUT_ROOT SEED...   (docs/results/cl-lsg.md)
set -euo pipefail
data=$1 out=$2; shift 2
. "$(dirname "$0")/run_once.sh"
run() { local name=$1 seed=$2; shift 2; run_once "$out/$name-s$seed" --data-dir "$data" --device cpu --seed "$seed" "$@"; }
for s in "$@"; do
  run scratch "$s" --preset seq-mnist-scratch
  run grow "$s" --preset seq-mnist-grow
  run cl-lsg "$s" --preset seq-mnist-cl-lsg
done
s=$1  # Table 8: each row adds one technique to grow-only, growing in every task (growth=always)
run abl-sel "$s" --preset seq-mnist-cl-lsg -o growth=always -o attentive=false -o retrain_released=false
run abl-lsg "$s" --preset seq-mnist-cl-lsg -o growth=always -o retrain_released=false
run abl-retrain "$s" --preset seq-mnist-cl-lsg -o growth=always
