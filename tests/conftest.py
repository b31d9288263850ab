import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    # Keep caches and default run directories out of the user's home and the repository.
    monkeypatch.setenv("SPARSECL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def extra(module: str):
    """Import an optional extra's module for a test: skipped where the extra is not installed (the
    README's core install), but a failure under ``SPARSECL_REQUIRE_EXTRAS=1`` (CI installs them)."""
    if os.environ.get("SPARSECL_REQUIRE_EXTRAS") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)
