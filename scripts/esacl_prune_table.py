"""Aggregate scripts/esacl_prune_study.sh runs (or a sweep of `esacl` runs) into the markdown table
of docs/results/esacl.md.

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

ORDER = ["esacl", "wo-sa", "wo-sp", "wo-sa-wo-sp", "sam-sfw", "sgd-prune"]
LABEL = {"esacl": "EsaCL (SAM + SFW + SSE/ERE)", "wo-sa": "w/o SA (SFW + SSE/ERE)", "wo-sp": "w/o SP (SAM + SGD + SSE/ERE)",
         "wo-sa-wo-sp": "w/o SA, w/o SP (SGD + SSE/ERE)", "sam-sfw": "SAM + SFW (no selection)",
         "sgd-prune": "plain SGD (no selection)"}


def variant_of(r: dict) -> tuple[str, str] | None:
    """(variant, sparsity) from a run's configuration (runs not named by esacl_prune_study.sh)."""
    o = r["config"]["method_options"]
    flag = {k: str(o.get(k, True)).lower() not in ("false", "0") for k in ("sam", "polytope", "sse", "ere")}
    select = flag["sse"] and flag["ere"]
    names = {(True, True, True): "esacl", (False, True, True): "wo-sa", (True, False, True): "wo-sp",
             (False, False, True): "wo-sa-wo-sp", (True, True, False): "sam-sfw", (False, False, False): "sgd-prune"}
    if select != (flag["sse"] or flag["ere"]):
        return None  # SSE-only / ERE-only runs have no row here
    name = names.get((flag["sam"], flag["polytope"], select))
    return (name, str(o.get("sparsity", 0.8))) if name else None


def fmt(xs: list[float], digits: int = 2) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def main(out: str) -> None:
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(out).glob("*/result.json")):
        r = json.loads(path.read_text())
        if not r.get("complete") or "esacl" not in r.get("method", {}):
            continue
        m = re.fullmatch(r"(.+)-sp([0-9.]+)-s(\d+)", path.parent.name)
        key = (m.group(1), m.group(2)) if m and m.group(1) in LABEL else variant_of(r)
        if key is None:
            continue
        prune = r["method"]["esacl"]["prune"]
        d = rows[key]
        d["before"].append(statistics.mean(p["accuracy_before_prune"]["task_il"] for p in prune))
        d["after"].append(statistics.mean(p["accuracy_after_prune"]["task_il"] for p in prune))
        d["drop"].append(statistics.mean(p["drop"]["task_il"] for p in prune))
        if all("drop_after_bn_recalibration" in p for p in prune):
            d["recal"].append(statistics.mean(p["accuracy_after_bn_recalibration"]["task_il"] for p in prune))
            d["recal_drop"].append(statistics.mean(p["drop_after_bn_recalibration"]["task_il"] for p in prune))
        d["worst"].append(max(p["drop"]["task_il"] for p in prune))
        d["cil"].append(r["accuracy"]["class_il"]["acc"])
        d["til"].append(r["accuracy"]["task_il"]["acc"])
        d["flops"].append(r["flops"]["train"] / 1e10)
        d["time"].append(r["timing"]["train_seconds"])
    recal = any(d["recal"] for d in rows.values())
    extra = " after BN re-estimation | its drop |" if recal else ""
    print("| sparsity | variant | seeds | current task before prune | after prune | drop (mean of 5 tasks) "
          f"| worst task drop |{extra} final Class-IL ACC | final Task-IL ACC | train FLOPs (1e10) | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if recal else ""))
    for sp in sorted({k[1] for k in rows}):
        for name in ORDER:
            d = rows.get((name, sp))
            if not d:
                continue
            cells = (f" {fmt(d['recal'])} | **{fmt(d['recal_drop'])}** |" if d["recal"] else " - | - |") if recal else ""
            print(f"| {sp} | {LABEL[name]} | {len(d['drop'])} | {fmt(d['before'])} | {fmt(d['after'])} | **{fmt(d['drop'])}** "
                  f"| {fmt(d['worst'])} |{cells} {fmt(d['cil'])} | {fmt(d['til'])} | {fmt(d['flops'])} | {fmt(d['time'], 0)} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/esacl-prune")
