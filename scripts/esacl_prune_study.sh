#!/usr/bin/env bash
# EsaCL's central claim on seq-mnist (CPU): current-task accuracy right before / right after the
# end-of-task one-shot prune, EsaCL (SAM + Frank-Wolfe) against plain SGD pruned the same way, and the
# SA / SP ablations. Usage: scripts/esacl_prune_study.sh OUT_DIR "SEEDS" "ABLATION_SEEDS"
# PROTOCOL=seq-cifar10-cpu: the same study on seq-cifar10-jpeg at a CPU budget (ResNet-18 nf 8,
# 1 epoch per task, batch 32) instead of seq-mnist.
# Restartable: a run whose result.json exists is skipped. Needs DATA (or SPARSECL_DATA): a folder with MNIST and cifar10-jpeg.
set -euo pipefail
OUT=${1:-runs/esacl-prune}
SEEDS=${2:-"0 1 2"}
ABL_SEEDS=${3-"0"}  # "" = no ablation runs
DATA=${DATA:-${SPARSECL_DATA:?set DATA or SPARSECL_DATA to the data directory}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case ${PROTOCOL:-seq-mnist} in
  seq-mnist) common=(--benchmark seq-mnist --data-dir "$DATA" --epochs 1 --batch-size 10 --quiet) ;;
  seq-cifar10-cpu) common=(--benchmark seq-cifar10-jpeg --data-dir "$DATA" --backbone-opt nf=8 --epochs 1
                           --batch-size 32 --quiet) ;;
  *) echo "unknown PROTOCOL ${PROTOCOL} (seq-mnist | seq-cifar10-cpu)" >&2; exit 2 ;;
esac
# EsaCL on seq-mnist: the paper's Split CIFAR-10 values (tau 5, K 0.05, lr 0.01, rho 0.05, 40% kept)
esacl=(-o lr=0.01 -o tau=5 -o k_frac=0.05 -o rho=0.05 -o keep_frac=0.4)
run() {  # name seed sparsity options...
  local name=$1 seed=$2 sp=$3; shift 3
  local dir="$OUT/$name-sp$sp-s$seed"
  [ -f "$dir/result.json" ] && return 0
  rm -rf "$dir"
  sparsecl run --method esacl "${common[@]}" --seed "$seed" --out "$dir" -o sparsity="$sp" "$@"
}
for sp in 0.6 0.7 0.8 0.9; do
  for seed in $SEEDS; do
    run esacl "$seed" "$sp" "${esacl[@]}"
    run sgd-prune "$seed" "$sp" -o sam=false -o polytope=false -o sse=false -o ere=false -o lr=0.03
  done
  for seed in $ABL_SEEDS; do
    run wo-sa "$seed" "$sp" "${esacl[@]}" -o sam=false
    run wo-sp "$seed" "$sp" "${esacl[@]}" -o polytope=false -o lr=0.03
    run wo-sa-wo-sp "$seed" "$sp" "${esacl[@]}" -o sam=false -o polytope=false -o lr=0.03
  done
done
