"""Bias-free multi-layer perceptrons: homogeneous of a degree fixed by depth and activation."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_int
from .._registry import register
from ._base import AbstractModel, check_key


def _activation(activation):
    """(function, homogeneity k) of an activation spec."""
    if activation == "relu":
        return jax.nn.relu, 1
    if activation == "leaky_relu":
        return (lambda z: jnp.where(z >= 0, z, 0.01 * z)), 1
    if (
        isinstance(activation, (int, np.integer))
        and not isinstance(activation, bool)
        and activation >= 1
    ):
        k = int(activation)
        return (lambda z: jax.nn.relu(z) ** k), k
    raise ValueError(
        "MLP: `activation` must be 'relu', 'leaky_relu' or a positive integer k "
        f"(the power of ReLU, max(z, 0)^k), got {activation!r}."
    )


@register("model")
class MLP(AbstractModel):
    """Phi(W; x) = W_D s(W_{D-1} ... s(W_1 x)), no biases; `depth` = D weight layers.

    With a k-homogeneous activation s (relu, leaky_relu: k = 1; max(z,0)^k), the degree is
    L_1 = 1, L_{i+1} = 1 + k L_i, i.e. L = D for k = 1. Layers start from PyTorch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `activation=2` (or larger) gives a smooth model.
    """

    weights: list[Float[Array, "o i"]]
    in_dim: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)
    activation: str | int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        *,
        out_dim: int = 1,
        activation: str | int = "relu",
        key: PRNGKeyArray,
    ):
        self.in_dim = check_int(in_dim, "in_dim", "MLP")
        self.width = check_int(width, "width", "MLP")
        self.depth = check_int(depth, "depth", "MLP")
        self.out_dim = check_int(out_dim, "out_dim", "MLP")
        _, k = _activation(activation)
        self.activation = activation if isinstance(activation, str) else int(activation)
        check_key(key, "MLP")
        dims = [self.in_dim] + [self.width] * (self.depth - 1) + [self.out_dim]
        keys = jax.random.split(key, self.depth)
        self.weights = [
            jax.random.uniform(kk, (o, i), minval=-1 / np.sqrt(i), maxval=1 / np.sqrt(i))
            for kk, i, o in zip(keys, dims[:-1], dims[1:], strict=True)
        ]
        degree = 1
        for _ in range(self.depth - 1):
            degree = 1 + k * degree
        self.degree = degree

    @property
    def in_shape(self):
        return (self.in_dim,)

    @property
    def piecewise_linear(self) -> bool:
        """ReLU, leaky ReLU and activation=1 have kinks; max(z, 0)^k, k >= 2, is C^1."""
        return _activation(self.activation)[1] == 1 and self.depth > 1

    @property
    def frequent_kinks(self) -> bool:
        """A piecewise-linear MLP switches on a surface per sample and hidden unit."""
        return self.piecewise_linear

    def spec(self):
        return {
            "class": "MLP",
            "kwargs": {
                "in_dim": self.in_dim,
                "width": self.width,
                "depth": self.depth,
                "out_dim": self.out_dim,
                "activation": self.activation,
            },
        }

    def __call__(self, x):
        act, _ = _activation(self.activation)
        for W in self.weights[:-1]:
            x = act(W @ x)
        out = self.weights[-1] @ x
        return out[0] if self.out_dim == 1 else out
