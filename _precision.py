"""The matrix-product precision of a run's arithmetic: full float32, not TF32, by default.

On recent NVIDIA GPUs JAX's default precision computes float32 matrix products and
convolutions in TF32 (a 10-bit mantissa). Measured on an H200, the gradient of the paper's
CNN on 1,000 digits was off by 4.6e-3 relative to float64 at the default and by 4.3e-7 at
"highest" (1.3 ms against 2.3 ms). A field that wrong cannot be integrated to rtol >= 1e-6
(the step-size controller would chase TF32's rounding), and a discrete run that wrong cannot
be compared with a flow. float64 is never rounded to TF32, and on a CPU the setting changes
nothing. A checkpoint records the precision of a float32 run (`precision_of`), and a resume
continues at it (`at_precision`), whatever the resuming process has set.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def matmul_precision(dtype):
    """The context a run of `dtype` is traced in: JAX's matmul precision "highest" for
    float32 unless the user set one (`jax.default_matmul_precision(...)` or the
    `jax_default_matmul_precision` setting; "default" or "tensorfloat32" keeps TF32),
    else no change."""
    return at_precision(precision_of(dtype))


def precision_of(dtype) -> str | None:
    """The matmul precision a run of `dtype` computes at (`matmul_precision` enters it):
    None for float64 (never rounded), else the user's setting or "highest"."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    return str(jax.config.jax_default_matmul_precision or "highest")


def at_precision(precision: str | None):
    """The context that traces at `precision` (None: no change). A resumed run is traced
    at the precision its checkpoint recorded (None: a float64 run, or a folder written
    before precisions were recorded: as a new run)."""
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)
