"""Hyper-parameter search with Optuna: ``sparsecl tune``.

Every trial is one ``sparsecl run`` of the base configuration (the usual run flags, a preset or a
``--config``) with the sampled values, evaluated on a held-out validation split of the training
data (``--validation``, 0.1 when not given): the test set is never looked at. A search space comes
from ``--param NAME=SPEC`` flags or a YAML file mapping names to specs::

    lr: log:1e-3:1e-1          # float, log-uniform
    alpha: 0.1:1.0             # float, uniform
    minibatch_size: int:8:64   # integer (int:log:LO:HI for log-uniform)
    policy: choice:conv-linear,all   # one of the values

A name is a method option (``lr``, ``alpha``), a run option (``epochs``, ``batch_size``) or a
backbone option (``backbone.nf``).

Objective: the final Class-IL or Task-IL ACC (``--objective``), of one seed's run or the mean over
``--seeds`` (one run directory per seed under the trial's folder), optionally minus
``--flops-penalty`` points per 100 % of dense training FLOPs, or with ``--pareto`` the pair
(ACC, FLOPs ratio) searched for its Pareto front. After each task a trial reports its average
accuracy over the tasks seen so far, so a pruner (median by default) stops trials that fall behind
the others at the same task; a stopped trial keeps its run directory and checkpoint.

A study lives in a database (SQLite in the output folder by default, any SQLAlchemy URL such as
``postgresql://...`` to share one study between machines): ``--workers N`` processes share it here,
and ``sparsecl tune`` started on several machines with the same ``--storage`` and ``--study`` share
it there; ``--trials`` counts finished (complete or pruned) trials of the whole study. Resumable:
started again, a tune goes on where it stopped, and a trial that was interrupted (Ctrl-C, SIGTERM,
a killed process or machine) is tried again with the same values, resuming its run from its last
completed task, so the study's results do not depend on the interruption. At the end the best
trial's configuration is written as a preset file (``sparsecl run --preset-file FILE``) with the
study's provenance, and every trial is listed in ``OUT/tune.json``.
"""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from sparsecl import SparseCLError, __version__, first_line, import_extra
from sparsecl.config import LOCATION_KEYS, RunConfig, build_options, first_difference, load_yaml, merge_config
from sparsecl.engine.io import atomic_write_json, atomic_write_text
from sparsecl.engine.loggers import RunObserver
from sparsecl.engine.launch import die_with_parent
from sparsecl.engine.trainer import CHECKPOINT, RESULT, resume, run
from sparsecl.methods import METHODS
from sparsecl.sweep import SAME_FAILURES, sigterm_as_interrupt

OBJECTIVES = {"class-il": "class_il", "task-il": "task_il"}
DEFAULT_VALIDATION = 0.1
# Run options a trial sets itself or that do not change its result: never searched, never in a preset.
NOT_TUNABLE = {"method", "benchmark", "seed", "out", "device", "validation", "threads", "method_options",
               "backbone_options", "keep_checkpoints", "tensorboard", "wandb", *LOCATION_KEYS}
NOT_IN_PRESET = NOT_TUNABLE - {"method", "benchmark", "method_options", "backbone_options"} | {"download"}
HOST = socket.gethostname()
SUMMARY = "tune.json"
BEST_PRESET = "best-preset.yaml"
PROVENANCE = "sparsecl tune study"  # how a best preset's source begins (and how it is recognised)


def _optuna():
    optuna = import_extra("optuna", "tune", "sparsecl tune")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is our one line, not a traceback
    return optuna


