"""Linear (L = 1) and deep linear (L = depth) models."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_int
from .._registry import register
from ._base import AbstractModel, check_key


@register("model")
class Linear(AbstractModel):
    """Phi(w; x) = <w, x> (out_dim = 1) or W x (out_dim = C): homogeneous of degree 1.

    Initialisation: PyTorch's default for a bias-free linear layer,
    U(-1/sqrt(in_dim), 1/sqrt(in_dim)).
    """

    weight: Float[Array, "out in"]
    in_dim: int = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def __init__(self, in_dim: int, *, out_dim: int = 1, key: PRNGKeyArray):
        self.in_dim = check_int(in_dim, "in_dim", "Linear")
        self.out_dim = check_int(out_dim, "out_dim", "Linear")
        check_key(key, "Linear")
        bound = 1.0 / jnp.sqrt(self.in_dim)
        self.weight = jax.random.uniform(
            key, (self.out_dim, self.in_dim), minval=-bound, maxval=bound
        )
        self.degree = 1

    @property
    def in_shape(self):
        return (self.in_dim,)

    def spec(self):
        return {"class": "Linear", "kwargs": {"in_dim": self.in_dim, "out_dim": self.out_dim}}

    def __call__(self, x):
        out = self.weight @ x
        return out[0] if self.out_dim == 1 else out


@register("model")
class DeepLinear(AbstractModel):
    """Phi(W; x) = W_D ... W_1 x with dims = (in, h_1, ..., out): degree L = D.

    Layers start from PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    weights: list[Float[Array, "o i"]]
    dims: tuple[int, ...] = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def __init__(self, dims: Sequence[int], *, key: PRNGKeyArray):
        try:
            dims = tuple(dims)
        except TypeError:
            raise TypeError(
                f"DeepLinear: `dims` must be a sequence (in_dim, hidden..., out_dim), got "
                f"{dims!r}; pass e.g. dims=(4, 4, 4, 1)."
            ) from None
        if len(dims) < 2:
            raise ValueError(
                f"DeepLinear: `dims` must list at least (in_dim, out_dim), got {dims!r}."
            )
        self.dims = tuple(check_int(d, "dims[i]", "DeepLinear") for d in dims)
        check_key(key, "DeepLinear")
        keys = jax.random.split(key, len(dims) - 1)
        self.weights = [
            jax.random.uniform(k, (o, i), minval=-1 / jnp.sqrt(i), maxval=1 / jnp.sqrt(i))
            for k, i, o in zip(keys, self.dims[:-1], self.dims[1:], strict=True)
        ]
        self.out_dim = self.dims[-1]  # a Python int (a NumPy one would be a traced static)
        self.degree = len(dims) - 1

    @property
    def in_shape(self):
        return (self.dims[0],)

    def spec(self):
        return {"class": "DeepLinear", "kwargs": {"dims": list(self.dims)}}

    def __call__(self, x):
        for W in self.weights:
            x = W @ x
        return x[0] if self.out_dim == 1 else x
