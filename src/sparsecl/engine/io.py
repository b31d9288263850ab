"""Atomic file writes (a reader, or a crash, never sees a half-written result, checkpoint or
export) and the run-directory lock (one run per directory at a time)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.export import build_export, default_export_path

LOCK = ".lock"
TMP_GLOB = ".*.tmp"  # what _atomic leaves behind when a process dies mid-write


def os_error(action: str, path: Path | str, e: OSError) -> SparseCLError:
    """One line for a failed file operation: disk full says so by name, a file where a folder
    should be is named, others give the OS reason."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e)).lower()
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            reason = f"not a directory ({blocking} is a file)"
    return SparseCLError(f"cannot {action} {path}: {reason}")


def _atomic(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise os_error("write", path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise os_error("write", path, e) from None
        # torch.save wraps the writer's OSError (e.g. ENOSPC) in a RuntimeError
        cause = e.__cause__ or e.__context__
        if isinstance(e, RuntimeError) and isinstance(cause, OSError):
            raise os_error("write", path, cause) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def export_run(run_dir: str | Path, fmt: str = "pt", out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the final model of ``run_dir`` with its masks in format ``fmt`` (``'pt'`` or ``'csr'``).

    Returns ``(path written, size report)``; the report also holds the file's size on disk.
    Default output: ``RUN_DIR/model-sparse.pt`` (pt) or ``RUN_DIR/model-csr.pt`` (csr).
    """
    payload, report = build_export(run_dir, fmt)
    path = Path(out) if out else default_export_path(run_dir, fmt)
    atomic_torch_save(path, payload)
    report["file"] = str(path)
    report["file_bytes"] = path.stat().st_size
    return path, report


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files of writes that a killed process never finished."""
    stale = sorted(Path(directory).glob(TMP_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held for a run's lifetime.

    The OS drops it when the process ends, however it ends (SIGKILL included), so a stale lock
    never blocks a later resume; while it is held a second run or resume of the directory fails
    at once with one line instead of silently overwriting the first run's files.
    """

    def __init__(self, run_dir: Path, *, exclusive_create: bool = False) -> None:
        """``exclusive_create``: the directory must not exist yet (a default name: unique by mkdir)."""
        self.run_dir = Path(run_dir)
        # the directory and its missing parents, made here (removed again if nothing is written)
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            if exclusive_create or not self.run_dir.is_dir():
                self.run_dir.mkdir(parents=True)
            self._fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            if exclusive_create:
                raise
            raise SparseCLError(f"cannot use {self.run_dir} as run directory: it is a file") from None
        except OSError as e:
            raise os_error("create run directory", self.run_dir, e) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise SparseCLError(f"run directory {self.run_dir} is in use by another run"
                                + (f" (pid {holder})" if holder else "") + ": wait for it or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, *, remove_if_empty: bool = False) -> None:
        """Drop the lock; ``remove_if_empty``: also the directory, if this lock made it and nothing
        else was written (a run that failed before its first file leaves no empty directory)."""
        if self._fd < 0:
            return
        if remove_if_empty and self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            (self.run_dir / LOCK).unlink()
            for p in self.created:
                if any(p.iterdir()):
                    break
                p.rmdir()
        os.close(self._fd)
        self._fd = -1
