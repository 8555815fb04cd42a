"""Exact max-margin references: linear L2 / L-infinity max-margin (hard-margin SVM through
the origin), the paper's toy model (docs/math.md section 6), and angles between directions."""

from __future__ import annotations

import equinox as eqx
import numpy as np
import scipy.linalg
import scipy.optimize
from jaxtyping import ArrayLike, Float

from .._records import record_repr
from ..models import Dataset
from ._common import check_n_classes, is_trajectory


def angle(a: Float[ArrayLike, "... p"], b: Float[ArrayLike, "... p"]) -> np.ndarray:
    """The angle (radians, in [0, pi]) between a and b along the last axis (broadcasting).

    Computed as 2 atan2(||a^ - b^||, ||a^ + b^||) with a^ = a/||a||: accurate for tiny
    angles, where arccos(<a^, b^>) loses half the digits (1 - cos theta ~ theta^2 / 2).
    A Trajectory in place of a or b stands for its last saved state traj.w[..., -1, :], as
    everywhere in marginflow.analysis (pass traj.w for the angle at every save).
    """
    a, b = (np.asarray(x.w[..., -1, :] if is_trajectory(x) else x, np.float64) for x in (a, b))
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    if np.any(na == 0) or np.any(nb == 0):
        raise ValueError("angle: both vectors must be non-zero (the angle to 0 is undefined).")
    ua, ub = a / na, b / nb
    return 2.0 * np.arctan2(np.linalg.norm(ua - ub, axis=-1), np.linalg.norm(ua + ub, axis=-1))


class MaxMargin(eqx.Module):
    """The solution of a max-margin problem (see `max_margin_linear`).

    w: the minimiser of ||weights * w|| subject to all constraints >= 1 (the SVM solution);
    direction = w / ||w||_2; margin = 1 / ||weights * w|| (the max-min normalised margin in
    the chosen norm); support: indices of the active constraints (a_c . w = 1 to 1e-9);
    multipliers: the KKT multipliers, one per constraint (l2: v = sum_c alpha_c a_c / s in
    v = s * w; linf: the LP dual mu); kkt: the residuals of the KKT conditions of the returned
    solution, checked directly on all constraints; verified: all of them below 1e-9.
    """

    w: np.ndarray
    direction: np.ndarray
    margin: float = eqx.field(static=True)
    support: np.ndarray
    multipliers: np.ndarray
    kkt: dict = eqx.field(static=True)
    verified: bool = eqx.field(static=True)
    norm: str = eqx.field(static=True)

    __repr__ = record_repr


_VERIFY_TOL = 1e-9


