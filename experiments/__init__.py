"""The paper's experiments as code, and the `marginflow` command line.

Each experiment is a function `name(*, quick=None, progress=False, seed=0)` returning an
`ExperimentResult` (figure data, a JSON summary of the key numbers, the paper's claims
marked reproduced or not, PNG figures). `quick=None` reads the environment variable
MARGINFLOW_QUICK. From the shell: `marginflow reproduce NAME --out DIR [--quick]`.
"""

from ._crossover import crossover as crossover
from ._fig1 import fig1 as fig1
from ._fig1 import fig4 as fig4
from ._fig1 import fig5 as fig5
from ._fig2 import fig2 as fig2
from ._mnist import mnist_5k as mnist_5k
from ._mnist import mnist_idx as mnist_idx
from ._mnist import read_idx as read_idx
from ._momentum import momentum as momentum
from ._qian import qian as qian
from ._reproduce import EXPERIMENTS as EXPERIMENTS
from ._reproduce import reproduce as reproduce
from ._results import Claim as Claim
from ._results import ExperimentResult as ExperimentResult
from ._soudry import soudry as soudry
