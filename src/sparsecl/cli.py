"""Command-line interface: ``sparsecl run | flops | tune | list | report | export | sweep``."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparsecl import SparseCLError
from sparsecl.engine.launch import die_with_parent, is_main_process
from sparsecl.sparse.flops import CONVENTIONS as FLOP_CONVENTIONS

DEFAULT_PRESET = "default"


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SparseCLError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train and evaluate one configuration (no arguments: the embedded default)")
    _run_options(p)
    p.add_argument("--flop-convention", choices=FLOP_CONVENTIONS,
                   help="which FLOP count is result.json's flops.train (both are recorded; default spec)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run after its last completed task")
    p.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, else a line per epoch)")


def _flops_parser(sub) -> None:
    p = sub.add_parser("flops", help="a configuration's training FLOPs planned from its schedule, without training")
    _run_options(p)
    p.add_argument("--convention", dest="flop_convention", choices=FLOP_CONVENTIONS, default="spec",
                   help="spec (default) or sparcl-paper (SparCL Table 1's count)")


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="hyper-parameter search with Optuna on a validation split (see sparsecl.tune)")
    _run_options(p)
    p.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                   help="a searched value: lr=log:1e-3:1e-1, alpha=0.1:1.0, minibatch_size=int:8:64, policy=choice:a,b")
    p.add_argument("--space", metavar="FILE", help="YAML file of NAME: SPEC (the --param flags win)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study needs, over all workers and restarts")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study here (the CPU threads are split)")
    p.add_argument("--study", help="study name (default BENCHMARK-METHOD)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study database (default: sqlite in --out)")
    p.add_argument("--objective", choices=["class-il", "task-il"], help="whose ACC is maximised (default: the setting's)")
    p.add_argument("--flops-penalty", type=float, default=0.0, metavar="POINTS",
                   help="subtract POINTS of ACC per 100 %% of dense training FLOPs")
    p.add_argument("--pareto", action="store_true", help="two objectives, ACC and the FLOPs ratio: a Pareto front")
    p.add_argument("--pruner", help="median (default), none, or below:ACC (stop trials under ACC after any task)")
    p.add_argument("--seeds", metavar="S,S,...", help="a trial's value is the mean over runs with these seeds "
                   "(default: the one --seed); pruning watches the first")
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (default: the run seed)")
    p.add_argument("--best-preset", metavar="FILE", help="where the best trial's preset goes (default OUT/best-preset.yaml)")


def _run_options(p) -> None:
    """The options that define a run (shared by `run` and `flops`)."""
    p.add_argument("--method", help="method name (see `sparsecl list`)")
    p.add_argument("--benchmark", help="benchmark name (see `sparsecl list`)")
    p.add_argument("--preset", help="named preset of best-known hyper-parameters (default: the preset of the "
                   "named method, benchmark and buffer, if there is one)")
    p.add_argument("--preset-file", metavar="FILE", help="a preset file of your own, e.g. the best preset of `sparsecl tune`")
    p.add_argument("--no-preset", action="store_true", help="the bare defaults, even where a matching preset exists")
    p.add_argument("--config", help="YAML file with run options (CLI flags override it)")
    p.add_argument("--setting", choices=["class-il", "task-il"])
    p.add_argument("--backbone")
    p.add_argument("--backbone-opt", action="append", metavar="KEY=VALUE", help="backbone option, e.g. nf=32")
    p.add_argument("--data-dir", help="where datasets live (default: $SPARSECL_DATA or ./data)")
    p.add_argument("--data-root", help="root of an image-folder benchmark")
    p.add_argument("--class-order", help="seed:N to permute classes, or a comma-separated list")
    p.add_argument("--n-tasks", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--no-download", action="store_true", help="never try to download missing data")
    p.add_argument("--validation", type=float, metavar="FRAC",
                   help="hold out FRAC of each class's training data and evaluate on it instead of the test set")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--buffer", type=int, help="replay buffer size (methods with a buffer)")
    p.add_argument("--lr", type=float)
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="method option, e.g. alpha=0.2")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out", help="run directory (default: runs/<benchmark>-<method>-s<seed>-<time>)")
    p.add_argument("--keep-checkpoints", choices=["last", "all"])
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (CUDA), fp32 master weights")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    p.add_argument("--cuda-graph", action="store_true", default=None, help="replay each step from a captured CUDA graph")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on CUDA: SyncBatchNorm, batch statistics of the global batch")
    p.add_argument("--fused-optimizer", action="store_true", default=None,
                   help="torch's fused SGD/Adam/AdamW step (not Frank-Wolfe)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND[:MODE]",
                   help="torch.compile the training forward/backward (default: inductor; e.g. inductor:reduce-overhead)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard event files to RUN_DIR/tensorboard")
    p.add_argument("--wandb", metavar="PROJECT", help="log to this Weights & Biases project (files in RUN_DIR/wandb; "
                   "WANDB_MODE=offline: no upload)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; recorded in config.yaml)")
    p.add_argument("--sparse-kernels", nargs="?", const="on", metavar="on|off|auto",
                   help="run masked layers on real sparse CPU kernels (compiled once with g++ and ninja); "
                        "auto: only where they measure faster")


# What --resume still takes from the command line; every other run flag is the run's own.
RESUME_FLAGS = {"resume", "device", "data_dir", "quiet"}


def build_config(args: argparse.Namespace):
    from sparsecl.config import RunConfig, load_preset, load_preset_file, load_yaml, merge_config

    if args.preset and args.preset_file:
        raise SparseCLError("give --preset or --preset-file, not both")
    layers: list[dict[str, Any]] = []
    if not any([args.method, args.benchmark, args.preset, args.preset_file, args.config]):
        layers.append(load_preset(DEFAULT_PRESET))
    if args.preset_file:
        layers.append(load_preset_file(args.preset_file))
    preset = args.preset or (None if args.config or args.no_preset or args.preset_file else matching_preset(args))
    if preset:
        layers.append(load_preset(preset))
    if args.config:
        layers.append(load_yaml(args.config))
    # Every flag named after a RunConfig field sets that field (an option is a field and a flag).
    flags: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(RunConfig)
                             if getattr(args, f.name, None) is not None}
    if args.no_download:
        flags["download"] = False
    method_opts: dict[str, Any] = _key_values(args.option, "--option")
    if args.buffer is not None:
        if args.buffer < 0:
            raise SparseCLError(f"--buffer must be >= 0, got {args.buffer}")
        method_opts["buffer_size"] = args.buffer
    if args.lr is not None:
        method_opts["lr"] = args.lr
    if method_opts:
        flags["method_options"] = method_opts
    if args.backbone_opt:
        flags["backbone_options"] = {k: _yaml_scalar(v) for k, v in _key_values(args.backbone_opt, "--backbone-opt").items()}
    # A preset's method options belong to its method: switching method on the CLI drops them.
    if args.method and layers:
        for layer in layers:
            if layer.get("method") not in (None, args.method):
                layer.pop("method_options", None)
    return merge_config(*layers, flags)


def matching_preset(args: argparse.Namespace) -> str | None:
    """The preset named after ``--method``, ``--benchmark`` (and ``--buffer``), if one exists:
    its hyper-parameters are the tuned ones, the bare defaults are not. Says so in one line; where
    only variants exist (e.g. sparsities) it lists them instead."""
    from sparsecl.config import RunConfig, preset_names

    if not args.method:
        return None
    name = f"{args.benchmark or RunConfig.benchmark}-{args.method}"
    if args.buffer is not None:
        name += f"-{args.buffer}"
    names = preset_names()
    if name in names:
        _note(f"using the hyper-parameters of preset {name} (--no-preset for the bare defaults)")
        return name
    variants = [n for n in names if n.startswith(f"{name}-")]
    if variants:
        _note(f"bare defaults; tuned presets for this: {', '.join(variants)} (pick one with --preset)")
    return None


def _note(message: str) -> None:
    if is_main_process():
        print(f"sparsecl: {message}", file=sys.stderr)


def _yaml_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.engine.trainer import resume, run

    progress = not args.quiet
    if args.resume:
        ignored = [f"--{k.replace('_', '-')}" for k, v in sorted(vars(args).items())
                   if k not in RESUME_FLAGS and k != "command" and v not in (None, False)]
        if ignored and (Path(args.resume) / "config.yaml").is_file():  # an error alone is one line
            _note(f"--resume continues the run's own configuration; ignoring {', '.join(ignored)}")
        result, run_dir = resume(args.resume, device=args.device, data_dir=args.data_dir, progress=progress)
    else:
        cfg = build_config(args)
        result, run_dir = run(cfg, progress=progress)
    if is_main_process():  # under torchrun only rank 0 reports
        print_result(result, run_dir, console)
    return 0


def cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.tune import DEFAULT_VALIDATION, TuneSettings, parse_params, tune

    base = build_config(args)
    params = parse_params(args.param, args.space)
    if base.validation is None:
        base.validation = DEFAULT_VALIDATION
        _note(f"trials are evaluated on a {DEFAULT_VALIDATION:g} validation split of the training data (--validation)")
    study = args.study or f"{base.benchmark}-{base.method}"
    out, base.out = Path(args.out or f"runs/tune-{study}"), None
    settings = TuneSettings(
        study=study, out=out, storage=args.storage or "", trials=args.trials, workers=args.workers,
        objective=args.objective or base.setting, flops_penalty=args.flops_penalty, pareto=args.pareto,
        pruner=args.pruner or ("none" if args.pareto else "median"),
        sampler_seed=base.seed if args.sampler_seed is None else args.sampler_seed, seeds=_seed_list(args),
        best_preset=Path(args.best_preset) if args.best_preset else None)
    summary = tune(settings, base, params)
    print_tune(summary, settings, console)
    return 0


def _seed_list(args: argparse.Namespace) -> tuple[int, ...]:
    if not args.seeds:
        return ()
    if args.seed is not None:
        raise SparseCLError("give --seed or --seeds, not both")
    try:
        return tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise SparseCLError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None


def print_tune(summary: dict[str, Any], settings, console: Console) -> None:
    from sparsecl.tune import BEST_PRESET, SUMMARY, shown_values

    done = [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]
    table = Table(title=f"study {summary['study']}: {len(done)} finished trials, best first")
    for col in ("trial", "state", "value", "FLOPs ratio", "parameters"):
        table.add_column(col, justify="left" if col == "parameters" else "right")
    ranked = sorted(done, key=lambda t: (t["state"] != "complete", -(t["values"] or [float("-inf")])[0]))
    for t in ranked[:10]:
        value = _fmt(t["values"][0]) if t["values"] else "-"
        table.add_row(str(t["number"]), t["state"], value, _fmt(t.get("flops_ratio"), 3), shown_values(t["params"]))
    console.print(table)
    if summary["best"] is None:
        console.print("no trial completed: no best preset written", markup=False)
        return

    preset = settings.best_preset or settings.out / BEST_PRESET
    console.print(f"best: trial {summary['best']}; preset {preset} (sparsecl run --preset-file {preset}); "
                  f"all trials: {settings.out / SUMMARY}", markup=False, highlight=False)


def cmd_flops(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.engine.planner import plan_flops

    plan = plan_flops(build_config(args))
    table = Table(title=f"planned training FLOPs: {plan['method']} on {plan['benchmark']}")
    for col in ("convention", "train FLOPs", "dense-equivalent", "ratio"):
        table.add_column(col, justify="right")
    for conv, c in plan["conventions"].items():
        mark = " (selected)" if conv == plan["convention"] else ""
        table.add_row(conv + mark, _flops(c["train"]), _flops(c["dense_equivalent"]), _fmt(c["ratio"], 3))
    console.print(table)
    sel = plan["selection"]
    share = f"{100 * sel['share_of_train']:.2f} %" if sel["share_of_train"] is not None else "-"
    console.print(f"selection (importance backward passes): {_flops(sel['flops'])} FLOPs, {share} of the "
                  f"{plan['convention']} training FLOPs; {plan['samples']['trained']:,} samples trained, "
                  f"{plan['samples']['replayed']:,} of them replayed", highlight=False)
    console.print("per task: " + ", ".join(_flops(v) for v in plan["per_task"]), highlight=False)
    return 0


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _flops(v: float | None) -> str:
    return "-" if v is None else f"{v:.3e}"


def print_result(result: dict[str, Any], run_dir: Path, console: Console) -> None:
    cfg = result["config"]
    split = f", validation {cfg['validation']:g} of train" if cfg.get("validation") else ""
    table = Table(title=f"{cfg['method']} on {cfg['benchmark']}{split} (seed {cfg['seed']}, {result['device']})")
    for col in ("setting", "ACC", "BWT", "FWT", "forgetting"):
        table.add_column(col, justify="right")
    for key, label in (("class_il", "Class-IL"), ("task_il", "Task-IL")):
        if key in result["accuracy"]:
            a = result["accuracy"][key]
            table.add_row(label, _fmt(a.get("acc")), _fmt(a.get("bwt")), _fmt(a.get("fwt")), _fmt(a.get("forgetting")))
    console.print(table)
    f, t = result["flops"], result["timing"]
    ratio = f"{f['ratio']:.3f}" if f["ratio"] is not None else "-"
    sps = [s for s in t["samples_per_second"] if s]
    console.print(
        f"training FLOPs {_flops(f['train'])} (dense-equivalent {_flops(f['dense_equivalent'])}, ratio {ratio}); "
        f"wall time {t['train_seconds']:.1f} s training + {sum(t['eval_seconds_per_task']):.1f} s evaluation; "
        f"{(sum(sps) / len(sps)) if sps else 0:.0f} samples/s"
    )
    sel = f.get("selection") or {}
    if sel.get("flops"):
        console.print(f"selection (importance backward passes): {_flops(sel['flops'])} FLOPs, "
                      f"{100 * sel['share_of_train']:.2f} % of the training FLOPs ({f['convention']} convention)")
    sp = result.get("sparsity")
    if sp and sp["overall"]["masked_weights"]:
        o = sp["overall"]
        console.print(
            f"weight density {o['density']:.4f} over the masked layers ({sp.get('policy') or 'masked'}; "
            f"gradient density {o['grad_density']:.4f}), nonzero fraction of all parameters "
            f"{o['nonzero_fraction']:.4f}, masks {sp['mask_bytes'] + sp.get('task_mask_bytes', 0)} bytes"
        )
    console.print(f"results: {run_dir / 'result.json'}")


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.config import preset_description, preset_names
    from sparsecl.data.benchmarks import benchmark_names
    from sparsecl.methods import METHODS
    from sparsecl.models import backbone_names

    console.print("[bold]methods[/bold]")
    for name, cls in METHODS.items():
        settings = "/".join(sorted(cls.settings))
        console.print(escape(f"  {name:<14} {cls.description} [{settings}]"), highlight=False)
    console.print("[bold]benchmarks[/bold]")
    for name, desc in _named(benchmark_names()):
        console.print(escape(f"  {name:<22} {desc}"), highlight=False)
    console.print("[bold]backbones[/bold]")
    for name, desc in _named(backbone_names()):
        console.print(escape(f"  {name:<14} {desc}"), highlight=False)
    console.print("[bold]presets[/bold]")
    for name in preset_names():
        console.print(escape(f"  {name:<28} {preset_description(name)}"), highlight=False)
    return 0


def _named(items) -> list[tuple[str, str]]:
    if isinstance(items, dict):
        return sorted(items.items())
    return [(i, "") if isinstance(i, str) else tuple(i) for i in items]


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.engine.io import os_error
    from sparsecl.report import collect_results, render_dst_table, render_table

    if args.plots:  # an unusable folder fails before anything is written
        try:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error("write plots to", args.plots, e) from None
    results = collect_results(args.runs, warn=lambda m: print(f"sparsecl: warning: {m}", file=sys.stderr))
    if getattr(args, "table", "runs") == "dst":
        text = render_dst_table(results, fmt=args.format)
    else:
        text = render_table(results, fmt=args.format, aggregate=args.aggregate, baseline=args.baseline,
                            convention=args.flop_convention)
    if args.output:
        from sparsecl.engine.io import atomic_write_text

        atomic_write_text(Path(args.output), text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    if args.plots:
        from sparsecl.plots import write_plots

        try:
            paths = write_plots(results, args.plots)
        except OSError as e:
            raise os_error("write plots to", args.plots, e) from None
        for path in paths:  # stderr: `> table.csv` holds the table only
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.sweep import ClusterOptions, run_sweep

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    cluster = ClusterOptions(**{f.name: getattr(args, f.name) for f in fields(ClusterOptions)})
    cluster.slurm_opt = _key_values(args.slurm_opt, "--slurm-opt")
    status = run_sweep(args.grid, jobs=args.jobs, devices=devices, data_dir=args.data_dir,
                       log=lambda m: console.print(m, highlight=False, markup=False),
                       executor=args.executor, cluster=cluster)
    failed = sum(s.startswith("failed") for s in status.values())
    not_run = sum(s == "not run" for s in status.values())
    console.print(f"sweep: {len(status) - failed - not_run} of {len(status)} runs complete"
                  + (f", {failed} failed (see sweep.log in their run directories)" if failed else "")
                  + (f", {not_run} not started" if not_run else ""), markup=False)
    return 1 if failed or not_run else 0


def _size(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from sparsecl.engine.io import export_run

    path, rep = export_run(args.run_dir, args.format, args.out)
    table = Table(title="sizes of the final model")
    for col in ("storage", "whole model", "masked layers", "vs dense"):
        table.add_column(col, justify="right")
    for key, label in (("dense", "dense fp32"), ("csr", "CSR"), ("bitmask", "bitmask + values")):
        total = rep[f"{key}_bytes"]
        table.add_row(label, _size(total), _size(rep["masked_layers"][key]), f"{total / rep['dense_bytes']:.3f}")
    console.print(f"{rep['active_weights']:,} of {rep['masked_weights']:,} weights of the sparse-encoded layers "
                  f"active (density {rep['density']:.4f}); structure from {rep['structure_from']}", soft_wrap=True)
    console.print(table)
    console.print("CSR: fp32 values + int16/int32 column indices + int32 row pointers; bitmask: fp32 values + "
                  "1 bit per weight; biases, BatchNorm and unmasked layers dense in all three", soft_wrap=True)
    if rep.get("task_views"):
        console.print(f"per-task subnetworks of {rep['task_views']} tasks: {_size(rep['task_view_bytes'])} of masks "
                      "and per-task tensors (select one with sparsecl.sparse.export.use_task)", soft_wrap=True)
    if rep.get("classifier"):
        console.print(f"classifier: {rep['classifier']} (the run's evaluation; load_export rebuilds it)", soft_wrap=True)
    console.print(f"wrote {path} ({rep['encoding']} encoding, {_size(rep['file_bytes'])} on disk); "
                  f"load with sparsecl.sparse.export.load_export", soft_wrap=True)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is one clear line on stderr (exit 2), not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecl", description="Efficient continual learning of sparse networks.")
    sub = parser.add_subparsers(dest="command")
    _run_parser(sub)
    _flops_parser(sub)
    _tune_parser(sub)
    sub.add_parser("list", help="methods, benchmarks, backbones and presets, one line each")
    rp = sub.add_parser("report", help="one table of final metrics over run directories")
    rp.add_argument("runs", nargs="+", help="run directories (or folders containing them)")
    rp.add_argument("--format", choices=["md", "csv"], default="md")
    rp.add_argument("--aggregate", action="store_true", help="mean +- std over seeds of the same configuration")
    rp.add_argument("--table", choices=["runs", "dst"], default="runs",
                    help="runs: one row per run/configuration; dst: continual-DST ACC/BWT/FWT per (init, growth) x sparsity")
    rp.add_argument("--baseline", metavar="METHOD",
                    help="add Class-IL ACC difference and training-FLOPs ratio to METHOD's runs of the same protocol")
    rp.add_argument("--flop-convention", choices=FLOP_CONVENTIONS, default="spec",
                    help="FLOP count of the table: spec (default) or sparcl-paper (SparCL Table 1's)")
    rp.add_argument("--output", help="write the table to this file")
    rp.add_argument("--plots", metavar="DIR", help="also write PNG figures (accuracy matrices, accuracy vs FLOPs, per-task curves)")
    sw = sub.add_parser("sweep", help="run a grid of configurations x seeds (restartable: finished runs are skipped)")
    sw.add_argument("grid", help="grid YAML file (see sparsecl.sweep)")
    sw.add_argument("--jobs", type=int, help="local executor: runs at a time (CPU threads are split between them; default 1)")
    sw.add_argument("--devices", help="local executor: comma-separated devices handed out round-robin, e.g. cuda:0,cuda:1")
    sw.add_argument("--data-dir", help="where datasets live, for every run (default: $SPARSECL_DATA or ./data)")
    sw.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                    help="local: child processes here (default); slurm: one SLURM job per run through submitit; "
                         "submitit-local: the same jobs on this machine (see docs/distributed.md)")
    cl = sw.add_argument_group("cluster jobs (--executor slurm or submitit-local)")
    cl.add_argument("--time", help="each job's time limit: MINUTES, H:MM:SS or D-HH:MM:SS (required)")
    cl.add_argument("--partition")
    cl.add_argument("--gpus-per-node", type=int, help="0 or 1 (a run trains on one device)")
    cl.add_argument("--cpus-per-task", type=int, help="the run's OMP/MKL threads (default: what SLURM gives)")
    cl.add_argument("--mem-gb", type=float)
    cl.add_argument("--account")
    cl.add_argument("--qos")
    cl.add_argument("--constraint")
    cl.add_argument("--slurm-opt", action="append", metavar="KEY=VALUE", help="any other sbatch option (repeatable)")
    cl.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="shell line each job runs first, e.g. 'module load cuda' (repeatable)")
    cl.add_argument("--array", action="store_true", help="one job array instead of one job per run")
    cl.add_argument("--array-parallelism", type=int, metavar="N", help="with --array: at most N of its jobs at once")
    ep = sub.add_parser("export", help="write a run's final sparse model with its masks; print dense/CSR/bitmask sizes")
    ep.add_argument("run_dir", help="run directory")
    ep.add_argument("--format", choices=["pt", "csr"], default="pt",
                    help="pt: packed bitmask + active values; csr: compressed sparse rows")
    ep.add_argument("--out", help="output file (default RUN_DIR/model-sparse.pt or RUN_DIR/model-csr.pt)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()  # a run of a sweep: it ends with the sweep
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed as one line) and --help
        return int(e.code or 0)
    # Piped or redirected: no wrapping at 80 columns (tables and lines stay one per row).
    console = Console() if sys.stdout.isatty() else Console(width=1000, soft_wrap=True)
    handlers = {"run": cmd_run, "flops": cmd_flops, "list": cmd_list, "report": cmd_report, "export": cmd_export,
                "sweep": cmd_sweep, "tune": cmd_tune}
    try:
        return handlers[args.command](args, console)
    except SparseCLError as e:
        # Under torchrun every rank raises the same error (configuration errors are identical and
        # per-rank failures are shared, see Distributed.everywhere): rank 0 says it once.
        if is_main_process():
            print(f"sparsecl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if is_main_process():
            print(f"sparsecl: {_interrupted(e, args.command)}", file=sys.stderr)
        return 130


def _interrupted(e: KeyboardInterrupt, command: str) -> str:
    """Where an interrupted run or sweep stands and how to continue it."""
    run_dir, done = getattr(e, "run_dir", None), getattr(e, "completed", 0)
    if command == "tune":
        return "interrupted; its trials were stopped (run the same command again: interrupted trials resume)"
    if command == "sweep":
        return "interrupted; its runs were stopped, completed tasks are checkpointed (rerun the sweep to continue)"
    if run_dir is None:
        return "interrupted"
    if done:
        return f"interrupted; {done} task(s) checkpointed in {run_dir} (continue with: sparsecl run --resume {run_dir})"
    return f"interrupted before the first task was completed; nothing to resume in {run_dir}"


if __name__ == "__main__":
    sys.exit(main())
