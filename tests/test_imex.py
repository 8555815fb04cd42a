"""The low-order solvers on the decay split, `DecayIMEX2` (Ascher-Ruuth-Spiteri's (2,2,2)
pair) and `DecayHeun` (exponential Heun, ETD2RK), against exact solutions of
dy/du = a y + sin u - lambda y: their order, their embedded errors, their damping of an
arbitrarily stiff decay (L-stability); and `DecayHeun`'s convex weights: a moment stays
>= 0, an equilibrium is kept, a pure decay is exact."""

from __future__ import annotations

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marginflow.flows import DecayHeun, DecayIMEX2

A = 0.5  # the explicit part's own rate: F(u, y) = A y + sin u


def _exact(u, lam, y0):
    # y' = k y + sin u, k = A - lam: y = C e^{k u} - (k sin u + cos u) / (1 + k^2).
    k = A - lam
    particular = lambda s: -(k * np.sin(s) + np.cos(s)) / (1.0 + k * k)  # noqa: E731
    return (y0 - particular(0.0)) * np.exp(k * u) + particular(u)


# lambda is the args: one compiled step per solver serves every lambda and du.
_TERMS = dfx.MultiTerm(dfx.ODETerm(lambda u, y, lam: A * y + jnp.sin(u)),
                       dfx.ODETerm(lambda u, y, lam: jnp.full_like(y, lam)))
_STEPS = {}


def _step(solver):
    name = type(solver).__name__
    if name not in _STEPS:
        _STEPS[name] = jax.jit(
            lambda u, du, y, f, lam: solver.step(_TERMS, u, u + du, y, lam, f, False))
    return _STEPS[name]


def _integrate(lam, du, n, y0=1.0, solver=None, u0=0.0):
    """n steps of du from (u0, y0); the state and the last step's error estimate."""
    solver = DecayIMEX2() if solver is None else solver
    step, lam = _step(solver), jnp.asarray(lam, jnp.float64)
    y = jnp.asarray([y0], jnp.float64)
    f = solver.init(_TERMS, u0, u0 + du, y, lam)
    u = u0
    for _ in range(n):
        y, err, _, f, result = step(u, du, y, f, lam)
        assert result == dfx.RESULTS.successful
        u += du
    return float(y[0]), float(err[0])


def test_second_order_against_the_exact_solution():
    # lam du <= 0.4 here: the asymptotic regime, where halving du divides the error by 4
    # up to O(du) corrections (the next term of the error expansion is O(du^3)).
    lam, U = 4.0, 2.0
    errors = []
    for n in (20, 40, 80, 160):
        y, _ = _integrate(lam, U / n, n)
        errors.append(abs(y - _exact(U, lam, 1.0)))
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all((orders > 1.8) & (orders < 2.2)), (errors, orders)


def test_the_embedded_error_is_the_local_error_of_a_first_order_step():
    # One step from the same state: the estimate y1 - y_hat (y_hat an IMEX Euler step)
    # is O(du^2), so halving du quarters it (to O(du) relative).
    lam = 4.0
    ratios = []
    for du in (0.02, 0.01, 0.005):
        _, e1 = _integrate(lam, du, 1)
        _, e2 = _integrate(lam, du / 2, 1)
        ratios.append(e1 / e2)
    assert np.all((np.asarray(ratios) > 3.6) & (np.asarray(ratios) < 4.4)), ratios


@pytest.mark.parametrize("lam", [1e4, 1e12])
def test_a_stiff_decay_is_damped_at_any_step(lam):
    # du lam = 1e3 and 1e11: an explicit step would multiply y by ~(du lam)^2 per step.
    # The exact solution relaxes at once to the quasi-steady y ~ sin(u) / lam; an
    # L-stable, stiffly accurate pair lands within O(1/lam) of it, without oscillation.
    du, n = 0.1, 20
    y, _ = _integrate(lam, du, n)
    exact = _exact(du * n, lam, 1.0)
    assert abs(y - exact) <= 2.0 / lam, (y, exact)


@pytest.mark.parametrize("lam", [0.0, 4.0])
def test_decay_heun_is_second_order(lam):
    # lam = 0 is Heun's method itself; lam du <= 0.4: the asymptotic regime (as above).
    U = 2.0
    errors = [abs(_integrate(lam, U / n, n, solver=DecayHeun())[0] - _exact(U, lam, 1.0))
              for n in (20, 40, 80, 160)]
    orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all((orders > 1.8) & (orders < 2.2)), (errors, orders)


