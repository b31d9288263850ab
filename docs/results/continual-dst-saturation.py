"""The saturation table of docs/results/continual-dst.md (run from the repository root after
`sparsecl sweep benchmarks/grids/perm-mnist-continual-dst-saturation.yaml`).

Per (init, density per task), over the seeds: the first task that got fewer weights than it asked
for, the task after which some layer had no free weight, and the mean final Task-IL accuracy of the
tasks that got their full share, only part of it, or none (head and biases on a frozen backbone)."""
import glob
import json
import statistics as st
import sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else "runs/sweep-perm-mnist-continual-dst"
groups = defaultdict(list)
for f in sorted(glob.glob(f"{root}/*/result.json")):
    r = json.load(open(f))
    if r.get("complete"):
        mo = r["config"]["method_options"]
        groups[(mo["init"], round(1 - mo["sparsity"], 2))].append(r)


def mean(values):
    return f"{st.mean(values):.2f}" if values else "-"


print("| init | density per task | seeds | first task short of weights | some layer full after task "
      "| ACC (20 tasks) | final ACC, tasks with full share | partial share | no free weight (head only) | BWT |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (init, density), runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "uniform")):
    full, partial, none = [], [], []
    for r in runs:
        final = r["accuracy"]["task_il"]["matrix"][-1]
        for h in r["method"]["tasks"]:
            got = sum(h["trained_weights"].values()) / max(sum(h["requested_weights"].values()), 1)
            (full if got >= 1 else none if got == 0 else partial).append(final[h["task"] - 1])
    sat = sorted({r["method"]["saturated_at_task"] for r in runs}, key=str)
    layer_full = sorted({r["method"]["layer_full_after_task"] for r in runs}, key=str)
    accs = [r["accuracy"]["task_il"]["acc"] for r in runs]
    bwt = max(abs(r["accuracy"]["task_il"]["bwt"]) for r in runs)
    acc = f"{st.mean(accs):.2f} ± {st.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
    print(f"| {init} | {density} | {len(runs)} | {'/'.join(map(str, sat))} | {'/'.join(map(str, layer_full))} "
          f"| {acc} | {mean(full)} ({len(full)}) | {mean(partial)} ({len(partial)}) | {mean(none)} ({len(none)}) "
          f"| {bwt:.2f} |")
