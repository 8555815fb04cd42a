"""Data sets: a validated `Dataset(X, y)`, the paper's synthetic sets (docs/math.md section 6)."""

from __future__ import annotations

import hashlib

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._checks import check_int, check_positive


class Dataset(eqx.Module):
    """Inputs X (N, ...) and labels y (N,).

    Float labels in {-1, +1}: a binary problem (scalar model output). Integer labels in
    0..C-1: a multi-class problem (C logits). Validated on construction: shapes, finite
    values, and the label set.
    """

    X: Float[Array, "N ..."]
    y: Array

    def __init__(self, X, y):
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim < 2:
            raise ValueError(
                f"Dataset: X must have shape (N, features...), got shape {X.shape}; "
                "for one feature use X[:, None]."
            )
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(
                f"Dataset: y must have shape (N,) = ({X.shape[0]},) to match X, got {y.shape}."
            )
        if X.shape[0] == 0:
            raise ValueError("Dataset: X must contain at least one sample, got N = 0.")
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise TypeError(f"Dataset: X must be a real numeric array, got dtype {X.dtype}.")
        if not np.all(np.isfinite(X)):
            bad = int(np.sum(~np.isfinite(X)))
            raise ValueError(
                f"Dataset: X must be finite, found {bad} NaN/inf entries; "
                "drop or impute those samples."
            )
        if np.issubdtype(y.dtype, np.floating):
            if not np.all(np.isfinite(y)):
                raise ValueError("Dataset: y must be finite, found NaN/inf labels.")
            labels = set(np.unique(y).tolist())
            if not labels <= {-1.0, 1.0}:
                raise ValueError(
                    "Dataset: float labels mean a binary problem and must be in {-1, +1}, got "
                    f"{sorted(labels)[:6]}; map them with y = 2 * y01 - 1, or pass integer "
                    "labels 0..C-1 for a multi-class problem."
                )
            y = y.astype(np.float64)
        elif np.issubdtype(y.dtype, np.integer):
            if y.min() < 0:
                raise ValueError(
                    "Dataset: integer labels mean a multi-class problem and must be in "
                    f"0..C-1, got minimum {int(y.min())}; for a binary problem pass float "
                    "labels in {-1.0, +1.0}."
                )
            y = y.astype(np.int32)
        else:
            raise TypeError(
                f"Dataset: y must be float ({{-1, +1}}) or integer (0..C-1), got dtype {y.dtype}."
            )
        self.X = jnp.asarray(X, dtype=jnp.float64)
        self.y = jnp.asarray(y)

    @property
    def binary(self) -> bool:
        return bool(jnp.issubdtype(self.y.dtype, jnp.floating))

    @property
    def n_classes(self) -> int:
        return 2 if self.binary else int(jnp.max(self.y)) + 1

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def fingerprint(self) -> str:
        """A short hash of X and y (identifies the data a trajectory was computed on)."""
        h = hashlib.sha256()
        h.update(np.asarray(self.X, np.float64).tobytes())
        h.update(np.asarray(self.y).tobytes())
        return h.hexdigest()[:16]


def seeded_rng(seed, where: str) -> np.random.Generator:
    """NumPy's generator for a data set's `seed`, checked: an int >= 0 (NumPy's own refusal
    of a negative seed names neither the argument nor the function)."""
    return np.random.default_rng(check_int(seed, "seed", where, 0, "pass e.g. seed=0"))


def toy_dataset(seed: int = 0) -> Dataset:
    """The paper's toy data (Sec. 6.2, App. F.3): 100 points in R^2.

    x_i = (cos 0.5, sin 0.5) + u_i for 50 points with y = +1 and -(cos 0.5, sin 0.5) + u_i
    for 50 with y = -1, u_i ~ U([-0.6, 0.6]^2).
    """
    rng = seeded_rng(seed, "toy_dataset")
    c = np.array([np.cos(0.5), np.sin(0.5)])
    u = rng.uniform(-0.6, 0.6, size=(100, 2))
    X = np.concatenate([c + u[:50], -c + u[50:]])
    y = np.concatenate([np.ones(50), -np.ones(50)])
    return Dataset(X, y)


def soudry_dataset(seed: int = 0) -> Dataset:
    """Soudry et al.'s 2-D set whose L2 max-margin direction is exactly (1, 1)/sqrt(2).

    Support vectors (0.5, 1.5), (1.5, 0.5) with y = +1 and their negatives with y = -1
    (margin <u, y x> = sqrt(2) for u = (1,1)/sqrt(2)), plus 12 random points, 6 per class,
    each with <u, y x> > sqrt(2). Any unit d != u has min over the two support vectors
    <d, x> < <d, (1, 1)> <= sqrt(2), so u is the unique maximiser.
    """
    rng = seeded_rng(seed, "soudry_dataset")
    u = np.array([1.0, 1.0]) / np.sqrt(2)
    u_perp = np.array([1.0, -1.0]) / np.sqrt(2)
    sv = np.array([[0.5, 1.5], [1.5, 0.5]])
    along = np.sqrt(2) + rng.uniform(0.3, 2.0, size=12)
    across = rng.uniform(-1.5, 1.5, size=12)
    pts = along[:, None] * u + across[:, None] * u_perp
    y_extra = np.array([1.0] * 6 + [-1.0] * 6)
    X = np.concatenate([sv, -sv, y_extra[:, None] * pts])
    y = np.concatenate([np.ones(2), -np.ones(2), y_extra])
    return Dataset(X, y)


def separable_gaussians(n: int, dim: int, *, gap: float = 0.5, seed: int = 0) -> Dataset:
    """Two Gaussian classes of n // 2 and n - n // 2 points in R^dim, linearly separable.

    A random unit vector u is drawn; points are N(0, I) shifted along u so that every
    sample has y <u, x> >= gap: the hard-margin SVM through the origin has margin >= gap.
    """
    n = check_int(n, "n", "separable_gaussians", 2)
    dim = check_int(dim, "dim", "separable_gaussians")
    gap = float(check_positive(gap, "gap", "separable_gaussians",
                               "it is the margin the data keep, e.g. gap=0.5", "0.5",
                               scalar=True))
    rng = seeded_rng(seed, "separable_gaussians")
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    y = np.where(np.arange(n) < n // 2, 1.0, -1.0)
    X = rng.normal(size=(n, dim))
    proj = y * (X @ u)
    # Push each point along u so that its projection is at least `gap`: separable by u.
    shift = np.maximum(gap - proj, 0.0) + rng.exponential(0.5, size=n)
    X = X + (y * shift)[:, None] * u
    return Dataset(X, y)
