"""The entry check of `simulate` and `run`: is the model homogeneous of the degree it claims?

Phi(2w; x) = 2^L Phi(w; x) is compared on a fixed set of at most 16 samples, the 8 of
largest norm ||x_i|| and 8 evenly spread over the rest of the data set, at two parameter
points: the initial w0, and w0 plus a step of norm ||w0|| in a fixed pseudo-random
direction (at w0 alone a model may be degenerate, e.g. a non-homogeneous term that vanishes
there). Scaling by 2 is exact in floating point, so a homogeneous model passes with an
error of rounding size at most, far below the tolerance 1e-8. Refused: a relative error
above it at either point, and outputs that are NaN or inf (the comparison says nothing
then, and the flow would start from a non-finite loss). Outputs that are all exactly zero
at both points are accepted: the zero function is homogeneous of every degree. Batched
initialisations (B, p): member 0 is checked (all members share the model's code).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._stored import StoredProgram

N_ROWS = 16  # compared samples: half of largest norm, half evenly spread
TOL = 1e-8
MAX_DEGREE = 1023  # the largest L with 2.0**L finite in float64


@jax.jit
def _squared_norms(X):
    return jnp.sum(jnp.square(X.reshape(X.shape[0], -1)), axis=1)


def sample_rows(X) -> np.ndarray:
    """The compared rows: all of them if N <= 16, else the 8 of largest norm and 8 evenly
    spread over the others, sorted (a fixed size, so the compiled check is reused)."""
    n = int(X.shape[0])
    if n <= N_ROWS:
        return np.arange(n)
    sq = np.asarray(_squared_norms(X))
    largest = np.argsort(-sq, kind="stable")[: N_ROWS // 2]
    rest = np.setdiff1d(np.arange(n), largest)
    spread = rest[np.rint(np.linspace(0, rest.size - 1, N_ROWS - largest.size)).astype(int)]
    return np.sort(np.concatenate([largest, spread]))


def _direction(p: int, dtype):
    """A fixed pseudo-random direction in R^p, entries in [-1/2, 1/2): the hash
    frac(43758.5453 sin(12.9898 i + 78.233)) - 1/2 of the index i. Deterministic, and
    cheaper to compile than jax.random (it is compiled once per model shape)."""
    i = jnp.arange(p, dtype=dtype)
    return jnp.mod(jnp.sin(12.9898 * i + 78.233) * 43758.5453, 1.0) - 0.5


def _compare_traced(objective, rows, w):
    """Per point (w0, the second point): (relative error, NaN/inf among Phi(w), among
    Phi(2w)) on the sampled rows, and the second point's norm. w: (p,) or (B, p)."""
    w = w.reshape(-1, w.shape[-1])[0].astype(jnp.float64)  # float64: float32 would fail
    small = eqx.tree_at(lambda o: o.data.X, objective, objective.data.X[rows])
    power = 2.0**objective.degree
    z = _direction(w.shape[0], w.dtype)
    norm = jnp.linalg.norm(w)
    w1 = w + jnp.where(norm > 0, norm, 1.0) * z / jnp.linalg.norm(z)
    # One vmapped evaluation of the model at w0, 2 w0, w1, 2 w1 (one trace to compile).
    out = jax.vmap(small.outputs)(jnp.stack([w, 2.0 * w, w1, 2.0 * w1]))
    out = out.reshape(2, 2, -1)
    a, b = out[:, 0], out[:, 1]
    # max, not sum, of the two sizes: a sum could overflow and turn any error into 0.
    scale = jnp.maximum(jnp.max(jnp.abs(b), axis=1), power * jnp.max(jnp.abs(a), axis=1))
    err = jnp.max(jnp.abs(b - power * a), axis=1) / jnp.where(scale > 0, scale, 1.0)
    bad_a = jnp.sum(~jnp.isfinite(a), axis=1)
    bad_b = jnp.sum(~jnp.isfinite(b), axis=1)
    return jnp.stack([err, bad_a, bad_b], axis=1), jnp.linalg.norm(w1)


_compare = StoredProgram("compare", _compare_traced)


def check_homogeneous(objective, w0, where: str) -> None:
    """Raise a ValueError naming the rule, the value and the fix unless Phi(2w) = 2^L Phi(w)
    on the sampled rows at w0 and at the second point (module docstring). `w0`: the flat
    initial parameters, (p,) or batched (B, p) (then member 0 is checked)."""
    if objective.degree > MAX_DEGREE:
        # 2^L itself overflows float64: Phi(2w) = 2^L Phi(w) cannot hold in floating point
        # unless Phi(w) is below 2^-1024 (subnormal), and ||w||^L overflows from ||w|| = 2.
        raise ValueError(
            f"{where}: the model's degree of homogeneity must be at most {MAX_DEGREE} "
            f"(2^L and ||w||^L must fit in float64), got L = {objective.degree}; use fewer "
            "layers or a lower power k (an MLP's degree grows like k^depth)."
        )
    rows = sample_rows(objective.data.X)
    stats, norm1 = _compare(objective, rows, jnp.asarray(w0))
    stats = np.asarray(stats)
    L, k = objective.degree, rows.size
    samples = (f"{k} samples (the largest-norm rows and rows spread over the data set)"
               if k < objective.data.X.shape[0] else f"all {k} samples")
    fix_scale = ("re-initialise the model with smaller weights or rescale the data (inputs of "
                 "order 1)")
    bad_a, bad_b = int(stats[0, 1]), int(stats[0, 2])
    if bad_a:
        raise ValueError(
            f"{where}: the model's outputs at the initial parameters are not finite ({bad_a} "
            f"of {k} sampled outputs Phi(w0; x_i) are NaN/inf), so the loss is not finite and "
            f"homogeneity (Phi(2w) = 2^L Phi(w)) cannot be checked; {fix_scale}."
        )
    if bad_b:
        raise ValueError(
            f"{where}: the model's outputs overflow at 2 w0 ({bad_b} of {k} sampled outputs "
            f"Phi(2 w0; x_i) are NaN/inf while Phi(w0; x_i) is finite): the initial outputs "
            f"are within a factor 2^L = {2**L} of float64 overflow and the flow, which grows "
            f"||w||, would overflow; {fix_scale}."
        )
    bad1 = int(stats[1, 1] + stats[1, 2])
    if bad1:
        raise ValueError(
            f"{where}: the model's outputs are not finite at a second check point (w0 plus a "
            f"step of norm ||w0|| in a fixed direction, ||w|| = {float(norm1):.3g}: {bad1} "
            f"NaN/inf among Phi(w; x_i), Phi(2w; x_i) on {k} samples); check the model for "
            f"operations not defined everywhere (log, sqrt, division by parameters), or "
            f"{fix_scale}."
        )
    for i, at in enumerate(("at the initial parameters w0",
                            "at a second check point (w0 plus a step of norm ||w0|| in a "
                            "fixed pseudo-random direction)")):
        err = float(stats[i, 0])
        if not err <= TOL:
            raise ValueError(
                f"{where}: the model is not homogeneous of the degree it claims "
                f"(degree = {L}): Phi(2w) differs from 2^L Phi(w) by {err:.2e} relative "
                f"(tolerance {TOL:.0e}) {at}, on {samples}; remove biases and "
                "non-homogeneous activations, or fix `degree`."
            )