# ------------------------------------------------------------------ the search space
@dataclass(frozen=True)
class Param:
    """One searched value: ``kind`` float | int | choice, over [low, high] or ``choices``."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()
    text: str = ""  # as the user wrote it (the study's record of its space)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def apply(self, layer: dict[str, Any], value: Any) -> None:
        """Put ``value`` where this name belongs in a configuration layer."""
        if self.name.startswith("backbone."):
            layer.setdefault("backbone_options", {})[self.name.split(".", 1)[1]] = value
        elif self.name in RUN_FIELDS:
            layer[self.name] = value
        else:
            layer.setdefault("method_options", {})[self.name] = value


RUN_FIELDS = {f.name for f in fields(RunConfig)} - NOT_TUNABLE


def parse_spec(name: str, spec: str) -> Param:
    """``[log:]LO:HI`` (float), ``int:[log:]LO:HI`` or ``choice:A,B,...`` for ``name``."""
    name = name.strip().replace("-", "_")
    text = f"{name}={spec}"
    if name in NOT_TUNABLE:
        raise SparseCLError(f"search space {text!r}: {name} is set by the tune or changes no result, it is not searched")
    head, _, rest = str(spec).strip().partition(":")
    if head == "choice":
        choices = tuple(yaml.safe_load(v) for v in rest.split(",") if v.strip())
        if len(choices) < 2:
            raise SparseCLError(f"search space {text!r}: choice needs at least two values (choice:A,B)")
        return Param(name, "choice", choices=choices, text=text)
    kind = "float"
    parts = str(spec).strip().split(":")
    if parts[0] == "int":
        kind, parts = "int", parts[1:]
    log = bool(parts) and parts[0] == "log"
    bounds = parts[1:] if log else parts
    try:
        low, high = (float(b) for b in bounds)
    except ValueError:
        raise SparseCLError(f"search space {text!r}: expected [int:][log:]LOW:HIGH or choice:A,B,...") from None
    if not low < high or (log and low <= 0) or (kind == "int" and not (low.is_integer() and high.is_integer())):
        raise SparseCLError(f"search space {text!r}: need LOW < HIGH (positive for log, integers for int)")
    return Param(name, kind, low, high, log, text=text)


def parse_params(flags: Sequence[str] = (), space_file: str | None = None) -> list[Param]:
    """The search space of ``--param NAME=SPEC`` flags and a YAML file (flags win)."""
    specs: dict[str, str] = {}
    if space_file:
        data = load_yaml(space_file)
        data = data.get("space", data)
        if not isinstance(data, dict):
            raise SparseCLError(f"search space file {space_file}: expected a mapping of NAME: SPEC")
        specs.update({str(k): str(v) for k, v in data.items()})
    for item in flags:
        name, eq, spec = item.partition("=")
        if not eq:
            raise SparseCLError(f"--param expects NAME=SPEC, got {item!r}")
        specs[name] = spec
    if not specs:
        raise SparseCLError("nothing to search: give --param NAME=SPEC (e.g. --param lr=log:1e-3:1e-1) or --space FILE")
    return [parse_spec(k, v) for k, v in specs.items()]


# ------------------------------------------------------------------ the study
@dataclass
class TuneSettings:
    """What a tune is, beside its base run configuration and search space."""

    study: str
    out: Path
    storage: str = ""  # SQLAlchemy URL; '' = SQLite in ``out``
    trials: int = 20
    workers: int = 1
    objective: str = "class-il"
    flops_penalty: float = 0.0  # ACC points per 100 % of dense training FLOPs
    pareto: bool = False
    pruner: str = "median"  # median | none | below:ACC
    sampler_seed: int = 0
    best_preset: Path | None = None
    threads: int = field(default=0)  # per trial; 0 = the CPUs split between the workers
    seeds: tuple[int, ...] = ()  # a trial's value is the mean over these seeds' runs; () = the base seed

    def validate(self, base: RunConfig) -> None:
        if self.trials < 1 or self.workers < 1:
            raise SparseCLError("--trials and --workers must be >= 1")
        if self.objective not in OBJECTIVES:
            raise SparseCLError(f"unknown objective {self.objective!r} (known: {', '.join(OBJECTIVES)})")
        if self.objective == "class-il" and base.setting == "task-il":
            raise SparseCLError("a task-il run reports no Class-IL accuracy: use --objective task-il")
        if self.flops_penalty < 0 or not math.isfinite(self.flops_penalty):
            raise SparseCLError(f"--flops-penalty must be >= 0, got {self.flops_penalty}")
        if self.pareto and self.flops_penalty:
            raise SparseCLError("--pareto searches ACC and FLOPs as two objectives: drop --flops-penalty")
        if self.pareto and self.pruner != "none":
            raise SparseCLError("Optuna cannot prune multi-objective trials: use --pruner none with --pareto")
        if base.validation is None:
            raise SparseCLError("a tune evaluates on a validation split: set validation")
        if len(set(self.seeds)) != len(self.seeds):
            raise SparseCLError(f"--seeds repeats a seed: {', '.join(map(str, self.seeds))}")

    def run_seeds(self, base: RunConfig) -> tuple[int, ...]:
        return self.seeds or (base.seed,)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    @property
    def shown_storage(self) -> str:
        """The storage URL without its password (it goes into files and logs)."""
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.storage_url).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy parses: opening it will say so
            return self.storage_url


def check_space(base: RunConfig, params: list[Param]) -> None:
    """Every searched method option is one of the method's (before any trial runs)."""
    known = {f.name for f in fields(METHODS.get(base.method).options_cls)}
    unknown = sorted(p.name for p in params if not p.name.startswith("backbone.") and p.name not in RUN_FIELDS
                     and p.name not in known)
    if unknown:
        raise SparseCLError(f"method {base.method!r} has no option {', '.join(unknown)} to search "
                            f"(its options: {', '.join(sorted(known))})")


