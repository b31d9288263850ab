"""Atomic file writes: a reader (or a crash) never sees a half-written result, checkpoint or export."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsecl.sparse.export import build_export, default_export_path


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
