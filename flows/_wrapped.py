"""`Wrapped`: a solver that forwards everything but `init` and `step` to the one it wraps.

`simulate`'s solver is the chosen diffrax solver inside two wrappers, `PenaltyIntegral`
(Lemma 3's I(t)) inside `SavedAt` (the saves). diffrax sees through both: `isinstance`
checks go to the wrapped solver (`AbstractWrappedSolver`), and its term structure,
interpolation, orders, root finder and vector field are the wrapped solver's.
"""

from __future__ import annotations

import diffrax as dfx


class Wrapped(dfx.AbstractAdaptiveSolver, dfx.AbstractWrappedSolver):
    """Forwards to `solver`; subclasses define `init` and `step` (and may override the rest)."""

    solver: dfx.AbstractAdaptiveSolver

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def root_finder(self):
        # diffrax fills an implicit solver's root-finder tolerances from the controller
        # (`isinstance` sees through the wrapper): the path must exist here too.
        return self.solver.root_finder

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)
