"""The default solver per flow and size (MATH.md section 2, "Stiffness")."""

from __future__ import annotations

import diffrax as dfx
import optimistix as optx


def default_solver(flow, p: int, *, rtol: float = 1e-8, atol: float = 1e-12):
    """The solver `simulate(..., solver=None)` uses.

    The m-equation of RMSProp/Adam decays at rate (1 - b) while w moves on time scales ~ t
    late in training, and the w-equation itself has Jacobian ~ h * Hess L ~ 1/t: both are
    stiff over long horizons, so an explicit solver's cost grows linearly in t1. Kvaerno5
    (implicit, L-stable, 5th order) takes steps that grow with t: constant cost per decade.
    Its root finder is a full Newton method: the Jacobian of the Adam field changes by
    orders of magnitude within a step near t = 0 (psi = m / c(t), c(t) ~ t), where the
    default VeryChord (Jacobian frozen per step) was measured to need 20x more steps.
    The root finder's convergence test, like the step-size controller's error test, looks at
    (w, m) only (`wm_norm`): the rate of the quadrature I(t) is ~ 1/(eps + m), and with the
    default max-norm over the whole state Newton was measured to never converge from a
    large initial gradient (every step rejected), although I does not feed back.
    `cauchy_termination=False`: optimistix's default also asks |residual| < atol, which a
    residual of size |dw/dt| ~ 1e5 (a large initial gradient times h = eps^{-1/2}) can never
    meet in float64, so Newton "failed" at every step size; convergence is judged on the
    iterates' change instead.
    """
    newton = optx.Newton(rtol=rtol, atol=atol, norm=wm_norm, cauchy_termination=False)
    return dfx.Kvaerno5(root_finder=newton)


def wm_norm(y):
    """RMS norm of the (w, m) part of the state (w, m, I).

    Error control on (w, m) only. I(t) is a quadrature driven by the state: its rate
    contains 1/(eps + m) and m c'(t)/c(t)^2 (Adam), so trial stages with m off by the
    tolerance give huge rates and would stall the controller, while its value is only
    used after separation, where it inherits the accuracy of (w, m).
    """
    w, m, _ = y
    return optx.rms_norm((w, m))


def solver_name(solver) -> str:
    return type(solver).__name__
