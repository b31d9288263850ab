#!/usr/bin/env bash
# CL-LSG on split CIFAR-10 (our JPEG data, 5 tasks x 2) on CPU: LeNet-5 variant (the paper's
# CIFAR-100 backbone), 4 epochs per task, two runs at a time (one core each).
# Usage: scripts/cl_lsg_seq_cifar10_cpu.sh OUT_ROOT SEED...   (docs/results/cl-lsg.md)
# Rows: scratch, cl-lsg (paper mask lr 5e-4), grow; MASK_LR_SWEEP=1 adds cl-lsg at mask lr 0.01,
# ABLATION=1 the Table-8 rows at mask lr 0.01 for the first seed. CL-LSG's targets are the scratch run's per-task accuracies
# (-o target=[...]) instead of retraining the same scratch models inside every CL-LSG run.
set -euo pipefail
out=$1; shift
common=(--backbone lenet --epochs 4 --data-dir ../shared/data --device cpu --quiet)
done_() { [ -f "$1/result.json" ] && grep -q '"complete": true' "$1/result.json"; }
job() {  # job NAME SEED ARGS...; cl-lsg rows wait for their seed's scratch run and read its targets
  local name=$1 seed=$2; shift 2; local dir="$out/$name-s$seed"
  done_ "$dir" && return 0
  if [[ " $* " == *" TARGET "* ]]; then
    until done_ "$out/scratch-s$seed"; do sleep 20; done
    local t; t=$(python -c "import json,sys; m=json.load(open(sys.argv[1]))['accuracy']['task_il']['matrix']; print('['+','.join(f'{m[j][j]:.2f}' for j in range(len(m)))+']')" "$out/scratch-s$seed/result.json")
    set -- "${@/TARGET/target=$t}"
  fi
  OMP_NUM_THREADS=1 sparsecl run "${common[@]}" --seed "$seed" --out "$dir" "$@" > "$dir.log" 2>&1
}
export -f job done_; export out; export common_str="${common[*]}"
jobs_file=$(mktemp)
for s in "$@"; do echo "scratch $s --preset seq-cifar10-jpeg-scratch"; done >> "$jobs_file"
for s in "$@"; do echo "cl-lsg $s --preset seq-cifar10-jpeg-cl-lsg -o TARGET"; done >> "$jobs_file"
for s in "$@"; do echo "grow $s --preset seq-cifar10-jpeg-grow"; done >> "$jobs_file"
if [ "${MASK_LR_SWEEP:-0}" = 1 ]; then
  for s in "$@"; do echo "cl-lsg-mlr0.01 $s --preset seq-cifar10-jpeg-cl-lsg -o mask_lr=0.01 -o TARGET"; done >> "$jobs_file"
fi
if [ "${ABLATION:-0}" = 1 ]; then s=$1; m="-o mask_lr=0.01"
  echo "grow-mlr0.01 $s --preset seq-cifar10-jpeg-grow $m" >> "$jobs_file"
  echo "abl-sel-mlr0.01 $s --preset seq-cifar10-jpeg-cl-lsg $m -o growth=always -o attentive=false -o retrain_released=false" >> "$jobs_file"
  echo "abl-lsg-mlr0.01 $s --preset seq-cifar10-jpeg-cl-lsg $m -o growth=always -o retrain_released=false" >> "$jobs_file"
  echo "abl-retrain-mlr0.01 $s --preset seq-cifar10-jpeg-cl-lsg $m -o growth=always" >> "$jobs_file"
fi
mkdir -p "$out"
# common is an array: re-declare it inside the workers
xargs -P 2 -L 1 bash -c 'common=($common_str); job "$@"' _ < "$jobs_file"
rm -f "$jobs_file"
