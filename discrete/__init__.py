"""Discrete optimisers that match the flows, `run`, the flow <-> discrete dictionary
(docs/math.md section 5) and `compare` for two trajectories."""

from ._compare import Comparison as Comparison
from ._compare import compare as compare
from ._dictionary import matching_flow as matching_flow
from ._dictionary import matching_optimizer as matching_optimizer
from ._optimizers import GD as GD
from ._optimizers import AbstractOptimizer as AbstractOptimizer
from ._optimizers import AdaGrad as AdaGrad
from ._optimizers import Adam as Adam
from ._optimizers import RMSProp as RMSProp
from ._optimizers import SGDMomentum as SGDMomentum
from ._optimizers import optimizer_from_meta as optimizer_from_meta
from ._resume import resume_run as resume_run
from ._run import run as run
