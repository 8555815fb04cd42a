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


def _dot(coeffs, ks):
    """sum_j coeffs[j] * ks[j] over a list of pytrees (coefficients that are 0 skipped)."""
    out = None
    for c, k in zip(coeffs, ks, strict=False):
        if c == 0:
            continue
        # Python floats are weakly typed: a float32 run stays float32.
        term = jtu.tree_map(lambda x, c=float(c): c * x, k)
        out = term if out is None else jtu.tree_map(jnp.add, out, term)
    return out


def _axpy(a, x, y):
    """y + a * x for pytrees (x may be None: nothing to add)."""
    if x is None:
        return y
    return jtu.tree_map(lambda xi, yi: yi + a * xi, x, y)


class DecayIMEX(dfx.AbstractAdaptiveSolver):
    """KenCarp5's IMEX pair for dy/du = F(u, y) - lambda(u, y) * y, lambda diagonal (module doc).

    Call with terms = MultiTerm(ODETerm(F), ODETerm(lambda)): the second term's vector
    field returns the decay rates lambda >= 0, a pytree like y (constant in y), not a
    field. Cost per step: 8 evaluations of F (7 stages and the first-same-as-last value at
    the new state), O(p) memory and time besides.
    """

    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar = _Interpolation

    def order(self, terms):
        return 5

    def error_order(self, terms):
        return 5

    def init(self, terms, t0, t1, y0, args):
        explicit, _ = terms.terms
        return explicit.vf(t0, y0, args)

    def func(self, terms, t0, y0, args):
        explicit, rates = terms.terms
        f = explicit.vf(t0, y0, args)
        lam = rates.vf(t0, y0, args)
        return jtu.tree_map(lambda fi, li, yi: fi - li * yi, f, lam, y0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        explicit, rates = terms.terms
        du = t1 - t0
        # The state holds F(t0, y0) from the previous step. `made_jump` is ignored: simulate's
        # fields have no jumps in u (at the switch t = 1 to u = log t, dt/du = 1 on both sides)
        # and a lax.cond on it would evaluate both branches under vmap.
        del made_jump
        f0 = solver_state
        lam0 = rates.vf(t0, y0, args)
        kE = [f0]
        kI = [jtu.tree_map(lambda li, yi: -li * yi, lam0, y0)]
        Y = y0
        for i in range(1, _S):
            ui = t0 + float(_C[i]) * du
            partial = _axpy(du, _dot(_AE[i - 1], kE), y0)
            partial = _axpy(du, _dot(_AI[i - 1], kI), partial)
            lam = rates.vf(ui, partial, args)
            # Y = partial - gamma du lam Y, solved exactly (the implicit part is diagonal).
            Y = jtu.tree_map(lambda p, li: p / (1.0 + _GAMMA * du * li), partial, lam)
            kI.append(jtu.tree_map(lambda li, yi: -li * yi, lam, Y))
            kE.append(explicit.vf(ui, Y, args))
        # Stiffly accurate update (module doc, point 2): b_8 - aE_88 = b_8 = gamma.
        corr = np.concatenate([_B[:-1] - _AE[-1], [_B[-1]]])
        y1 = _axpy(du, _dot(corr, kE), Y)
        f1 = explicit.vf(t1, y1, args)
        lam1 = rates.vf(t1, y1, args)
        k_sum = [jtu.tree_map(jnp.add, a, b) for a, b in zip(kE, kI, strict=True)]
        raw = jtu.tree_map(lambda x: du * x, _dot(_B_ERR, k_sum))
        y_error = jtu.tree_map(lambda e, li: e / (1.0 + _GAMMA * du * li), raw, lam1)
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
        stuck = jnp.invert(finite) & (jnp.abs(du) <= 1e-10 * jnp.maximum(1.0, jnp.abs(t0)))
        result = dfx.RESULTS.where(stuck, dfx.RESULTS.nonfinite, dfx.RESULTS.successful)
        # diffrax drops the result of a rejected step: report a zero error (accepted, with
        # y1 = y0 finite) so that the run stops here with that result.
        y_error = jtu.tree_map(lambda e: jnp.where(stuck, 0.0, e), y_error)
        stack = lambda ks: jtu.tree_map(lambda *xs: du * jnp.stack(xs), *ks)  # noqa: E731
        dense_info = dict(y0=y0, y1=y1, k=(stack(kE), stack(kI)))
        return y1, y_error, dense_info, f1, result
