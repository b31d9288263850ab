"""Data layer: readers, downloads, benchmarks and device augmentation.

Every file format is exercised on files the test writes (and on small real slices under
tests/fixtures), including the corrupt cases users hit: truncated downloads, swapped files,
tampered pickles, broken JPEGs. No network is used (downloads go to file:// URLs).
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sparsecl import SparseCLError
from sparsecl.data import download as dl
from sparsecl.data import readers
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import benchmark_names, load_benchmark, parse_class_order
from sparsecl.data.stream import AugmentSpec

FIXTURES = Path(__file__).parent / "fixtures"
MNIST_SLICE = FIXTURES / "mnist-slice"  # MNIST/raw/*.gz: real MNIST test images 0-199 (train), 200-299 (t10k)
CIFAR_JPEG_SLICE = FIXTURES / "cifar10-jpeg-slice"  # real CIFAR-10 JPEGs: 4 train + 2 test per class


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, magic: int) -> Path:
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    xs, ys = [], []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(directory / f"{prefix}-images-idx3-ubyte{sfx}", x, 0x803)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{sfx}", y, 0x801)
        xs.append(x)
        ys.append(y)
    return xs[0], ys[0]


def cifar_dict(n: int, seed: int, fine: int = 10, cifar100: bool = False, bytes_keys: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    d = {k("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    labels = [int(v) for v in np.arange(n) % fine]
    if cifar100:
        d[k("fine_labels")] = labels
        d[k("coarse_labels")] = [v % 20 for v in labels]
    else:
        d[k("labels")] = labels
    return d


def write_pickle(path: Path, obj, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_cifar10_dir(directory: Path, n: int = 20) -> dict[str, str]:
    """Fake cifar-10-batches-py; returns the md5 of each file."""
    md5 = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        md5[name] = readers.md5sum(write_pickle(directory / name, cifar_dict(n, i)))
    return md5


def write_cifar100_dir(directory: Path) -> dict[str, str]:
    md5 = {}
    for i, name in enumerate(("train", "test")):
        md5[name] = readers.md5sum(write_pickle(directory / name, cifar_dict(200, i, fine=100, cifar100=True)))
    return md5


def save_img(path: Path, arr: np.ndarray, mode: str | None = None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, format=fmt) if mode else Image.fromarray(arr).save(path, format=fmt)
    return path


def write_folder(root: Path, classes=("cat", "ant", "bee"), n_train: int = 3, n_test: int = 2, size: int = 8) -> dict:
    """PNG image folder with known pixels; returns {(split, class, i): HWC array}."""
    rng = np.random.default_rng(1)
    pixels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                save_img(root / split / c / f"{i:03d}.png", arr)
                pixels[(split, c, i)] = arr
    return pixels


# ------------------------------------------------------------------------------------------
# MNIST IDX
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_mnist_roundtrip(tmp_path, gz):
    x, y = write_mnist(tmp_path, gz=gz)
    data = readers.read_mnist(tmp_path)
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(data.x_train[:, 0], x)
    np.testing.assert_array_equal(data.y_train, y)
    assert data.y_train.dtype == np.int64


def test_idx_wrong_magic_names_file(tmp_path):
    write_mnist(tmp_path)
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((20, 28, 28), np.uint8), 0x803)  # swapped
    with pytest.raises(SparseCLError, match="magic") as e:
        readers.read_mnist(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    garbage = tmp_path / "garbage-idx"
    garbage.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(SparseCLError, match="garbage-idx"):
        readers.read_idx(garbage)


def test_idx_truncated_gz_names_file(tmp_path):
    write_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(SparseCLError, match="truncated") as e:
        readers.read_mnist(tmp_path)
    assert str(p) in str(e.value)


def test_idx_short_payload_names_file(tmp_path):
    p = write_idx(tmp_path / "imgs-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), 0x803)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(SparseCLError, match="imgs-idx3-ubyte.*truncated"):
        readers.read_idx(p)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8), 0x801)
    with pytest.raises(SparseCLError, match="7 labels for 10 images"):
        readers.read_mnist(tmp_path)


# ------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (2, False), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar_pickle_trusted_roundtrip(tmp_path, protocol, bytes_keys):
    d = cifar_dict(7, 0, bytes_keys=bytes_keys)
    p = write_pickle(tmp_path / "data_batch_1", d, protocol)
    out = readers.load_cifar_pickle(p, trusted=True)
    np.testing.assert_array_equal(out["data"], d[b"data" if bytes_keys else "data"])
    assert out["labels"] == list(np.arange(7) % 10)


def test_cifar_pickle_needs_checksum_or_trust(tmp_path):
    p = write_pickle(tmp_path / "data_batch_1", cifar_dict(3, 0))
    with pytest.raises(SparseCLError, match="md5") as e:
        readers.load_cifar_pickle(p, md5=readers.CIFAR10_MD5["data_batch_1"])
    assert str(p) in str(e.value)
    with pytest.raises(SparseCLError, match="checksum"):
        readers.load_cifar_pickle(p)
    assert readers.load_cifar_pickle(p, md5=readers.md5sum(p))["data"].shape == (3, 3072)  # matching md5 is enough


def test_read_cifar10_layout(tmp_path):
    write_cifar10_dir(tmp_path, n=4)
    with pytest.raises(SparseCLError, match="data_batch_1.*md5"):
        readers.read_cifar10(tmp_path)  # not the published files
    data = readers.read_cifar10(tmp_path, trusted=True)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.class_names == readers.CIFAR10_CLASSES
    raw = cifar_dict(4, 0)[b"data"]
    # Rows are channel-major (1024 R, then G, then B), each 32 rows of 32 pixels.
    assert data.x_train[1, 2, 5, 7] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert data.y_train.tolist()[:4] == [0, 1, 2, 3]


def test_read_cifar100_fine_and_coarse(tmp_path):
    write_cifar100_dir(tmp_path)
    data = readers.read_cifar100(tmp_path, trusted=True)
    assert data.x_train.shape == (200, 3, 32, 32)
    np.testing.assert_array_equal(data.coarse_train, data.y_train % 20)
    assert len(data.class_names) == 100 and len(data.coarse_names) == 20


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_cifar_pickle_cannot_run_code_even_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    p = write_pickle(tmp_path / "data_batch_1", {"data": _Evil(str(marker))})
    with pytest.raises(SparseCLError, match="not a valid CIFAR pickle") as e:
        readers.load_cifar_pickle(p, trusted=True)
    assert str(p) in str(e.value) and "makedirs is not allowed" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps(cifar_dict(3, 0), 2)[:100], pickle.dumps([1, 2])])
def test_cifar_bad_pickle_names_file(tmp_path, content):
    p = tmp_path / "test_batch"
    p.write_bytes(content)
    with pytest.raises(SparseCLError, match="test_batch.*not a valid CIFAR pickle"):
        readers.load_cifar_pickle(p, trusted=True)


def test_cifar_wrong_data_shape(tmp_path):
    p = write_pickle(tmp_path / "data_batch_1", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        write_pickle(tmp_path / name, cifar_dict(2, 0))
    with pytest.raises(SparseCLError, match=r"data_batch_1.*\[N, 3072\]"):
        readers.read_cifar10(tmp_path, trusted=True)
    assert p.exists()


# ------------------------------------------------------------------------------------------
# Image folders and Tiny-ImageNet
# ------------------------------------------------------------------------------------------


def test_image_folder_decodes_and_caches(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    pixels = write_folder(root)
    data = readers.read_image_folder(root)
    assert data.class_names == ["ant", "bee", "cat"]  # sorted directory names
    assert data.x_train.shape == (9, 3, 8, 8) and data.x_test.shape == (6, 3, 8, 8)
    assert data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(data.x_train[3].transpose(1, 2, 0), pixels[("train", "bee", 0)])  # PNG is lossless
    cache = Path(os.environ["SPARSECL_CACHE"])
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one cache file, no temporary leftovers

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(readers, "decode_image", boom)
    again = readers.read_image_folder(root)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    # Changing a file changes the key: decoded again (here: the patched decoder fires).
    save_img(root / "train" / "ant" / "000.png", np.zeros((8, 8, 3), np.uint8))
    os.utime(root / "train" / "ant" / "000.png", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        readers.read_image_folder(root)


def test_image_folder_grayscale_rgba_jpeg_to_rgb(tmp_path):
    root = tmp_path / "mixed"
    save_img(root / "train" / "a" / "g.png", np.full((6, 6), 77, np.uint8), mode="L")
    save_img(root / "train" / "b" / "r.png", np.full((6, 6, 4), 200, np.uint8), mode="RGBA")
    save_img(root / "test" / "a" / "j.jpg", np.full((6, 6, 3), 128, np.uint8))
    data = readers.read_image_folder(root)
    assert data.x_train.shape == (2, 3, 6, 6)
    assert (data.x_train[0] == 77).all()
    assert abs(int(data.x_test[0].astype(int).mean()) - 128) <= 2


def test_image_folder_truncated_jpeg_names_file(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = root / "train" / "ant" / "broken.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(SparseCLError, match="cannot decode") as e:
        readers.read_image_folder(root)
    assert str(bad) in str(e.value)
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(SparseCLError, match="broken.jpg"):
        readers.read_image_folder(root)


def test_image_folder_sizes_resize_and_pixel_limit(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root, size=8)
    save_img(root / "train" / "ant" / "big.png", np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(SparseCLError, match="big.png.*image size"):
        readers.read_image_folder(root)
    data = readers.read_image_folder(root, size=5)
    assert data.x_train.shape == (10, 3, 5, 5)
    with pytest.raises(SparseCLError, match="exceeds the limit"):
        readers.read_image_folder(root, size=6, max_pixels=80)  # (size 5 is cached: decoding is what the limit guards)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(SparseCLError, match="train/<class>"):
        readers.read_image_folder(tmp_path)
    root = tmp_path / "f"
    write_folder(root)
    (root / "test" / "zebra").mkdir()
    save_img(root / "test" / "zebra" / "z.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SparseCLError, match="zebra"):
        readers.read_image_folder(root)


def write_tiny_imagenet(root: Path, wnids=("n02", "n01"), n_train: int = 2) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\n")
    lines = []
    for w in wnids:
        for i in range(n_train):
            save_img(root / "train" / w / "images" / f"{w}_{i}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt="JPEG")
    for i, w in enumerate(wnids):
        save_img(root / "val" / "images" / f"val_{i}.JPEG", rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L", fmt="JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_layout_and_benchmark(tmp_path):
    write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = readers.read_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert data.x_train.shape == (4, 3, 64, 64) and data.x_test.shape == (2, 3, 64, 64)
    assert data.class_names == ["goldfish", "salamander"]  # sorted wnids n01, n02
    assert data.y_test.tolist() == [1, 0]  # val_0 is n02
    s = load_benchmark("seq-tinyimg", tmp_path, n_tasks=2, download=False)
    assert s.n_tasks == 2 and s.input_shape == (3, 64, 64) and s.augment.crop_padding == 4


# ------------------------------------------------------------------------------------------
# Downloads and safe extraction
# ------------------------------------------------------------------------------------------


def test_mnist_download_from_mirror_verifies_md5(tmp_path, monkeypatch):
    mirror = MNIST_SLICE / "MNIST" / "raw"
    md5s = {p.name: readers.md5sum(p) for p in mirror.iterdir()}
    monkeypatch.setattr(dl, "MNIST_MIRRORS", ("file:///nonexistent-mirror/", mirror.as_uri() + "/"))
    monkeypatch.setattr(dl, "MNIST_MD5", md5s)
    s = load_benchmark("seq-mnist", tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data" / "MNIST" / "raw").iterdir()) == sorted(md5s)
    assert sum(len(t.train) for t in s.tasks) == 200

    # A download whose md5 differs is refused and leaves nothing behind.
    monkeypatch.setattr(dl, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    monkeypatch.setattr(dl, "MNIST_MD5", {k: "0" * 32 for k in md5s})
    with pytest.raises(SparseCLError, match="download failed.*md5") as e:
        load_benchmark("seq-mnist", tmp_path / "other")
    assert "\n" not in str(e.value)
    assert not any(p.is_file() for p in (tmp_path / "other").rglob("*"))


def test_missing_data_message(tmp_path, monkeypatch):
    with pytest.raises(SparseCLError) as e:
        load_benchmark("seq-cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "\n" not in msg and "CIFAR-10 not found" in msg and "downloads are disabled" in msg
    assert str(tmp_path) in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    # No network: the failed download is reported in the same single line.
    monkeypatch.setattr(dl, "CIFAR100_ARCHIVE", dl.Resource(("file:///nonexistent/cifar-100-python.tar.gz",),
                                                            "cifar-100-python.tar.gz", dl.CIFAR100_ARCHIVE.md5))
    with pytest.raises(SparseCLError, match="CIFAR-100 not found.*the download failed") as e:
        load_benchmark("seq-cifar100", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(SparseCLError, match=r"MNIST not found in .*MNIST/raw.*put train-images-idx3-ubyte.gz.*MNIST/raw"):
        load_benchmark("seq-mnist", tmp_path, download=False)
    with pytest.raises(SparseCLError, match="CIFAR-10 JPEG folder not found"):
        load_benchmark("seq-cifar10-jpeg", tmp_path)


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def test_cifar10_local_archive_is_verified_and_extracted(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-batches-py"
    md5 = write_cifar10_dir(src, n=10)
    archive = _tar(tmp_path / "data" / "cifar-10-python.tar.gz",
                   {f"cifar-10-batches-py/{n}": (src / n).read_bytes() for n in md5})
    monkeypatch.setattr(dl, "CIFAR10_ARCHIVE", dl.Resource(("file:///nowhere",), archive.name, "1" * 32))
    with pytest.raises(SparseCLError, match="cifar-10-python.tar.gz: md5"):
        load_benchmark("seq-cifar10", tmp_path / "data")
    monkeypatch.setattr(dl, "CIFAR10_ARCHIVE", dl.Resource(("file:///nowhere",), archive.name, readers.md5sum(archive)))
    with pytest.raises(SparseCLError, match="does not match the published"):
        load_benchmark("seq-cifar10", tmp_path / "data")  # extracted, but these pickles are not the published ones
    for name, m in md5.items():
        monkeypatch.setitem(readers.CIFAR10_MD5, name, m)
    s = load_benchmark("seq-cifar10", tmp_path / "data")
    assert s.n_tasks == 5 and s.input_shape == (3, 32, 32) and s.default_backbone == "resnet18"
    assert [len(t.train) for t in s.tasks] == [10] * 5 and [len(t.test) for t in s.tasks] == [2] * 5
    assert s.augment == AugmentSpec(4, True, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/abs-evil.txt", "ok/../../evil.txt"])
def test_extract_rejects_escaping_paths(tmp_path, name):
    dest = tmp_path / "dest"
    archive = _tar(tmp_path / "a.tar.gz", {"fine.txt": b"x", name: b"evil"})
    with pytest.raises(SparseCLError, match="unsafe member"):
        dl.extract_archive(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "fine.txt").exists()
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("fine.txt", b"x")
        zf.writestr(name, b"evil")
    with pytest.raises(SparseCLError, match="unsafe member"):
        dl.extract_archive(zpath, dest)
    assert not (tmp_path / "evil.txt").exists()


def test_extract_rejects_links_and_extracts_normal_archives(tmp_path):
    with pytest.raises(SparseCLError, match="link"):
        dl.extract_archive(_tar(tmp_path / "l.tar.gz", {"a.txt": b"a"}, {"b": "/etc/passwd"}), tmp_path / "d1")
    dl.extract_archive(_tar(tmp_path / "ok.tar.gz", {"top/a.txt": b"a", "top/sub/b.txt": b"b"}), tmp_path / "d2")
    assert (tmp_path / "d2" / "top" / "sub" / "b.txt").read_bytes() == b"b"
    assert [p.name for p in (tmp_path / "d2").iterdir()] == ["top"]  # no temporary directory left
    truncated = tmp_path / "t.tar.gz"
    truncated.write_bytes((tmp_path / "ok.tar.gz").read_bytes()[:30])
    with pytest.raises(SparseCLError, match="t.tar.gz"):
        dl.extract_archive(truncated, tmp_path / "d3")


# ------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------


def check_stream(s, n_tasks: int, per_task: int) -> None:
    assert s.n_tasks == n_tasks and s.n_classes == n_tasks * per_task
    for t in s.tasks:
        assert t.classes == list(range(t.index * per_task, (t.index + 1) * per_task))
        for split in (t.train, t.test):
            assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
            assert split.x.device.type == "cpu" and tuple(split.x.shape[1:]) == s.input_shape
            assert set(split.y.tolist()) == set(t.classes)  # contiguous range, every class present
    assert s.task_of_class().tolist() == [c // per_task for c in range(s.n_classes)]
    assert sorted(s.class_order) == list(range(s.n_classes)) and len(s.class_names) == s.n_classes


def test_digits_offline():
    s = load_benchmark("digits")
    check_stream(s, 5, 2)
    assert s.input_shape == (1, 8, 8) and s.default_backbone == "mlp"
    assert sum(len(t.train) for t in s.tasks) + sum(len(t.test) for t in s.tasks) == 1797
    assert s.augment.crop_padding == 0 and not s.augment.hflip
    # The hard-coded normalisation constants are the train split's statistics.
    x = torch.cat([t.train.x for t in s.tasks]).double() / 255
    assert abs(x.mean().item() - s.augment.mean[0]) < 1e-3 and abs(x.std().item() - s.augment.std[0]) < 1e-3
    assert s.settings == frozenset({"class-il", "task-il"})


def test_seq_mnist_real_slice():
    s = load_benchmark("seq-mnist", MNIST_SLICE, download=False)
    check_stream(s, 5, 2)
    assert s.input_shape == (1, 28, 28) and s.augment == AugmentSpec() and s.default_backbone == "mlp"
    assert sum(len(t.train) for t in s.tasks) == 200 and sum(len(t.test) for t in s.tasks) == 100
    # Identity order: remapped label == digit; the first test image of the slice (MNIST t10k #200) is a 3.
    assert s.class_order == list(range(10)) and s.class_names[3] == "3"
    raw = readers.read_mnist(MNIST_SLICE / "MNIST" / "raw")
    first3 = int(np.flatnonzero(raw.y_test == 3)[0])
    assert torch.equal(s.tasks[1].test.x[int((s.tasks[1].test.y == 3).nonzero()[0])], torch.from_numpy(raw.x_test[first3]))


def test_flat_mnist_layout_and_n_tasks(tmp_path):
    write_mnist(tmp_path, n_train=40, n_test=20)
    s = load_benchmark("seq-mnist", tmp_path, n_tasks=2, download=False)
    check_stream(s, 2, 5)
    with pytest.raises(SparseCLError, match="cannot be split evenly into 3 tasks"):
        load_benchmark("seq-mnist", tmp_path, n_tasks=3, download=False)


def test_class_order_seed_and_explicit():
    a = load_benchmark("seq-mnist", MNIST_SLICE, class_order="seed:7", download=False)
    b = load_benchmark("seq-mnist", MNIST_SLICE, class_order="seed:7", download=False)
    assert a.class_order == b.class_order == np.random.default_rng(7).permutation(10).tolist()
    assert a.class_order != list(range(10))
    for ta, tb in zip(a.tasks, b.tasks):
        assert torch.equal(ta.train.x, tb.train.x) and torch.equal(ta.train.y, tb.train.y)
    check_stream(a, 5, 2)
    raw = readers.read_mnist(MNIST_SLICE / "MNIST" / "raw")
    # Task 0 holds exactly the images of raw labels class_order[0:2], remapped to 0/1, in file order.
    want = np.flatnonzero(np.isin(raw.y_train, a.class_order[:2]))
    assert torch.equal(a.tasks[0].train.x, torch.from_numpy(raw.x_train[want]))
    assert a.tasks[0].train.y.tolist() == [a.class_order.index(int(v)) for v in raw.y_train[want]]
    assert a.class_names == [str(c) for c in a.class_order]
    c = load_benchmark("seq-mnist", MNIST_SLICE, class_order="9,8,7,6,5,4,3,2,1,0", download=False)
    assert c.class_order == list(range(9, -1, -1)) and c.class_names[0] == "9"


@pytest.mark.parametrize("bad", ["seed:x", "seed:-1", "1,2,3", "0,0,1,2,3,4,5,6,7,8", "0,1,2,3,4,5,6,7,8,10", "a,b"])
def test_class_order_invalid(bad):
    with pytest.raises(SparseCLError, match="class_order"):
        parse_class_order(bad, 10)


def test_seq_cifar10_jpeg_real_slice(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar10-jpeg").symlink_to(CIFAR_JPEG_SLICE.resolve())
    s = load_benchmark("seq-cifar10-jpeg", data_dir)
    check_stream(s, 5, 2)
    assert s.input_shape == (3, 32, 32) and s.class_names == readers.CIFAR10_CLASSES
    assert [len(t.train) for t in s.tasks] == [8] * 5 and [len(t.test) for t in s.tasks] == [4] * 5
    assert s.augment == AugmentSpec(4, True, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))
    assert 30 < s.tasks[0].train.x.float().mean().item() < 225  # real photos, not blank
    t = load_benchmark("seq-cifar10-jpeg", data_dir, class_order="seed:1")  # second load: from the cache
    assert t.class_order == np.random.default_rng(1).permutation(10).tolist()


def test_image_folder_benchmark(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root, classes=("a", "b", "c", "d"), size=16)
    with pytest.raises(SparseCLError, match="needs root"):
        load_benchmark("image-folder")
    with pytest.raises(SparseCLError, match="4 classes cannot be split evenly into 3"):
        load_benchmark("image-folder", root=root, n_tasks=3)
    with pytest.raises(SparseCLError, match="does not take root"):
        load_benchmark("digits", root=root)
    s = load_benchmark("image-folder", root=root, n_tasks=2)
    check_stream(s, 2, 2)
    assert s.augment.crop_padding == 2 and s.augment.hflip and s.default_backbone == "resnet18"
    x = torch.cat([t.train.x for t in s.tasks]).double() / 255
    np.testing.assert_allclose(s.augment.mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-4)
    np.testing.assert_allclose(s.augment.std, x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).numpy(), atol=1e-4)
    r = load_benchmark("image-folder", root=root, n_tasks=4, image_size=8)
    assert r.input_shape == (3, 8, 8) and r.augment.crop_padding == 1


def test_miniimagenet_folder_resized(tmp_path):
    write_folder(tmp_path / "miniimagenet", classes=tuple(f"n{i:02d}" for i in range(20)), n_train=1, n_test=1, size=10)
    s = load_benchmark("miniimagenet", tmp_path, n_tasks=20)
    check_stream(s, 20, 1)
    assert s.input_shape == (3, 84, 84) and s.augment.crop_padding == 10
    with pytest.raises(SparseCLError, match="miniImageNet not found"):
        load_benchmark("miniimagenet", tmp_path / "none")


def test_cifar100_superclass_tasks(tmp_path, monkeypatch):
    md5 = write_cifar100_dir(tmp_path / "cifar-100-python")
    for name, m in md5.items():
        monkeypatch.setitem(readers.CIFAR100_MD5, name, m)
    s = load_benchmark("cifar100-superclass", tmp_path, download=False)
    check_stream(s, 20, 5)
    assert s.class_order[:5] == [0, 20, 40, 60, 80]  # coarse 0 = fine labels with fine % 20 == 0 (our fake)
    p = load_benchmark("cifar100-superclass", tmp_path, class_order="seed:0", download=False)
    first = np.random.default_rng(0).permutation(20)[0]
    assert p.class_order[:5] == [int(first) + 20 * i for i in range(5)]
    with pytest.raises(SparseCLError, match="exactly 20 tasks"):
        load_benchmark("cifar100-superclass", tmp_path, n_tasks=10, download=False)
    for name, tasks in (("seq-cifar100", 10), ("cifar100-5", 5), ("cifar100-10", 10), ("cifar100-20", 20)):
        s = load_benchmark(name, tmp_path, download=False)
        check_stream(s, tasks, 100 // tasks)
        assert s.augment.mean == (0.5071, 0.4865, 0.4409)


def test_registry_names_and_unknown():
    names = benchmark_names()
    for n in ("digits", "seq-mnist", "seq-cifar10", "seq-cifar10-jpeg", "seq-cifar100", "cifar100-5", "cifar100-10",
              "cifar100-20", "cifar100-superclass", "seq-tinyimg", "image-folder", "miniimagenet"):
        assert names[n] and "\n" not in names[n]
    with pytest.raises(SparseCLError, match="unknown benchmark 'nope'.*digits"):
        load_benchmark("nope")


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECL_DATA", str(MNIST_SLICE))
    assert load_benchmark("seq-mnist", download=False).n_tasks == 5


# ------------------------------------------------------------------------------------------
# Device augmentation
# ------------------------------------------------------------------------------------------


def coded_images(b: int, h: int, w: int) -> torch.Tensor:
    """Each pixel holds 1 + its position (0 is left for padding)."""
    return (torch.arange(h * w, dtype=torch.int64) + 1).view(1, 1, h, w).expand(b, 1, h, w).to(torch.uint8).contiguous()


def test_crop_offsets_uniform():
    p, n = 2, 20000
    aug = DeviceAugment(AugmentSpec(crop_padding=p), (1, 8, 8))
    torch.manual_seed(0)
    out = torch.round(aug.train(coded_images(n, 8, 8)) * 255).long()
    centre = out[:, 0, 4, 4] - 1  # always inside the image: source (4+oy-p, 4+ox-p)
    oy, ox = centre // 8 - 4 + p, centre % 8 - 4 + p
    assert oy.min() >= 0 and oy.max() <= 2 * p and ox.min() >= 0 and ox.max() <= 2 * p
    joint = torch.bincount(oy * (2 * p + 1) + ox, minlength=(2 * p + 1) ** 2).double()
    expected = n / (2 * p + 1) ** 2
    chi2 = ((joint - expected) ** 2 / expected).sum().item()
    assert chi2 < 60, chi2  # 24 degrees of freedom: p < 1e-4 for a uniform sampler to exceed this
    for marg in (torch.bincount(oy, minlength=5), torch.bincount(ox, minlength=5)):
        assert (marg - n / 5).abs().max() < 5 * (n * 0.2 * 0.8) ** 0.5


def test_crop_is_padded_window_and_flip_flips():
    p, b = 3, 64
    aug = DeviceAugment(AugmentSpec(crop_padding=p, hflip=True), (3, 10, 12))
    x = torch.randint(0, 256, (b, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = torch.round(aug.train(x) * 255).to(torch.uint8)
    padded = F.pad(x, (p, p, p, p))
    flips = 0
    for i in range(b):
        matches = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, oy:oy + 10, ox:ox + 12]))]
        assert matches, f"sample {i} is not a (flipped) window of the zero-padded image"
        flips += matches[0][2]
    assert 10 < flips < b - 10  # both flipped and unflipped crops occur


def test_flip_only_probability_half():
    aug = DeviceAugment(AugmentSpec(hflip=True), (1, 4, 5))
    x = torch.randint(0, 256, (4000, 1, 4, 5), dtype=torch.uint8)
    out = torch.round(aug.train(x) * 255).to(torch.uint8)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert abs(flipped.double().mean().item() - 0.5) < 0.05


def test_normalisation_and_reproducibility():
    spec = AugmentSpec(crop_padding=4, hflip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2615))
    aug = DeviceAugment(spec, (3, 32, 32))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    ev = aug.eval(x)
    assert ev.dtype == torch.float32 and torch.allclose(ev, ref, atol=1e-5)
    torch.manual_seed(5)
    a = aug.train(x)
    torch.manual_seed(5)
    assert torch.equal(a, aug.train(x))
    # Padding is black (0) before normalisation, as torchvision's RandomCrop fills it.
    white = DeviceAugment(spec, (3, 32, 32)).train(torch.full((256, 3, 32, 32), 255, dtype=torch.uint8))
    pad_value = (-torch.tensor(spec.mean) / torch.tensor(spec.std)).view(1, 3, 1, 1)
    assert bool(torch.isclose(white, pad_value, atol=1e-5).any())
    plain = DeviceAugment(AugmentSpec(mean=spec.mean, std=spec.std), (3, 32, 32))
    assert torch.equal(plain.train(x), plain.eval(x))


def test_channels_last_output_same_values():
    spec = AugmentSpec(crop_padding=2, hflip=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    plain, cl = DeviceAugment(spec, (3, 16, 16)), DeviceAugment(spec, (3, 16, 16), memory_format=torch.channels_last)
    for fn in ("train", "eval"):
        torch.manual_seed(3)
        a = getattr(plain, fn)(x)
        torch.manual_seed(3)
        b = getattr(cl, fn)(x)
        assert b.is_contiguous(memory_format=torch.channels_last) and a.is_contiguous()
        assert torch.equal(a, b)


def test_augment_has_no_data_dependent_host_ops():
    # On the meta device any .item(), nonzero or boolean-mask indexing raises: this proves the
    # whole computation is shape-static and sync-free (capturable in a CUDA graph).
    aug = DeviceAugment(AugmentSpec(crop_padding=4, hflip=True, mean=(0.5,) * 3, std=(0.25,) * 3), (3, 32, 32))
    x = torch.empty(32, 3, 32, 32, dtype=torch.uint8, device="meta")
    assert aug.train(x).shape == (32, 3, 32, 32) and aug.eval(x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_no_sync():
    aug = DeviceAugment(AugmentSpec(crop_padding=4, hflip=True, mean=(0.5,) * 3, std=(0.25,) * 3), (3, 32, 32))
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    aug.train(x)  # builds the per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug.train(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = DeviceAugment(aug.spec, (3, 32, 32))
    assert out.device.type == "cuda" and torch.allclose(cpu.eval(x.cpu()), aug.eval(x).cpu(), atol=1e-6)
    # Capturable in a CUDA graph with no warm-up call (constants built beforehand by prepare);
    # replays draw new crops.
    fresh = DeviceAugment(aug.spec, (3, 32, 32)).prepare("cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fresh.train(x)
    graph.replay()
    first = captured.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, captured)


def test_augment_rejects_bad_input():
    with pytest.raises(SparseCLError, match="3 channels"):
        DeviceAugment(AugmentSpec(mean=(0.1, 0.2), std=(1.0, 1.0)), (3, 4, 4))
    aug = DeviceAugment(AugmentSpec(), (1, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        aug.train(torch.zeros(2, 1, 4, 4))


def test_validation_holds_out_exact_stratified_share_of_train_and_replaces_test():
    """`--validation 0.1`: each class gives exactly round(0.1 n) training examples to the
    evaluation split, which replaces the test set; the split is the same whatever the run seed."""
    from sparsecl.data.stream import hold_out_validation

    stream = load_benchmark("digits")
    val = hold_out_validation(stream, 0.1)
    assert hold_out_validation(stream, 0.1).tasks[2].test.y.tolist() == val.tasks[2].test.y.tolist()
    for before, after in zip(stream.tasks, val.tasks):
        for c in before.classes:
            n = int((before.train.y == c).sum())
            assert int((after.test.y == c).sum()) == round(0.1 * n)
            assert int((after.train.y == c).sum()) == n - round(0.1 * n)
        # the held-out images are training images, never test images, and none is in both parts
        train_rows = {bytes(r) for r in before.train.x.flatten(1).numpy()}
        kept = [bytes(r) for r in after.train.x.flatten(1).numpy()]
        held = [bytes(r) for r in after.test.x.flatten(1).numpy()]
        assert set(held) <= train_rows and len(kept) + len(held) == len(before.train)
        assert sorted(kept + held) == sorted(bytes(r) for r in before.train.x.flatten(1).numpy())
    with pytest.raises(SparseCLError, match="fraction"):
        hold_out_validation(stream, 1.0)
