"""Markdown tables in the layout of CL-LSG's Tables 2-3 and 8 from sparsecl run directories.

Usage: python scripts/cl_lsg_table.py ROOT [ABLATION_SUFFIX]
  run dirs ROOT/<name>-s<seed> (see cl_lsg_seq_mnist.sh, cl_lsg_seq_cifar10_cpu.sh); the ablation
  table reads <row><ABLATION_SUFFIX> (e.g. "-mlr0.01" for the rows run at mask lr 0.01).
Accuracies: Task-IL accuracy of each task after the last task (= after its own task for these
isolation methods), mean ± std over seeds; model size = size_total after each task (x full net).
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROWS = [("scratch", "Scratch"), ("grow", "Grow"), ("cl-lsg", "CL-LSG (ours impl.)"),
        ("cl-lsg-mlr0.01", "CL-LSG, mask lr 0.01 (not the paper's)")]
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


def main(root: Path, suffix: str = "") -> None:
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
            if key in runs:
                cols = [ms([r["method"][field][j] for r in runs[key]]) for j in range(T)]
                print(f"| {label} | " + " | ".join(c + "x" for c in cols) + " |")
    for key in ("cl-lsg", "cl-lsg-mlr0.01"):
        if key not in runs:
            continue
        print(f"\n{key} decisions: grew per task, stage-1 accuracy / scratch target (seed by seed)\n")
        for r in runs[key]:
            m = r["method"]
            print(f"- seed {r['seed']}: grew {m['grew']}; stage-1 {m['stage1_accuracy']}; target {m['target']}")
    print("\nAblation (Table 8 layout: each row adds one technique; accuracy and its change vs the row above)\n")
    print("| Method | " + " | ".join(str(j + 1) for j in range(T)) + " | Avg | Model size |\n" + "|" + "---|" * (T + 3))
    prev = None
    for key, label in ABLATION:
        key += suffix
        if key not in runs:
            continue
        rs = runs[key]
        acc = [statistics.mean(r["accuracy"]["task_il"]["matrix"][-1][j] for r in rs) for j in range(T)]
        avg = statistics.mean(r["accuracy"]["task_il"]["acc"] for r in rs)
        size = statistics.mean(r["method"]["model_size"] for r in rs)
        if prev is None or key == "cl-lsg" + suffix:
            cols = [f"{a:.2f}" for a in acc] + [f"{avg:.2f}"]
        else:
            cols = [f"{a - p:+.2f}" for a, p in zip(acc + [avg], prev)]
        print(f"| {label} | " + " | ".join(cols) + f" | {size:.3f}x |")
        prev = acc + [avg]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
