"""The bias-free MNIST CNN of Madry et al. used in the paper (Sec. 6.1): degree 4."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._base import AbstractModel, check_key, check_positive_int


def _uniform(key, shape, fan_in):
    # PyTorch's default (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _maxpool2(x):
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x[None], kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )[0]


class CNN(AbstractModel):
    """conv 32@5x5 - ReLU - maxpool 2 - conv 64@3x3 - ReLU - maxpool 2 - fc 1024 - ReLU - fc C.

    No biases, "same" padding, input one 28x28 image (shape (28, 28), (1, 28, 28) or (784,)):
    3,240,736 parameters for C = 10. `widths` = (conv1 channels, conv2 channels, fc units)
    shrinks the network for CPU runs (still degree 4). ReLU and max-pooling are
    1-homogeneous, so Phi is homogeneous of degree 4 (four weight layers). PyTorch's default
    initialisation.
    """

    conv1: Float[Array, "c1 1 5 5"]
    conv2: Float[Array, "c2 c1 3 3"]
    fc1: Float[Array, "f c2*49"]
    fc2: Float[Array, "C f"]
    out_dim: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    widths: tuple = eqx.field(static=True, default=(32, 64, 1024))

    def __init__(self, *, out_dim: int = 10, widths=(32, 64, 1024), key: PRNGKeyArray):
        self.out_dim = check_positive_int(out_dim, "out_dim", "CNN")
        if not isinstance(widths, (tuple, list)) or len(widths) != 3:
            raise ValueError(
                "CNN: `widths` must be three positive integers (conv1 channels, conv2 "
                f"channels, fc units), got {widths!r}; the paper's are (32, 64, 1024)."
            )
        c1, c2, f = (check_positive_int(v, "widths", "CNN") for v in widths)
        self.widths = (c1, c2, f)
        check_key(key, "CNN")
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = _uniform(k1, (c1, 1, 5, 5), 25)
        self.conv2 = _uniform(k2, (c2, c1, 3, 3), c1 * 9)
        self.fc1 = _uniform(k3, (f, c2 * 7 * 7), c2 * 7 * 7)
        self.fc2 = _uniform(k4, (self.out_dim, f), f)
        self.degree = 4

    @property
    def in_shape(self):
        return (1, 28, 28)

    def spec(self):
        kwargs = {"out_dim": self.out_dim}
        if self.widths != (32, 64, 1024):
            kwargs["widths"] = list(self.widths)
        return {"class": "CNN", "kwargs": kwargs}

    def __call__(self, x):
        x = jnp.reshape(x, (1, 28, 28))
        x = _maxpool2(jax.nn.relu(_conv(x, self.conv1)))
        x = _maxpool2(jax.nn.relu(_conv(x, self.conv2)))
        x = jax.nn.relu(self.fc1 @ x.reshape(-1))
        out = self.fc2 @ x
        return out[0] if self.out_dim == 1 else out
