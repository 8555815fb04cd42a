"""Lemma 3's penalty integral I(t), accumulated step by step from the solver's states.

    I(t) = int_{t0}^t sum_i (-1/2 d log h_i/ds)_+ ds,    Q(t) = log gamma~(t) + L I(t)

is non-decreasing after separation (Lemma 3). The conditioner h_i depends on the state only
through psi_i (m_i, or Adam's m_i / c(t)), so with phi_i = -1/2 log h_i(psi_i) the integral
is the positive variation of each phi_i along the path, summed over i:

    I(t1) = I(t0) + sum_i (phi_i(t1) - phi_i(t0))_+     whenever each phi_i is monotone on
                                                        [t0, t1].

`PenaltyIntegral` wraps the solver that integrates (v, m) and adds, after each accepted
step, the positive variation of each phi_i over the step's end states and seven interior
points of its dense output. Its errors: the variation a turning point of some phi_i hides
inside one of those sub-intervals, O((dt / 8)^2) near a smooth extremum, and the positive
parts of every sample's tolerance-level error, which a positive variation adds up (about
samples x p sqrt(2p) x rtol / 4 with eps inside the root; with eps outside, phi has an
infinite slope at psi = 0 and small psi amplify it). Against the verification bank's oracle:
within 1e-6 (1 + I) plus that bound on 95 of 106 problems, within 2.3 times it on 9, and
3-4e-4 relative on the small MLP's two RMSProp rows with eps outside.

Why not integrate I as a component of the ODE. Its rate, (-1/2 dpsi/dt / (eps + psi))_+, is
1/sqrt(psi)-singular at t = 0 with eps outside the root (psi ~ t), and late in training it is
set by dm/dt = (1 - b)(g^2 - m), whose stages in an IMEX step are off by the stiff part's
rounding: measured on the bank (tests/test_bank.py) as I off by 1e-4 to 1e-3 with eps inside
and by up to 0.18 with eps outside, I even decreasing (Runge-Kutta weights of both signs).
The ODE component now has rate 0 (the inner solver carries it unchanged) and this wrapper
sets it, and its dense output gives I at the save times from the interpolated m.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from ._wrapped import Wrapped

# Each step's variation is taken over _SUB equal sub-intervals, on the inner solver's dense
# output: a turning point of some phi_i inside a sub-interval hides O((dt / _SUB)^2) of its
# variation. Measured on the verification bank's toy-exp-adam row (rtol 1e-10), where
# phi_0 turns twice in [0.5, 0.9] inside long steps: the end points alone missed 1.6e-5
# of I = 0.0096; with 8 sub-intervals the error was below the bank's 1e-6 budget.
_SUB = 8


# The sub-points are taken only in steps that resolve m's decay (decay(u0, u1, args) =
# lambda du < 1): across a stiff step m relaxes to g^2 at once and the dense output of its
# stiff component does not follow the solution (sampled there, linear-exp-rmsprop_out's I
# came out 4e-3 too large); m then tracks g^2, whose turning points the step resolves.


def _rise_along(interp, fns, args, t0, t1, s, psi0, psi_s):
    """The positive variation of phi = -1/2 log h from t0 to s (t0 < s <= t1) along the
    step: over psi0, psi at the sub-points t0 + k (t1 - t0) / _SUB before s, and psi_s.
    fns = (psi, rise, decay) of `PenaltyIntegral`."""
    psi, rise, decay = fns
    us = t0 + jnp.arange(1, _SUB) * ((t1 - t0) / _SUB)
    psis = jax.vmap(lambda u: psi(u, interp.evaluate(u), args, False))(us)
    before = ((us < s) & (decay(t0, t1, args) < 1.0)).reshape((-1,) + (1,) * jnp.ndim(psi_s))
    psis = jnp.where(before, psis, psi_s)  # sub-points at or past s add nothing
    chain = jnp.concatenate([psi0[None], psis, psi_s[None]])
    return jnp.sum(jax.vmap(lambda a, b: rise(args, a, b))(chain[:-1], chain[1:]))


class _Interpolation(dfx.AbstractLocalInterpolation):
    """The inner solver's dense output for (v, m); I from the interpolated m.

    I(s) = I(t0) + the variation of phi along the step up to s (`_rise_along`): exact at
    the step's end, and of the inner interpolation's accuracy in between (a linear
    interpolation of I was measured 1e-4 off at t = 0.01 with eps outside, where
    -1/2 log h grows like 1/4 log t).
    """

    t0: float
    t1: float
    inner: dfx.AbstractLocalInterpolation
    I0: jnp.ndarray
    psi0: jnp.ndarray
    args: tuple
    fns: tuple = eqx.field(static=True)

    def __init__(self, inner_cls, fns, *, t0, t1, inner, I0, psi0, args):
        self.t0, self.t1, self.I0, self.psi0, self.args = t0, t1, I0, psi0, args
        self.fns = fns
        self.inner = inner_cls(t0=t0, t1=t1, **inner)

    def _at(self, s, left):
        v, m, I = self.inner.evaluate(s, None, left)
        psi_s = self.fns[0](s, (v, m, I), self.args, False)
        rise = _rise_along(self.inner, self.fns, self.args, self.t0, self.t1, s, self.psi0,
                           psi_s)
        return v, m, (self.I0 + rise).astype(self.I0.dtype)

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            return self._at(t0, left)
        a, b = self._at(t0, left), self._at(t1, left)
        return tuple(y - x for x, y in zip(a, b, strict=True))


class PenaltyIntegral(Wrapped):
    """`solver` on the state (v, m, I), with I advanced by the step's sampled variation.

    Args:
        solver: integrates (v, m); the field's I-component must be 0.
        psi: psi(u, y, args, start) -> psi_i, the conditioner's argument at (u, y); `start`
            says the gradient must be evaluated (Adam's limit at t = 0 needs g(0)); with
            start False it must not use args[1] (the objective).
        rise: rise(args, psi0, psi1) -> sum_i (phi_i(psi1) - phi_i(psi0))_+.
        decay: decay(u0, u1, args) -> lambda du, how far m's linear decay goes in the step.
    The solver state is (the inner state, psi at the last accepted step's end), so each
    step evaluates psi once, at its new end.
    """

    psi: Callable = eqx.field(static=True)
    rise: Callable = eqx.field(static=True)
    decay: Callable = eqx.field(static=True)

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(_Interpolation, self.solver.interpolation_cls,
                                 (self.psi, self.rise, self.decay))

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args), self.psi(t0, y0, args, True)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state, psi0 = solver_state
        y1, y_err, dense, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        psi1 = self.psi(t1, y1, args, False)
        I0 = y0[2]
        interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense)
        fns = (self.psi, self.rise, self.decay)
        rise = _rise_along(interp, fns, args, t0, t1, t1, psi0, psi1)
        I1 = (I0 + rise).astype(I0.dtype)
        y1 = (y1[0], y1[1], I1)
        if y_err is not None:
            y_err = (y_err[0], y_err[1], jnp.zeros_like(I1))
        # The interpolation needs psi's arguments but never the objective (the data).
        light = (args[0], None) + tuple(args[2:])
        dense = dict(inner=dense, I0=I0, psi0=psi0, args=light)
        return y1, y_err, dense, (inner_state, psi1), result
