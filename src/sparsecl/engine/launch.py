"""What a ``torchrun`` launch announces in the environment (no torch import: the CLI reads it
before deciding whether this process prints)."""
from __future__ import annotations

import os

from sparsecl import SparseCLError


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
