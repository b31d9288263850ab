"""Continual benchmarks: name -> :class:`TaskStream`, with the field's protocol defaults.

``load_benchmark`` reads (and if needed downloads) a dataset, orders its classes, remaps labels
so task ``t`` owns the contiguous range ``[t*k, (t+1)*k)`` (remapped label = position in the
class order) and splits train/test by task. Tensors stay on the CPU; the engine moves them.

Class orders: ``None`` = the dataset's label order (the protocol), ``"seed:N"`` =
``numpy.random.default_rng(N).permutation``, or an explicit comma list of raw labels.
For ``cifar100-superclass`` the order refers to the 20 superclasses (= tasks); classes inside
a task are its fine labels in increasing order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sparsecl import SparseCLError
from sparsecl.data import download as dl
from sparsecl.data import readers
from sparsecl.data.readers import ImageData
from sparsecl.data.stream import AugmentSpec, Split, Task, TaskStream
from sparsecl.registry import Registry

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
TINYIMG_MEAN, TINYIMG_STD = (0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)
# Pixel mean/std of the embedded digits train split (x/255), computed once with
# numpy from src/sparsecl/data/embedded/digits.npz.
DIGITS_MEAN, DIGITS_STD = (0.3051,), (0.3757,)
DIGITS_FILE = Path(__file__).parent / "embedded" / "digits.npz"


@dataclass(frozen=True)
class LoadRequest:
    """The arguments of :func:`load_benchmark`, resolved (``data_dir`` is a Path)."""

    name: str
    data_dir: Path
    class_order: str | Sequence[int] | None
    n_tasks: int | None
    root: Path | None
    image_size: int | None
    download: bool


@dataclass(frozen=True)
class ProtocolShape:
    """What a benchmark's protocol looks like without its data (for FLOP planning): the input
    shape, classes, training examples per task (dataset class order) and the default backbone."""

    input_shape: tuple[int, int, int]
    n_classes: int
    train_sizes: tuple[int, ...]
    default_backbone: str


@dataclass(frozen=True)
class BenchmarkInfo:
    """A registered benchmark: a one-line description and the function that builds it."""

    description: str
    build: Callable[[LoadRequest], TaskStream]
    accepts: frozenset[str] = frozenset()  # optional arguments besides class_order/n_tasks ("root", "image_size")
    shape: ProtocolShape | None = None  # the protocol's shape, for benchmarks with fixed published data


BENCHMARKS: Registry[BenchmarkInfo] = Registry("benchmark")


def benchmark_names() -> dict[str, str]:
    """``{name: one-line description}`` of every registered benchmark, sorted by name."""
    return {name: info.description for name, info in BENCHMARKS.items()}


def default_data_dir() -> Path:
    """``$SPARSECL_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("SPARSECL_DATA") or "data")


def load_benchmark(name: str, data_dir: str | Path | None = None, *, class_order: str | None = None,
                   n_tasks: int | None = None, root: str | Path | None = None, image_size: int | None = None,
                   download: bool = True) -> TaskStream:
    """Build the continual benchmark ``name`` (see :func:`benchmark_names`).

    Args:
        data_dir: where datasets live / are downloaded (default ``$SPARSECL_DATA`` or ``./data``).
        class_order: ``None`` (dataset order), ``"seed:N"`` or a comma list of raw labels.
        n_tasks: number of tasks (must divide the number of classes); ``None`` = the protocol's.
        root: the image folder of the ``image-folder`` benchmark.
        image_size: resize images to this square size (``image-folder``, ``miniimagenet``).
        download: allow downloading missing standard datasets.

    Raises:
        SparseCLError: unknown name, invalid option, or missing/corrupt data (one line)."""
    info = BENCHMARKS.get(name)
    for arg, value in (("root", root), ("image_size", image_size)):
        if value is not None and arg not in info.accepts:
            raise SparseCLError(f"benchmark {name!r} does not take {arg} (only image-folder"
                                f"{' and miniimagenet' if arg == 'image_size' else ''} do)")
    if n_tasks is not None and (not isinstance(n_tasks, int) or n_tasks < 1):
        raise SparseCLError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if image_size is not None and (not isinstance(image_size, int) or not 1 <= image_size <= 1024):
        raise SparseCLError(f"image_size must be an integer in 1..1024, got {image_size!r}")
    # Absolute paths, so that "put the files in ..." messages are unambiguous.
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    req = LoadRequest(name, base.absolute(), class_order, n_tasks,
                      Path(root).expanduser().absolute() if root is not None else None, image_size, download)
    return info.build(req)


# --------------------------------------------------------------------------------------------
# Class orders and task splitting
# --------------------------------------------------------------------------------------------


