"""Build the embedded default benchmark file ``src/sparsecl/data/embedded/digits.npz``.

Source: the UCI optical-recognition-of-handwritten-digits test set (E. Alpaydin, 1998,
CC BY 4.0) as bundled in scikit-learn (``sklearn/datasets/data/digits.csv.gz``): 1797
8x8 images with pixel counts 0..16. We rescale to 0..255 uint8 and fix a stratified
train/test split (80/20, seed 0) so the embedded benchmark needs no network and no
scikit-learn at run time.

Usage: python scripts/make_digits.py PATH/TO/digits.csv.gz
"""
import gzip
import sys
from pathlib import Path

import numpy as np


def main(src: str) -> None:
    with gzip.open(src, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = np.clip(np.rint(arr[:, :64] * 255.0 / 16.0), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = arr[:, 64].astype(np.int64)
    rng = np.random.default_rng(0)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.extend(rng.choice(idx, size=round(0.2 * len(idx)), replace=False).tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    out = Path(__file__).resolve().parents[1] / "src/sparsecl/data/embedded/digits.npz"
    np.savez_compressed(out, x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test], y_test=y[is_test])
    print(f"wrote {out}: {int((~is_test).sum())} train, {int(is_test.sum())} test")


if __name__ == "__main__":
    main(sys.argv[1])
