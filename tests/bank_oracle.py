"""The verification bank's independent oracle: the flows' ODE written in NumPy from the equations.

Nothing here calls marginflow. Each model's output Phi(w; x) and the gradient of the SUM loss
L(w) = sum_i ell_i(Phi(w; x_i)) are derived by hand (the chain rule through the layers, written
out below), and the flows' vector field is written from its definition:

    dw/dt = -h * g,   g = grad L(w),   dm/dt = phi(m, g),   m(0) = 0,
    h = 1 / sqrt(eps + psi)   (eps inside the root)   or   h = 1 / (sqrt(psi) + eps)   (outside),

    GD:       h = 1 (no m);
    AdaGrad:  phi = g^2,              psi = m;
    RMSProp:  phi = (1 - b)(g^2 - m), psi = m;
    Adam:     phi = (1 - b)(g^2 - m), psi = m / c(t), with c(t) = 1 - b^t ("paper") or
              c(t) = 1 - e^{-(1-b) t} ("ema").

At t = 0 both m and c(t) vanish. Their ratio has a finite limit, from m(t) = (1 - b) g(0)^2 t
+ O(t^2) and c(t) = c'(0) t + O(t^2): psi(0+) = (1 - b) g(0)^2 / c'(0), with c'(0) = -log b
("paper") or 1 - b ("ema", so psi(0+) = g(0)^2). The field uses that limit at t = 0.

The ODE is integrated by scipy, in plain w: LSODA (Adams / BDF switching) in t on [0, 1], then
BDF in u = log t: different methods, variables and code from marginflow's (which integrates
v = w ||w||^(L-1) with diffrax: its own IMEX Runge-Kutta pair, Dopri8, Kvaerno5).

Parameter layouts (the flat vector w; the test checks them against the models once):
- "linear":      W of shape (C, d) row-major (C = 1: w = the weight vector);
- "deep_linear": W_1 (h_1, d), W_2 (h_2, h_1), ..., W_D (C, h_{D-1}), each row-major, in order;
- "mlp":         the same layout as deep_linear (layers of a bias-free MLP);
- "toy":         (v, w_1, w_2) for Phi = v * sigma(<w, x>).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.integrate
import scipy.optimize

# ------------------------------------------------------------------------- models
#
# Batched forward passes (rows of X are samples) and their hand-written reverse passes.
# dPhi is dL/dPhi (N, C) (or (N,) for a scalar output); each backward returns dL/dw, flat.


def layer_shapes(kind: str, dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of the parameter blocks in flattening order (see the module docstring)."""
    if kind == "toy":
        return [(), (2,)]
    return [(o, i) for i, o in zip(dims[:-1], dims[1:], strict=True)]


def unpack(kind: str, dims: tuple[int, ...], w: np.ndarray) -> list[np.ndarray]:
    blocks, k = [], 0
    for shape in layer_shapes(kind, dims):
        size = int(np.prod(shape, dtype=int))
        blocks.append(np.asarray(w[k : k + size]).reshape(shape))
        k += size
    if k != w.shape[0]:
        raise ValueError(f"{kind} {dims}: {w.shape[0]} parameters, the layout has {k}.")
    return blocks


def pack(blocks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(b) for b in blocks])


def leaky_half(z):
    """sigma(z) = z for z >= 0, z / 2 for z < 0."""
    return np.where(z >= 0, z, 0.5 * z)


def leaky_half_slope(z):
    return np.where(z >= 0, 1.0, 0.5)


def forward(kind: str, blocks: list[np.ndarray], X: np.ndarray):
    """Phi for every row of X, and the intermediate values the backward pass needs."""
    if kind == "toy":
        v, u = blocks
        z = X @ u  # (N,)
        return v * leaky_half(z), (z,)
    if kind in ("linear", "deep_linear"):
        acts = [X]
        for W in blocks:
            acts.append(acts[-1] @ W.T)  # z_k = W_k z_{k-1}, row-wise
        return _squeeze(acts[-1]), (acts,)
    if kind == "mlp":
        # z_0 = x; a_k = W_k z_{k-1}; z_k = max(a_k, 0)^2 (k < D); Phi = W_D z_{D-1}.
        zs, pre = [X], []
        for W in blocks[:-1]:
            a = zs[-1] @ W.T
            pre.append(a)
            zs.append(np.maximum(a, 0.0) ** 2)
        return _squeeze(zs[-1] @ blocks[-1].T), (zs, pre)
    raise ValueError(kind)


