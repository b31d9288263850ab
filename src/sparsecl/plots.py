"""Figures over run directories (``sparsecl report RUNS --plots DIR``): accuracy-matrix heatmaps,
accuracy against training FLOPs (the Pareto view across methods and sparsities) and per-task
accuracy curves. Runs of the same configuration (all but the seed) are averaged."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsecl.engine.figures import draw_accuracy_matrix  # noqa: E402


def _label(cfg: dict[str, Any]) -> str:
    mo = cfg.get("method_options", {})
    parts = [cfg["method"]]
    if "buffer_size" in mo:
        parts.append(f"buf {mo['buffer_size']}")
    if "sparsity" in mo:
        parts.append(f"s {mo['sparsity']}")
    if "allocation" in mo:
        parts.append(str(mo["allocation"]))
    return " ".join(parts)


def _groups(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configurations with the seed-mean of their accuracy matrices, ACC and FLOPs."""
    from sparsecl.report import config_key, varied_options

    groups: dict[str, list[dict[str, Any]]] = {}
    extra: dict[str, str] = {}  # options that tell this configuration apart from the others
    for r, options in zip(results, varied_options(results, skip=("sparsity", "allocation"))):
        key = config_key(r["config"])
        groups.setdefault(key, []).append(r)
        extra[key] = options
    out = []
    for key, members in groups.items():
        cfg = members[0]["config"]
        setting = "class_il" if "class_il" in members[0]["accuracy"] else "task_il"
        done = min(m["tasks_completed"] for m in members)
        if done == 0:
            continue
        mats = np.array([[row[:done] for row in m["accuracy"][setting]["matrix"][:done]] for m in members], dtype=float)
        # average accuracy on the tasks seen so far, after each task, per seed
        curves = np.array([[R[t, : t + 1].mean() for t in range(done)] for R in mats])
        accs = [m["accuracy"][setting]["acc"] for m in members]
        flops = [m["flops"]["train"] for m in members]
        out.append({
            "label": " ".join(filter(None, (_label(cfg), extra[key]))) + f" ({cfg['benchmark']})",
            "setting": setting, "matrix": mats.mean(0),
            "acc": float(np.mean(accs)), "acc_sd": _sd(accs),
            "flops": float(np.mean(flops)), "flops_sd": _sd(flops),
            "curve": curves.mean(0), "curve_sd": curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(done),
            "n": len(members),
        })
    return out


def _sd(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed: no error bar)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _flops_axis(ax: Any, values: list[float]) -> None:
    """Log scale over several decades; within one decade a log axis shows no labelled tick, so a
    linear one with a shared power of ten."""
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))


def write_plots(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the three figures as PNG files into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _groups(results)
    paths = []

    # 1. Accuracy matrices (one panel per configuration).
    n = len(groups)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False, constrained_layout=True)
    for ax, g in zip(axes.flat, groups):
        title = textwrap.fill(g["label"], 38)  # long labels wrapped: no title runs into its neighbour's
        im = draw_accuracy_matrix(ax, g["matrix"], f"{title}\n{g['setting'].replace('_', '-')}, {g['n']} seed(s)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy (%)")
    paths.append(out_dir / "accuracy_matrices.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. Final accuracy against training FLOPs, with the Pareto front (fewer FLOPs, higher accuracy).
    fig, ax = plt.subplots(figsize=(8.5, 5.0))
    pts = sorted(groups, key=lambda g: (g["flops"], -g["acc"]))  # of equal FLOPs only the best is on the front
    for i, g in enumerate(pts):  # error bars: std over seeds; labels in a legend (point labels collide)
        ax.errorbar(g["flops"], g["acc"], xerr=g["flops_sd"] or None, yerr=g["acc_sd"] or None, ms=5, capsize=3,
                    fmt="os^Dv"[i // 10 % 5], label=textwrap.fill(g["label"], 50))  # 10 colours, then a new marker
    front, best = [], -1.0
    for g in pts:
        if g["acc"] > best:
            front.append(g)
            best = g["acc"]
    ax.plot([g["flops"] for g in front], [g["acc"] for g in front], "k--", lw=1, label="Pareto front")
    _flops_axis(ax, [g["flops"] for g in pts])
    ax.margins(x=0.1)
    ax.set_xlabel("training FLOPs (mean ± std over seeds)")
    ax.set_ylabel("final average accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(out_dir / "accuracy_vs_flops.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    # 3. Average accuracy over the tasks seen so far, after each task.
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in groups:
        tasks = np.arange(1, len(g["curve"]) + 1)
        ax.errorbar(tasks, g["curve"], yerr=g["curve_sd"] if g["n"] > 1 else None, marker="o", capsize=3,
                    label=textwrap.fill(g["label"], 50))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(out_dir / "accuracy_per_task.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