def _identity(settings: TuneSettings, base: RunConfig, params: list[Param]) -> dict[str, Any]:
    """What a study is: resuming it with another space, objective or base configuration would mix
    trials of two searches."""
    cfg = {k: v for k, v in base.to_dict().items() if k not in ("out", "device", "threads", *LOCATION_KEYS)}
    return {"space": [p.text for p in params], "objective": settings.objective, "pareto": settings.pareto,
            "flops_penalty": settings.flops_penalty, "seeds": list(settings.run_seeds(base)), "base": cfg}


def open_study(settings: TuneSettings, base: RunConfig, params: list[Param], worker: int = 0):
    """Create or load the study, refusing one made for another search. Each worker's sampler has its
    own seed, moved on by the trials already in the study, so that neither two workers nor a restart
    propose the first values again."""
    optuna = _optuna()
    for attempt in range(3):
        try:
            study = _create_study(optuna, settings)
            break
        except SparseCLError:
            raise
        except Exception as e:  # a bad URL, a missing database driver, an unreachable server, directions
            if attempt < 2 and "already exists" in str(e):  # another process created the tables just now
                time.sleep(1.0)
                continue
            raise SparseCLError(f"cannot open study {settings.study!r} in {settings.shown_storage}: "
                                f"{first_line(e)}") from None
    study.sampler = optuna.samplers.TPESampler(
        seed=settings.sampler_seed + 1000 * worker + len(study.get_trials(deepcopy=False)))
    want = _identity(settings, base, params)
    have = study.user_attrs.get("sparsecl")
    if have is None:
        study.set_user_attr("sparsecl", want)
    elif have != want:
        diff = first_difference(have, want)
        raise SparseCLError(f"study {settings.study!r} in {settings.shown_storage} is another search ({diff}); "
                            "give another --study")
    return study


def _create_study(optuna, settings: TuneSettings):
    url = settings.storage_url
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # Optuna calls its heartbeat experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A trial whose process stops beating (a lost machine) fails after 2 minutes and is queued again.
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120,
                                             heartbeat_stale_trial_callback=_retry)
    return optuna.create_study(
        storage=storage, study_name=settings.study, load_if_exists=True,
        directions=["maximize", "minimize"] if settings.pareto else ["maximize"],
        pruner=_pruner(optuna, settings.pruner))


def _pruner(optuna, spec: str):
    if spec == "none":
        return optuna.pruners.NopPruner()
    if spec == "median":
        return _task_median_pruner(optuna)
    if spec.startswith("below:"):
        try:
            return optuna.pruners.ThresholdPruner(lower=float(spec.split(":", 1)[1]))
        except ValueError:
            pass
    raise SparseCLError(f"unknown pruner {spec!r} (median, none or below:ACC)")


