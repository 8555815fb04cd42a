"""An IMEX Runge-Kutta solver for dy/du = F(u, y) - lambda(u) * y with lambda diagonal, >= 0.

`simulate`'s m-equation decays at the rate lambda = (1 - b) dt/du, 1e99 at t = 1e100 in the
variable u = log t: the one stiff part of the flows. This solver treats F explicitly and the
decay implicitly with the additive Runge-Kutta pair of Kennedy & Carpenter (2003), 5th order
with a 4th-order embedded estimate (the tableau of diffrax's `KenCarp5`), and differs from
`diffrax.KenCarp5` in three places, each needed beyond t ~ 1e18:

1. The implicit stage equation Y_i = P_i - gamma du lambda(u_i) Y_i is solved exactly by one
   division (no root finder, no Jacobian: O(p)).
2. The new state is Y_8 + du sum_j (b_j - aE_8j) kE_j, which equals y0 + du sum_j b_j k_j
   because the implicit tableau is stiffly accurate (b = its last row). The latter form,
   diffrax's, cancels terms of size du lambda |m| ~ 1e18 |m| whose rounding was measured to
   grow m by a factor ~ 1 + 1e-16 du lambda per step: a stall from t ~ 1e18 on.
3. The error estimate is filtered by (1 + gamma du lambda)^{-1} (Shampine's filter for
   stiff problems), which removes the same rounding from the estimate of the stiff part.
"""

from __future__ import annotations

from typing import ClassVar

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax._solver.kencarp5 import (
    _explicit_tableau,
    _implicit_tableau,
    _KenCarp5Interpolation,
)

_GAMMA = float(_implicit_tableau.a_diagonal[-1])
_S = 8
_C = np.concatenate([[0.0], np.asarray(_explicit_tableau.c, dtype=np.float64)])
_B = np.asarray(_explicit_tableau.b_sol, dtype=np.float64)
_B_ERR = np.asarray(_explicit_tableau.b_error, dtype=np.float64)
_AE = [np.asarray(row, dtype=np.float64) for row in _explicit_tableau.a_lower]
_AI = [np.asarray(row, dtype=np.float64) for row in _implicit_tableau.a_lower]
assert np.allclose(_AI[-1], _B[:-1]) and np.isclose(_B[-1], _GAMMA)  # stiffly accurate


def all_finite(tree) -> jax.Array:
    """Whether every leaf of `tree` is finite everywhere (one traced bool)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]))


class _Interpolation(_KenCarp5Interpolation):
    """KenCarp5's dense output, cast back to the state's dtype (its float64 coefficient
    table would otherwise promote a float32 run's saved values to float64)."""

    def evaluate(self, t0, t1=None, left=True):
        out = super().evaluate(t0, t1, left)
        return jtu.tree_map(lambda o, y: o.astype(y.dtype), out, self.y0)


def _weights(coeffs, ks):
    """sum_j coeffs[j] ks[j] for stacked stage values ks (each leaf (S, ...)), coeffs (S,)
    a table in the leaf's dtype (a float32 run stays float32)."""
    return jtu.tree_map(lambda k: jnp.tensordot(jnp.asarray(coeffs, k.dtype), k, axes=1), ks)


def _lower(rows, n: int) -> np.ndarray:
    """The strictly lower rows (row i - 1 holds stage i's i coefficients) as an n x n table."""
    table = np.zeros((n, n))
    for i, row in enumerate(rows, start=1):
        table[i, :i] = row
    return table


class DecaySplit(dfx.AbstractAdaptiveSolver):
    """A solver for dy/du = F(u, y) - lambda(u) * y, lambda diagonal and >= 0, that takes
    terms = MultiTerm(ODETerm(F), ODETerm(lambda)): the second term's vector field returns
    the decay rates lambda, a pytree like y (constant in y), not a field. Its state is
    F(t0, y0), first same as last."""

    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]

    def init(self, terms, t0, t1, y0, args):
        explicit, _ = terms.terms
        return explicit.vf(t0, y0, args)

    def func(self, terms, t0, y0, args):
        explicit, rates = terms.terms
        f = explicit.vf(t0, y0, args)
        lam = rates.vf(t0, y0, args)
        return jtu.tree_map(lambda fi, li, yi: fi - li * yi, f, lam, y0)


