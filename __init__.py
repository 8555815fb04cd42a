"""marginflow: continuous flows of adaptive optimisers on homogeneous networks.

Sub-packages: `marginflow.models`, `marginflow.flows`, `marginflow.discrete`,
`marginflow.analysis`, `marginflow.experiments`. Importing marginflow switches JAX to
float64 (`jax_enable_x64`): every check of the theory is done in double precision;
float32 runs are asked for explicitly (`simulate(..., dtype=jnp.float32)`).
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
