#!/usr/bin/env bash
# Issue 23 Task-IL baselines on split CIFAR-10 (our JPEG data, 5 tasks x 2) on CPU, the protocol of
# docs/results/cl-lsg.md: the LeNet-5 variant, EPOCHS epochs per task (default 2), batch 32, SGD lr
# 0.01; LPS's ADMM stages and retraining shortened to one epoch each. Fine-tune per task, LPS and PNN
# for every seed given, one run at a time, one thread; completed runs are skipped.
# Usage: scripts/baselines23_seq_cifar10_cpu.sh DATA_DIR OUT_ROOT SEED...
set -euo pipefail
data=$1 out=$2; shift 2
. "$(dirname "$0")/run_once.sh"
common=(--backbone lenet --epochs "${EPOCHS:-2}" --data-dir "$data" --device cpu)
run() { local name=$1 seed=$2; shift 2; run_once "$out/$name-s$seed" "${common[@]}" --seed "$seed" "$@"; }
for s in "$@"; do
  run finetune-per-task "$s" --preset seq-cifar10-jpeg-finetune-per-task
  run lps "$s" --preset seq-cifar10-jpeg-lps -o admm_epochs=1 -o retrain_epochs=1
  run pnn "$s" --preset seq-cifar10-jpeg-pnn
done