def guard(t0, du, y0, f0, y1, y_error, f1):
    """(y1, y_error, f1, result) of a step made safe for diffrax's controller where the
    step's values are not finite."""
    # A step too long for the fields (e.g. exp overflowing in the loss) gives NaN/inf:
    # report an infinite error so the controller shrinks the step (a NaN error would
    # make its next step size NaN and stall the run) ...
    finite = all_finite((y1, y_error, f1))
    y_error = jtu.tree_map(lambda e: jnp.where(finite, e, jnp.inf), y_error)
    # ... and a finite candidate: diffrax scales the error by max(|y0|, |y1|), and
    # inf / inf = NaN would again poison the step size (measured: dt -> NaN, a stall).
    y1 = jtu.tree_map(lambda a, b: jnp.where(finite, a, b), y1, y0)
    f1 = jtu.tree_map(lambda a, b: jnp.where(finite, a, b), f1, f0)
    # Non-finite even for a step at the resolution of u: the field itself is NaN/inf
    # there (not a step too long), so stop with that result instead of shrinking forever.
    stuck = jnp.invert(finite) & at_resolution(t0, du)
    result = dfx.RESULTS.where(stuck, dfx.RESULTS.nonfinite, dfx.RESULTS.successful)
    # diffrax drops the result of a rejected step: report a zero error (accepted, with
    # y1 = y0 finite) so that the run stops here with that result.
    y_error = jtu.tree_map(lambda e: jnp.where(stuck, 0.0, e), y_error)
    return y1, y_error, f1, result, finite


def at_resolution(t0, dt) -> jax.Array:
    """Whether a step of dt from t0 is within 4 units in the last place of t0 (of 1e-10
    near 0, where any step is representable: a step shorter than 9e-26 that is still not
    finite is the field's doing).

    Not a fixed fraction like 1e-10 |t0|: the field in u = log t is t h g, and a run from
    w0 (m = 0) started at t0 = 1e5 takes first steps of 1 unit in u's last place (RMSProp
    and AdaGrad on the toy); from 3e4 RMSProp meets non-finite candidates at du ~ 2e-10
    and smallest steps of 4 units."""
    eps = jnp.finfo(jnp.result_type(t0, dt)).eps
    return jnp.abs(dt) <= 4 * eps * jnp.maximum(1e-10, jnp.abs(t0))


