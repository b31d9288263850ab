"""Progress bars for tasks, epochs and batches (rich), silent when disabled."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Three stacked bars; all calls are cheap host-side updates (no device synchronisation)."""

    def __init__(self, n_tasks: int, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self._p = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True), transient=True,
        )
        self._tasks = self._p.add_task("tasks", total=n_tasks)
        self._epochs = self._p.add_task("epochs", total=1)
        self._batches = self._p.add_task("batches", total=1)

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)

    def start_task(self, index: int, n_epochs: int) -> None:
        if self.enabled:
            self._p.update(self._tasks, completed=index, description=f"task {index + 1}")
            self._p.reset(self._epochs, total=n_epochs)

    def start_epoch(self, n_batches: int) -> None:
        if self.enabled:
            self._p.reset(self._batches, total=max(n_batches, 1))

    def batch_done(self) -> None:
        if self.enabled:
            self._p.advance(self._batches)

    def epoch_done(self) -> None:
        if self.enabled:
            self._p.advance(self._epochs)

    def task_done(self) -> None:
        if self.enabled:
            self._p.advance(self._tasks)
