"""The paper's toy network (Sec. 6.2): Phi(w, v; x) = v * sigma(<w, x>), x in R^2."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._registry import register
from ._base import AbstractModel, check_key


def leaky_half(z):
    """sigma(z) = z for z >= 0, z / 2 for z < 0 (the toy's leaky ReLU, slope 1/2)."""
    return jnp.where(z >= 0, z, 0.5 * z)


@register("model")
class ToyLeaky(AbstractModel):
    """Phi(w, v; x) = v * sigma(<w, x>) with sigma the leaky ReLU of slope 1/2: degree 2.

    Three parameters (w_1, w_2, v), initialised standard normal; the flat parameter vector
    is ordered (v, w_1, w_2) (equinox's field order).
    """

    v: Float[Array, ""]
    w: Float[Array, " 2"]
    out_dim: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def __init__(self, *, key: PRNGKeyArray):
        check_key(key, "ToyLeaky")
        kv, kw = jax.random.split(key)
        self.v = jax.random.normal(kv, ())
        self.w = jax.random.normal(kw, (2,))
        self.out_dim = 1
        self.degree = 2

    @property
    def in_shape(self):
        return (2,)

    @property
    def piecewise_linear(self) -> bool:
        """sigma has a kink at 0."""
        return True

    def spec(self):
        return {"class": "ToyLeaky", "kwargs": {}}

    def __call__(self, x):
        return self.v * leaky_half(jnp.dot(self.w, x))