def constraint_rows(X, y, n_classes=None) -> np.ndarray:
    """The rows a_c of the linear constraints a_c . w >= 1 of a linear model.

    Binary (float labels +-1): a_i = y_i x_i, w in R^d. Multi-class (integer labels 0..C-1,
    C = n_classes, default max(y) + 1): one row per pair (i, j != y_i), a = (e_{y_i} - e_j)
    (x) x_i for W of shape (C, d) flattened row-major (the layout of
    Linear(d, out_dim=C).weight).
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or y.shape[0] != X.shape[0] or X.shape[0] == 0:
        raise ValueError(
            f"max_margin_linear: X must be (N, d) and y (N,) with N >= 1, got X {X.shape} and "
            f"y {y.shape}; flatten inputs with X.reshape(N, -1)."
        )
    if not np.all(np.isfinite(X)):
        raise ValueError("max_margin_linear: X must be finite, found NaN/inf entries.")
    if np.issubdtype(y.dtype, np.floating):
        if not set(np.unique(y).tolist()) <= {-1.0, 1.0}:
            raise ValueError(
                "max_margin_linear: float labels mean a binary problem and must be in {-1, +1}, "
                f"got {sorted(set(np.unique(y).tolist()))[:6]}; pass integer labels 0..C-1 for "
                "multi-class."
            )
        check_n_classes(n_classes, 2, True, "max_margin_linear")
        return y[:, None] * X
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(
            "max_margin_linear: labels must be float +-1 (binary) or integers 0..C-1, got "
            f"dtype {y.dtype} with min {y.min()}."
        )
    n, d = X.shape
    c = check_n_classes(n_classes, int(y.max()) + 1, False, "max_margin_linear")
    if c == 1:
        raise ValueError(
            "max_margin_linear: the labels hold one class (all 0), so there is no constraint "
            "j != y_i and no margin to maximise; pass n_classes=C, the model's out_dim, or "
            "data with two classes or more."
        )
    rows = []
    for i in range(n):
        for j in range(c):
            if j != y[i]:
                a = np.zeros((c, d))
                a[y[i]] += X[i]
                a[j] -= X[i]
                rows.append(a.ravel())
    return np.asarray(rows)


def _not_separable(where: str) -> ValueError:
    return ValueError(
        f"{where}: the data is not linearly separable through the origin (the LP "
        "'a_c . w >= 1 for all constraints' is infeasible), so no max-margin solution exists; "
        "check the labels, or use a model with more capacity."
    )


def _linf_lp(A: np.ndarray, where: str):
    """min t s.t. A w >= 1, -t <= w_j <= t (HiGHS): the L-infinity problem; also the
    separability check of both norms."""
    n, d = A.shape
    c = np.zeros(d + 1)
    c[-1] = 1.0
    eye = np.eye(d)
    A_ub = np.block([[-A, np.zeros((n, 1))], [eye, -np.ones((d, 1))], [-eye, -np.ones((d, 1))]])
    b_ub = np.concatenate([-np.ones(n), np.zeros(2 * d)])
    res = scipy.optimize.linprog(
        c, A_ub=A_ub, b_ub=b_ub, bounds=[(None, None)] * (d + 1), method="highs-ds"
    )
    if res.status == 2:
        raise _not_separable(where)
    if res.status != 0:
        raise RuntimeError(f"{where}: scipy.optimize.linprog failed: {res.message}")
    return res.x[:d], res.x[-1]


def _kkt_l2(A, w, alpha):
    slack = A @ w - 1.0
    nw = np.linalg.norm(w)
    return {
        "primal_infeasibility": float(max(0.0, -slack.min())),
        "stationarity": float(np.linalg.norm(w - A.T @ alpha) / nw),
        "complementarity": float(np.max(np.abs(alpha * slack)) / max(1.0, alpha.max())),
        "dual_infeasibility": float(max(0.0, -alpha.min())),
    }


def _worst(kkt: dict) -> float:
    return max(kkt.values())


def _refine_l2(A, w0):
    """Solve the KKT system of min 1/2||w||^2 s.t. A w >= 1 exactly on candidate active sets.

    On the active set S the solution is the minimum-norm solution of A_S w = 1 (w lies in
    the row space of A_S, w = A_S^T alpha); it is the optimum iff alpha >= 0 can be found
    (non-negative least squares) and every other constraint holds. Candidate sets come from
    the approximate solution w0 with several activity thresholds.
    """
    slack0 = A @ w0 - 1.0
    best = None
    for tol in (1e-7, 1e-9, 1e-5, 1e-3, 1e-11):
        S = np.nonzero(slack0 <= tol * max(1.0, float(np.abs(A @ w0).max())))[0]
        if S.size == 0:
            continue
        AS = A[S]
        w = scipy.linalg.lstsq(AS, np.ones(S.size))[0]
        a_S = scipy.optimize.nnls(AS.T, w, maxiter=50 * S.size + 100)[0]
        alpha = np.zeros(A.shape[0])
        alpha[S] = a_S
        kkt = _kkt_l2(A, w, alpha)
        if best is None or _worst(kkt) < _worst(best[2]):
            best = (w, alpha, kkt)
        if _worst(kkt) <= 1e-12:
            break
    return best


def _solve_l2(A, where):
    w_feas, _ = _linf_lp(A, where)
    n, d = A.shape
    res = scipy.optimize.minimize(
        lambda w: 0.5 * np.dot(w, w),
        w_feas,
        jac=lambda w: w,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda w: A @ w - 1.0, "jac": lambda w: A}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    w0 = res.x if np.all(np.isfinite(res.x)) else w_feas
    refined = _refine_l2(A, w0)
    # Multipliers of the raw SLSQP point (for the fallback report): nnls on its active set.
    if refined is None:
        alpha = np.zeros(n)
        return w0, alpha, _kkt_l2(A, w0, alpha)
    return refined


def _solve_linf(A, where):
    """min ||w||_inf s.t. A w >= 1: LP vertex, then the vertex equations solved exactly and
    the dual (stationarity) certificate found by non-negative least squares."""
    n, d = A.shape
    w, t = _linf_lp(A, where)
    slack = A @ w - 1.0
    for tol in (1e-7, 1e-9, 1e-5):
        S = np.nonzero(slack <= tol * max(1.0, t))[0]
        J = np.nonzero(np.abs(np.abs(w) - t) <= tol * max(1.0, t))[0]
        sgn = np.sign(w[J])
        # unknowns (w, t): A_S w = 1; w_j - sgn_j t = 0 on J.
        E = np.zeros((S.size + J.size, d + 1))
        E[: S.size, :d] = A[S]
        E[S.size + np.arange(J.size), J] = 1.0
        E[S.size :, d] = -sgn
        rhs = np.concatenate([np.ones(S.size), np.zeros(J.size)])
        z, _, rank, _ = scipy.linalg.lstsq(E, rhs)
        if rank < d + 1:
            continue  # not a vertex: keep the LP solution
        w_new, t_new = z[:d], z[d]
        if (A @ w_new).min() >= 1.0 - 1e-12 and np.abs(w_new).max() <= t_new * (1 + 1e-12):
            w, t = w_new, t_new
            break
    slack = A @ w - 1.0
    S = np.nonzero(slack <= 1e-9 * max(1.0, t))[0]
    J = np.nonzero(np.abs(np.abs(w) - t) <= 1e-9 * max(1.0, t))[0]
    sgn = np.sign(w[J])
    # Lagrangian t - mu.(A w - 1) + sum_j eta_j (sgn_j w_j - t): stationarity in w and t:
    # A_S^T mu = sum_J eta_j sgn_j e_j, sum_J eta_j = 1, mu, eta >= 0; strong duality:
    # t = sum mu (the dual objective).
    M = np.zeros((d + 1, S.size + J.size))
    M[:d, : S.size] = A[S].T
    M[J, S.size + np.arange(J.size)] = -sgn
    M[d, S.size :] = 1.0
    rhs = np.zeros(d + 1)
    rhs[d] = 1.0
    sol, resid = scipy.optimize.nnls(M, rhs, maxiter=50 * (S.size + J.size) + 100)
    mu = np.zeros(n)
    mu[S] = sol[: S.size]
    kkt = {
        "primal_infeasibility": float(max(0.0, -slack.min(), np.abs(w).max() / t - 1.0)),
        "stationarity": float(resid),
        "duality_gap": float(abs(mu.sum() - t) / t),
        "dual_infeasibility": 0.0,
    }
    return w, mu, kkt


def max_margin_linear(
    X: Float[ArrayLike, "N d"],
    y: ArrayLike,
    *,
    norm: str = "l2",
    weights: Float[ArrayLike, " dim"] | None = None,
    n_classes: int | None = None,
) -> MaxMargin:
    """The max-margin linear classifier through the origin: the exact reference of (P)/(PA).

    norm = "l2":   min 1/2 ||s * w||_2^2  s.t. a_c . w >= 1 for all constraints c,
    norm = "linf": min ||s * w||_inf       s.t. a_c . w >= 1,
    with s = weights (s = 1 for (P); s = h_inf^{-1/2} gives AdaGrad's (PA), Theorem 7),
    a_i = y_i x_i (binary) or (e_{y_i} - e_j) (x) x_i per pair j != y_i (multi-class, W of
    shape (C, d) flattened row-major). The max-min margin is
    margin = max_{||s*w|| = 1} min_c a_c . w = 1 / ||s * w*||, and direction = w*/||w*||_2 is
    what a linear flow's w(t)/||w(t)|| converges to (Theorems 6/7 with a linear model).

    Solved in v = s * w (rows a_c / s) by well-kept solvers, then refined exactly:
    - l2: SLSQP (scipy) from a feasible point of the LP below; then on the active set S
      the KKT system is solved exactly: w = min-norm solution of A_S w = 1 and multipliers
      alpha_S >= 0 with w = A_S^T alpha_S by nnls; the conditions (feasibility,
      stationarity, complementarity, alpha >= 0) are then checked on all constraints.
    - linf: the LP min t s.t. A w >= 1, |w_j| <= t (HiGHS dual simplex), its vertex
      equations re-solved exactly, and a dual certificate (mu, eta) >= 0 with
      A_S^T mu = sum_J eta_j sgn(w_j) e_j, sum eta = 1 found by nnls; duality_gap =
      |sum mu - t|/t. The L-infinity optimum may be non-unique (then `direction` is one of them).

    Args:
        X: (N, d) inputs; y: (N,) float labels +-1 or integer labels 0..C-1.
        norm: "l2" or "linf". weights: None or positive (dim,) (dim = d, or C d multi-class).
        n_classes: multi-class only, the model's out_dim C (default max(y) + 1). A class
            no sample has still enters every sample's constraints as a j != y_i, and w then
            has the length of the model's C d parameters.

    Returns:
        MaxMargin(w, direction, margin, support, multipliers, kkt, verified, norm):
        `verified` is True when every KKT residual is below 1e-9. The problem is solved
        scaled so that its largest |a_cj| is 1 (the result scales with the data); `kkt`
        holds the residuals of that scaled problem, and a margin below about 1e-7 of that
        scale is beyond the LP's feasibility tolerance (reported as not separable).

    Raises:
        ValueError if the data is not linearly separable through the origin, or on bad input.
    """
    where = "max_margin_linear"
    if isinstance(X, Dataset):
        raise TypeError(f"{where}: pass arrays, max_margin_linear(data.X, data.y).")
    if norm not in ("l2", "linf"):
        raise ValueError(f"{where}: `norm` must be 'l2' or 'linf', got {norm!r}.")
    A = constraint_rows(X, y, n_classes)
    dim = A.shape[1]
    if weights is None:
        s = np.ones(dim)
    else:
        s = np.asarray(weights, np.float64)
        if s.shape != (dim,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
            raise ValueError(
                f"{where}: `weights` must be a finite positive vector of shape ({dim},) (h_inf^"
                f"{{-1/2}} for (PA)), got shape {s.shape}; pass conditioner_limit(traj).h_inf "
                "** -0.5."
            )
    Av = A / s  # constraints in v = s * w
    # Solved in units where the largest |a_cj| is 1: the solvers' tolerances are absolute
    # (HiGHS's feasibility 1e-7, SLSQP's), so inputs of size 1e-8 gave a 13% wrong margin.
    # With A/c the solution is c v and the multipliers c^2 alpha (l2) or c mu (linf).
    c = float(np.abs(Av).max())
    if c == 0.0:
        raise _not_separable(where)
    if norm == "l2":
        v, mult, kkt = _solve_l2(Av / c, where)
        v, mult = v / c, mult / c**2
        margin = 1.0 / np.linalg.norm(v)
    else:
        v, mult, kkt = _solve_linf(Av / c, where)
        v, mult = v / c, mult / c
        margin = 1.0 / np.abs(v).max()
    w = v / s
    support = np.nonzero(Av @ v - 1.0 <= 1e-9 * max(1.0, float(np.abs(Av @ v).max())))[0]
    return MaxMargin(
        w=w,
        direction=w / np.linalg.norm(w),
        margin=float(margin),
        support=support,
        multipliers=mult,
        kkt=kkt,
        verified=bool(_worst(kkt) <= _VERIFY_TOL),
        norm=norm,
    )


class ToyMaxMargin(eqx.Module):
    """The two KKT branches of the paper's toy model (see `toy_max_margin`)."""

    gamma_plus: float = eqx.field(static=True)
    gamma_minus: float = eqx.field(static=True)
    theta_plus: np.ndarray
    theta_minus: np.ndarray
    feasible_plus: bool = eqx.field(static=True)
    feasible_minus: bool = eqx.field(static=True)

    __repr__ = record_repr

    def gamma_for(self, theta) -> float:
        """gamma* of the branch of sign(v) of the flat toy parameters theta = (v, w_1, w_2)."""
        v = float(np.asarray(theta)[..., 0])
        if v == 0:
            raise ValueError("gamma_for: v = 0 selects no branch of the toy model.")
        return self.gamma_plus if v > 0 else self.gamma_minus


def _toy_branch(rows):
    try:
        res = max_margin_linear(rows, np.ones(rows.shape[0]), norm="l2")
    except ValueError:
        return False, float("nan"), np.full(2, np.nan)
    return True, 0.5 * res.margin, res.direction


def toy_max_margin(data) -> ToyMaxMargin:
    """Exact max-margin references of the toy model Phi(v, w; x) = v sigma(<w, x>) (Sec. 6.2).

    sigma is the leaky ReLU of slope 1/2, degree L = 2, ||theta||^2 = v^2 + ||w||^2. On the
    branch v > 0 a positive sample needs <w, x> > 0 (margin v <w, x>) and a negative one
    <w, x> < 0 (margin -v <w, x>/2); with w = r u, |u| = 1, the normalised margin is
    v r / (v^2 + r^2) * min(min_{y=+1} <u,x>, min_{y=-1} -<u,x>/2), maximal at v = r:
        gamma*   = 1/2 max_{|u|=1} min( min_{y=+1} <u, x>, min_{y=-1} -<u, x>/2 ),
        gamma*_- = 1/2 max_{|u|=1} min( min_{y=-1} -<u, x>, min_{y=+1} <u, x>/2 )  (v < 0,
    the leaky side on the positive class; docs/math.md section 6). Each max-min of linear
    functions over the unit circle is an L2 max-margin problem with rows a_c (x_i, -x_i/2,
    ...), solved exactly by `max_margin_linear`. A flow converges to the branch its
    initialisation selects: compare with `gamma_for(theta)` (by sign(v)).

    Returns:
        ToyMaxMargin(gamma_plus, gamma_minus, theta_plus, theta_minus, feasible_plus,
        feasible_minus): theta_* are unit flat parameters (v, w_1, w_2) (ToyLeaky's order)
        attaining gamma*; an infeasible branch (no direction separates it) has gamma NaN
        and feasible_* False.
    """
    if not isinstance(data, Dataset) or not data.binary or data.X.shape[1:] != (2,):
        raise ValueError(
            "toy_max_margin: `data` must be a binary Dataset of 2-D inputs (the paper's toy, "
            "e.g. toy_dataset(seed))."
        )
    X = np.asarray(data.X, np.float64)
    y = np.asarray(data.y)
    pos, neg = X[y > 0], X[y < 0]
    ok_p, g_p, u_p = _toy_branch(np.concatenate([pos, -0.5 * neg]))
    # v < 0: Phi = -|v| sigma(<w,x>) needs <w,x> < 0 on the positive class (margin
    # -|v| <w,x>/2) and <w,x> > 0 on the negative class (margin |v| <w,x>).
    ok_m, g_m, u_m = _toy_branch(np.concatenate([neg, -0.5 * pos]))
    if not (ok_p or ok_m):
        raise ValueError(
            "toy_max_margin: neither branch of the toy model separates the data (no unit u "
            "with the class signs of <u, x> required by v > 0 or v < 0)."
        )
    r = 1.0 / np.sqrt(2.0)
    return ToyMaxMargin(
        gamma_plus=g_p,
        gamma_minus=g_m,
        theta_plus=np.concatenate([[r], r * u_p]),
        theta_minus=np.concatenate([[-r], r * u_m]),
        feasible_plus=ok_p,
        feasible_minus=ok_m,
    )