class _DiagonalIMEX(DecaySplit):
    """An additive Runge-Kutta pair (explicit F, diagonally implicit decay) for
    dy/du = F(u, y) - lambda(u, y) * y with lambda diagonal, as tables (class attributes):
    the stages' nodes C, the explicit rows AE and implicit rows AI (strictly lower parts,
    stage 0 is y0), the common implicit diagonal GAMMA, the solution's explicit weights
    B_SOL (applied after the last stage: y1 = Y_last + du sum_j B_SOL_j kE_j; all zero
    when the last stage is the solution, whose F is then the next step's first stage),
    and the error weights ERR_E, ERR_I on the explicit and implicit stage derivatives.

    Terms as for `DecaySplit`.
    """

    def _dense(self, y0, y1, kE, kI, du) -> dict:
        raise NotImplementedError

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        explicit, rates = terms.terms
        du = t1 - t0
        # The state holds F(t0, y0) from the previous step. `made_jump` is ignored: simulate's
        # fields have no jumps within a segment (where u becomes log t, a new segment, the
        # solver state is made anew or, at t = 1 from t, dt/du = 1 on both sides) and a
        # lax.cond on it would evaluate both branches under vmap.
        del made_jump
        f0 = solver_state
        n_stages = len(self.C)
        last_is_solution = not np.any(self.B_SOL)
        AE, AI = (jnp.asarray(_lower(rows, n_stages)) for rows in (self.AE, self.AI))
        lam0 = rates.vf(t0, y0, args)

        def stacked(first):  # (S, ...) per leaf: stage 0 filled, the others to come
            return jtu.tree_map(lambda x: jnp.zeros((n_stages, *x.shape), x.dtype).at[0].set(x),
                                first)

        # The stages run in a loop, not unrolled: the program holds one copy of the field F
        # instead of one per stage, as diffrax's own Runge-Kutta solvers do. Measured on the
        # toy's RMSProp run to t = 1e6 (2-core AMD EPYC, fresh process, no cache): XLA
        # compilation 3.4 s against 5.1 s unrolled, tracing 1.0 s against 1.7 s. Compiled
        # runs to 1e100 (RMSProp and Adam, the toy and MLP(4, 8, 2, k=2)) took 0.08-0.14 s
        # either way; the summation order changed, so step counts moved by 1-6%.
        def stage(i, carry):
            kE, kI, _ = carry
            ui = t0 + jnp.asarray(self.C, du.dtype)[i] * du
            if last_is_solution:  # the last stage is the new state, at t1 exactly
                ui = jnp.where(i == n_stages - 1, t1, ui)
            # The rows of the stages not yet computed are 0 in the tables: only j < i count.
            partial = jtu.tree_map(lambda y, e, m: y + du * (e + m), y0,
                                   _weights(AE[i], kE),
                                   _weights(AI[i], kI))
            lam = rates.vf(ui, partial, args)
            # Y = partial - gamma du lam Y, solved exactly (the implicit part is diagonal).
            Y = jtu.tree_map(lambda p, li: p / (1.0 + self.GAMMA * du * li), partial, lam)
            kI = jtu.tree_map(lambda k, li, yi: k.at[i].set(-li * yi), kI, lam, Y)
            kE = jtu.tree_map(lambda k, f: k.at[i].set(f), kE, explicit.vf(ui, Y, args))
            return kE, kI, Y

        kE, kI, Y = jax.lax.fori_loop(
            1, n_stages, stage,
            (stacked(f0), stacked(jtu.tree_map(lambda li, yi: -li * yi, lam0, y0)), y0))
        if last_is_solution:  # its F, the last stage's, is the next step's first
            y1 = Y
            f1 = jtu.tree_map(lambda k: k[-1], kE)
        else:
            y1 = jtu.tree_map(lambda y, k: y + du * k, Y, _weights(self.B_SOL, kE))
            f1 = explicit.vf(t1, y1, args)
        lam1 = rates.vf(t1, y1, args)
        raw = jtu.tree_map(lambda a, b: du * (a + b), _weights(self.ERR_E, kE),
                           _weights(self.ERR_I, kI))
        # Shampine's filter (module doc, point 3).
        y_error = jtu.tree_map(lambda e, li: e / (1.0 + self.GAMMA * du * li), raw, lam1)
        y1, y_error, f1, result, finite = guard(t0, du, y0, f0, y1, y_error, f1)
        # A run stopped at a non-finite field keeps y0 (`guard`): so does its dense output,
        # from which the saves inside the step are interpolated.
        kE, kI = jtu.tree_map(lambda k: jnp.where(finite, k, 0.0), (kE, kI))
        return y1, y_error, self._dense(y0, y1, kE, kI, du), f1, result


