"""What watches a run as it trains: loggers (TensorBoard, Weights & Biases) and any caller's
observer (a tuner's pruner). The trainer calls each on rank 0 after every epoch and after every
completed task, once that task's checkpoint and result.json are written, so an observer that stops
the run (raises) leaves it resumable.

Both loggers record the same values (:func:`epoch_scalars`, :func:`task_scalars`): the mean
training loss per epoch (on an axis of epochs counted over the whole run) and, after each task t
(axis: t, from 1), Class-IL / Task-IL average accuracy and the accuracy of every seen task,
cumulative training FLOPs and the ratio to dense, samples/s, training seconds, memory footprint,
overall and per-layer weight density, capacity; plus the accuracy-matrix heatmap as an image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsecl import SparseCLError, first_line, import_extra
from sparsecl.config import RunConfig
from sparsecl.engine.io import atomic_write_text

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID = "wandb-run-id"  # in RUN_DIR: the W&B run a resumed run continues
# RunConfig field -> (module the logger needs, the extra that installs it)
LIBRARIES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class RunObserver:
    """Told about a run's progress (override what you need; every hook does nothing by default).
    ``close`` is called once, however the run ends. The step and task-start hooks let a caller
    watch (or stop, by raising) a run at any point without patching the trainer."""

    def task_start(self, task: int) -> None:
        """Task index ``task`` is about to train."""

    def before_step(self, task: int) -> None:
        """A training step of task index ``task`` is about to run."""

    def after_step(self, task: int) -> None:
        """A training step of task index ``task`` ran (its optimiser step is done)."""

    def epoch(self, number: int, task: int, loss: float) -> None:
        """Epoch ``number`` (counted from 1 over the whole run) of task index ``task`` ended with mean ``loss``."""

    def task(self, result: dict[str, Any], task: int) -> None:
        """Task index ``task`` is complete; ``result`` is the run's result dict at that point."""

    def close(self) -> None:
        """The run ended (completed, failed or stopped)."""


def epoch_scalars(task: int, loss: float) -> dict[str, float]:
    """What an epoch of task index ``task`` logs."""
    return {"train/loss": loss, "train/task": task + 1}


def task_scalars(result: dict[str, Any], task: int) -> dict[str, float]:
    """The numbers of ``result`` (the run's result dict) after task index ``task``; values the run
    does not have (no masks, no capacity) are left out."""
    values: dict[str, float | None] = {}
    for key, acc in result["accuracy"].items():  # class_il (Class-IL runs) and task_il
        row = acc["matrix"][task][:task + 1]
        values[f"accuracy/{key}"] = sum(row) / len(row)
        for j, a in enumerate(row):
            values[f"accuracy_per_task/{key}/task_{j + 1}"] = a
    flops, timing = result["flops"], result["timing"]
    values["flops/train_cumulative"] = flops["train"]
    values["flops/ratio_to_dense"] = flops["ratio"]
    values["speed/samples_per_second"] = timing["samples_per_second"][task]
    values["time/train_seconds"] = timing["train_seconds_per_task"][task]
    footprint = result["memory"]["footprint_bytes"] or {}
    values["memory/footprint_bytes"] = footprint.get("total")
    sparsity = result.get("sparsity") or {}
    values["density/overall"] = (sparsity.get("overall") or {}).get("density")
    for name, layer in (sparsity.get("per_layer") or {}).items():
        if layer.get("masked"):
            values[f"density_per_layer/{name}"] = layer["weight_density"]
    values["capacity"] = (result.get("capacity") or {}).get("value")
    return {k: float(v) for k, v in values.items() if v is not None}


def task_figures(result: dict[str, Any], task: int) -> dict[str, Any]:
    """Per setting (class_il, task_il), the accuracy-matrix heatmap after task index ``task``
    (tag -> figure)."""
    from sparsecl.engine.figures import accuracy_matrix_figure  # matplotlib: only for runs that log

    return {f"accuracy_matrix/{key}":
            accuracy_matrix_figure(acc["matrix"], f"{key.replace('_', '-')} after task {task + 1}")
            for key, acc in result["accuracy"].items()}


