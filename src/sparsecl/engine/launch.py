"""What a ``torchrun`` launch announces in the environment (no torch import: the CLI reads it
before deciding whether this process prints)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from sparsecl import SparseCLError

PARENT_ENV = "SPARSECL_SWEEP_PARENT"  # pid of the sweep that a run must not outlive
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launched_world_size() -> int:
    """World size announced by a ``torchrun`` launch (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise SparseCLError(f"WORLD_SIZE={value!r} is not an integer") from None


def process_rank() -> int:
    """This process's global rank (0 when not launched by ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the only process that prints and writes files."""
    return process_rank() == 0


def die_with_parent(parent: int | None = None) -> None:
    """In a process started by ``sparsecl sweep`` or ``tune`` (:data:`PARENT_ENV` set, or the
    parent's pid given): ask Linux for SIGTERM when the parent dies, however it dies (SIGKILL
    included), and exit at once if it is already gone (it died before the request took effect)."""
    parent = os.environ.pop(PARENT_ENV, None) if parent is None else parent
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):
        sys.exit(143)
