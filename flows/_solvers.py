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
    """
    return dfx.Kvaerno5(root_finder=optx.Newton(rtol=rtol, atol=atol))


def solver_name(solver) -> str:
    return type(solver).__name__
