"""Summaries behind the findings of docs/results/continual-dst.md (run from the repository root;
argument: the sweep folder, default runs/sweep-seq-mnist-continual-dst). Shared-BN runs only (the
grids' main entry); per-task BN changes only later evaluations (see the doc)."""
import glob
import json
import statistics as st
import sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else "runs/sweep-seq-mnist-continual-dst"
d = defaultdict(list)
for f in glob.glob(f"{root}/*/result.json"):
    r = json.load(open(f))
    mo = r["config"]["method_options"]
    if not r.get("complete") or mo.get("per_task_bn"):
        continue
    d[(mo["init"], mo["grow"], mo["sparsity"])].append(r["accuracy"]["task_il"])
m = {k: st.mean(a["acc"] for a in v) for k, v in d.items()}
diag = {k: st.mean(st.mean(a["matrix"][j][j] for j in range(len(a["matrix"]))) for a in v) for k, v in d.items()}


def fmt(v):
    return "-" if v is None else "%.2f" % v


print("| sparsity | init | mean ACC, fixed modes | range over them | adaptive `random:2,gradient:3` | fixed random "
      "| fixed gradient | mean ACC with per-task BN (diagonal), fixed modes |")
print("|---|---|---|---|---|---|---|---|")
for sp in (0.8, 0.9, 0.95):
    for init in ("uniform", "erk"):
        vals = {g: m.get((init, g, sp)) for g in ("random", "unfired", "gradient", "momentum", "random:2,gradient:3")}
        fixed = [v for g, v in vals.items() if v is not None and ":" not in g]
        fixed_diag = [diag[(init, g, sp)] for g in ("random", "unfired", "gradient", "momentum") if (init, g, sp) in diag]
        if not fixed:
            continue
        print(f"| {sp} | {'ERK' if init == 'erk' else init} | {fmt(st.mean(fixed))} ({len(fixed)} modes) | "
              f"{fmt(max(fixed) - min(fixed))} | {fmt(vals['random:2,gradient:3'])} | {fmt(vals['random'])} "
              f"| {fmt(vals['gradient'])} | {fmt(st.mean(fixed_diag))} |")
print("seeds per configuration:", sorted({len(v) for v in d.values()}))