class TensorBoardLogger(RunObserver):
    """``--tensorboard``: event files under RUN_DIR/tensorboard, through ``torch.utils.tensorboard``.

    A resumed run restarts at the first epoch of the first task not completed; its writer's
    ``purge_step`` makes TensorBoard drop what the stopped part logged from that step on (the
    epochs of the task it did not finish), so no step is shown twice. Task values sit at steps
    1..T, never past a task's last epoch step, so the purge keeps those of the completed tasks.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, first_task: int) -> None:
        tensorboard = _library("tensorboard")
        purge = first_task * cfg.epochs + 1 if first_task else None
        self.writer = tensorboard.SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def epoch(self, number: int, task: int, loss: float) -> None:
        for tag, value in epoch_scalars(task, loss).items():
            self.writer.add_scalar(tag, value, number)
        self.writer.flush()  # a run killed mid-task keeps what it logged

    def task(self, result: dict[str, Any], task: int) -> None:
        for tag, value in task_scalars(result, task).items():
            self.writer.add_scalar(tag, value, task + 1)
        for tag, fig in task_figures(result, task).items():
            self.writer.add_figure(tag, fig, task + 1)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(RunObserver):
    """``--wandb PROJECT``: a Weights & Biases run with the run's configuration, its files under
    RUN_DIR/wandb; mode, entity and login from wandb's own environment (``WANDB_MODE=offline``:
    files only, ``wandb sync`` uploads them later). A resumed run continues the same W&B run (its
    id is kept in RUN_DIR/wandb-run-id).

    W&B cannot take back a logged row, so a task's epoch losses are sent when the task is complete
    (checkpointed): a resumed run then never logs an epoch twice. Rows carry their own axes,
    ``epoch`` for the losses and ``task`` for the per-task values (``define_metric``): charts do
    not depend on W&B's internal step, which counts logged rows and only ever grows.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.wandb = _library("wandb")
        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        try:
            self.run = self.wandb.init(project=cfg.wandb, dir=str(run_dir), id=run_id, resume="allow",
                                       name=run_dir.name, config=cfg.to_dict())
        except self.wandb.errors.Error as e:  # not logged in, no such entity, server unreachable
            raise SparseCLError(f"--wandb {cfg.wandb}: {first_line(e)}") from None
        if run_id is None:
            atomic_write_text(id_file, self.run.id)
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")
        self.run.define_metric("task")
        self.defined: set[str] = set()  # per-task keys given the task axis
        self.pending: list[dict[str, float]] = []  # epoch rows of the task in progress

    def epoch(self, number: int, task: int, loss: float) -> None:
        self.pending.append({"epoch": number, **epoch_scalars(task, loss)})

    def task(self, result: dict[str, Any], task: int) -> None:
        for row in self.pending:
            self.run.log(row)
        self.pending = []
        row: dict[str, Any] = {"task": task + 1, **task_scalars(result, task)}
        row.update({tag: self.wandb.Image(fig) for tag, fig in task_figures(result, task).items()})
        for key in row.keys() - self.defined - {"task"}:
            self.run.define_metric(key, step_metric="task")
            self.defined.add(key)
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()


def _library(field: str) -> Any:
    """The library of the logger that RunConfig field ``field`` turns on."""
    module, extra = LIBRARIES[field]
    return import_extra(module, extra, f"--{field}")


def check_loggers(cfg: RunConfig) -> None:
    """Fail before anything is loaded or trained if a logger ``cfg`` asks for lacks its library
    (one error line naming the pip command)."""
    for field in LIBRARIES:
        if getattr(cfg, field):
            _library(field)


def loggers_for(cfg: RunConfig, run_dir: Path, first_task: int = 0) -> list[RunObserver]:
    """The loggers ``cfg`` asks for, for a run (re)starting at task index ``first_task``."""
    loggers: list[RunObserver] = []
    try:
        if cfg.tensorboard:
            loggers.append(TensorBoardLogger(cfg, run_dir, first_task))
        if cfg.wandb:
            loggers.append(WandbLogger(cfg, run_dir))
    except BaseException:  # e.g. W&B refused the login: close the writers already open
        for logger in loggers:
            logger.close()
        raise
    return loggers