def _task_median_pruner(optuna, startup: int = 4, warmup: int = 1):
    """Stops a trial whose accuracy after task t is below the median of the finished trials' after
    the same task (once ``startup`` of them reached it), never before task ``warmup + 1``: every
    trial learns one task alone well (seq-mnist: 99.6-99.8 %), so that says nothing about
    forgetting. (Optuna's MedianPruner compares a trial's best value over its steps, which for an
    accuracy that falls as tasks are added is always its first task's.)"""

    class TaskMedianPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            step = trial.last_step
            if step is None or step < warmup:
                return False
            state = optuna.trial.TrialState
            others = [t.intermediate_values[step] for t in study.get_trials(
                deepcopy=False, states=(state.COMPLETE, state.PRUNED)) if step in t.intermediate_values]
            return len(others) >= startup and trial.intermediate_values[step] < statistics.median(others)

    return TaskMedianPruner()


# ------------------------------------------------------------------ interrupted trials
def _retry(study, trial) -> bool:
    """Try an interrupted trial again with its values (its run resumes from its checkpoint); False
    for a trial that failed for a reason, was never needed or is queued again already."""
    if trial.user_attrs.get("error") or trial.user_attrs.get("surplus"):
        return False
    if any(t.user_attrs.get("resume_of") == trial.number for t in study.get_trials(deepcopy=False)):
        return False
    study.enqueue_trial(trial.params, user_attrs={"resume_of": trial.number,
                                                  "run_dir": trial.user_attrs.get("run_dir")})
    return True


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def recover(study, log: Callable[[str], None]) -> None:
    """Before any worker starts: fail this machine's trials whose process is gone (a SIGKILL leaves
    them running in the database) and queue every interrupted trial again."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        if t.user_attrs.get("host") == HOST and not _alive(t.user_attrs.get("pid")):
            study.tell(t.number, state=state.FAIL, skip_if_finished=True)
    for t in study.get_trials(deepcopy=False, states=(state.FAIL,)):
        if _retry(study, t):
            log(f"tune: trial {t.number} was interrupted; it runs again from its last completed task")


# ------------------------------------------------------------------ one trial
class _Pruning(RunObserver):
    """Reports a trial's average accuracy over the tasks seen after each task; stops it when the
    pruner says so (after the task's checkpoint is written)."""

    def __init__(self, trial: Any, key: str, penalty: float) -> None:
        self.trial, self.key, self.penalty = trial, key, penalty

    def task(self, result: dict[str, Any], task: int) -> None:
        self.trial.report(_value(result, self.key, self.penalty, task), task)
        if self.trial.should_prune():
            raise _optuna().TrialPruned(f"pruned after task {task + 1}")


def _value(result: dict[str, Any], key: str, penalty: float, task: int | None = None) -> float:
    """The run's ACC (or, after task index ``task``, the average accuracy over the tasks seen), minus
    ``penalty`` points per 100 % of dense training FLOPs so far."""
    if task is None:
        acc = result["accuracy"][key]["acc"]
    else:
        row = result["accuracy"][key]["matrix"][task][:task + 1]
        acc = sum(row) / len(row)
    return acc - penalty * 100.0 * (result["flops"]["ratio"] or 0.0)


class _Surplus(Exception):
    """Workers started more trials than the study needs; this one is not run."""


@dataclass
class _Worker:
    settings: TuneSettings
    base: RunConfig
    params: list[Param]
    log: Callable[[str], None]
    threads: int
    failures: dict[str, int] = field(default_factory=dict)

    def objective(self, trial: Any) -> float | tuple[float, float]:
        for name, value in (("host", HOST), ("pid", os.getpid()), ("threads", self.threads)):
            trial.set_user_attr(name, value)
        values = {p.name: p.suggest(trial) for p in self.params}
        if trial.user_attrs.get("resume_of") is None and self._surplus(trial):
            trial.set_user_attr("surplus", True)
            raise _Surplus
        run_dir = self._run_dir(trial)
        key = OBJECTIVES[self.settings.objective]
        observers = [] if self.settings.pareto else [_Pruning(trial, key, self.settings.flops_penalty)]
        t0 = time.perf_counter()
        try:
            results = [self._run_seed(run_dir / f"seed-{seed}", seed, values, observers if i == 0 else [])
                       for i, seed in enumerate(self.settings.run_seeds(self.base))]
        except SparseCLError as e:
            trial.set_user_attr("error", str(e))
            self._failed(trial, str(e))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except _optuna().TrialPruned as e:
            self.log(f"tune: trial {trial.number} {e} ({shown_values(values)})")
            raise
        value = statistics.fmean(_value(r, key, self.settings.flops_penalty) for r in results)
        ratio = _record(trial, results)
        self.log(f"tune: trial {trial.number} {self.settings.objective} {value:.2f} in "
                 f"{time.perf_counter() - t0:.0f} s ({shown_values(values)})")
        return (value, ratio) if self.settings.pareto else value

    def _run_dir(self, trial: Any) -> Path:
        """A new trial's folder (a run directory per seed in it); an interrupted one's where its runs
        are (here, or on a shared disk); one that never checkpointed a task starts again in a new one."""
        old = trial.user_attrs.get("run_dir")
        resumable = old is not None and any(Path(old).glob(f"seed-*/{CHECKPOINT}"))
        run_dir = Path(old) if resumable else self.settings.out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        return run_dir

    def _run_seed(self, run_dir: Path, seed: int, values: dict[str, Any], observers: list) -> dict[str, Any]:
        """One seed's run of the trial: done already, resumed from its checkpoint (an interrupted
        trial; its completed tasks are reported again) or new."""
        done = _read_json(run_dir / RESULT)
        if done is not None and (done.get("complete") or (run_dir / CHECKPOINT).exists()):
            for t in range(done["tasks_completed"]):
                for observer in observers:
                    observer.task(done, t)
            if done["complete"]:
                return done
            return resume(run_dir, device=self.base.device, observers=observers)[0]
        layer = self.base.to_dict()
        for p in self.params:
            p.apply(layer, values[p.name])
        layer.update(out=str(run_dir), threads=self.threads, seed=seed)
        cfg = merge_config(layer)
        build_options(METHODS.get(cfg.method).options_cls, dict(cfg.method_options), f"method {cfg.method!r}")
        return run(cfg, observers=observers)[0]

    def _surplus(self, trial: Any) -> bool:
        state = _optuna().trial.TrialState
        ahead = trial.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING))
        return sum(t.number < trial.number for t in ahead) >= self.settings.trials

    def _failed(self, trial: Any, message: str) -> None:
        self.log(f"tune: trial {trial.number} failed: {message}")
        self.failures[message] = self.failures.get(message, 0) + 1

    def work(self, study: Any) -> None:
        """Run trials until the study has enough finished ones (or the same error repeats)."""
        state = _optuna().trial.TrialState
        while max(self.failures.values(), default=0) < SAME_FAILURES:
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == state.WAITING for t in trials)
            active = sum(t.state in (state.COMPLETE, state.PRUNED, state.RUNNING) for t in trials)
            if not waiting and active >= self.settings.trials:
                return
            try:
                study.optimize(self.objective, n_trials=1, catch=(SparseCLError, _Surplus))
            except Exception as e:
                raise _storage_error(e, self.settings) or e
        message = max(self.failures, key=self.failures.get)
        raise SparseCLError(f"stopping: {SAME_FAILURES} trials failed with: {message}")