def parse_class_order(spec: str | Sequence[int] | None, n_classes: int) -> list[int]:
    """Raw labels in task order: ``None`` -> ``0..n-1``; ``"seed:N"`` -> a seeded permutation;
    ``"3,1,..."`` (or a list) -> exactly that, which must be a permutation of ``0..n-1``."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return list(range(n_classes))
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("seed:"):
            try:
                seed = int(s[5:])
            except ValueError:
                raise SparseCLError(f"class_order {spec!r}: expected seed:<integer>") from None
            if seed < 0:
                raise SparseCLError(f"class_order {spec!r}: the seed must be >= 0")
            return np.random.default_rng(seed).permutation(n_classes).tolist()
        try:
            order = [int(t) for t in s.split(",")]
        except ValueError:
            raise SparseCLError(f"class_order {spec!r}: expected None, seed:N or a comma-separated list of labels") from None
    else:
        order = [int(t) for t in spec]
    if sorted(order) != list(range(n_classes)):
        raise SparseCLError(f"class_order must list every label 0..{n_classes - 1} exactly once "
                            f"(got {len(order)} labels)")
    return order


def _check_tasks(name: str, n_classes: int, n_tasks: int) -> int:
    if n_classes % n_tasks:
        raise SparseCLError(f"{name}: {n_classes} classes cannot be split evenly into {n_tasks} tasks")
    return n_classes // n_tasks


def make_stream(name: str, data: ImageData, order: list[int], n_tasks: int, augment: AugmentSpec,
                backbone: str) -> TaskStream:
    """Split ``data`` into ``n_tasks`` tasks following ``order`` (raw labels), remapping labels."""
    n = len(order)
    k = _check_tasks(name, n, n_tasks)
    lut = np.empty(n, dtype=np.int64)
    lut[np.asarray(order, dtype=np.int64)] = np.arange(n)
    splits = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if y.size and (y.min() < 0 or y.max() >= n):
            raise SparseCLError(f"{name}: {split} labels outside 0..{n - 1}")
        # A stable sort by remapped label groups each task's samples contiguously while keeping
        # the file order within a class; one slice per task then avoids n_tasks boolean scans.
        yr = lut[y]
        perm = np.argsort(yr, kind="stable")
        bounds = np.searchsorted(yr[perm], np.arange(0, n + 1, k))
        splits[split] = (x, yr, perm, bounds)
    tasks = []
    for t in range(n_tasks):
        parts = []
        for split in ("train", "test"):
            x, yr, perm, bounds = splits[split]
            idx = np.sort(perm[bounds[t]:bounds[t + 1]])  # original order within the task
            parts.append(Split(torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(yr[idx])))
        tasks.append(Task(t, list(range(t * k, (t + 1) * k)), parts[0], parts[1]))
    c, h, w = data.x_train.shape[1:]
    return TaskStream(name=name, tasks=tasks, input_shape=(int(c), int(h), int(w)), n_classes=n, augment=augment,
                      default_backbone=backbone, class_names=[data.class_names[r] for r in order],
                      class_order=[int(r) for r in order])


def _simple(req: LoadRequest, data: ImageData, n_classes: int, default_tasks: int, augment: AugmentSpec,
            backbone: str) -> TaskStream:
    order = parse_class_order(req.class_order, n_classes)
    n_tasks = req.n_tasks or default_tasks
    _check_tasks(req.name, n_classes, n_tasks)
    return make_stream(req.name, data, order, n_tasks, augment, backbone)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 ``[N, C, H, W]`` images scaled to [0, 1] (via histograms,
    so no float copy of the dataset is made)."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for ch in range(x.shape[1]):
        hist = np.bincount(x[:, ch].reshape(-1), minlength=256).astype(np.float64)
        total = hist.sum()
        m = float((hist * values).sum() / total)
        var = float((hist * (values - m) ** 2).sum() / total)
        means.append(round(m, 4))
        stds.append(round(max(var, 1e-12) ** 0.5, 4))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def _register(name: str, description: str, accepts: Sequence[str] = (), shape: ProtocolShape | None = None) -> Callable:
    def deco(fn: Callable[[LoadRequest], TaskStream]) -> Callable[[LoadRequest], TaskStream]:
        BENCHMARKS.add(name, BenchmarkInfo(description, fn, frozenset(accepts), shape))
        return fn

    return deco


@_register("digits", "embedded 8x8 UCI digits, 5 tasks x 2, offline default")
def _digits(req: LoadRequest) -> TaskStream:
    with np.load(DIGITS_FILE, allow_pickle=False) as z:
        data = ImageData(z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64),
                         class_names=[str(i) for i in range(10)])
    return _simple(req, data, 10, 5, AugmentSpec(mean=DIGITS_MEAN, std=DIGITS_STD), "mlp")


# MNIST's training examples per digit 0..9, paired by task (0-1, 2-3, ...).
_MNIST_TASKS = (5923 + 6742, 5958 + 6131, 5842 + 5421, 5918 + 6265, 5851 + 5949)
_CIFAR10_SHAPE = ProtocolShape((3, 32, 32), 10, (10000,) * 5, "resnet18")


@_register("seq-mnist", "MNIST 28x28, 5 tasks x 2, no augmentation (Mammoth)",
           shape=ProtocolShape((1, 28, 28), 10, _MNIST_TASKS, "mlp"))
def _seq_mnist(req: LoadRequest) -> TaskStream:
    data = readers.read_mnist(dl.ensure_mnist(req.data_dir, req.download))
    return _simple(req, data, 10, 5, AugmentSpec(), "mlp")


@_register("perm-mnist", "permuted MNIST: T tasks (default 20) x 10 classes, one pixel permutation each, Task-IL")
def _perm_mnist(req: LoadRequest) -> TaskStream:
    """Every task is the whole of MNIST with its own fixed pixel permutation (all tasks permuted).

    The permutations come from ``numpy.random.default_rng(N)`` with ``class_order="seed:N"``
    (``N = 0`` by default), so a run's stream is fixed by that seed alone. Task ``t`` owns the
    labels ``10t .. 10t+9`` (digit ``d`` -> ``10t + d``), which the per-task heads need; the same
    digit in two tasks is two classes, so the benchmark is Task-IL only.
    """
    spec = req.class_order
    seed = 0
    if spec is not None and str(spec).strip():
        s = str(spec).strip()
        try:
            if not s.startswith("seed:"):
                raise ValueError
            seed = int(s[5:])
        except ValueError:
            raise SparseCLError(f"perm-mnist: class_order {spec!r}: only seed:N (the permutations' seed) is accepted") from None
        if seed < 0:
            raise SparseCLError(f"perm-mnist: class_order {spec!r}: the seed must be >= 0")
    n_tasks = req.n_tasks or 20
    data = readers.read_mnist(dl.ensure_mnist(req.data_dir, req.download))
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n_tasks):
        perm = rng.permutation(28 * 28)
        parts = []
        for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
            xp = np.ascontiguousarray(x.reshape(len(x), -1)[:, perm].reshape(x.shape))
            parts.append(Split(torch.from_numpy(xp), torch.from_numpy(y.astype(np.int64) + 10 * t)))
        tasks.append(Task(t, list(range(10 * t, 10 * t + 10)), parts[0], parts[1]))
    return TaskStream(name=req.name, tasks=tasks, input_shape=(1, 28, 28), n_classes=10 * n_tasks, augment=AugmentSpec(),
                      default_backbone="mlp", class_names=[f"t{t}:{data.class_names[d]}" for t in range(n_tasks) for d in range(10)],
                      class_order=[d for _ in range(n_tasks) for d in range(10)], settings=frozenset({"task-il"}))


CIFAR10_AUG = AugmentSpec(crop_padding=4, hflip=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
CIFAR100_AUG = AugmentSpec(crop_padding=4, hflip=True, mean=CIFAR100_MEAN, std=CIFAR100_STD)


@_register("seq-cifar10", "CIFAR-10 pickles, 5 tasks x 2, crop+flip (SparCL/DER)", shape=_CIFAR10_SHAPE)
def _seq_cifar10(req: LoadRequest) -> TaskStream:
    data = readers.read_cifar10(dl.ensure_cifar10(req.data_dir, req.download))
    return _simple(req, data, 10, 5, CIFAR10_AUG, "resnet18")


@_register("seq-cifar10-jpeg", "CIFAR-10 JPEG folder <data_dir>/cifar10-jpeg, 5 x 2", shape=_CIFAR10_SHAPE)
def _seq_cifar10_jpeg(req: LoadRequest) -> TaskStream:
    root = req.data_dir / "cifar10-jpeg"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise SparseCLError(f"CIFAR-10 JPEG folder not found: put train/<class>/*.jpg and test/<class>/*.jpg "
                            f"under {root} (class folders named {', '.join(readers.CIFAR10_CLASSES[:3])}, ...)")
    data = readers.read_image_folder(root)
    if data.class_names != readers.CIFAR10_CLASSES:
        raise SparseCLError(f"{root}: class folders {data.class_names} are not CIFAR-10's "
                            f"({', '.join(readers.CIFAR10_CLASSES)}); use the image-folder benchmark instead")
    if data.x_train.shape[1:] != (3, 32, 32):
        raise SparseCLError(f"{root}: images are {data.x_train.shape[3]}x{data.x_train.shape[2]}, expected 32x32")
    return _simple(req, data, 10, 5, CIFAR10_AUG, "resnet18")


def _cifar100(req: LoadRequest, default_tasks: int) -> TaskStream:
    data = readers.read_cifar100(dl.ensure_cifar100(req.data_dir, req.download))
    return _simple(req, data, 100, default_tasks, CIFAR100_AUG, "resnet18")


@_register("seq-cifar100", "CIFAR-100, 10 tasks x 10, crop+flip")
def _seq_cifar100(req: LoadRequest) -> TaskStream:
    return _cifar100(req, 10)


@_register("cifar100-5", "CIFAR-100, 5 tasks x 20, crop+flip")
def _cifar100_5(req: LoadRequest) -> TaskStream:
    return _cifar100(req, 5)


@_register("cifar100-10", "CIFAR-100, 10 tasks x 10, crop+flip")
def _cifar100_10(req: LoadRequest) -> TaskStream:
    return _cifar100(req, 10)


@_register("cifar100-20", "CIFAR-100, 20 tasks x 5, crop+flip")
def _cifar100_20(req: LoadRequest) -> TaskStream:
    return _cifar100(req, 20)


def superclass_order(fine: np.ndarray, coarse: np.ndarray, coarse_order: list[int]) -> list[int]:
    """Fine labels grouped by superclass (in ``coarse_order``), increasing within a group."""
    n_fine = int(fine.max()) + 1
    parent = np.full(n_fine, -1, dtype=np.int64)
    parent[fine] = coarse
    # Every fine label must belong to exactly one superclass for tasks to be superclasses.
    if (parent < 0).any() or not np.array_equal(parent[fine], coarse):
        raise SparseCLError("CIFAR-100 coarse labels are inconsistent with the fine labels")
    return [int(f) for c in coarse_order for f in np.flatnonzero(parent == c)]


@_register("cifar100-superclass", "CIFAR-100, 20 tasks = superclasses x 5, crop+flip")
def _cifar100_superclass(req: LoadRequest) -> TaskStream:
    if req.n_tasks not in (None, 20):
        raise SparseCLError(f"cifar100-superclass has exactly 20 tasks (one per superclass), not {req.n_tasks}")
    data = readers.read_cifar100(dl.ensure_cifar100(req.data_dir, req.download))
    assert data.coarse_train is not None
    coarse_order = parse_class_order(req.class_order, 20)  # orders the superclasses
    order = superclass_order(data.y_train, data.coarse_train, coarse_order)
    return make_stream(req.name, data, order, 20, CIFAR100_AUG, "resnet18")


@_register("seq-tinyimg", "Tiny-ImageNet 64x64, 10 tasks x 20, crop+flip (Mammoth)",
           shape=ProtocolShape((3, 64, 64), 200, (10000,) * 10, "resnet18"))
def _seq_tinyimg(req: LoadRequest) -> TaskStream:
    data = readers.read_tiny_imagenet(dl.ensure_tiny_imagenet(req.data_dir, req.download))
    aug = AugmentSpec(crop_padding=4, hflip=True, mean=TINYIMG_MEAN, std=TINYIMG_STD)
    return _simple(req, data, len(data.class_names), 10, aug, "resnet18")


def _folder_stream(req: LoadRequest, root: Path, size: int | None, default_tasks: int) -> TaskStream:
    data = readers.read_image_folder(root, size=size)
    mean, std = channel_stats(data.x_train)
    aug = AugmentSpec(crop_padding=data.x_train.shape[2] // 8, hflip=True, mean=mean, std=std)
    return _simple(req, data, len(data.class_names), default_tasks, aug, "resnet18")


@_register("image-folder", "root/{train,test}/<class>/*, 5 tasks, own mean/std", accepts=("root", "image_size"))
def _image_folder(req: LoadRequest) -> TaskStream:
    if req.root is None:
        raise SparseCLError("the image-folder benchmark needs root (--data-root) pointing at a folder "
                            "with train/<class>/* and test/<class>/*")
    return _folder_stream(req, req.root, req.image_size, 5)


@_register("miniimagenet", "<data_dir>/miniimagenet folder, 84x84, 10 or 20 tasks", accepts=("image_size",))
def _miniimagenet(req: LoadRequest) -> TaskStream:
    root = req.data_dir / "miniimagenet"
    if not (root / "train").is_dir():
        raise SparseCLError(f"miniImageNet not found: put its images as train/<class>/* and test/<class>/* under "
                            f"{root} (it has no official archive to download)")
    return _folder_stream(req, root, req.image_size or 84, 10)


__all__ = [
    "load_benchmark", "benchmark_names", "BENCHMARKS", "BenchmarkInfo", "LoadRequest", "ProtocolShape", "parse_class_order",
    "make_stream", "channel_stats", "superclass_order", "default_data_dir",
]
