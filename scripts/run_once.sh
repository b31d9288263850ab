# Sourced by the result scripts: `run_once DIR ARGS...` runs `sparsecl run ARGS... --out DIR` on one
# thread unless DIR already holds a complete run (so an interrupted script can simply be restarted).
run_once() { local dir=$1; shift
  [ -f "$dir/result.json" ] && grep -q '"complete": true' "$dir/result.json" && return 0
  OMP_NUM_THREADS=1 sparsecl run --out "$dir" --quiet "$@"; }
