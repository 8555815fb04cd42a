"""Margins, surrogate margins, conditioner limits, KKT residuals, exact references
(docs/math.md sections 3-4): pure functions of (model, data, Trajectory or w), never a solver.

Where a function takes parameters w (`normalized_margin`, `q_min`, `kkt_residual`,
`lemma3_terms`, `angle`), a Trajectory may stand in for them: it means the run's last saved
state, traj.w[..., -1, :] (one per member of a batched run), checked against the model and
data where the function takes them. Pass the array traj.w for every saved state instead.
"""

from ._common import NotSeparatedError as NotSeparatedError
from ._conditioner import ConditionerLimit as ConditionerLimit
from ._conditioner import beta as beta
from ._conditioner import conditioner_limit as conditioner_limit
from ._conditioner import h_direction as h_direction
from ._kkt import KKTResidual as KKTResidual
from ._kkt import kkt_residual as kkt_residual
from ._margins import normalized_margin as normalized_margin
from ._margins import q_min as q_min
from ._rates import RateFit as RateFit
from ._rates import rate_fit as rate_fit
from ._references import MaxMargin as MaxMargin
from ._references import ToyMaxMargin as ToyMaxMargin
from ._references import angle as angle
from ._references import max_margin_linear as max_margin_linear
from ._references import toy_max_margin as toy_max_margin
from ._separability import linearly_separable as linearly_separable
from ._surrogate import Lemma3Terms as Lemma3Terms
from ._surrogate import MonotoneQuantity as MonotoneQuantity
from ._surrogate import SurrogateMargin as SurrogateMargin
from ._surrogate import lemma3_terms as lemma3_terms
from ._surrogate import monotone_quantity as monotone_quantity
from ._surrogate import surrogate_margin as surrogate_margin
from ._switching import SwitchingSurfaces as SwitchingSurfaces
from ._switching import switching_surfaces as switching_surfaces
