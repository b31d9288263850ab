"""The table of docs/results/speed.md: per method, the plain eager loop against its speed options.

Reads the run directories of a sweep (e.g. ``benchmarks/grids/speed-seq-cifar10.yaml``) and prints,
for each configuration (method, preset options, speed options), the seeds found, Class-IL and
Task-IL ACC (mean +- std), training wall time per run (seconds, compilation included), trained samples/s, the speed-up over the same
configuration without speed options and the Class-IL difference to it. Prints its command and the
devices of the runs first.

    python3 benchmarks/speed_table.py runs/speed-seq-cifar10 [--format md|csv]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

from sparsecl.report import collect_results, mean_std
from sparsecl.sweep import SPEED_KEYS


def speed_options(cfg: dict[str, Any]) -> str:
    """The speed options of a run's config as CLI flags ('plain eager' when none)."""
    flags = []
    for key in SPEED_KEYS:
        value = cfg.get(key)
        if value:
            flag = "--" + key.replace("_", "-")
            flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(flags) or "plain eager"


def speed_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its complete runs (incomplete runs are left out)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if not r.get("complete"):
            continue
        cfg = r["config"]
        base = {k: v for k, v in cfg.items() if k not in (*SPEED_KEYS, "seed", "out", "device", "data_dir")}
        groups[(json.dumps(base, sort_keys=True), speed_options(cfg))].append(r)
    rows = []
    for (base, options), runs in groups.items():
        cil = [r["accuracy"]["class_il"]["acc"] for r in runs if "class_il" in r["accuracy"]]
        til = [r["accuracy"]["task_il"]["acc"] for r in runs]
        train_s = [r["timing"]["train_seconds"] for r in runs]
        samples = [r["samples"]["trained"] / r["timing"]["train_seconds"] for r in runs]
        cfg = runs[0]["config"]
        sparsity = cfg["method_options"].get("sparsity")
        rows.append({
            "base": base, "options": options, "method": cfg["method"], "benchmark": cfg["benchmark"],
            "sparsity": sparsity, "epochs": cfg["epochs"], "seeds": sorted(r["seed"] for r in runs),
            "devices": sorted({r["device"] for r in runs}),
            "cil": mean_std(cil) if cil else None, "til": mean_std(til),
            "train_s": mean_std(train_s), "samples_s": mean_std(samples)[0],
        })
    plain = {row["base"]: row for row in rows if row["options"] == "plain eager"}
    for row in rows:
        ref = plain.get(row["base"])
        row["speedup"] = ref["train_s"][0] / row["train_s"][0] if ref else None
        row["cil_vs_plain"] = (row["cil"][0] - ref["cil"][0]) if ref and row["cil"] and ref["cil"] else None
    rows.sort(key=lambda r: (r["method"], r["base"], r["options"] != "plain eager", r["options"]))
    return rows


def _pm(ms: tuple[float, float] | None, digits: int = 2) -> str:
    return "-" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def render(rows: list[dict[str, Any]], fmt: str = "md") -> str:
    head = ["method", "sparsity", "benchmark", "epochs", "options", "seeds", "Class-IL ACC", "Task-IL ACC",
            "train s / run", "trained samples/s", "speed-up", "Class-IL vs plain"]
    body = []
    for r in rows:
        body.append([
            r["method"], "-" if r["sparsity"] is None else f"{r['sparsity']:g}", r["benchmark"], str(r["epochs"]),
            r["options"] if fmt == "csv" else f"`{r['options']}`", ",".join(map(str, r["seeds"])),
            _pm(r["cil"]), _pm(r["til"]), _pm(r["train_s"], 1), f"{r['samples_s']:,.0f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "-" if r["cil_vs_plain"] is None else f"{r['cil_vs_plain']:+.2f}",
        ])
    if fmt == "csv":
        return "\n".join(",".join(f'"{c}"' if "," in c else c for c in line) for line in [head, *body])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="sweep output folders or run directories")
    ap.add_argument("--format", choices=["md", "csv"], default="md")
    args = ap.parse_args(argv)
    rows = speed_rows(collect_results(args.runs))
    print("command:", " ".join([sys.executable, *sys.argv]))
    print("devices:", "; ".join(sorted({d for r in rows for d in r["devices"]})) or "-")
    print(render(rows, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
