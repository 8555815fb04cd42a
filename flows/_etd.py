"""Heun's method with the decay integrated exactly: dy/du = F(u, y) - lambda(u) * y.

`DecayHeun` is exponential time differencing of second order (Cox & Matthews' ETD2RK,
2002) in the predictor-corrector form of Heun's method, written for a diagonal decay
whose rate varies along the step. Per entry with lambda > 0, the field is read as
dy/du = lambda (q - y), q = F / lambda the value the entry relaxes to; with
Lambda = int lambda du over the step (Simpson's rule on three values of the rates) and
q taken linear in Lambda between its values at the step's two ends:

    predictor  a  = e^{-Lambda} y0 + (1 - e^{-Lambda}) q0                  (ETD1)
    corrector  y1 = e^{-Lambda} y0 + (phi1 - e^{-Lambda}) q0 + (1 - phi1) q_a,
                                    phi1 = (1 - e^{-Lambda}) / Lambda,

q_a = F(u1, a) / lambda(u1). The three weights are >= 0 and sum to 1, so y1 lies between
y0, q0 and q_a: an RMSProp moment stays >= 0, an equilibrium y = q is kept, and a decay
with Lambda -> infinity lands on q_a (no cancellation of terms of size Lambda |y|, which
stalled diffrax's KenCarp5 from t ~ 1e18; see `_imex`). An entry with lambda = 0 (w,
AdaGrad's moment) gets Heun's step, the limit Lambda -> 0: a = y0 + du F0,
y1 = y0 + du (F0 + F_a) / 2, with convex weights (1/2, 1/2) that average the two sides of
a jump of F (why Heun suits dense kinks: docs/solvers.md, "Dense kinks").

Cost: 2 evaluations of F per step (at a, and at y1, which is the next step's F0), O(p).

The error estimate is y1 - a, the local error of the predictor (as in Heun's method). For
an entry that decays it is divided by 1 + lambda_bar (lambda_bar = Lambda / du, the rate
per unit of u): while lambda_bar du is small it is the predictor's local error
du^2 lambda q' / 2 over 1 + lambda_bar; once the decay is stiff (lambda_bar >> 1) the
predictor errs by the lag q_a - q0 ~ du q', which the corrector removes, and what is left
is the corrector's error in the lag of y behind q (y ~ q - q'/lambda), of order
du q'' / lambda, which (q_a - q0) / lambda_bar matches in size. Without that division a
stiff entry would be charged the whole lag q'/lambda at any step size, and the step
would never be accepted (Shampine's filter 1/(1 + Lambda) leaves q'/lambda as well).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._imex import DecaySplit, _Linear, guard


def _phi1(z):
    """(1 - e^{-z}) / z, 1 at z = 0, for z >= 0 (expm1: no cancellation at small z)."""
    safe = jnp.where(z > 0, z, 1.0)
    return jnp.where(z > 0, -jnp.expm1(-safe) / safe, 1.0)


def _phi2(z):
    """(z - 1 + e^{-z}) / z^2 = (1 - phi1(z)) / z, 1/2 at z = 0, for z >= 0. Below 0.05
    its Taylor series to z^6 (truncation < 4e-15 relative); above, the closed form loses
    at most a factor 40 of precision to cancellation (about 1e-14)."""
    series = 0.5 + z * (-1 / 6 + z * (1 / 24 + z * (-1 / 120 + z * (1 / 720 + z * (
        -1 / 5040 + z / 40320)))))
    safe = jnp.where(z >= 0.05, z, 1.0)
    return jnp.where(z >= 0.05, (safe + jnp.expm1(-safe)) / (safe * safe), series)


class DecayHeun(DecaySplit):
    """Exponential Heun (ETD2RK) for dy/du = F(u, y) - lambda(u) * y, lambda diagonal >= 0
    (module doc): the decay integrated exactly, F by Heun's predictor-corrector; 2
    evaluations of F per step, second order, an RMSProp moment kept >= 0 by convex
    weights, and Heun's own step where lambda = 0. Dense output is linear.

    The default for the flows with a decay on models with dense kinks (the CNN), where
    a step across a kink errs at first order whatever the solver and a step's cost counts
    more than its order (docs/solvers.md, "Dense kinks"). Terms as for `DecaySplit`.
    """

    interpolation_cls: ClassVar = _Linear

    def order(self, terms):
        return 2

    def error_order(self, terms):
        return 2

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump  # no jumps in u (see `_DiagonalIMEX.step`)
        explicit, rates = terms.terms
        du = t1 - t0
        f0 = solver_state
        lam0 = rates.vf(t0, y0, args)
        lam_mid = rates.vf(t0 + du / 2, y0, args)
        lam1 = rates.vf(t1, y0, args)
        # The mean rate over the step (Simpson's rule) and, per entry, F's scale to it:
        # r F = lambda_bar q, so that du r F enters as Lambda q (1 where lambda = 0).
        bar = jtu.tree_map(lambda a, m, b: (a + 4.0 * m + b) / 6.0, lam0, lam_mid, lam1)

        def ratio(lam, mean):
            return jnp.where(lam > 0, mean / jnp.where(lam > 0, lam, 1.0), 1.0)

        r0 = jtu.tree_map(ratio, lam0, bar)
        r1 = jtu.tree_map(ratio, lam1, bar)
        big = jtu.tree_map(lambda b: du * b, bar)  # Lambda
        decay = jtu.tree_map(lambda z: jnp.exp(-z), big)
        a = jtu.tree_map(lambda e, y, z, r, f: e * y + du * _phi1(z) * r * f,
                         decay, y0, big, r0, f0)

        def correction(fa):
            return jtu.tree_map(lambda z, ra, f, rb, g: du * _phi2(z) * (rb * g - ra * f),
                                big, r0, f0, r1, fa)

        # F at a, then at y1, in a loop: the program holds one copy of the field, not two
        # (as `DecayIMEX` runs its stages; compilation dominates a first call).
        def evaluate(i, carry):
            y, fa, _ = carry
            f = explicit.vf(t1, y, args)
            first = i == 0
            y = jtu.tree_map(lambda x, c, yi: jnp.where(first, x + c, yi), a, correction(f), y)
            fa = jtu.tree_map(lambda g, h: jnp.where(first, g, h), f, fa)
            return y, fa, f

        y1, fa, f1 = jax.lax.fori_loop(0, 2, evaluate, (a, f0, f0))
        y_error = jtu.tree_map(lambda c, b: c / (1.0 + b), correction(fa), bar)
        y1, y_error, f1, result, _ = guard(t0, du, y0, f0, y1, y_error, f1)
        return y1, y_error, dict(y0=y0, y1=y1), f1, result
