"""Shared test helpers: a run killed at the start of a task (as a user's Ctrl-C or a lost machine),
and whether a process still runs."""
from pathlib import Path

import pytest

from sparsecl.config import RunConfig
from sparsecl.engine import trainer as trainer_mod
from sparsecl.engine.loggers import RunObserver


class CtrlCAtTask(RunObserver):
    """Presses Ctrl-C as task index ``task`` starts (tasks before it are checkpointed)."""

    def __init__(self, task: int) -> None:
        self.at = task

    def task_start(self, task: int) -> None:
        if task == self.at:
            raise KeyboardInterrupt


def run_interrupted(config: RunConfig, run_dir: Path, at_task: int = 2) -> None:
    """Run ``config`` into ``run_dir`` and interrupt it when task ``at_task`` (0-based) starts."""
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.run(config, run_dir, observers=[CtrlCAtTask(at_task)])


def alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting for its reaper is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
