"""The losses' f, g, f', g' and the log-terms, with their first and second derivatives as
JAX computes them (autodiff through the custom JVPs), against mpmath at 50 digits.

The references are independent of marginflow's formulas: mpmath evaluates the definitions
f(q) = -log(log1p(e^{-q})) and g(x) = -log(expm1(e^{-x})) and differentiates them
numerically (`mpmath.diff`) at a working precision of 60 + |x| / ln(10) digits, enough to
resolve the cancellation e^{-|x|} against 1 that the definitions carry.

Error measure: |computed - exact| in ulps of the exact value in the tested dtype. Two
rules make the measure meaningful where ulps are not:
- XLA flushes subnormals to zero on CPU, so an exact value below the smallest normal
  number passes when the computed one is within the smallest normal number of it;
- f''' changes sign near q = -0.49, where no formula in f''' itself has relative
  accuracy; there the error is counted in ulps of f''(q), the scale of the logarithmic
  derivative f''' / f'' that the code evaluates to absolute accuracy.
The bounds (README, "Loss numerics") are the worst figures measured on these grids, rounded
up: float64 <= 8 ulps, float32 <= 12 ulps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from marginflow.models import CrossEntropy, Exponential, Logistic

# Worst measured on these grids: float64 6.5 ulps (f'''), float32 10.8 (f''' at q = 7, where
# its logarithmic derivative is a sum of O(1) terms cancelling to 1 - 5u/3, u = e^{-q}; XLA's
# float32 exp and log are themselves 1-2 ulps off). The bounds leave a margin of ~1.2x.
ULP_BOUND = {np.float64: 8, np.float32: 12}

LOGISTIC = Logistic()


def _mp_f(q):
    return -mp.log(mp.log1p(mp.exp(-q)))


def _mp_g(x):
    return -mp.log(mp.expm1(mp.exp(-x)))


def _mp_derivative(fun, x: float, n: int):
    with mp.workdps(60 + int(abs(x) / math.log(10))):
        xm = mp.mpf(x)
        return fun(xm) if n == 0 else mp.diff(fun, xm, n)


def _q_grid(dtype) -> np.ndarray:
    """Dense in every band where exp, expm1 and log1p change regime: around 0 (and the
    roots of f at -0.5413 and of f''' near -0.49), 30-40 (e^{-q} < eps), 680-750 (float64:
    e^{-q} subnormal, then zero) or 80-105 (float32: the same)."""
    if dtype == np.float64:
        parts = [np.linspace(-1e3, -50, 12), np.linspace(-50, -1, 30), np.linspace(-1, 1, 81),
                 np.linspace(-0.56, -0.45, 23), [-0.5413248546129181], np.linspace(1, 30, 20),
                 np.linspace(30, 40, 41), np.linspace(40, 680, 12), np.linspace(680, 750, 71),
                 [1e3, 1.5e3]]
    else:
        parts = [np.linspace(-80, -1, 20), np.linspace(-1, 1, 61), np.linspace(-0.56, -0.45, 12),
                 np.linspace(1, 14, 14), np.linspace(14, 20, 25), np.linspace(20, 80, 10),
                 np.linspace(80, 105, 51), [200.0, 500.0]]
    return np.unique(np.concatenate(parts).astype(dtype))


def _ulps(computed, exact, dtype, scale=None):
    """Error in ulps of max(|exact|, scale) in `dtype`; subnormal results count as exact."""
    computed = np.asarray(computed, np.float64)
    exact = np.asarray(exact, np.float64)
    finfo = np.finfo(dtype)
    ref = np.abs(exact) if scale is None else np.maximum(np.abs(exact), np.abs(scale))
    ulp = np.spacing(np.maximum(ref, finfo.tiny).astype(dtype)).astype(np.float64)
    err = np.abs(computed - exact)
    flushed = (np.abs(exact) < finfo.tiny) & (err <= finfo.tiny)
    return np.where(flushed, 0.0, err / ulp)


def _derivative(fun, n: int):
    for _ in range(n):
        fun = jax.grad(fun)
    return jax.jit(jax.vmap(fun))


_FUNCTIONS = {  # name: (marginflow function, mpmath definition, order of the base function)
    "f": (LOGISTIC.f, _mp_f, 0),
    "f'": (LOGISTIC.f_prime, _mp_f, 1),
    "g": (LOGISTIC.g, _mp_g, 0),
    "g'": (LOGISTIC.g_prime, _mp_g, 1),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(_FUNCTIONS))
def test_logistic_chain_against_mpmath(name, dtype):
    fun, mp_fun, base = _FUNCTIONS[name]
    q = _q_grid(dtype)
    # g is tested where its values g(x) = q cover the same grid: x = f(q).
    x = q if name.startswith("f") else np.array(
        [float(_mp_f(mp.mpf(float(v)))) for v in q]).astype(dtype)
    worst = {}
    for n in range(3):  # value, first and second derivative
        got = np.asarray(_derivative(fun, n)(jnp.asarray(x, dtype)))
        assert got.dtype == dtype
        exact = np.array([float(_mp_derivative(mp_fun, float(v), base + n)) for v in x])
        scale = None
        if base + n == 3 and name.startswith("f"):  # f''': scale f'' near its root
            scale = np.array([float(_mp_derivative(mp_fun, float(v), 2)) for v in x])
        ulps = _ulps(got, exact, dtype, scale)
        worst[n] = float(np.max(ulps))
        bad = np.argmax(ulps)
        assert ulps[bad] <= ULP_BOUND[dtype], (
            f"{name}, derivative {n}, {np.dtype(dtype).name}: {ulps[bad]:.0f} ulps at "
            f"x = {x[bad]!r}: got {got[bad]!r}, exact {exact[bad]!r}"
        )
    print(name, np.dtype(dtype).name, worst)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_logistic_far_tail_limits(dtype):
    """Past the grid (q up to 1e6 in float64, 1e4 in float32) every function is at its
    limit after rounding: with u = e^{-q} < 1e-300, f = q + u/2 + O(u^2) rounds to q, f' =
    1 - u/2 + ... to 1, f'' ~ u/2 and f''' ~ -u/2 to 0; likewise g(x) -> x, g' -> 1,
    g'', g''' -> 0. (The leading terms are from the series of log1p and expm1.)"""
    top = 1e6 if dtype == np.float64 else 1e4
    q = jnp.asarray(np.geomspace(2e3 if dtype == np.float64 else 200.0, top, 9), dtype)
    for name, (fun, _, base) in _FUNCTIONS.items():
        limits = [q, 1.0, 0.0, 0.0][base:base + 3]
        for n, limit in enumerate(limits):
            got = np.asarray(_derivative(fun, n)(q))
            np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(limit, dtype), got.shape),
                                          err_msg=f"{name}, derivative {n}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_binary_log_terms_against_mpmath(dtype):
    """log ell(q) of the exponential (-q) and logistic (log log1p(e^{-q})) losses as
    functions of the output Phi with label y = -1, +1: value, d/dPhi, d^2/dPhi^2."""
    q = _q_grid(dtype)
    for loss, mp_log_term in ((Exponential(), lambda z: -z), (LOGISTIC, lambda z: -_mp_f(z))):
        for label in (1.0, -1.0):
            def term(phi, loss=loss, label=label):
                return loss.log_terms(phi[None], jnp.asarray([label], phi.dtype))[0]

            phi = (label * q).astype(dtype)
            for n in range(3):
                got = np.asarray(_derivative(term, n)(jnp.asarray(phi)))
                exact = np.array([float(label**n * _mp_derivative(mp_log_term, float(v), n))
                                  for v in q])
                ulps = _ulps(got, exact, dtype)
                assert np.max(ulps) <= ULP_BOUND[dtype], (loss.name, label, n, float(np.max(ulps)))