def _record(trial: Any, results: list[dict[str, Any]]) -> float:
    """The finished runs' accuracies (mean and per seed) and mean FLOPs ratio, beside the trial's
    values in the study; returns that ratio."""
    for name in OBJECTIVES.values():
        if name in results[0]["accuracy"]:
            accs = [r["accuracy"][name]["acc"] for r in results]
            trial.set_user_attr(f"{name}_acc", statistics.fmean(accs))
            trial.set_user_attr(f"{name}_acc_per_seed", accs)
    ratio = statistics.fmean(r["flops"]["ratio"] or 0.0 for r in results)
    trial.set_user_attr("flops_ratio", ratio)
    return ratio


def _storage_error(e: BaseException, settings: TuneSettings) -> SparseCLError | None:
    """One line for a failure of the study's database (anywhere in the exception's chain)."""
    from sqlalchemy.exc import SQLAlchemyError

    while e is not None and not isinstance(e, SQLAlchemyError):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    return SparseCLError(f"the study database {settings.shown_storage} failed: {first_line(getattr(e, 'orig', None) or e)}")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shown_values(values: dict[str, Any]) -> str:
    """Searched values as one short line: ``lr=0.1591, alpha=1.938``."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


# ------------------------------------------------------------------ workers
def _worker_main(settings: TuneSettings, base: RunConfig, params: list[Param], index: int, parent: int,
                 threads: int) -> None:
    """A worker process: dies with the tune, Ctrl-C and SIGTERM interrupt its trial."""
    die_with_parent(parent)
    log = _stderr_log(f"[worker {index}] ")
    try:
        with sigterm_as_interrupt():
            _Worker(settings, base, params, log, threads).work(open_study(settings, base, params, index))
    except SparseCLError as e:
        print(f"sparsecl: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _stderr_log(prefix: str = "") -> Callable[[str], None]:
    return lambda m: print(prefix + m, file=sys.stderr, flush=True)


def _run_workers(settings: TuneSettings, base: RunConfig, params: list[Param], threads: int) -> None:
    ctx = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    procs = [ctx.Process(target=_worker_main, args=(settings, base, params, i, os.getpid(), threads))
             for i in range(settings.workers)]
    try:
        for p in procs:
            p.start()
        pending = {p.sentinel: i for i, p in enumerate(procs)}
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending)):
                i = pending.pop(sentinel)
                if procs[i].exitcode:  # its error line is above; the others stop too, resumable
                    raise SparseCLError(f"worker {i} stopped (exit code {procs[i].exitcode}); the other workers "
                                        "were stopped too: run the same command again to continue")
    except BaseException:  # Ctrl-C, SIGTERM or a failed worker: no worker outlives the tune
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each marks its trial interrupted
        for p in procs:
            p.join(timeout=60)
        raise


def tune(settings: TuneSettings, base: RunConfig, params: list[Param],
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the study to ``settings.trials`` finished trials; write ``tune.json`` and the best preset.
    Returns the summary written to ``tune.json``."""
    log = log or _stderr_log()
    settings.validate(base)
    check_space(base, params)
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from sparsecl.engine.io import os_error

        raise os_error("create", settings.out, e) from None
    threads = settings.threads or base.threads or max(1, (os.cpu_count() or 1) // settings.workers)
    _check_out(settings)
    study = open_study(settings, base, params)
    recover(study, log)
    atomic_write_json(settings.out / SUMMARY, summarize(study, settings))  # claims OUT for this study
    log(f"tune: study {settings.study!r} in {settings.shown_storage}: {_finished(study)} of {settings.trials} "
        f"trials finished, {settings.workers} worker(s) of {threads} thread(s)")
    with sigterm_as_interrupt():  # like Ctrl-C: the workers stop, their trials recorded as interrupted
        if settings.workers > 1:
            _run_workers(settings, base, params, threads)
        else:
            _Worker(settings, base, params, log, threads).work(study)
    summary = summarize(study, settings)
    atomic_write_json(settings.out / SUMMARY, summary)
    if summary["best"] is not None:
        write_best_preset(study, settings, base, params, summary)
    return summary


def _check_out(settings: TuneSettings) -> None:
    """One output folder holds one study's trials (their run directories are named by number)."""
    old = _read_json(settings.out / SUMMARY)
    if old is not None and (old.get("study"), old.get("storage")) != (settings.study, settings.shown_storage):
        raise SparseCLError(f"{settings.out} holds the trials of study {old.get('study')!r} in {old.get('storage')}: "
                            "give another --out")


def _finished(study) -> int:
    state = _optuna().trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))


