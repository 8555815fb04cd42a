"""`DecayIMEX2` (Ascher-Ruuth-Spiteri's (2,2,2) pair on the decay split) against exact
solutions of dy/du = a y + sin u - lambda y: its order, its embedded error's order, and its
damping of an arbitrarily stiff decay (L-stability)."""

from __future__ import annotations

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marginflow.flows import DecayIMEX2

A = 0.5  # the explicit part's own rate: F(u, y) = A y + sin u


def _exact(u, lam, y0):
    # y' = k y + sin u, k = A - lam: y = C e^{k u} - (k sin u + cos u) / (1 + k^2).
    k = A - lam
    particular = lambda s: -(k * np.sin(s) + np.cos(s)) / (1.0 + k * k)  # noqa: E731
    return (y0 - particular(0.0)) * np.exp(k * u) + particular(u)


def _terms(lam):
    return dfx.MultiTerm(dfx.ODETerm(lambda u, y, args: A * y + jnp.sin(u)),
                         dfx.ODETerm(lambda u, y, args: jnp.full_like(y, lam)))


def _integrate(lam, du, n, y0=1.0):
    solver, terms = DecayIMEX2(), _terms(lam)
    step = jax.jit(lambda u, y, f: solver.step(terms, u, u + du, y, None, f, False))
    y = jnp.asarray([y0], jnp.float64)
    f = solver.init(terms, 0.0, du, y, None)
    u = 0.0
    for _ in range(n):
        y, err, _, f, result = step(u, y, f)
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
