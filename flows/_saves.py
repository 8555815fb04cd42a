"""Saves at given times, taken by the solver itself: compiled programs without host callbacks.

diffrax's `SaveAt(ts=...)` checks traced save times (increasing, inside [t0, t1]) with
equinox's runtime errors, which are host callbacks, and JAX never writes a program holding
a host callback to its persistent compilation cache (`marginflow.cache`). `simulate` passes
the save times of a segment as a traced array (so that a new t1 or n_save reuses the
compiled segment) and checks them on the host before the call. `SavedAt` then does the
saving diffrax would do: after each step it evaluates fn(u, y(u), args) at every save time
u the step reached, on the step's dense output, and writes it into a buffer carried in the
solver state. diffrax keeps the solver state of accepted steps only, so a rejected step's
writes are dropped with it; `n` counts the saves made, which after a failed solve says how
far the run got.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from ._wrapped import Wrapped


class SavedAt(Wrapped):
    """`solver`, also writing fn(u, y(u), args) at the save times `us` into its state.

    Args:
        solver: the solver that integrates.
        us: the save times, non-decreasing, inside the solve's [t0, t1] (checked by the
            caller); repeats are allowed (`simulate` pads with the segment's end).
        fn: fn(u, y, args) -> a pytree of arrays, the saved quantities.
    The state is (the inner state, the buffer: fn's tree with a leading axis len(us),
    NaN where not yet saved, the number of saves made).
    """

    us: jax.Array
    fn: Callable = eqx.field(static=True)

    def empty(self, t0, y0, args):
        """The buffer before any save, and n = 0: (NaN-filled buffer, 0)."""
        shapes = eqx.filter_eval_shape(self.fn, t0, y0, args)
        buffer = jax.tree.map(
            lambda s: jnp.full((self.us.shape[0], *s.shape), jnp.nan, s.dtype), shapes
        )
        return buffer, jnp.asarray(0)

    def init(self, terms, t0, t1, y0, args):
        return (self.solver.init(terms, t0, t1, y0, args), *self.empty(t0, y0, args))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state, buffer, n = solver_state
        y1, y_err, dense, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense)
        size = self.us.shape[0]

        def reached(carry):
            k, _ = carry
            return (k < size) & (self.us[jnp.minimum(k, size - 1)] <= t1)

        def save(carry):
            k, buffer = carry
            u = self.us[k]
            value = self.fn(u, interp.evaluate(u), args)
            return k + 1, jax.tree.map(lambda b, x: b.at[k].set(x), buffer, value)

        n, buffer = jax.lax.while_loop(reached, save, (n, buffer))
        return y1, y_err, dense, (inner_state, buffer, n), result
