"""Why a run stopped: `Stop`, marginflow's enumeration of diffrax's results, each with its
meaning and what to change."""

from __future__ import annotations

import enum

import diffrax as dfx
import jax.numpy as jnp


class Stop(enum.Enum):
    """Why a segment call stopped: marginflow's names for diffrax's results (the
    Trajectory's `result`), each with what it means and what to change. The compiled
    segment returns the member's index in this enumeration (`stop_code`), so nothing reads
    diffrax's private result codes."""

    successful = ("", "")
    max_steps_reached = (
        "The maximum number of solver steps was reached.",
        "increase `max_steps` (a limit per segment: a decade of t, ten after 1e10) or loosen "
        "rtol; with a solver of your own, try solver=None (its default treats the stiff "
        "decay of m implicitly); on a ReLU or max-pool model, keep kink_tol > 0, which "
        "bounds the steps among kinks")
    nonfinite_state = (
        "The vector field is non-finite (NaN/inf) at the state reached.",
        "the vector field became non-finite (NaN/inf) at the state reached: check the data "
        "scale, the initialisation and the flow's hyper-parameters")
    dt_min_reached = (
        "The minimum step size was reached.",
        "the step size underflowed: loosen rtol/atol or check the model for a kink the "
        "solver cannot step over")
    nonlinear_divergence = (
        "The implicit solver's root finder diverged.",
        "the implicit solver's root finder diverged: loosen rtol or pass another solver")
    nonlinear_max_steps_reached = (
        "The implicit solver's root finder did not converge.",
        "the implicit solver's root finder did not converge: loosen rtol or pass another "
        "solver")
    breakdown = (
        "The solver broke down.",
        "the state became non-finite (NaN/inf): check the data scale and the "
        "initialisation, or lower t1")
    singular = (
        "A linear solve of the implicit solver returned non-finite output.",
        "the implicit solver's linear solve failed: loosen rtol or pass another solver")
    max_steps_rejected = (
        "The maximum number of rejected steps was reached.",
        "loosen rtol/atol, or pass another solver")
    internal_error = ("An internal error occurred in diffrax.", "report it with the inputs")
    unknown_failure = ("The solver stopped.", "see the diffrax result")

    @property
    def text(self) -> str:
        return self.value[0]

    @property
    def hint(self) -> str:
        return self.value[1]


STOPS = tuple(Stop)
# diffrax's result of each Stop (unknown_failure: any other, e.g. event_occurred).
_DIFFRAX = {Stop.successful: "successful", Stop.max_steps_reached: "max_steps_reached",
            Stop.nonfinite_state: "nonfinite", Stop.dt_min_reached: "dt_min_reached",
            Stop.nonlinear_divergence: "nonlinear_divergence",
            Stop.nonlinear_max_steps_reached: "nonlinear_max_steps_reached",
            Stop.breakdown: "breakdown", Stop.singular: "singular",
            Stop.max_steps_rejected: "max_steps_rejected", Stop.internal_error: "internal_error"}


def stop_code(result):
    """The index in STOPS of a diffrax result (traced; public comparisons only)."""
    known = [(STOPS.index(stop), getattr(dfx.RESULTS, name, None))
             for stop, name in _DIFFRAX.items()]
    code = jnp.asarray(STOPS.index(Stop.unknown_failure))
    for index, item in known:
        if item is not None:
            code = jnp.where(result == item, index, code)
    return code
