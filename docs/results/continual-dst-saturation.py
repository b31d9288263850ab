"""The saturation tables of docs/results/continual-dst.md (run from the repository root after
`sparsecl sweep benchmarks/grids/perm-mnist-continual-dst-saturation.yaml`; argument: the sweep folder).

Per (init, density per task), over the seeds: when the backbone (the union of the task masks) is
full: the first task after which some isolated layer has no free weight, after which all of them
are used, and after which 95 % / 99 % are used; the share of M_t that earlier tasks had trained
(reused) at tasks 2, 5, 10 and 20; ACC and BWT. Then the usage after every task."""
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


def first(runs, pred):
    """The first task (1-based) per seed whose record satisfies ``pred``, joined by '/' ('-' = never)."""
    return "/".join(str(next((h["task"] for h in r["method"]["tasks"] if pred(h)), "-")) for r in runs)


def mean_sd(values):
    return f"{st.mean(values):.2f} ± {st.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


order = sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "uniform"))
print("| init | density per task | seeds | some layer full after task | all full after task | >= 95 % used after task "
      "| >= 99 % used after task | reused share of M_t at tasks 2 / 5 / 10 / 20, % | ACC | BWT |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (init, density), runs in order:
    reuse = [st.mean(100 * r["method"]["tasks"][t - 1]["reused_fraction"] for r in runs) for t in (2, 5, 10, 20)]
    print(f"| {init} | {density} | {len(runs)} "
          f"| {first(runs, lambda h: min(h['free_weights'].values()) == 0)} "
          f"| {first(runs, lambda h: sum(h['free_weights'].values()) == 0)} "
          f"| {first(runs, lambda h: h['used_fraction'] >= 0.95)} | {first(runs, lambda h: h['used_fraction'] >= 0.99)} "
          f"| {' / '.join(f'{v:.1f}' for v in reuse)} "
          f"| {mean_sd([r['accuracy']['task_il']['acc'] for r in runs])} "
          f"| {mean_sd([r['accuracy']['task_il']['bwt'] for r in runs])} |")
print()
n = max(len(r["method"]["tasks"]) for _, runs in order for r in runs)
print("| init | density | " + " | ".join(str(t) for t in range(1, n + 1)) + " |")
print("|---|---|" + "---|" * n)
for (init, density), runs in order:
    used = [st.mean(100 * r["method"]["tasks"][t]["used_fraction"] for r in runs) for t in range(n)]
    print(f"| {init} | {density} | " + " | ".join(f"{u:.1f}" for u in used) + " |")
print("\nbackbone used after each task, % of the isolated weights (mean over seeds); "
      "a random mask of density d would give 100 * (1 - (1 - d)^t)")