def _squeeze(out):
    return out[:, 0] if out.shape[1] == 1 else out


def backward(kind: str, blocks, X, cache, dPhi: np.ndarray) -> np.ndarray:
    """dL/dw from dL/dPhi, by the chain rule through the layers."""
    if kind == "toy":
        v, u = blocks
        (z,) = cache
        # Phi_i = v sigma(z_i), z_i = <u, x_i>: dPhi/dv = sigma(z), dPhi/du = v sigma'(z) x.
        dv = np.sum(dPhi * leaky_half(z))
        du = (dPhi * v * leaky_half_slope(z)) @ X
        return pack([np.asarray(dv), du])
    delta = dPhi[:, None] if dPhi.ndim == 1 else dPhi  # dL/d(output of the top layer)
    if kind in ("linear", "deep_linear"):
        (acts,) = cache
        grads = [None] * len(blocks)
        for k in range(len(blocks) - 1, -1, -1):
            # z_{k+1} = W_k z_k: dL/dW_k = sum_i delta_i z_{k,i}^T; dL/dz_k = W_k^T delta.
            grads[k] = delta.T @ acts[k]
            delta = delta @ blocks[k]
        return pack(grads)
    if kind == "mlp":
        zs, pre = cache
        grads = [None] * len(blocks)
        grads[-1] = delta.T @ zs[-1]
        delta = delta @ blocks[-1]  # dL/dz_{D-1}
        for k in range(len(blocks) - 2, -1, -1):
            # z = max(a, 0)^2: dz/da = 2 max(a, 0).
            delta = delta * 2.0 * np.maximum(pre[k], 0.0)
            grads[k] = delta.T @ zs[k]
            delta = delta @ blocks[k]
        return pack(grads)
    raise ValueError(kind)


# ------------------------------------------------------------------------- losses
#
# Binary: q_i = y_i Phi_i. Multi-class: the per-sample loss is
# log(1 + sum_{j != y} e^{Phi_j - Phi_y}) = logsumexp_j(Phi_j) - Phi_y.


