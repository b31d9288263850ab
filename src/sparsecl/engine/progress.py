"""Progress of a run on stderr: rich bars on a terminal, plain lines (one per epoch, and one per
tenth of a long epoch) when stderr is a file or a pipe, nothing when disabled."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LINE_EVERY_S = 30.0  # within an epoch, a line at each tenth only if this long since the last one


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunProgress:
    """Task/epoch/batch progress; every call is a cheap host-side update (no device sync)."""

    def __init__(self, n_tasks: int, enabled: bool, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        self.mode = "off" if not enabled else ("bars" if console.is_terminal else "lines")
        self.n_tasks = n_tasks
        if self.mode == "bars":
            self._p = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
            )
            self._tasks = self._p.add_task("tasks", total=n_tasks)
            self._epochs = self._p.add_task("epochs", total=1)
            self._batches = self._p.add_task("batches", total=1)
        self._t0 = self._last = time.monotonic()
        self._units_total = 0  # epochs this process will train (set at its first task)
        self._units_done = 0
        self._task = self._epoch = self._n_epochs = self._n_batches = self._batch = self._samples0 = 0
        self._epoch_t0 = self._t0

    def __enter__(self) -> "RunProgress":
        if self.mode == "bars":
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode == "bars":
            self._p.__exit__(*exc)

    def start_task(self, index: int, n_epochs: int) -> None:
        self._task, self._n_epochs, self._epoch = index, n_epochs, 0
        if not self._units_total:
            self._units_total = (self.n_tasks - index) * n_epochs
        if self.mode == "bars":
            self._p.update(self._tasks, completed=index, description=f"task {index + 1}")
            self._p.reset(self._epochs, total=n_epochs)

    def start_epoch(self, n_batches: int, samples: int = 0) -> None:
        """``samples``: the run's training samples so far (for samples/s)."""
        self._n_batches, self._batch, self._samples0 = n_batches, 0, samples
        self._epoch_t0 = time.monotonic()
        if self.mode == "bars":
            self._p.reset(self._batches, total=max(n_batches, 1))

    def batch_done(self) -> None:
        self._batch += 1
        if self.mode == "bars":
            self._p.advance(self._batches)
        elif self.mode == "lines" and self._n_batches >= 10 and self._batch % (self._n_batches // 10) == 0 \
                and self._batch < self._n_batches and time.monotonic() - self._last >= LINE_EVERY_S:
            frac = self._batch / self._n_batches
            self._line(f"{frac:.0%} of the epoch", self._units_done + frac)

    def epoch_done(self, loss: float | None = None, samples: int | None = None) -> None:
        """``loss``: the epoch's mean loss (None: no batches); ``samples``: as in :meth:`start_epoch`."""
        self._units_done += 1
        if self.mode == "bars":
            self._p.advance(self._epochs)
        elif self.mode == "lines":
            parts = ["loss " + (f"{loss:.4f}" if loss is not None else "- (no batches)")]
            seconds = time.monotonic() - self._epoch_t0
            if samples is not None and seconds > 0:
                parts.append(f"{(samples - self._samples0) / seconds:.0f} samples/s")
            self._line(", ".join(parts), self._units_done)
        self._epoch += 1

    def _line(self, what: str, units: float) -> None:
        now = time.monotonic()
        self._last = now
        left = self._units_total - units
        eta = f", ETA {_duration((now - self._t0) / units * left)}" if units > 0 and left > 0 else ""
        print(f"task {self._task + 1}/{self.n_tasks} epoch {self._epoch + 1}/{self._n_epochs}: {what}{eta}",
              file=sys.stderr, flush=True)

    def task_done(self) -> None:
        if self.mode == "bars":
            self._p.advance(self._tasks)
