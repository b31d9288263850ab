"""Markdown tables in the layout of CL-LSG's Tables 2-3 and 8 from sparsecl run directories.

Usage: python scripts/cl_lsg_table.py ROOT
  run dirs ROOT/<name>-s<seed> (see cl_lsg_seq_mnist.sh, cl_lsg_seq_cifar10_cpu.sh).
Accuracies: Task-IL test accuracy of each task after the last task (= after its own task for these
isolation methods), mean ± std over seeds; model size = size_total after each task (x full net);
mask statistics = cl-lsg's per-task report (method.selected, released, ...), mean over seeds.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROWS = [("scratch", "Scratch"), ("finetune-per-task", "Fine-tune"), ("pnn", "PNN"), ("lps", "LPS"), ("grow", "Grow"),
        ("den", "DEN (ours impl.)"), ("cpg", "CPG (ours impl.)"),
        ("cl-lsg", "CL-LSG (ours impl.)")]
STATS = [("growth_stage", "growth stage ran"), ("grew", "grew (a channel kept)"),
         ("grown_kept", "grown channels kept / growable"), ("selected", "old frozen kernels selected"),
         ("released", "old kernels released (free to retrain)"), ("released_kept", "released kernels kept"),
         ("size_task", "size used by the task (x full)")]
ABLATION = [("grow", "Grow only"), ("abl-sel", "+Sel-mask"), ("abl-lsg", "+LSG"), ("abl-retrain", "+Re-train"),
            ("cl-lsg", "CL-LSG (target growth)")]


def ms(xs: list[float], digits: int = 2) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def load(root: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for d in sorted(root.iterdir()):
        f = d / "result.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        if r.get("complete"):
            runs[d.name.rsplit("-s", 1)[0]].append(r)
    return runs


def mean_or_dash(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.mean(xs):.3f}" if xs else "–"


def main(root: Path) -> None:
    runs = load(root)
    T = next(iter(runs.values()))[0]["n_tasks"]
    seeds = {k: len(v) for k, v in runs.items()}
    print(f"seeds per row: {seeds}\n")
    head = "| Method | " + " | ".join(str(j + 1) for j in range(T)) + " | Avg | Model size |"
    sep = "|" + "---|" * (T + 3)
    print("Accuracy (Task-IL %, after the last task)\n")
    print(head + "\n" + sep)
    for key, label in ROWS:
        if key not in runs:
            continue
        rs = runs[key]
        cols = [ms([r["accuracy"]["task_il"]["matrix"][-1][j] for r in rs]) for j in range(T)]
        avg = ms([r["accuracy"]["task_il"]["acc"] for r in rs])
        size = ms([r["method"]["model_size"] for r in rs])
        print(f"| {label} | " + " | ".join(cols) + f" | {avg} | {size}x |")
    for field, title in (("size_total", "Model size after each task (x full backbone; conv/linear weights in use by any task)"),
                         ("size_task", "Model size used by each task alone (x full backbone)")):
        print(f"\n{title}\n")
        print("| Method | " + " | ".join(str(j + 1) for j in range(T)) + " |\n" + "|" + "---|" * (T + 1))
        for key, label in ROWS:
            if key in runs and all(field in r["method"] for r in runs[key]):
                cols = [ms([r["method"][field][j] for r in runs[key]]) for j in range(T)]
                print(f"| {label} | " + " | ".join(c + "x" for c in cols) + " |")
    for key in ("cl-lsg", "grow"):
        if key not in runs:
            continue
        print(f"\n{key}: mask statistics per task (mean over seeds)\n")
        print("| | " + " | ".join(str(j + 1) for j in range(T)) + " |\n" + "|" + "---|" * (T + 1))
        for field, label in STATS:
            cols = [mean_or_dash([r["method"][field][j] for r in runs[key]]) for j in range(T)]
            print(f"| {label} | " + " | ".join(cols) + " |")
    if "cl-lsg" in runs:
        print("\ncl-lsg decisions: stage-1 validation accuracy / target (seed by seed)\n")
        for r in runs["cl-lsg"]:
            m = r["method"]
            print(f"- seed {r['seed']}: stage-1 {m['stage1_accuracy']}; target {m['target']}; "
                  f"channels kept {m['channels_kept']}")
    present = [key for key, _ in ABLATION if key in runs]
    seeds = set.intersection(*({r["seed"] for r in runs[k]} for k in present)) if present else set()
    print(f"\nAblation (Table 8 layout, seeds {sorted(seeds)}: each row adds one technique; "
          "accuracy and its change vs the row above)\n")
    print("| Method | " + " | ".join(str(j + 1) for j in range(T)) + " | Avg | Model size |\n" + "|" + "---|" * (T + 3))
    prev = None
    for key, label in ABLATION:
        if key not in present:
            continue
        rs = [r for r in runs[key] if r["seed"] in seeds]
        acc = [statistics.mean(r["accuracy"]["task_il"]["matrix"][-1][j] for r in rs) for j in range(T)]
        avg = statistics.mean(r["accuracy"]["task_il"]["acc"] for r in rs)
        size = statistics.mean(r["method"]["model_size"] for r in rs)
        if prev is None or key == "cl-lsg":
            cols = [f"{a:.2f}" for a in acc] + [f"{avg:.2f}"]
        else:
            cols = [f"{a - p:+.2f}" for a, p in zip(acc + [avg], prev)]
        print(f"| {label} | " + " | ".join(cols) + f" | {size:.3f}x |")
        prev = acc + [avg]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
