"""Lemma 3's penalty integral I(t), accumulated step by step from the solver's states.

    I(t) = int_{t0}^t sum_i (-1/2 d log h_i/ds)_+ ds,    Q(t) = log gamma~(t) + L I(t)

is non-decreasing after separation (Lemma 3). The conditioner h_i depends on the state only
through psi_i (m_i, or Adam's m_i / c(t)), so with phi_i = -1/2 log h_i(psi_i) the integral
is the positive variation of each phi_i along the path, summed over i:

    I(t1) = I(t0) + sum_i (phi_i(t1) - phi_i(t0))_+     whenever each phi_i is monotone on
                                                        [t0, t1].

`PenaltyIntegral` wraps the solver that integrates (v, m) and, after each accepted step,
walks each phi_i over the step's end state and seven interior points of its dense output,
adding its rises (`_walk`). A plain sum of the rises of sampled values has two errors:
every sample's tolerance-level error adds its positive part (noise in a flat stretch adds
up with the number of samples), and a turning point between two samples hides
O(h^2 phi'') of the variation. So the walk
- has a dead band per coordinate (`_width`: phi's change under psi's noise level, from the
  controller's rtol and atol): a dip or rise smaller than it is not a turn, so noise adds
  at most one width per coordinate, not one per sample; a genuine wiggle smaller than the
  width after a turn is missed (at most one width each);
- corrects each confirmed turn's sampled extremum to the vertex of the parabola through
  the samples around it (`_vertex`), leaving O(h^3).
Measured on the verification bank (tests/test_bank.py, 90 float64 problems at rtol 1e-10,
oracle: the exact solution's positive variation with each turn located on its dense
output): the plain sum was off by up to 3.6e-5 (1.7e-6 relative, Adam on a deep linear
net, turns inside long early steps) and 2e-6 (late noise, RMSProp with eps outside); with
the band and the correction by at most 9.5e-7 on I = 105 (9e-9 relative), which falls to
6e-8 at rtol 1e-12: what is left is the path's own integration error.

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
from typing import NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from ._wrapped import Wrapped

# Each step's variation is taken over _SUB equal sub-intervals, on the inner solver's dense
# output: a turning point of some phi_i inside a long step needs samples around it (the
# end points alone missed 1.6e-5 of I = 0.0096 on the bank's toy-exp-adam row, rtol 1e-10,
# where phi_0 turns twice in [0.5, 0.9] inside long steps).
_SUB = 8


# The sub-points are taken only in steps that resolve m's decay (decay(u0, u1, args) =
# lambda du < 1): across a stiff step m relaxes to g^2 at once and the dense output of its
# stiff component does not follow the solution (sampled there, linear-exp-rmsprop_out's I
# came out 4e-3 too large); m then tracks g^2, whose turning points the step resolves.


class Band(NamedTuple):
    """Per coordinate i, the state of the dead-band variation of phi_i (`_walk`).

    `rising` says whether phi_i last moved up; `level` is psi_i at phi_i's running maximum
    (rising) or minimum (falling), sampled at time `u_ext`; (u_prev, x_prev) is the sample
    just before that extremum and (u_next, x_next) the one just after it (u_next <= u_ext:
    none yet); (u_last, x_last) is the last sample (u_last is one number)."""

    level: jnp.ndarray
    rising: jnp.ndarray
    u_ext: jnp.ndarray
    u_prev: jnp.ndarray
    x_prev: jnp.ndarray
    u_next: jnp.ndarray
    x_next: jnp.ndarray
    u_last: jnp.ndarray
    x_last: jnp.ndarray

    @classmethod
    def start(cls, u, psi):
        """At the first sample: rising (phi's first moves count), no neighbours yet."""
        u = jnp.asarray(u, psi.dtype)
        us = jnp.full(psi.shape, u)
        return cls(psi, jnp.ones(psi.shape, bool), us, us, psi, us, psi, u, psi)

    def moved_to(self, u):
        """This band in a new time variable (t -> log t) from u on: the extrema and the
        direction are kept, their neighbours' times dropped (no vertex correction for a
        turn at the switch). Any leading batch axes are kept."""
        u = jnp.asarray(u, self.level.dtype)
        return self._replace(u_ext=jnp.full_like(self.u_ext, u),
                             u_prev=jnp.full_like(self.u_prev, u),
                             u_next=jnp.full_like(self.u_next, u),
                             u_last=jnp.full_like(self.u_last, u))


def _vertex(drop, b: Band):
    """How far phi's true extremum lies beyond the sampled one (>= 0): the vertex of the
    parabola through the samples before, at and after it (0 where a neighbour is missing).
    A turning point between samples h apart otherwise hides O(h^2) of the variation (times
    phi's second derivative); with this, O(h^3)."""
    a = drop(b.level, b.x_prev)  # phi(before) - phi(extremum), likewise c after it
    c = drop(b.level, b.x_next)
    h1, h2 = b.u_ext - b.u_prev, b.u_next - b.u_ext
    ok = (h1 > 0) & (h2 > 0)
    h1, h2 = jnp.where(ok, h1, 1.0), jnp.where(ok, h2, 1.0)
    s1, s2 = -a / h1, c / h2  # the two secant slopes
    curv = (s2 - s1) / (h1 + h2)  # A of phi = A x^2 + B x through the three samples
    ok = ok & jnp.where(b.rising, curv < 0, curv > 0)  # a maximum bends down
    slope = s1 + curv * h1
    beyond = jnp.abs(slope * slope / (4 * jnp.where(ok, curv, 1.0)))
    # Kept to max(|a|, |c|): with even spacing the vertex lies between the neighbours and
    # never exceeds it; where the spacing ratio is large (h2 / h1 above ~5, after a jump
    # in step size) the clip can bind and the correction is partial (back to O(h^2)), and
    # it stops a noisy, nearly flat triple from adding a large vertex.
    return jnp.where(ok, jnp.minimum(beyond, jnp.maximum(jnp.abs(a), jnp.abs(c))), 0.0)


def _walk(drop, chain, times, widths, band: Band):
    """The dead-band positive variation of each phi_i along the samples `chain` (psi_i at
    `times`), from `band`; returns (the sum over i of what it adds, the new band).

    Rising: a new maximum adds its increase; a drop of more than the width below it
    confirms a turn (a maximum), and phi then falls. Falling: a new minimum moves the
    level; a rise of more than the width above it confirms a turn (a minimum) and adds
    the whole rise from it. At a confirmed turn the sampled extremum is corrected to the
    true one (`_vertex`). So a monotone stretch adds exactly its variation; noise below
    the width adds nothing (and no corrections: only confirmed turns get one); a genuine
    rise of less than the width after a fall is missed (at most one width per such
    wiggle)."""

    def step(carry, sample):
        b, total = carry
        u, x, width = sample
        d = drop(b.level, x)  # phi(x) - phi(level), formed from the increment of psi
        extreme = jnp.where(b.rising, d > 0, d < 0)  # the run goes on: a new extremum
        turn = jnp.where(b.rising, d < -width, d > width)  # confirmed turn at the level
        first_after = ~extreme & (b.u_next <= b.u_ext) & (u > b.u_ext)
        b = b._replace(u_next=jnp.where(first_after, u, b.u_next),
                       x_next=jnp.where(first_after, x, b.x_next))
        beyond = jnp.where(turn, _vertex(drop, b), 0.0)
        gain = jnp.where(b.rising, jnp.where(extreme, d, 0.0) + beyond,
                         jnp.where(turn, d + beyond, 0.0))
        moved = extreme | turn
        b = Band(
            level=jnp.where(moved, x, b.level),
            rising=jnp.where(turn, ~b.rising, b.rising),
            u_ext=jnp.where(moved, u, b.u_ext),
            u_prev=jnp.where(moved, b.u_last, b.u_prev),
            x_prev=jnp.where(moved, b.x_last, b.x_prev),
            u_next=jnp.where(moved, u, b.u_next),  # none yet
            x_next=jnp.where(moved, x, b.x_next),
            u_last=u,
            x_last=x,
        )
        return (b, total + jnp.sum(gain)), None

    zero = jnp.zeros((), chain.dtype)
    (band, total), _ = jax.lax.scan(step, (band, zero), (times, chain, widths))
    return total, band


def _rise_along(interp, fns, args, tols, t0, t1, s, band, psi_s):
    """The dead-band variation of phi = -1/2 log h from t0 to s (t0 < s <= t1) along the
    step, over the sub-points t0 + k (t1 - t0) / _SUB before s, and psi_s; returns
    (its increase, the band at s). fns = (psi, drop, decay, scale) of `PenaltyIntegral`."""
    psi, drop, decay, scale = fns
    if not args[0].has_conditioner:  # h = 1: nothing to walk (GD, the momentum flow)
        return jnp.zeros((), psi_s.dtype), band
    us = t0 + jnp.arange(1, _SUB) * ((t1 - t0) / _SUB)
    psis = jax.vmap(lambda u: psi(u, interp.evaluate(u), args, False))(us)
    before = (us < s) & (decay(t0, t1, args) < 1.0)
    psis = jnp.where(before.reshape((-1,) + (1,) * jnp.ndim(psi_s)), psis, psi_s)
    chain = jnp.concatenate([psis, psi_s[None]])  # sub-points at or past s add nothing
    times = jnp.concatenate([jnp.where(before, us, s), jnp.asarray(s, us.dtype)[None]])
    widths = jax.vmap(lambda u, x: _width(drop, scale, args, tols, u, x))(times, chain)
    times = times.astype(psi_s.dtype)
    return _walk(lambda a, b: drop(args, a, b), chain, times, widths, band)


def _width(drop, scale, args, tols, u, psi):
    """The dead band of phi_i at a sample: phi's change under psi's noise level
    delta_i = k (rtol |psi_i| + atol psi_i(m = 1)), tols = (rtol, atol, k). The controller
    keeps each step's error below atol + rtol |y| in the RMS norm over the n components
    of (v, m), so one component may carry sqrt(n) times that: k = sqrt(n)."""
    rtol, atol, k = tols
    delta = k * (rtol * jnp.abs(psi) + atol * jnp.abs(scale(u, args, psi)))
    return drop(args, psi, psi + delta)


class _Interpolation(dfx.AbstractLocalInterpolation):
    """The inner solver's dense output for (v, m); I from the interpolated m.

    I(s) = I(t0) + the dead-band variation of phi along the step up to s (`_rise_along`):
    exact at the step's end, and of the inner interpolation's accuracy in between (a linear
    interpolation of I was measured 1e-4 off at t = 0.01 with eps outside, where
    -1/2 log h grows like 1/4 log t).
    """

    t0: float
    t1: float
    inner: dfx.AbstractLocalInterpolation
    I0: jnp.ndarray
    band: Band
    tols: tuple
    args: tuple
    fns: tuple = eqx.field(static=True)

    def __init__(self, inner_cls, fns, *, t0, t1, inner, I0, band, tols, args):
        self.t0, self.t1, self.I0, self.band, self.tols, self.args = t0, t1, I0, band, tols, args
        self.fns = fns
        self.inner = inner_cls(t0=t0, t1=t1, **inner)

    def _at(self, s, left):
        v, m, I = self.inner.evaluate(s, None, left)
        psi_s = self.fns[0](s, (v, m, I), self.args, False)
        rise, _ = _rise_along(self.inner, self.fns, self.args, self.tols, self.t0, self.t1, s,
                              self.band, psi_s)
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
        drop: drop(args, psi0, psi1) -> phi_i(psi1) - phi_i(psi0) per coordinate.
        decay: decay(u0, u1, args) -> lambda du, how far m's linear decay goes in the step.
        scale: scale(u, args, psi) -> psi_i at m = 1 (psi is linear in m; psi gives the
            shape): atol's size in psi.
        rtol, atol: the controller's tolerances, which set the dead band (`_width`).
    The solver state is (the inner state, the `Band`), so each step evaluates psi once, at
    its new end.
    """

    psi: Callable = eqx.field(static=True)
    drop: Callable = eqx.field(static=True)
    decay: Callable = eqx.field(static=True)
    scale: Callable = eqx.field(static=True)
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def fns(self):
        return self.psi, self.drop, self.decay, self.scale

    def tols(self, y):
        n = sum(x.shape[-1] for x in y[:2])  # the components in the controller's norm
        return self.rtol, self.atol, n ** 0.5

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(_Interpolation, self.solver.interpolation_cls, self.fns)

    def init(self, terms, t0, t1, y0, args):
        band = Band.start(t0, self.psi(t0, y0, args, True))
        return self.solver.init(terms, t0, t1, y0, args), band

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state, band = solver_state
        y1, y_err, dense, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        psi1 = self.psi(t1, y1, args, False)
        I0 = y0[2]
        interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense)
        tols = self.tols(y0)
        rise, band1 = _rise_along(interp, self.fns, args, tols, t0, t1, t1, band, psi1)
        I1 = (I0 + rise).astype(I0.dtype)
        y1 = (y1[0], y1[1], I1)
        if y_err is not None:
            y_err = (y_err[0], y_err[1], jnp.zeros_like(I1))
        # The interpolation needs psi's arguments but never the objective (the data).
        light = (args[0], None) + tuple(args[2:])
        dense = dict(inner=dense, I0=I0, band=band, tols=tols, args=light)
        # A rejected step keeps the old band: diffrax keeps the old solver state then.
        return y1, y_err, dense, (inner_state, band1), result
