"""Exact linear separability through the origin: one LP feasibility problem (HiGHS)."""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse

from ..models import Dataset
from ._common import check_n_classes


def _rows(X: np.ndarray, y: np.ndarray, binary: bool, n_classes: int):
    """The constraint rows a_c (sparse for multi-class): a_c . w >= 1 for every c.

    Binary: a_i = y_i x_i, w in R^d. Multi-class: one row per pair (i, j != y_i),
    a = (e_{y_i} - e_j) (x) x_i for W of shape (C, d) flattened row-major (the layout of
    Linear(d, out_dim=C).weight; `constraint_rows` of max_margin_linear, built sparse here:
    2 d non-zeros per row, N (C - 1) rows).
    """
    if binary:
        return y[:, None] * X
    n, d = X.shape
    c = n_classes
    i = np.repeat(np.arange(n), c - 1)
    k = np.tile(np.arange(c - 1), n)
    j = k + (k >= y[i])  # the classes != y_i, in increasing order
    r = np.arange(i.size)
    cols = np.arange(d)[None, :]
    rows = np.repeat(r, 2 * d)
    idx = np.concatenate([y[i][:, None] * d + cols, j[:, None] * d + cols], axis=1).ravel()
    vals = np.concatenate([X[i], -X[i]], axis=1).ravel()
    return scipy.sparse.csr_array((vals, (rows, idx)), shape=(i.size, c * d))


def linearly_separable(data: Dataset, *, n_classes: int | None = None) -> bool:
    """Whether a linear model through the origin separates `data`: some w with all margins > 0.

    Binary labels y_i = +-1 (Linear(d), out_dim 1): is there w in R^d with
        y_i <x_i, w> >= 1   for all i ?
    Integer labels 0..C-1 (Linear(d, out_dim=C)): is there W in R^{C x d} with
        W_{y_i} x_i - W_j x_i >= 1   for all i and all j != y_i ?
    The constraints are homogeneous in w, so "all margins >= 1" is feasible exactly when
    "all margins > 0" is. Each row a_c is scaled to unit length first (a positive row scale
    does not change the cone {w : A w > 0}; a zero row, x_i = 0, can never be positive),
    and the feasibility LP  min 0  s.t.  A w >= 1,  w free  is solved by HiGHS
    (scipy.optimize.linprog). A feasible answer is checked on its certificate: the returned
    w has min_c a_c . w > 0. By Gordan's alternative, infeasible means there is lambda >= 0,
    lambda != 0, with sum_c lambda_c a_c = 0: no linear model, whatever its parametrisation,
    gives all margins > 0. DeepLinear(dims) computes a linear map too, so an infeasible LP
    means it cannot separate the data either (the converse may fail for a multi-class
    DeepLinear whose hidden width caps the rank of W).

    Separability is what the implicit-bias theory needs (the paper's Assumption 1.III:
    g(log 1/L) > 0);
    without it a flow's loss stays >= ell(0) (L >= 1 exponential, >= log 2 logistic /
    cross-entropy) and cannot go to 0.

    Args:
        data: a Dataset (inputs flattened to (N, d)).
        n_classes: multi-class only, the model's out_dim C (default max(y) + 1). A class
            no sample has still enters every sample's constraints as a j != y_i.

    Returns:
        True if some w (W) gives every sample a positive margin, False otherwise.

    Raises:
        TypeError / ValueError on bad input; RuntimeError if the LP solver reports neither
        a solution nor infeasibility (numerical trouble).
    """
    where = "linearly_separable"
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{where}: `data` must be a marginflow.models.Dataset, got {type(data).__name__}; "
            "wrap arrays with Dataset(X, y)."
        )
    X = np.asarray(data.X, np.float64).reshape(len(data), -1)
    y = np.asarray(data.y)
    binary = data.binary
    c = check_n_classes(n_classes, 2 if binary else data.n_classes, binary, where)
    if not binary:
        y = y.astype(np.int64)
        if c == 1:
            return True  # one class: no constraint j != y_i
    A = _rows(X, y, binary, c)
    norms = (
        np.sqrt(A.multiply(A).sum(axis=1))
        if scipy.sparse.issparse(A)
        else np.linalg.norm(A, axis=1)
    )
    norms = np.asarray(norms).ravel()
    if np.any(norms == 0):
        return False  # a sample at x = 0 has margin 0 for every w
    A = (
        (scipy.sparse.diags_array(1.0 / norms) @ A)
        if scipy.sparse.issparse(A)
        else A / norms[:, None]
    )
    n_rows, dim = A.shape
    res = scipy.optimize.linprog(
        np.zeros(dim),
        A_ub=-A,
        b_ub=-np.ones(n_rows),
        bounds=[(None, None)] * dim,
        method="highs",
    )
    if res.status == 2:
        return False
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"{where}: scipy.optimize.linprog failed: {res.message}")
    return bool(np.min(A @ res.x) > 0)
