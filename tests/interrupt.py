"""Shared test helpers: a run killed at the start of a task (as a user's Ctrl-C or a lost machine),
and whether a process still runs."""
from pathlib import Path

import pytest

from sparsecl.config import RunConfig
from sparsecl.engine import trainer as trainer_mod


def run_interrupted(config: RunConfig, run_dir: Path, at_task: int = 2) -> None:
    """Run ``config`` into ``run_dir`` and interrupt it when task ``at_task`` (0-based) starts."""
    original = trainer_mod.Trainer._train_task

    def crash(self, t, bar):
        if t == at_task:
            raise KeyboardInterrupt
        return original(self, t, bar)

    trainer_mod.Trainer._train_task = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer_mod.run(config, run_dir)
    finally:
        trainer_mod.Trainer._train_task = original


def alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting for its reaper is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
