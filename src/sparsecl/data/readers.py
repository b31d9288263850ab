"""Readers for the on-disk dataset formats sparsecl understands, without torchvision.

* MNIST IDX files (plain or ``.gz``), validated structurally (magic number, dimensions, length).
* CIFAR-10/100 "python version" pickles, unpickled with a restricted unpickler that can only
  rebuild numpy arrays, and only after the file's md5 matched the published one (or when the
  caller says the user pointed at the file explicitly, ``trusted=True``).
* Image folders ``root/{train,test}/<class>/*`` and Tiny-ImageNet's layout, decoded with Pillow
  under a pixel-count limit, once, into a uint8 ``.npz`` cache keyed by the files' names, sizes
  and mtimes (so an edited folder is re-decoded and an unchanged one is loaded in a second).

Every reader returns numpy arrays (images uint8 ``[N, C, H, W]``, labels int64 ``[N]``); any
problem with a file is a :class:`~sparsecl.SparseCLError` whose single line names the file.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import stat
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from sparsecl import SparseCLError

# --------------------------------------------------------------------------------------------
# Common container
# --------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """A dataset as arrays: uint8 images ``[N, C, H, W]``, int64 labels, class names.

    ``coarse_*`` are CIFAR-100's superclass labels (``None`` elsewhere)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    coarse_train: np.ndarray | None = None
    coarse_test: np.ndarray | None = None
    coarse_names: list[str] | None = None


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip stream
        raise SparseCLError(f"cannot read {path}: corrupt or truncated file ({e}); delete it and download it again") from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or ``.gz``) into a uint8 array.

    Validates the magic number (type must be unsigned byte; ``expected_magic`` if given),
    that the dimensions are positive and that the payload length equals their product."""
    path = Path(path)
    data = _read_maybe_gz(path)
    if len(data) < 4:
        raise SparseCLError(f"{path}: not an IDX file (only {len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08:
        raise SparseCLError(f"{path}: not an unsigned-byte IDX file (magic number 0x{magic:08x}); is it the right file?")
    if expected_magic is not None and magic != expected_magic:
        raise SparseCLError(f"{path}: wrong IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x}); "
                            "images and labels files swapped or corrupt?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise SparseCLError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if any(d == 0 for d in dims):
        raise SparseCLError(f"{path}: IDX dimensions {dims} contain a zero")
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise SparseCLError(f"{path}: IDX payload has {len(data) - header} bytes, dimensions {dims} need {expected}; "
                            "the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` inside ``directory`` (plain preferred), or ``None``."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def read_mnist(directory: str | Path) -> ImageData:
    """Read the four MNIST IDX files from ``directory`` -> images ``[N, 1, 28, 28]``."""
    directory = Path(directory)
    paths = {}
    for key, stem in MNIST_FILES.items():
        p = find_idx_file(directory, stem)
        if p is None:
            raise SparseCLError(f"missing {directory / stem}(.gz)")
        paths[key] = p
    out = {}
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_images"], IDX_IMAGES_MAGIC)
        y = read_idx(paths[f"{split}_labels"], IDX_LABELS_MAGIC)
        if x.shape[0] != y.shape[0]:
            raise SparseCLError(f"{paths[f'{split}_labels']}: {y.shape[0]} labels for {x.shape[0]} images "
                                f"in {paths[f'{split}_images']}")
        if y.max(initial=0) > 9:
            raise SparseCLError(f"{paths[f'{split}_labels']}: label {int(y.max())} out of range 0..9")
        out[split] = (x[:, None], y.astype(np.int64))
    return ImageData(*out["train"], *out["test"], class_names=[str(i) for i in range(10)])


# --------------------------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------------------------

# Published md5 of each file of the "python version" archives (as torchvision lists them).
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may reference: what numpy needs to rebuild arrays.

    Python-2 era pickles name ``numpy.core.multiarray``; numpy >= 2 writes ``numpy._core``.
    ``_codecs.encode`` is how protocol-2 pickles written by Python 3 carry raw bytes."""
    import codecs

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    if hasattr(numeric, "_frombuffer"):  # protocol-5 array pickles
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array-rebuilding globals; anything else fails."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def load_cifar_pickle(path: str | Path, *, md5: str | None = None, trusted: bool = False) -> dict[str, Any]:
    """Unpickle one CIFAR python-format file into a dict with ``str`` keys.

    The file is unpickled only if its md5 equals ``md5`` (the published checksum) or the caller
    passes ``trusted=True`` (the user pointed at this file explicitly). Even then, a restricted
    unpickler allows only numpy's array-rebuilding globals, so the file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise SparseCLError(f"missing {path}")
    if not trusted:
        if md5 is None:
            raise SparseCLError(f"{path}: no published checksum to verify this pickle against; "
                                "pass the file explicitly to trust it")
        actual = md5sum(path)
        if actual != md5:
            raise SparseCLError(f"{path}: md5 {actual} does not match the published {md5}; refusing to unpickle it "
                                "(delete it so it is downloaded again, or point at the file explicitly if you trust it)")
    try:
        with open(path, "rb") as f:
            # latin1 decodes Python-2 str payloads byte for byte, as numpy arrays need.
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, MemoryError, UnicodeDecodeError) as e:
        raise SparseCLError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise SparseCLError(f"{path}: not a valid CIFAR pickle (top-level {type(obj).__name__}, expected dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_images(path: Path, d: dict[str, Any]) -> np.ndarray:
    data = d.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SparseCLError(f"{path}: 'data' must be a uint8 array [N, 3072], found {desc}")
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B), row by row: exactly [3, 32, 32].
    return data.reshape(-1, 3, 32, 32)


def _cifar_labels(path: Path, d: dict[str, Any], key: str, n: int, n_classes: int) -> np.ndarray:
    if key not in d:
        raise SparseCLError(f"{path}: missing key {key!r}")
    try:
        y = np.asarray(d[key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise SparseCLError(f"{path}: {key!r} is not a list of integers") from None
    if y.shape[0] != n:
        raise SparseCLError(f"{path}: {y.shape[0]} {key} for {n} images")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise SparseCLError(f"{path}: {key} outside 0..{n_classes - 1}")
    return y


def _names(path: Path, d: dict[str, Any], key: str, n: int) -> list[str] | None:
    names = d.get(key)
    if not isinstance(names, list) or len(names) != n:
        return None
    return [s.decode("latin1") if isinstance(s, bytes) else str(s) for s in names]


def read_cifar10(directory: str | Path, *, trusted: bool = False) -> ImageData:
    """Read ``cifar-10-batches-py`` (data_batch_1..5, test_batch, optional batches.meta)."""
    directory = Path(directory)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = directory / name
        d = load_cifar_pickle(path, md5=CIFAR10_MD5[name], trusted=trusted)
        x = _cifar_images(path, d)
        xs.append(x)
        ys.append(_cifar_labels(path, d, "labels", x.shape[0], 10))
    names = CIFAR10_CLASSES
    meta = directory / "batches.meta"
    if meta.is_file():
        names = _names(meta, load_cifar_pickle(meta, md5=CIFAR10_MD5["batches.meta"], trusted=trusted),
                       "label_names", 10) or names
    return ImageData(np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5], class_names=list(names))


def read_cifar100(directory: str | Path, *, trusted: bool = False) -> ImageData:
    """Read ``cifar-100-python`` (train, test, optional meta) with fine and coarse labels."""
    directory = Path(directory)
    parts = {}
    for name in ("train", "test"):
        path = directory / name
        d = load_cifar_pickle(path, md5=CIFAR100_MD5[name], trusted=trusted)
        x = _cifar_images(path, d)
        parts[name] = (x, _cifar_labels(path, d, "fine_labels", x.shape[0], 100),
                       _cifar_labels(path, d, "coarse_labels", x.shape[0], 20))
    fine = [f"class_{i}" for i in range(100)]
    coarse = [f"superclass_{i}" for i in range(20)]
    meta = directory / "meta"
    if meta.is_file():
        m = load_cifar_pickle(meta, md5=CIFAR100_MD5["meta"], trusted=trusted)
        fine = _names(meta, m, "fine_label_names", 100) or fine
        coarse = _names(meta, m, "coarse_label_names", 20) or coarse
    (xtr, ytr, ctr), (xte, yte, cte) = parts["train"], parts["test"]
    return ImageData(xtr, ytr, xte, yte, class_names=fine, coarse_train=ctr, coarse_test=cte, coarse_names=coarse)


# --------------------------------------------------------------------------------------------
# Image folders (decoded once, cached)
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
DEFAULT_MAX_PIXELS = 4096 * 4096  # per image; far above any benchmark, far below a decompression bomb
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$SPARSECL_CACHE`` or ``~/.cache/sparsecl``."""
    env = os.environ.get("SPARSECL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsecl"


def decode_image(path: str | Path, size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image with Pillow to RGB uint8 ``[3, H, W]``, optionally resized to ``size``².

    The pixel count is checked from the header before decoding; any decoding problem
    (truncated, not an image, too large) is a SparseCLError naming the file."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise SparseCLError(f"{path}: image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
            img.load()  # forces a full decode here, so truncation surfaces as an error now
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except SparseCLError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError for truncated files, UnidentifiedImageError (an OSError) for non-images.
        raise SparseCLError(f"{path}: cannot decode image ({e})") from None
    return arr.transpose(2, 0, 1)


def _decode_all(paths: Sequence[str | Path], size: int | None, max_pixels: int, workers: int | None) -> np.ndarray:
    """Decode ``paths`` into one uint8 ``[N, 3, H, W]`` array; all must share one size."""
    if not paths:
        return np.zeros((0, 3, size or 1, size or 1), dtype=np.uint8)
    first = decode_image(paths[0], size, max_pixels)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            img = decode_image(paths[i], size, max_pixels)
            if img.shape != first.shape:
                raise SparseCLError(f"{paths[i]}: image is {img.shape[2]}x{img.shape[1]} but {paths[0]} is "
                                    f"{first.shape[2]}x{first.shape[1]}; pass an image size to resize them all")
            out[i] = img

    # Pillow releases the GIL while decoding, so threads scale; chunks keep the overhead low.
    workers = workers or min(16, os.cpu_count() or 1)
    chunk = max(64, (len(paths) + 4 * workers - 1) // (4 * workers))
    bounds = [(lo, min(lo + chunk, len(paths))) for lo in range(1, len(paths), chunk)]
    if workers <= 1 or len(bounds) <= 1:
        for lo, hi in bounds:
            work(lo, hi)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for fut in [pool.submit(work, lo, hi) for lo, hi in bounds]:
                fut.result()  # re-raises the first worker error (a SparseCLError naming the file)
    return out


class ImageFile(NamedTuple):
    """One image of a folder dataset: path, label and the stat fields the cache key uses."""

    path: str
    label: int
    size: int
    mtime_ns: int


def _fingerprint(root: Path, items: dict[str, list[ImageFile]], size: int | None, extra: str) -> str:
    """Hash of absolute root, every file (relative name, size, mtime, label) and the resize."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{root}|{size}|{extra}".encode())
    cut = len(str(root)) + 1
    for split in sorted(items):
        h.update(f"|{split}".encode())
        # One joined string per split: hashing 60k small updates one by one costs more than the stats.
        h.update("|".join(f"{f.path[cut:]}:{f.size}:{f.mtime_ns}:{f.label}" for f in items[split]).encode())
    return h.hexdigest()[:32]


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed npz next to ``path`` and rename it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # damaged cache (BadZipFile, truncated member, ...): decode again, it is only a cache
        return None


def decode_cached(root: Path, items: dict[str, list[ImageFile]], class_names: list[str], *,
                  size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                  kind: str = "folder") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """Decode ``{split: [ImageFile, ...]}`` once into a cache file; later calls load it.

    Returns ``({split: (x, y)}, hit)`` where ``hit`` says whether the cache was used."""
    root = root.resolve()
    key = _fingerprint(root, items, size, kind + "|" + "\x1f".join(class_names))
    cpath = cache_dir() / f"{kind}-{root.name}-{key}.npz"
    cached = _load_cache(cpath) if cpath.is_file() else None
    if cached is not None and all(f"x_{s}" in cached and f"y_{s}" in cached for s in items):
        return {s: (cached[f"x_{s}"], cached[f"y_{s}"]) for s in items}, True
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape = None
    for split, pairs in items.items():
        x = _decode_all([f.path for f in pairs], size, max_pixels, workers)
        if shape is not None and len(x) and x.shape[1:] != shape:
            raise SparseCLError(f"{root}: {split} images are {x.shape[3]}x{x.shape[2]} but the others are "
                                f"{shape[2]}x{shape[1]}; pass an image size to resize them all")
        shape = x.shape[1:] if len(x) else shape
        out[split] = (x, np.asarray([f.label for f in pairs], dtype=np.int64))
    try:
        _atomic_savez(cpath, **{f"{k}_{s}": v for s, xy in out.items() for k, v in zip("xy", xy)})
    except OSError:
        pass  # a read-only cache dir costs speed, not correctness
    return out, False


def _scan_images(directory: Path, label: int) -> list[ImageFile]:
    """Image files directly inside ``directory``, sorted by name (``os.scandir``: one stat each)."""
    out = []
    try:
        with os.scandir(directory) as it:
            for e in it:
                dot = e.name.rfind(".")
                if dot <= 0 or e.name[dot:].lower() not in IMAGE_EXTENSIONS:  # also skips hidden files
                    continue
                st = e.stat()
                if stat.S_ISREG(st.st_mode):
                    out.append(ImageFile(e.path, label, st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SparseCLError(f"{directory}: cannot list images ({e})") from None
    out.sort(key=lambda f: f.path)
    return out


def read_image_folder(root: str | Path, *, size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                      workers: int | None = None) -> ImageData:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (``val`` if there is no ``test``).

    Classes are the sorted directory names of ``train``; ``test`` may not introduce new ones.
    Images are decoded to RGB (optionally resized to ``size``×``size``) and cached."""
    root = Path(root).expanduser().resolve()  # absolute: part of the cache key and of error messages
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise SparseCLError(f"{root}: expected an image folder with train/<class>/* and test/<class>/* subfolders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SparseCLError(f"{train_dir}: no class subfolders")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in index and not p.name.startswith("."))
    if extra:
        raise SparseCLError(f"{test_dir}: classes {', '.join(extra[:5])} do not exist in {train_dir}")
    items: dict[str, list[ImageFile]] = {"train": [], "test": []}
    for split, base in (("train", train_dir), ("test", test_dir)):
        for c in classes:
            found = _scan_images(base / c, index[c])
            if split == "train" and not found:
                raise SparseCLError(f"{base / c}: class folder has no images "
                                    f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
            items[split] += found
        if not items[split]:
            raise SparseCLError(f"{base}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    data, _ = decode_cached(root, items, classes, size=size, max_pixels=max_pixels, workers=workers)
    return ImageData(*data["train"], *data["test"], class_names=classes)


def read_tiny_imagenet(root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       workers: int | None = None) -> ImageData:
    """Read ``tiny-imagenet-200``: train/<wnid>/images/*.JPEG and val/images + val_annotations.txt.

    Classes are the sorted wnids; the labelled ``val`` split is the test split (as is usual,
    the official test split has no labels). Images are RGB 64×64, cached like image folders."""
    root = Path(root).expanduser().resolve()  # absolute: part of the cache key and of error messages
    train_dir, val_dir = root / "train", root / "val"
    ann = val_dir / "val_annotations.txt"
    if not train_dir.is_dir() or not ann.is_file():
        raise SparseCLError(f"{root}: expected tiny-imagenet-200 layout (train/<wnid>/images/*.JPEG, val/val_annotations.txt)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    train = []
    for c in classes:
        found = _scan_images(train_dir / c / "images", index[c])
        if not found:
            raise SparseCLError(f"{train_dir / c / 'images'}: no images found")
        train += found
    test = []
    for lineno, line in enumerate(ann.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise SparseCLError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a known wnid, got {line[:60]!r}")
        p = val_dir / "images" / fields[0]
        try:
            st = p.stat()
        except OSError:
            raise SparseCLError(f"{ann}:{lineno}: {p} does not exist") from None
        test.append(ImageFile(str(p), index[fields[1]], st.st_size, st.st_mtime_ns))
    names = list(classes)
    words = root / "words.txt"
    if words.is_file():  # wnid -> human-readable name, when the file is there
        table = dict(line.split("\t", 1) for line in words.read_text(errors="replace").splitlines() if "\t" in line)
        names = [table.get(c, c).split(",")[0].strip() or c for c in classes]
    data, _ = decode_cached(root, {"train": train, "test": test}, classes, size=64, max_pixels=max_pixels,
                            workers=workers, kind="tinyimg")
    return ImageData(*data["train"], *data["test"], class_names=names)


__all__ = [
    "ImageData", "ImageFile", "md5sum", "read_idx", "read_mnist", "find_idx_file", "load_cifar_pickle", "read_cifar10",
    "read_cifar100", "decode_image", "decode_cached", "read_image_folder", "read_tiny_imagenet", "cache_dir",
    "CIFAR10_MD5", "CIFAR100_MD5", "CIFAR10_CLASSES", "MNIST_FILES", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC",
]
