#!/usr/bin/env bash
# CL-LSG on split CIFAR-10 (our JPEG data, 5 tasks x 2) on CPU: the paper's LeNet-5 variant,
# EPOCHS epochs per task (default 2), CL-LSG's stage 1 shortened to STAGE1 epochs (default: EPOCHS);
# scratch, grow and cl-lsg for every seed given, one run at a time, one thread.
# Usage: scripts/cl_lsg_seq_cifar10_cpu.sh DATA_DIR OUT_ROOT SEED...   (docs/results/cl-lsg.md)
# CL-LSG's targets are the same seed's scratch run's per-task *validation* accuracies (result.json
# method.val_accuracy; scratch trains on the same training part and scores the same held-out
# split), passed as -o target=[...] instead of training the same scratch models again inside it.
set -euo pipefail
data=$1 out=$2; shift 2
epochs=${EPOCHS:-2}
common=(--backbone lenet --epochs "$epochs" --data-dir "$data" --device cpu --quiet)
stage1=()
[ -n "${STAGE1:-}" ] && stage1=(-o "stage1_epochs=$STAGE1")
done_() { [ -f "$1/result.json" ] && grep -q '"complete": true' "$1/result.json"; }
run() { local name=$1 seed=$2; shift 2; local dir="$out/$name-s$seed"
  done_ "$dir" && return 0
  OMP_NUM_THREADS=1 sparsecl run "${common[@]}" --seed "$seed" --out "$dir" "$@"; }
targets() { python -c "import json,sys; v=json.load(open(sys.argv[1]))['method']['val_accuracy']; print('['+','.join(f'{a:.4f}' for a in v)+']')" "$1"; }
mkdir -p "$out"
for s in "$@"; do
  run scratch "$s" --preset seq-cifar10-jpeg-scratch
  run cl-lsg "$s" --preset seq-cifar10-jpeg-cl-lsg -o "target=$(targets "$out/scratch-s$s/result.json")" "${stage1[@]}"
  run grow "$s" --preset seq-cifar10-jpeg-grow
done
