#!/usr/bin/env bash
# Does EsaCL learn on a BatchNorm ResNet? The first task of seq-cifar10-jpeg at a CPU budget
# (ResNet-18 nf 8, batch 32, 1 epoch, seed 0, sparsity 0.8) for EsaCL and its ablations; each run is
# stopped once task 1 is done, and the current task's Task-IL accuracy right before and right after
# the one-shot prune is printed (docs/results/esacl.md). Usage: scripts/esacl_cifar_task0.sh OUT_DIR
set -uo pipefail
OUT=${1:-runs/esacl-cifar-task0}
DATA=${DATA:-${SPARSECL_DATA:?set DATA or SPARSECL_DATA to the data directory}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
paper=(-o lr=0.01 -o tau=5 -o k_frac=0.05 -o rho=0.05 -o keep_frac=0.4)
first_task() {  # name epochs options...
  local name=$1 epochs=$2; shift 2
  local dir="$OUT/$name"
  if [ ! -f "$dir/result.json" ]; then
    rm -rf "$dir"
    sparsecl run --method esacl --benchmark seq-cifar10-jpeg --data-dir "$DATA" --backbone-opt nf=8 \
      --epochs "$epochs" --batch-size 32 --seed 0 --quiet --out "$dir" -o sparsity=0.8 "$@" >"$dir.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null && [ ! -f "$dir/result.json" ]; do sleep 1; done
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  fi
  python3 - "$dir" "$name" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/result.json"))
p = r["method"]["esacl"]["prune"][0]
print(f"| {sys.argv[2]} | {p['accuracy_before_prune']['task_il']:.2f} | {p['accuracy_after_prune']['task_il']:.2f} |")
PY
}
echo "| variant | task 1 before prune | after prune |"
echo "|---|---|---|"
first_task esacl 1 "${paper[@]}"
first_task esacl-3-epochs 3 "${paper[@]}"
first_task esacl-lr0.05 1 "${paper[@]}" -o lr=0.05
first_task esacl-rho0.01 1 "${paper[@]}" -o rho=0.01
first_task esacl-keep0.8 1 "${paper[@]}" -o keep_frac=0.8
first_task esacl-per-class 1 "${paper[@]}" -o selection=per-class
first_task sse-only 1 "${paper[@]}" -o ere=false
first_task ere-only 1 "${paper[@]}" -o sse=false
first_task wo-sa 1 "${paper[@]}" -o sam=false
first_task wo-sp 1 "${paper[@]}" -o polytope=false -o lr=0.03
first_task sam-fw-no-selection 1 "${paper[@]}" -o sse=false -o ere=false
first_task sam-sgd-no-selection 1 "${paper[@]}" -o polytope=false -o lr=0.03 -o sse=false -o ere=false
first_task sgd-selection 1 "${paper[@]}" -o sam=false -o polytope=false -o lr=0.03
first_task sgd-per-class-selection 1 "${paper[@]}" -o sam=false -o polytope=false -o lr=0.03 -o selection=per-class
first_task sgd 1 -o lr=0.03 -o sam=false -o polytope=false -o sse=false -o ere=false