class DecayIMEX(_DiagonalIMEX):
    """KenCarp5's IMEX pair for dy/du = F(u, y) - lambda(u, y) * y, lambda diagonal (module doc).

    Call with terms = MultiTerm(ODETerm(F), ODETerm(lambda)): the second term's vector
    field returns the decay rates lambda >= 0, a pytree like y (constant in y), not a
    field. Cost per step: 8 evaluations of F (7 stages and the first-same-as-last value at
    the new state), O(p) memory and time besides.
    """

    interpolation_cls: ClassVar = _Interpolation
    C: ClassVar = _C
    AE: ClassVar = _AE
    AI: ClassVar = _AI
    GAMMA: ClassVar = _GAMMA
    # Stiffly accurate update (module doc, point 2): b_8 - aE_88 = b_8 = gamma.
    B_SOL: ClassVar = np.concatenate([_B[:-1] - _AE[-1], [_B[-1]]])
    ERR_E: ClassVar = _B_ERR
    ERR_I: ClassVar = _B_ERR

    def order(self, terms):
        return 5

    def error_order(self, terms):
        return 5

    def _dense(self, y0, y1, kE, kI, du):
        # KenCarp5's interpolation takes du times the stacked stage values.
        return dict(y0=y0, y1=y1, k=jtu.tree_map(lambda k: du * k, (kE, kI)))


class _Linear(dfx.LocalLinearInterpolation):
    """Linear dense output, in the state's dtype."""

    def evaluate(self, t0, t1=None, left=True):
        out = super().evaluate(t0, t1, left)
        return jtu.tree_map(lambda o, y: o.astype(y.dtype), out, self.y0)


# Ascher, Ruuth & Spiteri (1997), the L-stable, stiffly accurate IMEX pair (2,2,2).
_G2 = 1.0 - 1.0 / np.sqrt(2.0)
_D2 = 1.0 - 1.0 / (2.0 * _G2)


class DecayIMEX2(_DiagonalIMEX):
    """Ascher-Ruuth-Spiteri's IMEX pair (2,2,2) on the same split as `DecayIMEX`: second
    order, 2 evaluations of F per step (one stage and the new state's, first same as last).

    An option (`simulate(..., solver=DecayIMEX2())`), not a default: where kink steps
    dominate a run, whose error is first order whatever the solver, a step costs 2
    evaluations against `DecayIMEX`'s 8. Measured on a ReLU MLP(5, 16, 2) on 100 points to
    t = 1e10: from 1.6-4.4x less wall time for every flow to 1.4x more for RMSProp in a
    later run (docs/solvers.md); on MLPs with few kinks 8-25x more (its
    steps between kinks are short at rtol 1e-8); on the CNN, where its explicit weights
    (-0.71, 1.71) extrapolate across the jumps, far more steps than Heun's convex weights
    (docs/solvers.md, "Dense kinks").
    Tableau (gamma = 1 - 1/sqrt 2, delta = 1 - 1/(2 gamma)): explicit rows
    Y1 = y0 + du gamma kE0, Y2 = y0 + du (delta kE0 + (1 - delta) kE1); implicit diagonal
    gamma with Y2's implicit part (1 - gamma) kI1; the solution is Y2 (stiffly accurate,
    L-stable: a decay with du lambda -> infinity is damped to 0). The error estimate is
    y1 - y_hat against the first-order IMEX Euler step y_hat = y0 + du (kE0 + kI2)
    (weights below), filtered like `DecayIMEX`'s. Dense output is linear.
    """

    interpolation_cls: ClassVar = _Linear
    C: ClassVar = np.array([0.0, _G2, 1.0])
    AE: ClassVar = [np.array([_G2]), np.array([_D2, 1.0 - _D2])]
    AI: ClassVar = [np.array([0.0]), np.array([0.0, 1.0 - _G2])]
    GAMMA: ClassVar = float(_G2)
    B_SOL: ClassVar = np.zeros(3)
    ERR_E: ClassVar = np.array([_D2 - 1.0, 1.0 - _D2, 0.0])
    ERR_I: ClassVar = np.array([0.0, 1.0 - _G2, _G2 - 1.0])

    def order(self, terms):
        return 2

    def error_order(self, terms):
        return 2

    def _dense(self, y0, y1, kE, kI, du):
        return dict(y0=y0, y1=y1)
