"""Grids of runs: ``sparsecl sweep GRID.yaml --jobs N`` (or ``--executor slurm``).

A grid file::

    out: runs/sweep                 # where the run directories go
    seeds: [0, 1, 2]
    base: {benchmark: seq-mnist, device: cpu}
    runs:
      - {preset: seq-mnist-der++-500}
      - {preset: seq-mnist-snip-der++-500-sp90, method_options: {sparsity: [0.8, 0.9]}}

Every entry of ``runs`` is merged over ``base`` (a ``preset`` key loads that preset first); a list
value, at the top level or inside ``method_options``/``backbone_options``, expands into one
configuration per element (the cartesian product over all lists). Each configuration runs once per
seed (an entry's own ``seeds: [...]`` replaces the grid's), in its own process, ``--jobs`` at a
time, with the CPU threads split between them and devices handed out round-robin
(``--devices cuda:0,cuda:1``).

Data: ``--data-dir`` (or ``$SPARSECL_DATA``) for every run; a grid names no machine's paths.

Restartable: a run whose ``result.json`` is complete is skipped, one with a checkpoint is resumed
from its last completed task, anything else starts fresh. Killing the sweep and starting it again
therefore loses at most the task each job was in. Its runs die with it (SIGTERM, SIGINT or
SIGKILL of the sweep), and each holds its run directory's lock, so a restart never trains a
directory twice at once. After :data:`SAME_FAILURES` runs fail with the same last line (a missing
data set, a bad option), no further run is started.

That is the local executor (``--executor local``, the default). ``--executor slurm`` submits each
run as a SLURM job through submitit, and ``submitit-local`` the same jobs on this machine, with the
same restart semantics (:mod:`sparsecl.cluster`; options: :class:`ClusterOptions`).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from sparsecl import SparseCLError, import_extra
from sparsecl.engine.launch import PARENT_ENV

NESTED = ("method_options", "backbone_options")
SPEED_KEYS = ("amp", "channels_last", "cuda_graph", "fused_optimizer", "compile")
SAME_FAILURES = 3  # this many runs failing with one message stop the sweep


@dataclass(frozen=True)
class SweepJob:
    name: str  # run directory name, unique in the sweep
    config: dict[str, Any]  # a complete layer for merge_config (seed included)


def _expand(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product over list values (top level and one level into the nested option maps)."""
    axes: list[tuple[tuple[str, ...], list[Any]]] = []
    for key, value in entry.items():
        if key in NESTED and isinstance(value, dict):
            axes += [((key, k), v) for k, v in value.items() if isinstance(v, list)]
        elif isinstance(value, list):
            axes.append(((key,), value))
    if not axes:
        return [entry]
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        cfg = json.loads(json.dumps(entry))  # deep copy of plain YAML data
        for (path, _), value in zip(axes, combo):
            target = cfg
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
        out.append(cfg)
    return out


def _slug(cfg: dict[str, Any]) -> str:
    parts = [str(cfg.get("preset") or cfg.get("method", "run"))]
    if "benchmark" in cfg and not cfg.get("preset"):
        parts.append(str(cfg["benchmark"]))
    for key in NESTED:
        for k, v in sorted((cfg.get(key) or {}).items()):
            parts.append(f"{k}{v}")
    for key in SPEED_KEYS:  # the same preset with and without speed options (benchmarks/speed_table.py)
        if cfg.get(key):
            parts.append(key if cfg[key] is True else f"{key}{cfg[key]}")
    text = "-".join(parts)
    return re.sub(r"[^A-Za-z0-9+._=-]+", "_", text)


def _seeds(value: Any, path: str | Path) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):  # bool is no seed
        raise SparseCLError(f"grid file {path}: 'seeds' must be a non-empty list of integers")
    return value