@pytest.mark.parametrize("lam, est_order, err_order", [(4.0, 2, 3), (1e4, 1, 1)])
def test_decay_heun_estimates_its_local_error(lam, est_order, err_order):
    """One step from the exact solution at u = 3. Non-stiff (lam du <= 0.08) the estimate
    is the predictor's local error, O(du^2), above the step's own O(du^3). Stiff (lam du
    >= 50) both are O(du): the error of the lag y ~ q - q'/lam that the corrector leaves
    (module `_etd`), and the estimate stays within a small factor above it (2-3 here,
    where q = sin u / lam; at most 10 is asserted). Never below the error: the controller
    does not accept a step that errs more than it was told."""
    solver, u0 = DecayHeun(), 3.0
    errs, ests = [], []
    for du in (0.02, 0.01, 0.005):
        y, est = _integrate(lam, du, 1, y0=_exact(u0, lam, 1.0), solver=solver, u0=u0)
        errs.append(abs(y - _exact(u0 + du, lam, 1.0)))
        ests.append(abs(est))
    ests, errs = np.asarray(ests), np.asarray(errs)
    for values, order in ((ests, est_order), (errs, err_order)):
        halving = np.log2(values[:-1] / values[1:])
        assert np.all(np.abs(halving - order) < 0.2), (values, halving)
    assert np.all(ests >= errs), (ests, errs)
    if est_order == err_order:
        assert np.all(ests <= 10 * errs), (ests, errs)


@pytest.mark.parametrize("lam", [1e4, 1e12])
def test_decay_heun_damps_a_stiff_decay(lam):
    # As for DecayIMEX2, but the exponential is exact for the decay: what is left is the
    # stiff local error O(du / lam^2) (previous test), so 1e-3 / lam is a wide bound.
    du, n = 0.1, 20
    y, _ = _integrate(lam, du, n, solver=DecayHeun())
    exact = _exact(du * n, lam, 1.0)
    assert abs(y - exact) <= 1e-3 / lam, (y, exact)


def _rate(u, y, args):
    return 0.1 * jnp.exp(u) * jnp.ones_like(y)  # RMSProp's decay rate in u = log t


def _q(u, m):
    return jnp.exp(-2 * u) * (1.1 + jnp.sin(7 * u + 3 * m))  # >= 0, <= 2.1 e^{-2u}


# F = lam(u) (wq q(u, m) + c): the moment equation m' = lam (q - m), a pure decay
# (wq = c = 0), or an equilibrium y = c; (wq, c) are the args, so one program serves all.
_TERMS_Q = dfx.MultiTerm(
    dfx.ODETerm(lambda u, y, args: _rate(u, y, args) * (args[0] * _q(u, y) + args[1])),
    dfx.ODETerm(_rate))


@jax.jit
def _one_step(u0, du, y0, wq, c):
    solver, args = DecayHeun(), (wq, c)
    f0 = solver.init(_TERMS_Q, u0, u0 + du, y0, args)
    return solver.step(_TERMS_Q, u0, u0 + du, y0, args, f0, False)[0]


def test_decay_heun_keeps_a_moment_between_its_values():
    """m' = lam(u) (q(u) - m), lam(u) = 0.1 e^u (RMSProp's rate in u = log t), q >= 0.
    The weights of y0, q0 and q_a are >= 0 and sum to 1, so m1 lies between them for every
    step size: >= 0 even where m0 >> q (a gradient that fell), where an extrapolating
    stage goes negative. A pure decay (q = 0) is exact, e^{-Lambda} m0, with Lambda from
    Simpson's rule (exact to O(du^5) relative for e^u)."""
    zero = np.zeros(4)
    for u0 in (-5.0, 0.0, 3.0, 20.0):
        for du in (1e-3, 0.1, 1.0, 5.0):
            m0 = np.array([0.0, 1e-3, 1.0, 1e3]) * float(_q(u0, 0.0))
            m1 = np.asarray(_one_step(u0, du, m0, 1.0, zero))
            top = np.maximum(m0, 2.1 * np.exp(-2 * u0))  # q <= 2.1 e^{-2u} <= that at u0
            assert np.all(m1 >= 0) and np.all(m1 <= top * (1 + 1e-14)), (u0, du, m0, m1)
            decayed = np.asarray(_one_step(u0, du, m0, 0.0, zero))
            exact = m0 * np.exp(-0.1 * (np.exp(u0 + du) - np.exp(u0)))
            # Simpson's error on Lambda = int 0.1 e^u du is at most du^5 max|f^(4)| / 2880
            # = Lambda du^4 (du e^du / (e^du - 1)) / 2880, and du e^du / (e^du - 1) <= 1 + du:
            # the relative error of e^{-Lambda} is below that.
            big = 0.1 * np.exp(u0) * np.expm1(du)
            simpson = big * du**4 / 2880 * (1 + du)
            assert np.allclose(decayed, exact, rtol=simpson + 1e-14, atol=0), (
                u0, du, decayed, exact)


def test_decay_heun_keeps_an_equilibrium():
    # F = lam(u) c and y0 = c: y stays c, to rounding, at any step and any rate (y1 is a
    # sum of a few rounded products: a few ulp, 8 eps allowed; measured 2 ulp).
    c = np.array([1e-30, 1e-3, 2.0, 1e3])
    for u0, du in ((-3.0, 0.5), (10.0, 3.0), (200.0, 30.0)):
        y1 = _one_step(u0, du, c, 0.0, c)
        np.testing.assert_allclose(np.asarray(y1), c, rtol=8 * np.finfo(np.float64).eps)
