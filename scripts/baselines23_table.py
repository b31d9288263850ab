"""The seq-mnist rows of docs/results/seq-mnist.md for FDR, LPS, PNN and Fine-tune per task.

Usage: python scripts/baselines23_table.py ROOT
  run dirs ROOT/<name>-s<seed> (see baselines23_seq_mnist.sh); mean ± sample std over seeds.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROWS = [("fdr-200", "fdr", "200"), ("fdr-500", "fdr", "500"), ("lps", "lps (Task-IL only)", "–"),
        ("pnn", "pnn (Task-IL only)", "–"), ("finetune-per-task", "finetune-per-task (Task-IL only)", "–")]


def ms(xs: list[float], digits: int = 2) -> str:
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def main(root: Path) -> None:
    runs: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(root.glob("*-s*/result.json")):
        r = json.loads(f.read_text())
        if r.get("complete"):
            runs[f.parent.name.rsplit("-s", 1)[0]].append(r)
    print("| method | buffer | Class-IL ACC | Task-IL ACC | Task-IL per seed | Task-IL BWT | model size (x one net) "
          "| train FLOPs | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, label, buf in ROWS:
        rs = sorted(runs.get(key, []), key=lambda r: r["seed"])
        if not rs:
            continue
        acc = {s: [r["accuracy"][s]["acc"] for r in rs if s in r["accuracy"]] for s in ("class_il", "task_il")}
        cil = ms(acc["class_il"]) if acc["class_il"] else "–"
        per_seed = ", ".join(f"{a:.2f}" for a in acc["task_il"])
        bwt = ms([r["accuracy"]["task_il"]["bwt"] for r in rs])
        size = rs[0]["method"].get("model_size")
        flops = statistics.mean(r["flops"]["train"] for r in rs)
        lateral = rs[0]["method"].get("lateral_train_flops")
        f = f"{flops:.3e}" + (f" + {lateral:.3e} laterals" if lateral else "")
        print(f"| {label} | {buf} | {cil} | {ms(acc['task_il'])} | {per_seed} | {bwt} | "
              f"{'1' if size is None else f'{size:.2f}'} | {f} | {','.join(str(r['seed']) for r in rs)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