def load_grid(path: str | Path) -> tuple[list[SweepJob], Path]:
    """Expand a grid file into jobs (validated now, so a typo fails before anything runs)."""
    # imported here: a cluster job (sparsecl.cluster) imports this module for what runs a job, which
    # needs neither torch nor the methods (each of its imports is paid once per job)
    from sparsecl.config import build_options, load_preset, load_yaml, merge_config
    from sparsecl.methods import METHODS

    grid = load_yaml(path)
    unknown = set(grid) - {"out", "seeds", "base", "runs"}
    if unknown:
        raise SparseCLError(f"grid file {path}: unknown keys {', '.join(sorted(unknown))} (known: out, seeds, base, runs)")
    runs = grid.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SparseCLError(f"grid file {path}: 'runs' must be a non-empty list of run options")
    seeds = _seeds(grid.get("seeds", [0]), path)
    base = grid.get("base") or {}
    out = Path(grid.get("out", "runs/sweep"))
    jobs: list[SweepJob] = []
    for entry in runs:
        if not isinstance(entry, dict):
            raise SparseCLError(f"grid file {path}: every item of 'runs' must be a mapping")
        entry = dict(entry)
        entry_seeds = _seeds(entry.pop("seeds"), path) if "seeds" in entry else seeds
        for variant in _expand(entry):
            layers = [dict(base)]
            preset = variant.pop("preset", None)
            if preset:
                layers.append(load_preset(preset))
            layers.append(variant)
            merged: dict[str, Any] = {}
            for layer in layers:
                for k, v in layer.items():
                    if k in NESTED:
                        merged.setdefault(k, {}).update(v or {})
                    else:
                        merged[k] = v
            stem = _slug({"preset": preset, **variant})
            run_cfg = merge_config(merged)  # validates run keys and types now
            method = METHODS.get(run_cfg.method)
            build_options(method.options_cls, dict(run_cfg.method_options), f"method {run_cfg.method!r}")
            for seed in entry_seeds:
                cfg = {**merged, "seed": seed}
                jobs.append(SweepJob(f"{stem}-s{seed}", cfg))
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SparseCLError(f"grid file {path}: several runs would share the directory {dupes[0]} (make entries differ)")
    return jobs, out


def job_state(run_dir: Path) -> str:
    """'done', 'resume' (checkpointed, incomplete) or 'new'."""
    result = run_dir / "result.json"
    if result.exists():
        try:
            if json.loads(result.read_text()).get("complete"):
                return "done"
        except json.JSONDecodeError:
            pass
    return "resume" if (run_dir / "checkpoint.pt").exists() else "new"


def check_unchanged(run_dir: Path, job: SweepJob) -> None:
    """A run directory kept from an earlier sweep must hold the job's configuration: after a preset
    or grid edit, skipping or resuming it would silently report the old settings."""
    from sparsecl.config import first_difference  # see load_grid

    saved = run_dir / "sweep-config.yaml"
    if not saved.exists():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        old = None
    diff = (first_difference(_without_location(old), _without_location(job.config)) if isinstance(old, dict)
            else "unreadable sweep-config.yaml")
    if diff:
        raise SparseCLError(f"{run_dir} was run with another configuration ({diff}); delete it to rerun, "
                            "or give the sweep another 'out'")


