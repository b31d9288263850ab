"""Aggregate scripts/esacl_prune_study.sh runs into the markdown table of docs/results/esacl.md.

Usage: python scripts/esacl_prune_table.py OUT_DIR
Per run: the current task's Task-IL accuracy right before and right after each end-of-task prune
(from result.json "method" -> "esacl" -> "prune"), averaged over the 5 tasks; then mean +- std over seeds.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ["esacl", "wo-sa", "wo-sp", "wo-sa-wo-sp", "sgd-prune"]
LABEL = {"esacl": "EsaCL (SAM + SFW + SSE/ERE)", "wo-sa": "w/o SA (SFW + SSE/ERE)", "wo-sp": "w/o SP (SAM + SGD + SSE/ERE)",
         "wo-sa-wo-sp": "w/o SA, w/o SP (SGD + SSE/ERE)", "sgd-prune": "plain SGD (no selection)"}


def fmt(xs: list[float], digits: int = 2) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def main(out: str) -> None:
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(out).glob("*/result.json")):
        m = re.fullmatch(r"(.+)-sp([0-9.]+)-s(\d+)", path.parent.name)
        if not m:
            continue
        r = json.loads(path.read_text())
        if not r.get("complete"):
            continue
        prune = r["method"]["esacl"]["prune"]
        d = rows[(m.group(1), m.group(2))]
        d["before"].append(statistics.mean(p["accuracy_before_prune"]["task_il"] for p in prune))
        d["after"].append(statistics.mean(p["accuracy_after_prune"]["task_il"] for p in prune))
        d["drop"].append(statistics.mean(p["drop"]["task_il"] for p in prune))
        d["worst"].append(max(p["drop"]["task_il"] for p in prune))
        d["cil"].append(r["accuracy"]["class_il"]["acc"])
        d["til"].append(r["accuracy"]["task_il"]["acc"])
        d["flops"].append(r["flops"]["train"] / 1e10)
        d["time"].append(r["timing"]["train_seconds"])
    print("| sparsity | variant | seeds | current task before prune | after prune | drop (mean of 5 tasks) "
          "| worst task drop | final Class-IL ACC | final Task-IL ACC | train FLOPs (1e10) | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sp in sorted({k[1] for k in rows}):
        for name in ORDER:
            d = rows.get((name, sp))
            if not d:
                continue
            print(f"| {sp} | {LABEL[name]} | {len(d['drop'])} | {fmt(d['before'])} | {fmt(d['after'])} | **{fmt(d['drop'])}** "
                  f"| {fmt(d['worst'])} | {fmt(d['cil'])} | {fmt(d['til'])} | {fmt(d['flops'])} | {fmt(d['time'], 0)} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/esacl-prune")
