"""Fetching the standard dataset archives (urllib only), checksum-verified and safely extracted.

Every ``ensure_*`` function returns the directory the matching reader wants, downloading into
``data_dir`` only when the data is not there yet. Downloads stream into a temporary file next
to the destination, are md5-checked against the published checksum and only then renamed into
place, so an interrupted or tampered download never looks like data. Archives are extracted
member by member after rejecting absolute paths, ``..`` components, links and special files.

Without network (or with ``download=False``) a missing dataset is one SparseCLError line saying
what is missing, where exactly to put it and where to get it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sparsecl import SparseCLError
from sparsecl.data.readers import CIFAR10_MD5, CIFAR100_MD5, MNIST_FILES, find_idx_file, md5sum


@dataclass(frozen=True)
class Resource:
    """A downloadable file: candidate URLs (mirrors, tried in order), file name, published md5."""

    urls: tuple[str, ...]
    filename: str
    md5: str


MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_ARCHIVE = Resource(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                           "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR100_ARCHIVE = Resource(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                            "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
TINYIMAGENET_ARCHIVE = Resource(("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                                "tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")


def mnist_resources() -> list[Resource]:
    """The four MNIST ``.gz`` files, each with its mirrors (read at call time so tests can patch them)."""
    return [Resource(tuple(m + name for m in MNIST_MIRRORS), name, md5) for name, md5 in MNIST_MD5.items()]


class DownloadError(Exception):
    """A download attempt failed (network, HTTP status, checksum); the message says why."""


def _say(msg: str) -> None:
    # Downloads take minutes; one line on stderr per file keeps the user informed without a logger setup.
    print(f"sparsecl: {msg}", file=sys.stderr, flush=True)


def download_url(url: str, dest: str | Path, md5: str | None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` before the file appears.

    Raises :class:`DownloadError` on any network error or checksum mismatch."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "sparsecl"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                while block := resp.read(1 << 20):
                    h.update(block)
                    out.write(block)
        if md5 is not None and h.hexdigest() != md5:
            raise DownloadError(f"md5 of the download from {url} is {h.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: malformed URL
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{url}: {reason}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def fetch(resource: Resource, directory: str | Path) -> Path:
    """Download ``resource`` into ``directory``, trying each mirror; return the file's path."""
    dest = Path(directory) / resource.filename
    errors = []
    for url in resource.urls:
        _say(f"downloading {url} -> {dest}")
        try:
            return download_url(url, dest, resource.md5)
        except DownloadError as e:
            errors.append(str(e))
    raise DownloadError("; ".join(errors))


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    """Reject names that could escape the extraction directory."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
        raise SparseCLError(f"{archive}: refusing to extract unsafe member path {name!r}")
    return p


def extract_archive(archive: str | Path, dest_dir: str | Path) -> None:
    """Extract a ``.tar(.gz|.bz2|.xz)`` or ``.zip`` into ``dest_dir`` safely.

    Only regular files and directories are extracted; absolute paths, ``..`` components,
    links and device files make the whole archive an error. Files are written to a temporary
    directory first and renamed into place, so a failed extraction leaves no partial files."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:  # validate everything before writing anything
                    _safe_member_path(info.filename, archive)
                    # Unix mode in the high bits; its file type may be 0 (plain writers), regular or dir.
                    if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG, stat.S_IFDIR):
                        raise SparseCLError(f"{archive}: refusing to extract special member {info.filename!r}")
                for info in infos:
                    target = tmp / _safe_member_path(info.filename, archive)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        else:
            try:
                tf = tarfile.open(archive, "r:*")
            except tarfile.TarError as e:
                raise SparseCLError(f"{archive}: not a readable tar or zip archive ({e})") from None
            with tf:
                members = tf.getmembers()
                for m in members:
                    _safe_member_path(m.name, archive)
                    if not (m.isfile() or m.isdir()):
                        raise SparseCLError(f"{archive}: refusing to extract link or special member {m.name!r}")
                for m in members:
                    target = tmp / _safe_member_path(m.name, archive)
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    assert src is not None  # regular file
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = dest_dir / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise SparseCLError(f"{archive}: corrupt or truncated archive ({e}); delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _missing(what: str, directory: Path, put: str, url: str, failure: str | None) -> SparseCLError:
    """The one-line error for absent data: what, where it was looked for, what to do, from where."""
    why = "downloads are disabled" if failure is None else f"the download failed ({failure})"
    return SparseCLError(f"{what} not found in {directory} and {why}: get it from {url} and put {put}, "
                         "or choose another data directory (--data-dir / SPARSECL_DATA)")


def ensure_mnist(data_dir: str | Path, download: bool = True) -> Path:
    """Directory with the four MNIST IDX files: ``<data_dir>/MNIST/raw`` (torchvision layout)
    or ``<data_dir>`` itself; downloads the missing ``.gz`` files into ``MNIST/raw``."""
    data_dir = Path(data_dir).expanduser()
    raw = data_dir / "MNIST" / "raw"
    for d in (raw, data_dir):
        if all(find_idx_file(d, stem) for stem in MNIST_FILES.values()):
            return d
    missing = [r for r in mnist_resources() if find_idx_file(raw, r.filename[:-3]) is None]
    names = ", ".join(r.filename for r in missing)
    if not download:
        raise _missing("MNIST", raw, f"{names} in {raw}", MNIST_MIRRORS[0], None)
    try:
        for r in missing:
            fetch(r, raw)
    except DownloadError as e:
        raise _missing("MNIST", raw, f"{names} in {raw}", MNIST_MIRRORS[0], str(e)) from None
    return raw


def _ensure_archive_dataset(what: str, data_dir: Path, folder: str, required: list[str], res: Resource,
                            download: bool) -> Path:
    """Shared logic: ``data_dir/folder`` complete -> done; else extract a local archive
    ``data_dir/res.filename`` (md5-checked) or download it first."""
    target = data_dir / folder
    if all((target / f).is_file() for f in required):
        return target
    archive = data_dir / res.filename
    put = f"{res.filename} (or its extracted {folder}/) in {data_dir}"
    if archive.is_file():
        actual = md5sum(archive)
        if actual != res.md5:
            raise SparseCLError(f"{archive}: md5 {actual} does not match the published {res.md5}; "
                                f"delete it and download it again from {res.urls[0]}")
    elif not download:
        raise _missing(what, target, put, res.urls[0], None)
    else:
        try:
            fetch(res, data_dir)
        except DownloadError as e:
            raise _missing(what, target, put, res.urls[0], str(e)) from None
    _say(f"extracting {archive}")
    extract_archive(archive, data_dir)
    absent = [f for f in required if not (target / f).is_file()]
    if absent:
        raise SparseCLError(f"{archive}: extracted, but {target / absent[0]} is still missing; is it the right archive?")
    return target


def ensure_cifar10(data_dir: str | Path, download: bool = True) -> Path:
    """``<data_dir>/cifar-10-batches-py``, downloading and extracting the archive if needed."""
    required = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return _ensure_archive_dataset("CIFAR-10", Path(data_dir).expanduser(), "cifar-10-batches-py", required,
                                   CIFAR10_ARCHIVE, download)


def ensure_cifar100(data_dir: str | Path, download: bool = True) -> Path:
    """``<data_dir>/cifar-100-python``, downloading and extracting the archive if needed."""
    return _ensure_archive_dataset("CIFAR-100", Path(data_dir).expanduser(), "cifar-100-python", ["train", "test"],
                                   CIFAR100_ARCHIVE, download)


def ensure_tiny_imagenet(data_dir: str | Path, download: bool = True) -> Path:
    """``<data_dir>/tiny-imagenet-200``, downloading and extracting the zip if needed."""
    return _ensure_archive_dataset("Tiny-ImageNet", Path(data_dir).expanduser(), "tiny-imagenet-200",
                                   ["wnids.txt", "val/val_annotations.txt"], TINYIMAGENET_ARCHIVE, download)


# The per-file md5s are re-exported for users who verify an extracted folder by hand.
__all__ = [
    "Resource", "DownloadError", "download_url", "fetch", "extract_archive", "ensure_mnist", "ensure_cifar10",
    "ensure_cifar100", "ensure_tiny_imagenet", "mnist_resources", "MNIST_MIRRORS", "MNIST_MD5", "CIFAR10_ARCHIVE",
    "CIFAR100_ARCHIVE", "TINYIMAGENET_ARCHIVE", "CIFAR10_MD5", "CIFAR100_MD5",
]
