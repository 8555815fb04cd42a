"""Continuous flows of GD, AdaGrad, RMSProp, Adam and momentum; `simulate` and `resume`.

`Trajectory` and `SimulationError` live at the top of the package (`marginflow.Trajectory`)
and are re-exported here."""

from .._trajectory import SimulationError as SimulationError
from .._trajectory import Trajectory as Trajectory
from ._etd import DecayHeun as DecayHeun
from ._flow import AbstractFlow as AbstractFlow
from ._flow import AdaGradFlow as AdaGradFlow
from ._flow import AdamFlow as AdamFlow
from ._flow import GradientFlow as GradientFlow
from ._flow import RMSPropFlow as RMSPropFlow
from ._imex import DecayIMEX as DecayIMEX
from ._imex import DecayIMEX2 as DecayIMEX2
from ._momentum import MomentumFlow as MomentumFlow
from ._progress import AbstractProgressMeter as AbstractProgressMeter
from ._progress import NoProgressMeter as NoProgressMeter
from ._progress import TqdmProgressMeter as TqdmProgressMeter
from ._sde import simulate_sde as simulate_sde
from ._simulate import default_save_times as default_save_times
from ._simulate import resume as resume
from ._simulate import simulate as simulate
from ._solvers import default_solver as default_solver
from ._solvers import late_solver as late_solver
from ._solvers import newton_solver as newton_solver