def loss_terms_log(loss: str, Phi: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log ell_i, computed so that it stays finite while ell_i is far below 1e-308."""
    if loss == "exponential":
        return -(y * Phi)
    if loss == "logistic":
        return _log_log1p_exp_neg(y * Phi)
    if loss == "cross_entropy":
        # ell = log(1 + s), s = sum_{j != y} e^{Phi_j - Phi_y}; log ell = log(log1p(s)).
        # With r = log s: for r < -30, log1p(s) = s (1 - s/2 + s^2/3 - ...) and
        # log ell = r + log1p(-s/2 + s^2/3) (the dropped terms are below s^3 < 1e-39).
        others = _others(Phi, y)
        r = logsumexp(others, axis=1)
        s = np.exp(np.minimum(r, 0.0))
        return np.where(r < -30.0, r + np.log1p(-s / 2 + s * s / 3),
                        np.log(np.logaddexp(0.0, np.maximum(r, -30.0))))
    raise ValueError(loss)


def logsumexp(a: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    """log sum e^a, shifted by the largest term (so no term overflows, and a sum that
    underflows stays finite in log space); -inf where every term is -inf.

    Written out because scipy.special.logsumexp's array-API dispatch cost 2/3 of the
    oracle's time on the multi-class rows (measured: 14 s of a 19.7 s profile), for the same
    numbers to rounding (the shift is the standard one)."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # log 0 = -inf: a row of -inf terms, as documented
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return out if keepdims else np.squeeze(out, axis=axis)


def _log_log1p_exp_neg(q):
    """log(log(1 + e^{-q})): series in u = e^{-q} for q > 30 (error below u^3 / 4)."""
    u = np.exp(-np.maximum(q, 30.0))
    return np.where(q > 30.0, -q + np.log1p(-u / 2 + u * u / 3),
                    np.log(np.logaddexp(0.0, -np.minimum(q, 30.0))))


def _others(Phi, y):
    """Phi_j - Phi_{y_i} for j != y_i; -inf at j = y_i."""
    own = np.take_along_axis(Phi, y[:, None], axis=1)
    mask = np.arange(Phi.shape[1])[None, :] == y[:, None]
    return np.where(mask, -np.inf, Phi - own)


def log_loss(loss: str, Phi, y) -> float:
    """log L = log sum_i ell_i (logsumexp: finite when L underflows)."""
    return float(logsumexp(loss_terms_log(loss, Phi, y)))


def loss_and_dphi(loss: str, Phi: np.ndarray, y: np.ndarray):
    """(log L, dL/dPhi / L) for the SUM loss L = sum_i ell_i.

    Both are formed in log space (every per-sample derivative is e^{something} times a
    sign, divided by L as e^{something - log L}), so they stay accurate when L is e^{-500}.
    """
    log_l = log_loss(loss, Phi, y)
    if loss == "exponential":
        # ell = e^{-q}, q = y Phi: d ell / d Phi = -y e^{-q}.
        return log_l, -y * np.exp(-(y * Phi) - log_l)
    if loss == "logistic":
        # ell(q) = log(1 + e^{-q}); ell'(q) = -1 / (1 + e^{q}) = -e^{-log(1 + e^{q})}.
        return log_l, -y * np.exp(-np.logaddexp(0.0, y * Phi) - log_l)
    if loss == "cross_entropy":
        # ell_i = logsumexp_j Phi_ij - Phi_{i, y_i}; d ell_i / d Phi_ij = softmax_ij for
        # j != y_i, and -sum_{j != y_i} softmax_ij for j = y_i (the same number as
        # softmax - 1, without the cancellation).
        lse = logsumexp(Phi, axis=1, keepdims=True)
        d = np.exp(Phi - lse - log_l)
        rows = np.arange(len(y))
        d[rows, y] = 0.0
        d[rows, y] = -np.sum(d, axis=1)
        return log_l, d
    raise ValueError(loss)


@dataclass(frozen=True)
class Problem:
    """A model kind and its dims, the data (X, y) and a loss: L(w) and grad L(w) in NumPy."""

    kind: str
    dims: tuple[int, ...]
    X: np.ndarray
    y: np.ndarray
    loss: str

    def log_loss_and_grad_log(self, w: np.ndarray):
        """(log L(w), grad log L(w)) (both fine when L itself underflows)."""
        blocks = unpack(self.kind, self.dims, w)
        Phi, cache = forward(self.kind, blocks, self.X)
        log_l, dPhi = loss_and_dphi(self.loss, Phi, self.y)
        return log_l, backward(self.kind, blocks, self.X, cache, dPhi)

    def loss_and_grad(self, w: np.ndarray):
        """(L(w), grad L(w)) in plain float64 (for moderate losses)."""
        log_l, glog = self.log_loss_and_grad_log(w)
        value = np.exp(log_l)
        return value, value * glog

    def value(self, w: np.ndarray) -> float:
        """L(w) directly from the per-sample losses (no gradient: the finite-difference
        check compares grad L with differences of this)."""
        Phi = self.outputs(w)
        if self.loss == "exponential":
            return float(np.sum(np.exp(-(self.y * Phi))))
        if self.loss == "logistic":
            return float(np.sum(np.logaddexp(0.0, -(self.y * Phi))))
        lse = logsumexp(Phi, axis=1)
        return float(np.sum(lse - np.take_along_axis(Phi, self.y[:, None], axis=1)[:, 0]))

    def log_loss(self, w: np.ndarray) -> float:
        Phi, _ = forward(self.kind, unpack(self.kind, self.dims, w), self.X)
        return log_loss(self.loss, Phi, self.y)

    def outputs(self, w: np.ndarray) -> np.ndarray:
        return forward(self.kind, unpack(self.kind, self.dims, w), self.X)[0]


# -------------------------------------------------------------------------- flows


@dataclass(frozen=True)
class FlowSpec:
    """Which flow, with its hyper-parameters (a bank row builds marginflow's flow from it)."""

    kind: str  # "gd", "adagrad", "rmsprop", "adam"
    eps: float = 1e-5
    b: float = 0.9
    correction: str = "paper"  # Adam only: "paper" (1 - b^t) or "ema" (1 - e^{-(1-b)t})
    conditioner: str = "eps_inside"  # or "eps_outside"

    @property
    def has_m(self) -> bool:
        return self.kind != "gd"

    def correction_and_limit(self, t: float):
        """(c(t), psi(0+) / g(0)^2) of Adam's bias correction."""
        b = self.b
        if self.correction == "paper":
            return -np.expm1(t * np.log(b)), (1.0 - b) / -np.log(b)
        return -np.expm1(-(1.0 - b) * t), 1.0

    def psi(self, t: float, m: np.ndarray, g: np.ndarray) -> np.ndarray:
        m = np.maximum(m, 0.0)  # m >= 0 on the exact solution; a solver stage may dip below
        if self.kind in ("adagrad", "rmsprop"):
            return m
        c, limit = self.correction_and_limit(t)
        return m / c if t > 0 else limit * g * g

    def h(self, t: float, m: np.ndarray, g: np.ndarray) -> np.ndarray:
        if self.kind == "gd":
            return np.ones_like(g)
        psi = self.psi(t, m, g)
        if self.conditioner == "eps_inside":
            return 1.0 / np.sqrt(self.eps + psi)
        return 1.0 / (np.sqrt(psi) + self.eps)

    def h_limit(self) -> float:
        """Theorem 5's limit of h for RMSProp and Adam (m -> 0)."""
        return self.eps**-0.5 if self.conditioner == "eps_inside" else 1.0 / self.eps

    def phi(self, m: np.ndarray, g: np.ndarray) -> np.ndarray:
        if self.kind == "adagrad":
            return g * g
        return (1.0 - self.b) * (g * g - m)


def reference_solution(flow: FlowSpec, problem: Problem, w0: np.ndarray, ts, *, rtol=1e-11,
                       penalty: bool = False, density: int = 1, turns: list | None = None):
    """The exact flow from (w0, m = 0) at t = 0, at the times `ts` (increasing, > 0).

    [0, 1] is integrated in t; from t = 1 on in u = log t, where the late field is O(1):
    dw/du = -h * (t g), dm/du = t phi(m, g), with t g = e^{log L + u} grad log L formed in
    log space (L reaches e^{-230} at t = 1e100; t g stays O(1)).

    Returns (w, m, I), each (len(ts), ...): I is Lemma 3's integral (see `penalty_integral`),
    computed only with penalty=True (else None); then `turns`, if given, receives
    (t, i, psi_i, excursion, ell_i there, is a minimum) for every turning point of
    ell_i = -1/2 log h_i. `density` multiplies the grid's density (a check of the
    oracle's own convergence).
    """
    ts = np.asarray(ts, float)
    p = w0.shape[0]
    has_m = flow.has_m

    def split(y):
        return y[:p], (y[p:] if has_m else np.zeros(p))

    def early(t, y):
        w, m = split(y)
        log_l, glog = problem.log_loss_and_grad_log(w)
        g = np.exp(log_l) * glog
        dw = -flow.h(t, m, g) * g
        return np.concatenate([dw, flow.phi(m, g)]) if has_m else dw

    def late(u, y):
        w, m = split(y)
        t = np.exp(u)
        log_l, glog = problem.log_loss_and_grad_log(w)
        # t g; the cap only acts at trial states far off the solution (where t L > e^700)
        tg = np.exp(min(log_l + u, 700.0)) * glog
        g = tg / t  # >= 1e-300-ish for t <= 1e100: representable
        dw = -flow.h(t, m, g) * tg
        if not has_m:
            return dw
        tg2 = tg * g  # t g^2 (may underflow to 0 late: negligible next to t m and eps)
        dm = tg2 if flow.kind == "adagrad" else (1.0 - flow.b) * (tg2 - t * m)
        return np.concatenate([dw, dm])

    y = np.concatenate([w0, np.zeros(p)]) if has_m else np.array(w0, dtype=float)
    # atol: w is O(1) and grows. m matters through h: eps inside the root, dh/h =
    # dm / (2 (eps + m)), so an absolute error far below rtol eps (rtol eps^2 / 100) is
    # enough; outside, dh/h = dm / (2 sqrt(m) (sqrt(m) + eps)) is unbounded as m -> 0 (h is
    # not Lipschitz in m at 0): m must be resolved relative to itself down to where
    # sqrt(m) / eps is negligible. 1e-40 does (sqrt: 1e-20 / eps), and keeps m > 0, off
    # the kink (measured: with 1e-19, BDF stalls where m's noise crosses 0).
    atol = np.full(y.shape, 1e-14)
    if has_m:
        atol[p:] = rtol * flow.eps**2 / 100.0 if flow.conditioner == "eps_inside" else 1e-40
    out = np.full((len(ts), y.shape[0]), np.nan)
    # For I: the conditioner's exponent ell(t) (penalty_integral) on a fine grid: 4000
    # points per decade of t in (1e-12, 1], 1000 per unit of u = log t up to u = 5, 100
    # after. The transient needs the dense grid: a coordinate's ell can wiggle by ~1e-5
    # around a plateau with turns closer than a coarser grid's step; 400 per decade missed
    # 4e-6 of I near t = 0.41 on toy-logistic-adam_ema_out (a leaky-ReLU net, turns 3e-4
    # apart), 100 per unit of u missed 3.5e-6 in t in [1, 10] on mlp-logistic-adam_ema_out.
    early_sel, late_sel = ts <= 1.0, ts > 1.0
    u1 = np.log(max(ts[-1], 1.0))
    grid_t = np.unique(np.concatenate([[0.0], np.geomspace(1e-12, 1.0, 48000 * density + 1),
                                       ts[early_sel]]))
    u_dense = min(u1, 5.0)  # up to t = e^5: turns still come close together there
    grid_u = np.unique(np.concatenate([np.linspace(0.0, u_dense, 1 + int(1000 * density * u_dense)),
                                       np.linspace(0.0, u1, 1 + int(100 * density * u1)),
                                       np.log(ts[late_sel])]))
    sol = _solve(early, 0.0, 1.0, y, ts[early_sel], out, early_sel, "LSODA", rtol, atol)
    pieces = [(grid_t, sol.sol)]
    if late_sel.any():
        # BDF: the m-equation of RMSProp / Adam decays at rate (1 - b) t in u, 1e99 at
        # t = 1e100; an implicit multistep method steps over it. (LSODA's explicit trial
        # steps overflow e^{log L + u} there.)
        sol = _solve(late, 0.0, np.log(ts[-1]), sol.y[:, -1], np.log(ts[late_sel]), out,
                     late_sel, "BDF", rtol, atol)
        pieces.append((np.exp(grid_u[1:]), lambda t, f=sol.sol: f(np.log(t))))
    w, m = out[:, :p], (out[:, p:] if has_m else np.zeros((len(ts), p)))
    if not penalty:
        return w, m, None
    return w, m, penalty_integral(flow, problem, pieces, ts, turns)


def _ell(flow: FlowSpec, problem: Problem, t, y) -> np.ndarray:
    """The exponent ell_i = -1/2 log h_i at (t, y): log(eps + psi) / 4 with eps inside the
    root (h = (eps + psi)^{-1/2}), log(sqrt(psi) + eps) / 2 outside."""
    n = y.shape[0] // 2
    w, m = y[:n], y[n:]
    g = problem.loss_and_grad(w)[1] if t == 0 else np.zeros(n)  # only Adam at t = 0
    psi = flow.psi(t, m, g)
    return (np.log(flow.eps + psi) / 4 if flow.conditioner == "eps_inside"
            else np.log(np.sqrt(psi) + flow.eps) / 2)


def _ells(flow: FlowSpec, problem: Problem, grid, states) -> np.ndarray:
    """`_ell` at every grid point at once: (len(grid), n)."""
    n = states.shape[1] // 2
    m = np.maximum(states[:, n:], 0.0)
    if flow.kind in ("adagrad", "rmsprop"):
        psi = m
    else:
        c, _ = flow.correction_and_limit(np.where(grid > 0, grid, 1.0))
        psi = m / c[:, None]
    out = (np.log(flow.eps + psi) / 4 if flow.conditioner == "eps_inside"
           else np.log(np.sqrt(psi) + flow.eps) / 2)
    for k in np.nonzero(grid == 0)[0]:  # Adam's limit at t = 0 needs g(0)
        out[k] = _ell(flow, problem, 0.0, states[k])
    return out


def penalty_integral(flow: FlowSpec, problem: Problem, pieces, ts, turns=None) -> np.ndarray:
    """Lemma 3's I(t) = int_0^t sum_i (-1/2 d log h_i / ds)_+ ds at the times ts.

    -1/2 d log h_i/dt = d ell_i/dt (`_ell`), so I is the sum over i of the positive
    variation of ell_i on [0, t]: the sum of its rises. That avoids the rate's 1/sqrt(psi)
    singularity (eps outside, psi = 0 at t = 0). `pieces` are (grid, dense solution) pairs
    covering [0, t1]. On the grid alone the variation is a lower bound that misses
    O(h^2 ell'') at every turning point of ell_i (measured: 6.1e-6 on the toy with Adam,
    400 points per decade), so each grid value at which some ell_i turns is replaced by
    ell_i's extremum between the neighbouring grid points, located on the dense solution
    (scipy's bounded Brent to 1e-10 of the interval; the value is then exact to rounding).
    I is then exact up to the dense solution's error and to turning points closer together
    than a grid step. `turns` (a list), if given, receives (t, i, psi_i, excursion,
    ell_i there, is a minimum) at each of them.
    """
    if not flow.has_m:
        return np.zeros(len(ts))
    grids, ells = [], []
    for grid, dense in pieces:
        values = _ells(flow, problem, grid, dense(grid).T)
        _refine_turns(flow, problem, grid, dense, values, turns)
        grids.append(grid)
        ells.append(values)
    grid, ells = np.concatenate(grids), np.concatenate(ells)
    increases = np.sum(np.maximum(np.diff(ells, axis=0), 0.0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(increases)])
    return np.interp(ts, grid, cum)  # the save times are grid points (up to rounding)


def _refine_turns(flow, problem, grid, dense, values, turns=None) -> None:
    """Where ell_i turns at grid point k, replace values[k, i] by ell_i's extremum on
    [grid[k - 1], grid[k + 1]] (in place); append (t, i, psi_i, excursion, ell_i there,
    is a minimum) to `turns`."""
    d = np.diff(values, axis=0)
    minima = (d[:-1] < 0) & (d[1:] > 0)
    maxima = (d[:-1] > 0) & (d[1:] < 0)
    for k, i in zip(*np.nonzero(minima | maxima), strict=True):
        sign = 1.0 if minima[k, i] else -1.0
        lo, hi = grid[k], grid[k + 2]
        res = scipy.optimize.minimize_scalar(
            lambda t, i=i, sign=sign: sign * _ell(flow, problem, t, dense(t))[i],
            bounds=(lo, hi), method="bounded", options={"xatol": 1e-10 * (hi - lo)})
        if res.fun < sign * values[k + 1, i]:
            values[k + 1, i] = sign * res.fun
        if turns is not None:
            y = dense(res.x)
            n = y.shape[0] // 2
            g = problem.loss_and_grad(y[:n])[1] if res.x == 0 else np.zeros(n)
            # the turn's excursion: the smaller rise or fall next to it on the grid
            excursion = min(abs(d[k, i]), abs(d[k + 1, i]))
            turns.append((float(res.x), int(i), float(flow.psi(res.x, y[n:], g)[i]),
                          float(excursion), float(values[k + 1, i]), bool(minima[k, i])))


def _solve(fun, lo, hi, y, evals, out, sel, method, rtol, atol):
    """Integrate fun from lo to hi, write the states at `evals` into out[sel]; the solution."""
    points = np.unique(np.append(evals, hi))
    sol = scipy.integrate.solve_ivp(fun, (lo, hi), y, method=method, t_eval=points,
                                    rtol=rtol, atol=atol, dense_output=True)
    if not sol.success:
        raise RuntimeError(f"reference solver failed: {sol.message}")
    out[sel] = sol.y.T[np.searchsorted(points, evals)]
    return sol
