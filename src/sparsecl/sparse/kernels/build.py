"""Build and load the C++ kernels: compiled once on the user's machine, cached, shared by processes.

The extension is compiled with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja) into
``$SPARSECL_CACHE/kernels/<hash>`` (default ``~/.cache/sparsecl/kernels/<hash>``), where the hash covers
the source, the torch and Python versions, the flags and the CPU's instruction set (``-march=native``).
A file lock makes concurrent processes (a sweep's jobs) build once; a later process imports the cached
library directly, without a compiler.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from sparsecl import SparseCLError

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "sparse_conv.cpp", CSRC / "batch_norm_relu.cpp"]
HEADERS = [CSRC / "batch_norm_relu.h"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]
INSTALL_HINT = "install a C++ compiler such as g++ (e.g. apt-get install g++) and ninja (pip install ninja)"

_loaded: ModuleType | None = None


def cache_root() -> Path:
    """Directory holding the compiled kernels (``$SPARSECL_CACHE/kernels``)."""
    base = os.environ.get("SPARSECL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsecl")
    return Path(base) / "kernels"


def _cpu_flags() -> str:
    # -march=native code only runs on the instruction set it was built for.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_hash() -> str:
    """Key of a build: source, torch and Python versions, flags, CPU instruction set."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.read_bytes())
    for part in (torch.__version__, sys.version.split()[0], " ".join(CFLAGS + LDFLAGS), platform.machine(), _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _module_name(key: str) -> str:
    return f"sparsecl_kernels_{key}"


def _import_built(name: str, directory: Path) -> ModuleType | None:
    so = directory / f"{name}.so"
    if not so.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:      # a truncated library from an interrupted build: build again
        return None
    return module


def _find_tools() -> None:
    """Fail with one line naming what to install; put a pip-installed ninja on PATH if needed."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise SparseCLError(f"sparse kernels: no C++ compiler ({compiler!r} not found); {INSTALL_HINT}")
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package ships the binary outside PATH when the venv is not activated
        except ImportError:
            raise SparseCLError(f"sparse kernels: ninja not found; {INSTALL_HINT}") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _compile(name: str, directory: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    _find_tools()
    try:
        return load(name=name, sources=[str(p) for p in SOURCES], build_directory=str(directory), extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS, verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
        log = directory / "build.log"
        log.write_text(str(exc))
        raise SparseCLError(f"sparse kernels: the C++ build failed (compiler output in {log}); {INSTALL_HINT}") from None


def load_extension() -> ModuleType:
    """The compiled kernel module, built on first use and cached (see the module docstring).

    Raises:
        SparseCLError: no compiler or ninja, or the build failed (one line naming what to install).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    key = build_hash()
    name = _module_name(key)
    directory = cache_root() / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SparseCLError(f"sparse kernels: cannot create the cache directory {directory}: {exc.strerror}") from None
    with open(directory.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            module = _import_built(name, directory) or _compile(name, directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _loaded = module
    return module


def kernels_available() -> bool:
    """True when the kernels load (building them if needed), False when they cannot be built."""
    try:
        load_extension()
    except SparseCLError:
        return False
    return True
