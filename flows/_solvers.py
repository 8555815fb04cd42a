"""The default solver per flow and size (MATH.md section 2, "Stiffness").

- `default_solver`: `DecayIMEX` (module `_imex`), its choice and the measured figures;
- `CarriedPID`: diffrax's PID controller carrying its step size across `simulate`'s segments;
- `decay_rate`, `is_imex`, `wm_norm`: what `_simulate` needs to lay out the terms.

The time variable (t on [t0, 1], u = log t after) is `_simulate`'s business.
"""

from __future__ import annotations

from typing import get_origin

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx


def wm_norm(y):
    """RMS norm of the (v, m) part of the state (v, m, I), v = w ||w||^(L-1).

    Error control on (v, m) only (relative errors of v and w agree within a factor L; an
    atol on v is atol ||w||^(1-L) on w). I(t) is a quadrature driven by the state: its rate
    contains 1/(eps + m) and m c'(t)/c(t)^2 (Adam), so trial stages with m off by the
    tolerance give huge rates and would stall the controller, while its value is only
    used after separation, where it inherits the accuracy of (v, m).
    """
    v, m, _ = y
    return optx.rms_norm((v, m))


# --------------------------------------------------------------- the stiff part
def decay_rate(flow) -> jax.Array:
    """The rate a of the linear decay dm/dt = ... - a m of the flow's m-equation.

    RMSProp and Adam (w/m): a = 1 - b (MATH.md section 2). GD and AdaGrad have no decay
    (a = 0): their m-equation is not stiff.
    """
    if has_decay(flow):
        return 1.0 - flow.b
    return jnp.zeros((), dtype=jnp.result_type(float))


def has_decay(flow) -> bool:
    """Whether the flow's m-equation has the linear decay -(1 - b) m (RMSProp, Adam)."""
    from ._flow import AdamFlow, RMSPropFlow

    return isinstance(flow, (RMSPropFlow, AdamFlow))


def is_imex(solver) -> bool:
    """Whether `solver` takes a MultiTerm (explicit, implicit) pair, like diffrax's KenCarp."""
    structure = getattr(solver, "term_structure", None)
    return get_origin(structure) is dfx.MultiTerm or isinstance(structure, dfx.MultiTerm)


# ------------------------------------------------------------------ the controller
class CarriedPID(dfx.AbstractAdaptiveStepSizeController):
    """diffrax's PIDController that also carries its proposed next step size in its state.

    `simulate` integrates one segment per diffeqsolve call. diffrax carries the PID error
    history across calls but, given a controller state and dt0=None, re-guesses the first
    step of every call (two more field evaluations and a cold start per segment). This
    wrapper stores the last proposal so the next segment starts with dt0 = that proposal.
    """

    pid: dfx.PIDController

    @property
    def rtol(self):
        return self.pid.rtol

    @property
    def atol(self):
        return self.pid.atol

    @property
    def norm(self):
        return self.pid.norm

    def wrap(self, direction):
        return CarriedPID(self.pid.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.pid.init(terms, t0, t1, y0, dt0, args, func, error_order)
        # Arrays throughout (PID's `at_dtmin` is a Python bool here): vmappable state.
        return tnext, (jtu.tree_map(jnp.asarray, state), jnp.asarray(tnext - t0))

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        state, _ = controller_state
        keep, next_t0, next_t1, jump, state, result = self.pid.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state
        )
        dt = jnp.asarray(next_t1 - next_t0)
        return keep, next_t0, next_t1, jump, (jtu.tree_map(jnp.asarray, state), dt), result


def default_controller(rtol: float, atol: float) -> CarriedPID:
    """PID gains (0.3, 0.4) were measured to need fewer steps than I-control on the toy."""
    return CarriedPID(dfx.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4, norm=wm_norm))


# ---------------------------------------------------------------------- the solver
def default_solver(flow, p: int, *, rtol: float = 1e-8, atol: float = 1e-12):
    """The solver `simulate(..., solver=None)` starts with: `DecayIMEX`, for every flow and
    size (from t = 1e10 on, `late_solver` takes over for GD and AdaGrad).

    Why. After separation g ~ 1/t, and in u = log t (which `simulate` uses from t = 1 on)
    the w-equation dw/du = -t h g is O(1): a constant number of steps per decade. The one
    stiff part is the decay of m, dm/du = -(1 - b) t m + ..., rate 1e99 at t = 1e100.
    `DecayIMEX` (module `_imex`) treats that decay implicitly and everything else explicitly
    with Kennedy & Carpenter's 5(4) IMEX pair; the implicit stages are diagonal and solved
    by a division, so a step costs 8 gradient evaluations plus O(p): the same solver runs
    the toy and the CNN's 3.3e6 parameters (Kvaerno5 + Newton formed a dense p x p
    Jacobian). GD and AdaGrad have no decay; the implicit part is then zero and the
    scheme is the explicit ARK5 method.

    Measured (2-core CPU, eps 1e-5, b 0.9, rtol 1e-8, atol 1e-12; state v = w ||w||^(L-1),
    segments ten decades wide after 1e10, `late_solver` from 1e10; steps to 1e5 / to
    1e100; tables in README.md): toy: GD 1287 / 1401, AdaGrad 1781 / 1920, RMSProp
    1837 / 2037, Adam 1640 / 1824 (ratio 1.1; all four also reach 1e300); MLP(4, 8, 2, k=2)
    and DeepLinear(4,4,4,1): ratios 1.52-2.07, except AdaGrad on the deep linear net (2.53),
    whose conditioner stays large on coordinates with small gradients (benchmarks/README.md,
    benchmarks/late_phase.py).
    Rejected alternatives, measured:
    - Kvaerno5 + dense Newton in log time: 2155 / 2397 steps, 0.30 s to 1e5, O(p^2) memory;
    - the old default, Kvaerno5 in t: stalled in [1e15, 1e16] (steps ~ t, and its Newton
      test |residual| < atol is absolute: unmeetable where the field is large);
    - diffrax's KenCarp5 on the same split: stalled from t ~ 1e18 (the cancellations that
      `DecayIMEX` avoids, see its module).

    Args:
        flow, p: unused today (one O(p) solver fits all); kept for per-flow/size choices.
        rtol, atol: unused (the implicit stages are solved exactly).
    """
    del flow, p, rtol, atol
    from ._imex import DecayIMEX

    return DecayIMEX()


def late_solver(flow, p: int):
    """The default solver from t = 1e10 on (`simulate`'s ten-decade segments).

    Flows without a decay of m (GD, AdaGrad): diffrax's Dopri8. Late in training their
    field is smooth and explicit (no stiff part to treat implicitly), and the 8th-order pair
    takes longer steps: measured from 1e5 to 1e100 in the state v (benchmarks/late_phase.py),
    109 / 123 / 854 steps against DecayIMEX's 233 / 227 / 1317 (GD on MLP(4, 8, 2, k=2), GD
    and AdaGrad on DeepLinear(4, 4, 4, 1)), at equal or smaller errors, 10-25% faster for GD
    after compilation. The price is a second compiled solver: about 1.75 s, once per process
    and model shape, for a run that goes past 1e10. RMSProp and Adam keep `DecayIMEX`: their
    m-equation decays at the rate (1 - b) t, 1e99 at t = 1e100.
    """
    del p
    from ._imex import DecayIMEX

    return DecayIMEX() if has_decay(flow) else dfx.Dopri8()


def solver_name(solver) -> str:
    return type(solver).__name__
