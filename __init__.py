"""marginflow: continuous flows of adaptive optimisers on homogeneous networks.

Sub-packages: `marginflow.models`, `marginflow.flows`, `marginflow.discrete`,
`marginflow.analysis`, `marginflow.experiments`. Importing marginflow switches JAX to
float64 (`jax_enable_x64`): every check of the theory is done in double precision, and
float32 runs are asked for explicitly (`simulate(..., dtype=jnp.float32)`). This changes
the configuration of the whole process, deliberately: float64 must be on before the first
array is made (a model or data set built earlier would be float32 and round the run's
inputs), and a library whose purpose is float64 checks should not depend on the user
remembering a call. It is documented (docs/errors.md, "What importing marginflow
changes") and can be declined: with MARGINFLOW_X64=0 in the environment the import leaves
`jax_enable_x64` alone, and `simulate` / `run` with dtype=float64 then refuse to start
with a message saying how to turn float64 on, instead of computing in float32.

Importing marginflow before JAX's first computation also sets two XLA options for the
process (`_xla.py`, docs/errors.md): 512-bit vectors on a CPU with AVX-512, and XLA's
classic CPU loop emitters, which compile the many small programs of a session in
0.5-0.75x the time. Neither is set where XLA_FLAGS names the option, where JAX's backend
is already running, with a jaxlib outside the versions they were verified with, or with
MARGINFLOW_XLA_DEFAULTS=0 in the environment.
"""

import os as _os

import jax as _jax

if _os.environ.get("MARGINFLOW_X64", "1").strip().lower() not in ("0", "false", "no", "off"):
    _jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"

from ._cache import cache_dir as cache_dir  # noqa: E402
from ._cache import use_cache as use_cache  # noqa: E402
from ._checkpoint import CheckpointFolder as CheckpointFolder  # noqa: E402
from ._trajectory import SimulationError as SimulationError  # noqa: E402
from ._trajectory import Trajectory as Trajectory  # noqa: E402
from ._xla import apply_defaults as _apply_xla_defaults  # noqa: E402

_apply_xla_defaults()