# ------------------------------------------------------------------ results
def summarize(study, settings: TuneSettings) -> dict[str, Any]:
    """Every trial (state, values, parameters, run directory, accuracies) and the best one."""
    state = _optuna().trial.TrialState
    trials = [{"number": t.number, "state": t.state.name.lower(), "values": t.values, "params": t.params,
               **t.user_attrs}
              for t in study.get_trials(deepcopy=False) if t.state != state.WAITING]
    complete = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    front = [t.number for t in study.best_trials] if complete else []
    best = _best(study, settings) if complete else None
    return {"study": settings.study, "storage": settings.shown_storage, "objective": settings.objective,
            "flops_penalty": settings.flops_penalty, "pareto": settings.pareto,
            "counts": {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail", "running")},
            "best": best.number if best is not None else None, "pareto_front": front, "trials": trials}


def _best(study, settings: TuneSettings):
    """The best trial; of a Pareto front, the most accurate."""
    if settings.pareto:
        return max(study.best_trials, key=lambda t: t.values[0])
    return study.best_trial


def best_preset(study, settings: TuneSettings, base: RunConfig, params: list[Param],
                summary: dict[str, Any]) -> dict[str, Any]:
    """The best trial's configuration in the presets' format, with the study's provenance."""
    best = _best(study, settings)
    layer = base.to_dict()
    for p in params:
        p.apply(layer, best.params[p.name])
    cfg = merge_config(layer).to_dict()
    default = RunConfig().to_dict()
    body = {k: v for k, v in cfg.items()
            if k not in NOT_IN_PRESET and (k in ("method", "benchmark") or v != default[k])}
    counts = summary["counts"]
    acc = best.values[0]
    seeds = ", ".join(map(str, settings.run_seeds(base)))
    what = f"{settings.objective} ACC" + (f" - {settings.flops_penalty:g} x FLOPs %" if settings.flops_penalty else "")
    over = f" (mean of seeds {seeds})" if len(settings.run_seeds(base)) > 1 else ""
    description = (f"{cfg['method']} on {cfg['benchmark']} tuned by sparsecl tune: {what} {acc:.2f}{over} on a "
                   f"{base.validation:g} validation split (trial {best.number})")
    source = (f"{PROVENANCE} {settings.study!r} ({settings.shown_storage}): trial {best.number} of "
              f"{counts['complete'] + counts['pruned']} finished ({counts['complete']} complete, {counts['pruned']} "
              f"pruned), objective {what}{' (Pareto front with FLOPs ratio; most accurate)' if settings.pareto else ''}, "
              f"validation {base.validation:g}, seed(s) {seeds}, {best.user_attrs.get('threads')} thread(s), "
              f"space {'; '.join(p.text for p in params)}; sparsecl {__version__}, "
              f"{datetime.date.today().isoformat()}. Reproduce: sparsecl run --preset-file FILE --validation "
              f"{base.validation:g} --seed S --threads {best.user_attrs.get('threads')} (S in {seeds}; the mean)")
    return {"description": description, "source": source, **body}


def write_best_preset(study, settings: TuneSettings, base: RunConfig, params: list[Param],
                      summary: dict[str, Any]) -> Path:
    """Write the best preset (refusing to replace a file that is not this study's)."""
    path = settings.best_preset or settings.out / BEST_PRESET
    if path.exists():
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            old = {}
        if not str(old.get("source", "") if isinstance(old, dict) else "").startswith(f"{PROVENANCE} {settings.study!r}"):
            raise SparseCLError(f"{path} exists and is not this study's best preset: give another --best-preset")
    atomic_write_text(path, yaml.safe_dump(best_preset(study, settings, base, params, summary), sort_keys=False,
                                           width=110))
    return path
