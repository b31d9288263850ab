#!/usr/bin/env bash
# Issue 23 baselines on seq-mnist (CPU): FDR (buffer 200, 500), LPS, PNN and Fine-tune per task, every
# seed given; one run at a time, one thread; completed runs are skipped.
# Usage: scripts/baselines23_seq_mnist.sh DATA_DIR OUT_ROOT SEED...   (docs/results/seq-mnist.md)
set -euo pipefail
data=$1 out=$2; shift 2
. "$(dirname "$0")/run_once.sh"
run() { local name=$1 seed=$2; shift 2; run_once "$out/$name-s$seed" --data-dir "$data" --device cpu --seed "$seed" "$@"; }
for s in "$@"; do
  for p in fdr-200 fdr-500 lps pnn finetune-per-task; do
    run "$p" "$s" --preset "seq-mnist-$p"
  done
done
