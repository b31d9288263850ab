"""Tables of final metrics over run directories (markdown or CSV), optionally aggregated over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from sparsecl import SparseCLError

COLUMNS = [
    ("method", "method"), ("benchmark", "benchmark"), ("buffer", "buffer"), ("options", "options"), ("seed", "seed"),
    ("cil_acc", "Class-IL ACC"), ("til_acc", "Task-IL ACC"), ("cil_bwt", "Class-IL BWT"), ("cil_fwt", "Class-IL FWT"),
    ("cil_forgetting", "Class-IL forgetting"), ("til_bwt", "Task-IL BWT"), ("flops", "train FLOPs"),
    ("flops_ratio", "FLOPs / dense"), ("density", "weight density"), ("footprint_mb", "footprint (MB)"),
    ("train_s", "train time (s)"),
]
NUMERIC = {"cil_acc", "til_acc", "cil_bwt", "cil_fwt", "cil_forgetting", "til_bwt", "flops", "flops_ratio", "density",
           "footprint_mb", "train_s"}
# What two runs must share for one to be the other's reference (``report --baseline``): the task
# stream, the network and the training budget; methods and their options may differ.
PROTOCOL_KEYS = ("benchmark", "setting", "backbone", "backbone_options", "class_order", "n_tasks", "image_size",
                 "validation", "epochs", "batch_size", "drop_last")


def _unusable(r: Any) -> str | None:
    """Why a parsed result.json cannot be a table row, or None."""
    if not isinstance(r, dict):
        return "not a result object"
    cfg = r.get("config")
    if not isinstance(cfg, dict) or any(k not in cfg for k in ("method", "benchmark", "seed")):
        return "no config with method, benchmark and seed"
    if not isinstance(cfg.get("method_options", {}), dict):
        return "method_options is not a mapping"
    if not isinstance(r.get("accuracy"), dict) or not all(isinstance(v, dict) for v in r["accuracy"].values()):
        return "no accuracy section of settings"
    if not all(isinstance(r.get(k, {}), dict) for k in ("flops", "timing", "sparsity", "memory")):
        return "a flops, timing, sparsity or memory section is not a mapping"
    return None


def collect_results(paths: Sequence[str | Path], warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Load ``result.json`` of each run directory (folders of run directories are searched).

    A malformed file is skipped with a ``warn``-ing (the table of the others is still made);
    without ``warn`` it is an error."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "result.json").exists():
            found.append(p / "result.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("result.json")))
        else:
            raise SparseCLError(f"no run directory at {p}")
    if not found:
        raise SparseCLError(f"no result.json under {', '.join(map(str, paths))}")
    results = []
    for f in found:
        try:
            r = json.loads(f.read_text())
            problem = _unusable(r)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = f"not valid JSON ({type(e).__name__})"
        if problem:
            if warn is None:
                raise SparseCLError(f"{f}: {problem}")
            warn(f"skipping {f}: {problem}")
            continue
        r["_path"] = str(f.parent)
        results.append(r)
    if not results:
        raise SparseCLError(f"no usable result.json under {', '.join(map(str, paths))}")
    return results


def config_key(cfg: dict[str, Any]) -> str:
    """A run's configuration without seed, output folder and device: runs with equal keys are
    seeds of one configuration (aggregated in tables and plots)."""
    # threads (float rounding only), flop_convention (both counts are recorded) and the loggers
    # do not make another configuration
    ignored = ("seed", "out", "device", "threads", "flop_convention", "tensorboard", "wandb")
    return json.dumps({k: v for k, v in cfg.items() if k not in ignored}, sort_keys=True)


def _megabytes(n: float | None) -> float | None:
    return None if n is None else n / 1e6


def flops_of(r: dict[str, Any], convention: str = "spec") -> tuple[float | None, float | None]:
    """A run's (training FLOPs, ratio to dense) under a FLOP ``convention`` (both are recorded);
    ``(None, None)`` for a result written before that convention was recorded."""
    f = r.get("flops") or {}
    if convention == f.get("convention", "spec"):
        return f.get("train"), f.get("ratio")
    c = (f.get("conventions") or {}).get(convention)
    return (c["train"], c["ratio"]) if c else (None, None)


def row_of(r: dict[str, Any], convention: str = "spec") -> dict[str, Any]:
    cfg = r["config"]
    flops, ratio = flops_of(r, convention)
    acc = r["accuracy"]
    cil, til = acc.get("class_il", {}), acc.get("task_il", {})
    return {
        "run": r["_path"], "method": cfg["method"], "benchmark": cfg["benchmark"],
        "buffer": (cfg.get("method_options") or {}).get("buffer_size", ""), "seed": cfg["seed"],
        "cil_acc": cil.get("acc"), "til_acc": til.get("acc"), "cil_bwt": cil.get("bwt"), "cil_fwt": cil.get("fwt"),
        "cil_forgetting": cil.get("forgetting"), "til_bwt": til.get("bwt"),
        "flops": flops, "flops_ratio": ratio, "train_s": (r.get("timing") or {}).get("train_seconds"),
        # active fraction of the masked layers at the end (1.0 dense; '-' for runs older than the sparse core)
        "density": ((r.get("sparsity") or {}).get("overall") or {}).get("density"),
        # training memory footprint per SPEC (weights, gradients, activations, masks, buffer), 1e6 bytes
        "footprint_mb": _megabytes(((r.get("memory") or {}).get("footprint_bytes") or {}).get("total")),
        "complete": r.get("complete", False),
        "_key": config_key(cfg),
        "_protocol": json.dumps({k: cfg.get(k) for k in PROTOCOL_KEYS}, sort_keys=True),
    }


# Never shown in the options column: they have their own column or do not change the result.
_NOT_OPTIONS = {"method", "benchmark", "seed", "out", "device", "data_dir", "data_root", "download",
                "keep_checkpoints", "tensorboard", "wandb", "method_options.buffer_size"}


def _flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: v for k, v in flat.items() if k not in _NOT_OPTIONS}


def varied_options(results: list[dict[str, Any]], skip: Sequence[str] = ()) -> list[str]:
    """Per result, the settings that differ between the runs of ``results`` (``lr=0.1
    delta_k=0.25``), so that runs of a sweep over options can be told apart. An option counts as
    varied when the runs that set it do not all share one value, or, for a method or backbone
    option, when runs of one method differ in setting it at all (unset = the method's default);
    options that only some methods have are not varied for that alone. ``skip`` names options
    (without ``method_options.``) shown elsewhere."""
    flats = [_flat_config(r["config"]) for r in results]
    methods = [r["config"].get("method") for r in results]
    keys = sorted({k for f in flats for k in f if k.split(".", 1)[-1] not in skip})

    def varied(k: str) -> bool:
        if len({json.dumps(f[k], sort_keys=True) for f in flats if k in f}) > 1:
            return True
        if "." not in k:  # a run option missing from a run's config: written by an older version
            return False
        return any(len({k in f for f, m in zip(flats, methods) if m == method}) > 1 for method in set(methods))

    shown = [k for k in keys if varied(k)]
    return [" ".join(f"{k.split('.', 1)[-1]}={flat[k]}" for k in shown if k in flat) for flat in flats]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rows of the same configuration (all but the seed) into mean +- std cells; a seed that
    appears twice in a group (the same configuration run in two directories) is counted once.
    Incomplete runs are grouped apart from complete ones (their metrics cover fewer tasks)."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for row in rows:
        members = groups.setdefault((row["_key"], bool(row["complete"])), [])
        if all(m["seed"] != row["seed"] for m in members):  # the same run twice (two sweep entries) counts once
            members.append(row)
    out = []
    for members in groups.values():
        agg = dict(members[0])
        agg["seed"] = ",".join(str(m["seed"]) for m in members)
        agg["seeds"] = len(members)
        for key in NUMERIC:
            vals = [m[key] for m in members if m[key] is not None]
            # one value has no spread: shown bare, not as "± 0.00"
            agg[key] = (mean_std(vals) if len(vals) > 1 else vals[0]) if vals else None
        out.append(agg)
    return out


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        m, sd = v
        return f"{_cell(key, m)} ± {_cell(key, sd)}"
    if key == "flops":
        return f"{v:.3e}"
    if key in ("flops_ratio", "density", "flops_vs"):
        return f"{v:.3f}"
    if key == "cil_vs":
        return f"{v:+.2f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _mean(v: Any) -> float | None:
    return v[0] if isinstance(v, tuple) else v


def baseline_references(rows: list[dict[str, Any]], baseline: str) -> dict[str, tuple[float | None, float]]:
    """Per protocol (:data:`PROTOCOL_KEYS`), the mean over seeds of method ``baseline``'s Class-IL
    ACC and training FLOPs, from per-run rows. Several configurations of the baseline under one
    protocol would make the reference ambiguous: that is an error. Incomplete runs are left out
    (their FLOPs cover only the tasks done)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in aggregate_rows([r for r in rows if r["method"] == baseline and r["complete"]]):
        groups.setdefault(row["_protocol"], []).append(row)
    if not groups:
        raise SparseCLError(f"--baseline {baseline}: no complete {baseline} run among the results")
    refs = {}
    for protocol, group in groups.items():
        if len(group) > 1:
            options = "; ".join(r["options"] or "(defaults)" for r in group)
            raise SparseCLError(f"--baseline {baseline}: {len(group)} configurations of {baseline} under one protocol "
                                f"({options}); report them separately or keep one")
        refs[protocol] = (_mean(group[0]["cil_acc"]), _mean(group[0]["flops"]))
    return refs


def _compare(row: dict[str, Any], refs: dict[str, tuple[float | None, float]]) -> None:
    """``cil_vs`` (Class-IL ACC minus the reference's) and ``flops_vs`` (FLOPs over the reference's)."""
    ref_cil, ref_flops = refs.get(row["_protocol"], (None, None))
    cil, flops = _mean(row["cil_acc"]), _mean(row["flops"])
    row["cil_vs"] = cil - ref_cil if cil is not None and ref_cil is not None else None
    row["flops_vs"] = flops / ref_flops if flops is not None and ref_flops else None


def _lines(headers: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(headers)
        w.writerows(rows)
        return buf.getvalue()
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in rows]
    return "\n".join(out) + "\n"


def render_table(results: list[dict[str, Any]], fmt: str = "md", aggregate: bool = False,
                 baseline: str | None = None, convention: str = "spec") -> str:
    """Markdown or CSV table, one row per run (or per configuration with ``aggregate``); with
    ``baseline`` (a method name) two more columns compare each row with that method's runs under
    the same protocol: Class-IL ACC difference and training FLOPs ratio. FLOPs are counted under
    ``convention`` (``spec`` or ``sparcl-paper``, see :mod:`sparsecl.sparse.flops`)."""
    rows = [row_of(r, convention) for r in results]
    for row, options in zip(rows, varied_options(results)):
        row["options"] = options
    columns = list(COLUMNS)
    refs = baseline_references(rows, baseline) if baseline is not None else None
    if aggregate:
        rows = aggregate_rows(rows)
        columns.insert(columns.index(("seed", "seed")) + 1, ("seeds", "seeds"))
    if refs is not None:
        for row in rows:
            _compare(row, refs)
        columns += [("cil_vs", f"Class-IL vs {baseline}"), ("flops_vs", f"FLOPs / {baseline}")]
    rows.sort(key=lambda r: (r["benchmark"], r["method"], str(r["buffer"]), r["options"], str(r["seed"])))
    headers = [h for _, h in columns]
    cells = [[_cell(k, r[k]) + ("" if r.get("complete", True) or k != "method" else " (incomplete)") for k, _ in columns] for r in rows]
    return _lines(headers, cells, fmt)


def _dst_key(cfg: dict[str, Any]) -> tuple[str, str, str, str]:
    """(benchmark, init, growth, BN) of a continual-DST run; unfired's run-wide scope is named."""
    mo = cfg["method_options"]
    grow = str(mo.get("grow", "gradient"))
    if "unfired" in grow and mo.get("unfired", "task") == "run":
        grow += " (unfired: run)"
    bn = "per-task" if mo.get("per_task_bn", False) else "shared"
    return cfg["benchmark"], str(mo.get("init", "uniform")), grow, bn


def render_dst_table(results: list[dict[str, Any]], fmt: str = "md") -> str:
    """The continual-DST study's tables.

    First, one row per (benchmark, init, growth, BN setting), for each sparsity Task-IL ACC, BWT and
    FWT as mean ± std over the seeds of finished runs (the paper's Tables 1-4 layout). Second, the capacity per task:
    one row per (benchmark, init, growth, BN, sparsity), for each task ``used (reused)``: the
    backbone usage after the task (% of the isolated weights in the union of the masks so far) and
    the share of the task's mask M_t that earlier tasks had trained (reused, frozen; the rest was
    newly trained), both in %, mean over seeds."""
    groups: dict[tuple[str, str, str, str], dict[float, list[dict[str, Any]]]] = {}
    sparsities: set[float] = set()
    for r in results:
        cfg = r["config"]
        if cfg["method"] != "continual-dst" or not r.get("complete", True):
            continue  # an unfinished run's metrics cover fewer tasks
        sp = float(cfg["method_options"].get("sparsity", 0.9))
        sparsities.add(sp)
        groups.setdefault(_dst_key(cfg), {}).setdefault(sp, []).append(r)
    if not groups:
        raise SparseCLError("no continual-dst runs among the results (the dst table needs them)")
    sps = sorted(sparsities)
    headers = ["benchmark", "init", "growth", "BN"] + [f"{m} s={s:g}" for s in sps for m in ("ACC", "BWT", "FWT")]
    lines = []
    for key, by_sp in sorted(groups.items()):
        cells = list(key)
        for s in sps:
            members = [r["accuracy"]["task_il"] for r in by_sp.get(s, [])]
            for m in ("acc", "bwt", "fwt"):
                vals = [a[m] for a in members if a.get(m) is not None]
                cells.append(_cell(m, mean_std(vals)) if vals else "-")
        cells.append(",".join(str(len(by_sp.get(s, []))) for s in sps))
        lines.append(cells)
    text = _lines(headers + ["seeds"], lines, fmt)
    capacity = []
    n_tasks = 0
    for key, by_sp in sorted(groups.items()):
        for s in sps:
            per_run = [r.get("method", {}).get("tasks", []) for r in by_sp.get(s, [])]
            per_run = [h for h in per_run if h and "reused_fraction" in h[0]]
            if not per_run:
                continue
            n = min(len(h) for h in per_run)
            n_tasks = max(n_tasks, n)
            cells = [*key, f"{s:g}"]
            for t in range(n):
                used = sum(100.0 * h[t]["used_fraction"] for h in per_run) / len(per_run)
                reused = sum(100.0 * h[t]["reused_fraction"] for h in per_run) / len(per_run)
                cells.append(f"{used:.1f} ({reused:.1f})")
            capacity.append(cells)
    if capacity:
        cap_headers = ["benchmark", "init", "growth", "BN", "sparsity"] + [f"task {t + 1}" for t in range(n_tasks)]
        capacity = [c + ["-"] * (len(cap_headers) - len(c)) for c in capacity]
        text += "\n" + ("" if fmt == "csv" else "Backbone used after each task, % (of M_t reused from earlier tasks, %):\n\n")
        text += _lines(cap_headers, capacity, fmt)
    return text
