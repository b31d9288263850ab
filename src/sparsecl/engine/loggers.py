"""What watches a run as it trains: loggers (TensorBoard) and any caller's observer (a tuner's
pruner). The trainer calls each on rank 0 after every epoch and after every completed task, once
that task's checkpoint and result.json are written, so an observer that stops the run (raises) leaves
it resumable."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from sparsecl.config import RunConfig
from sparsecl.engine.tensorboard import EventWriter, log_epoch, log_task

TENSORBOARD_DIR = "tensorboard"


class RunObserver(Protocol):
    """Told about a run's progress; ``close`` is called once, however the run ends."""

    def epoch(self, step: int, task: int, loss: float) -> None:
        """Epoch ``step`` (counted over the whole run) of task index ``task`` ended with mean ``loss``."""

    def task(self, result: dict[str, Any], task: int) -> None:
        """Task index ``task`` is complete; ``result`` is the run's result dict at that point."""

    def close(self) -> None:
        """The run ended (completed, failed or stopped)."""


class TensorBoardLogger:
    """``--tensorboard``: event files under RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = EventWriter(run_dir / TENSORBOARD_DIR)

    def epoch(self, step: int, task: int, loss: float) -> None:
        log_epoch(self.writer, step, task, loss)

    def task(self, result: dict[str, Any], task: int) -> None:
        log_task(self.writer, result, task)

    def close(self) -> None:
        self.writer.close()


def loggers_for(cfg: RunConfig, run_dir: Path) -> list[RunObserver]:
    """The loggers ``cfg`` asks for."""
    return [TensorBoardLogger(run_dir)] if cfg.tensorboard else []