def _without_location(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration without where its data is (that does not change a run)."""
    from sparsecl.config import LOCATION_KEYS  # see load_grid

    return {k: v for k, v in cfg.items() if k not in LOCATION_KEYS}


class Children:
    """The live run processes of a sweep (or of one cluster job), ended with it: by
    :meth:`terminate` when the sweep is stopped, or when the waiting thread is interrupted (a
    signal in a cluster job: its run stops and releases its directory before a requeue)."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False

    def run(self, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        with self._lock:
            if self.stopping:
                raise KeyboardInterrupt
            proc = subprocess.Popen(cmd, env={**env, PARENT_ENV: str(os.getpid())}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            self._procs.add(proc)
        try:
            out, err = proc.communicate()
        except BaseException:
            _end([proc])
            raise
        finally:
            with self._lock:
                self._procs.discard(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def terminate(self) -> None:
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        _end(procs)


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM (a run stops at once; completed tasks stay checkpointed), SIGKILL after 30 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    # Once: a second SIGTERM must not break off the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the process as Ctrl-C does, once (on the main thread; elsewhere signals are not
    ours). Used by sweeps and tunes."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if on_main_thread else None
    try:
        yield
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_command(job: SweepJob, run_dir: Path, state: str, data_dir: str | None, device: str | None) -> list[str]:
    """The ``sparsecl run`` command of a job in state 'new' (its configuration is written to
    RUN_DIR/sweep-config.yaml) or 'resume'."""
    if state == "resume":
        cmd = [sys.executable, "-m", "sparsecl", "run", "--resume", str(run_dir), "--quiet"]
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_file = run_dir / "sweep-config.yaml"
        cfg_file.write_text(yaml.safe_dump(dict(job.config), sort_keys=False))
        cmd = [sys.executable, "-m", "sparsecl", "run", "--config", str(cfg_file), "--out", str(run_dir), "--quiet"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if device:
        cmd += ["--device", device]
    return cmd


def execute(job: SweepJob, run_dir: Path, state: str, *, data_dir: str | None, device: str | None, threads: int,
            children: Children) -> tuple[str, float, int]:
    """Run one job (new or resumed) on ``threads`` CPU threads, its output to RUN_DIR/sweep.log.
    Returns 'done' or 'failed (LAST ERROR LINE)', the seconds it took and the run's exit status."""
    cmd = run_command(job, run_dir, state, data_dir, device)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = children.run(cmd, env)
    (run_dir / "sweep.log").write_text(proc.stdout + proc.stderr)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"failed ({(proc.stderr.strip().splitlines() or ['no output'])[-1]})", seconds, proc.returncode
    return "done", seconds, 0


class Outcomes:
    """Logs finished runs and finds the stop: :data:`SAME_FAILURES` runs failed with one message."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.stop: str | None = None  # the error line that stopped the sweep
        self._failures: dict[str, int] = {}  # last error line -> how many runs ended with it
        self._lock = threading.Lock()  # the local executor's threads report here

    def record(self, name: str, result: str, seconds: float) -> bool:
        """Note a finished run; True when its failure is the one that stops the sweep."""
        if result == "done":
            self.log(f"sweep: {name} done in {seconds:.0f} s")
        if not result.startswith("failed ("):
            return False
        last = result[len("failed ("):-1]
        with self._lock:
            self._failures[last] = self._failures.get(last, 0) + 1
            if self._failures[last] < SAME_FAILURES or self.stop is not None:
                return False
            self.stop = last
        self.log(f"sweep: stopping: {SAME_FAILURES} runs failed with: {last}")
        return True

    def summary(self, status: dict[str, str]) -> None:
        """One line per failed run (unless the stop line already said why)."""
        if self.stop is None:
            for name, result in status.items():
                if result.startswith("failed"):
                    self.log(f"sweep: {name} {result}")


EXECUTORS = ("local", "slurm", "submitit-local")
TIME_FORMAT = "MINUTES, H:MM:SS or D-HH:MM:SS"


@dataclass
class ClusterOptions:
    """What ``--executor slurm`` (or ``submitit-local``, the same path on this machine) asks for
    each job; None: not set (the cluster's default)."""

    time: str | None = None  # the job's time limit, TIME_FORMAT
    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    slurm_opt: dict[str, str] = field(default_factory=dict)  # any other sbatch option, KEY -> VALUE
    setup: list[str] = field(default_factory=list)  # shell lines each job runs first
    array: bool = False  # one job array instead of one job per run
    array_parallelism: int | None = None  # at most this many of the array's jobs at once

    def given(self) -> list[str]:
        """The flags set, as the user wrote them."""
        unset = (None, False, [], {})
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) not in unset]

    def minutes(self) -> int:
        """The time limit in whole minutes (rounded up)."""
        match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)|(\d+)", (self.time or "").strip())
        if not match:
            raise SparseCLError(f"--time {self.time!r}: expected {TIME_FORMAT}")
        days, hours, mins, secs, plain = (int(g) if g else 0 for g in match.groups())
        total = plain * 60 + ((days * 24 + hours) * 60 + mins) * 60 + secs
        if total <= 0:
            raise SparseCLError(f"--time {self.time!r}: the time limit must be positive")
        return -(-total // 60)

    def check(self, executor: str, jobs: int | None, devices: list[str] | None) -> None:
        """One clear error for options that do not fit the executor (before anything is submitted)."""
        if executor not in EXECUTORS:
            raise SparseCLError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
        if executor == "local":
            if self.given():
                raise SparseCLError(f"{', '.join(self.given())}: only with --executor slurm or submitit-local "
                                    "(the local executor runs --jobs N at a time on this machine)")
            return
        if jobs is not None or devices:
            raise SparseCLError(f"{'--jobs' if jobs is not None else '--devices'} is for --executor local: a cluster "
                                "starts the jobs as it schedules them, each on the devices it is given "
                                "(limit an --array with --array-parallelism N; GPUs with --gpus-per-node)")
        if self.time is None:
            raise SparseCLError(f"--executor {executor} needs --time, each job's time limit ({TIME_FORMAT}); "
                                "a job that reaches it is requeued and resumes its run")
        self.minutes()
        if self.array_parallelism is not None and not self.array:
            raise SparseCLError("--array-parallelism needs --array")
        if self.gpus_per_node is not None and self.gpus_per_node not in (0, 1):
            raise SparseCLError("--gpus-per-node: a sweep's run trains on one device (0 or 1); one run on several "
                                "GPUs is a torchrun launch (docs/distributed.md)")
        for flag, value in (("--cpus-per-task", self.cpus_per_task), ("--mem-gb", self.mem_gb),
                            ("--array-parallelism", self.array_parallelism)):
            if value is not None and value <= 0:
                raise SparseCLError(f"{flag} must be positive, got {value}")


def _plan(job_list: list[SweepJob], out: Path) -> tuple[dict[str, str], list[tuple[int, SweepJob, str]]]:
    """Finished runs ('skipped') and the rest with their state; a kept directory must hold its job."""
    status: dict[str, str] = {}
    todo = []
    for i, job in enumerate(job_list):
        state = job_state(out / job.name)
        if state != "new":
            check_unchanged(out / job.name, job)
        if state == "done":
            status[job.name] = "skipped"
        else:
            todo.append((i, job, state))
    return status, todo


def run_sweep(path: str | Path, jobs: int | None = None, devices: list[str] | None = None,
              data_dir: str | None = None, log: Callable[[str], None] = print, executor: str = "local",
              cluster: ClusterOptions | None = None) -> dict[str, str]:
    """Run every job of the grid; returns run name -> 'done' | 'skipped' | 'failed (...)' | 'not run'.

    ``data_dir``: where every run finds its data (default: the runs' own ``data_dir`` or
    ``$SPARSECL_DATA``). ``executor``: 'local' (``jobs`` runs at a time, on ``devices``
    round-robin), 'slurm' or 'submitit-local' (see :mod:`sparsecl.cluster`), with ``cluster``'s
    options."""
    cluster = cluster or ClusterOptions()
    cluster.check(executor, jobs, devices)
    job_list, out = load_grid(path)
    status, todo = _plan(job_list, out)
    data = str(Path(data_dir).resolve()) if data_dir else None
    outcomes = Outcomes(log)
    if executor == "local":
        n_jobs = max(1, jobs or 1)
        log(f"sweep: {len(job_list)} runs, {len(status)} already complete, {len(todo)} to run, {n_jobs} at a time")
        status.update(_run_local(todo, out, n_jobs, devices, data, outcomes))
    else:
        submitter = _submitit_module()
        log(f"sweep: {len(job_list)} runs, {len(status)} already complete, {len(todo)} to run, "
            f"as {executor} jobs")
        if todo:
            status.update(submitter.run_jobs(executor, todo, out, data, cluster, outcomes))
    outcomes.summary(status)
    return status


def _submitit_module():
    """:mod:`sparsecl.cluster`, which needs the optional extra ``sparsecl[slurm]``."""
    import_extra("submitit", "slurm", "--executor slurm|submitit-local")
    from sparsecl import cluster

    return cluster


def _run_local(todo: list[tuple[int, SweepJob, str]], out: Path, n_jobs: int, devices: list[str] | None,
               data_dir: str | None, outcomes: Outcomes) -> dict[str, str]:
    """``n_jobs`` runs at a time in child processes, the CPU threads split between them."""
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    children = Children()

    def one(item: tuple[int, SweepJob, str]) -> tuple[str, str]:
        i, job, state = item
        if outcomes.stop or children.stopping:
            return job.name, "not run"
        device = devices[i % len(devices)] if devices else None
        result, seconds, _ = execute(job, out / job.name, state, data_dir=data_dir, device=device, threads=threads,
                                     children=children)
        outcomes.record(job.name, result, seconds)
        return job.name, result

    status: dict[str, str] = {}
    with sigterm_as_interrupt(), ThreadPoolExecutor(max_workers=n_jobs) as pool:
        try:
            for name, result in pool.map(one, todo):
                status[name] = result
        except BaseException:  # Ctrl-C or SIGTERM: no run outlives the sweep
            children.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return status