def _ce_cases(dtype):
    """(outputs Phi in R^3, label) with class gaps Phi_y - Phi_j from -1e4 (float32: -80)
    to 1e4 (float32: 1e2), through every band of the soft margin."""
    rng = np.random.default_rng(0)
    big = 1e4 if dtype == np.float64 else 100.0
    gaps = [-big, -50.0, -3.0, -0.54, 0.0, 0.3, 2.0, 33.0, 700.0 if dtype == np.float64 else 90.0,
            big]
    cases = []
    for gap in gaps:
        spread = rng.uniform(0.0, 2.0)
        cases.append((np.array([gap, 0.0, -spread]), 0))            # one close rival
        cases.append((np.array([-spread, gap, 0.0 - 0.5 * spread]), 1))
    return [(phi.astype(dtype), y) for phi, y in cases]


def _mp_ce_reference(phi, y):
    """Value, gradient and Hessian of log(T), T = log1p(S), S = sum_{j != y} e^{Phi_j - Phi_y},
    by hand in mpmath: with a_k = dS/dPhi_k and b_km = d^2 S/dPhi_k dPhi_m,
    d/dPhi_k = a_k / ((1+S) T) and d^2/dPhi_k dPhi_m = b_km / ((1+S) T) - a_k a_m (T + 1) /
    ((1+S) T)^2, evaluated at a precision that resolves every cancellation."""
    with mp.workdps(60 + int(np.max(np.abs(phi)) / math.log(10))):
        p = [mp.mpf(float(v)) for v in phi]
        e = [mp.exp(v - p[y]) if j != y else mp.mpf(0) for j, v in enumerate(p)]
        S = mp.fsum(e)
        T = mp.log1p(S)
        a = [e[k] if k != y else -S for k in range(len(p))]

        def b(k, m):
            if k == y and m == y:
                return S
            if k == y or m == y:
                return -e[m if k == y else k]
            return e[k] if k == m else mp.mpf(0)

        n = len(p)
        grad = [a[k] / ((1 + S) * T) for k in range(n)]
        hess = [[b(k, m) / ((1 + S) * T) - a[k] * a[m] * (T + 1) / ((1 + S) * T) ** 2
                 for m in range(n)] for k in range(n)]
        to = np.vectorize(float)
        return float(mp.log(T)), to(np.array(grad, dtype=object)), to(np.array(hess, dtype=object))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_cross_entropy_log_terms_against_mpmath(dtype):
    """The cross-entropy log-term log(log1p(sum_{j != y} e^{Phi_j - Phi_y})) of one sample:
    value and gradient entry-wise, the Hessian in ulps of its largest entry (its rows sum
    to zero, by shift invariance, so small entries are differences of large ones)."""
    loss = CrossEntropy()

    def term(phi, y):
        return loss.log_terms(phi[None], y[None])[0]

    value = jax.jit(term)
    grad = jax.jit(jax.grad(term))
    hess = jax.jit(jax.hessian(term))
    for phi, y in _ce_cases(dtype):
        yy = jnp.asarray(y)
        exact_v, exact_g, exact_h = _mp_ce_reference(phi, y)
        where = f"Phi = {phi}, y = {y}, {np.dtype(dtype).name}"
        assert _ulps(value(jnp.asarray(phi), yy), exact_v, dtype) <= ULP_BOUND[dtype], where
        g_ulps = _ulps(grad(jnp.asarray(phi), yy), exact_g, dtype)
        assert np.max(g_ulps) <= ULP_BOUND[dtype], (where, g_ulps)
        h = np.asarray(hess(jnp.asarray(phi), yy))
        h_ulps = _ulps(h, exact_h, dtype, scale=np.max(np.abs(exact_h)))
        assert np.max(h_ulps) <= ULP_BOUND[dtype], (where, h_ulps, h, exact_h)


def test_issue_reproducer_late_band_gradient_is_finite():
    """The band where jax.grad of log log1p(e^{-q}) used to be +inf (q in [690, 708])."""
    from marginflow.models._losses import log_softplus_neg

    q = np.array([30.0, 700.0, 705.0, 720.0])
    got = np.asarray(jax.vmap(jax.grad(log_softplus_neg))(jnp.asarray(q)))
    # d/dq log log1p(e^{-q}) = -f'(q) = -(1 - e^{-q}/2 + O(e^{-2q})): -1 within 5e-14 here
    np.testing.assert_allclose(got, -(1.0 - np.exp(-q) / 2.0), rtol=4 * np.finfo(float).eps)
