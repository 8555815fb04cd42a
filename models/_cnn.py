"""The bias-free MNIST CNN of Madry et al. used in the paper (Sec. 6.1): degree 4."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_int
from .._registry import register
from ._base import AbstractModel, check_key


def _uniform(key, shape, fan_in):
    # PyTorch's default (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _maxpool2(x):
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


_CONVS = ("auto", "xla", "im2col")


def _conv_xla(x, kernel):
    return jax.lax.conv_general_dilated(
        x[None], kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )[0]


def _conv_im2col(x, kernel):
    """The same "same"-padded convolution as one matrix product (im2col).

    out[o, y, z] = sum_{c, i, j} kernel[o, c, i, j] * xpad[c, y + i, z + j]: the kh * kw
    shifted copies of the padded input are stacked and contracted with the kernel in a
    single dot. Why: XLA:CPU runs its convolution op 3.7-4x slower inside a while loop
    (every ODE solver's) than in a standalone jit call, measured on this CNN (float32 and
    float64, n = 32 and 256); slices and a dot have no such penalty (docs/changelog.md, 2026-11-28).
    """
    _, c, kh, kw = kernel.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2  # XLA's "SAME": the odd pixel of padding after
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw)))
    cols = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=1)
    return jnp.einsum("cshw,ocs->ohw", cols, kernel.reshape(kernel.shape[0], c, kh * kw))


def _conv_impl(conv: str):
    if conv == "auto":
        # cuDNN / the GPU backends have no loop penalty; im2col costs memory there.
        conv = "im2col" if jax.default_backend() == "cpu" else "xla"
    return _conv_im2col if conv == "im2col" else _conv_xla


@register("model")
class CNN(AbstractModel):
    """conv 32@5x5 - ReLU - maxpool 2 - conv 64@3x3 - ReLU - maxpool 2 - fc 1024 - ReLU - fc C.

    No biases, "same" padding, input one 28x28 image (shape (28, 28), (1, 28, 28) or (784,)):
    3,240,736 parameters for C = 10. `widths` = (conv1 channels, conv2 channels, fc units)
    shrinks the network for CPU runs (still degree 4). ReLU and max-pooling are
    1-homogeneous, so Phi is homogeneous of degree 4 (four weight layers). PyTorch's default
    initialisation. `conv` picks how the convolutions are computed (the function is the
    same): "auto" (default) is "im2col" on CPU, where XLA's convolution op runs ~4x slower
    inside a solver's while loop, and "xla" (lax.conv_general_dilated) on GPU.
    """

    conv1: Float[Array, "c1 1 5 5"]
    conv2: Float[Array, "c2 c1 3 3"]
    fc1: Float[Array, "f c2*49"]
    fc2: Float[Array, "C f"]
    out_dim: int = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    widths: tuple = eqx.field(static=True, default=(32, 64, 1024))
    conv: str = eqx.field(static=True, default="auto")

    def __init__(
        self, *, out_dim: int = 10, widths=(32, 64, 1024), conv: str = "auto", key: PRNGKeyArray
    ):
        self.out_dim = check_int(out_dim, "out_dim", "CNN")
        if conv not in _CONVS:
            raise ValueError(
                f"CNN: `conv` must be one of {_CONVS}, got {conv!r}: 'xla' is XLA's "
                "convolution op, 'im2col' the same function as one matrix product, 'auto' "
                "picks im2col on CPU (3.7-4x faster inside an ODE solver's loop) and xla "
                "elsewhere."
            )
        self.conv = conv
        if isinstance(widths, np.ndarray) and widths.ndim == 1:
            widths = widths.tolist()  # three NumPy ints, checked below as Python ints
        if not isinstance(widths, (tuple, list)) or len(widths) != 3:
            raise ValueError(
                "CNN: `widths` must be three positive integers (conv1 channels, conv2 "
                f"channels, fc units), got {widths!r}; the paper's are (32, 64, 1024)."
            )
        fix = "pass three positive ints, e.g. widths=(4, 8, 32)"
        c1, c2, f = (check_int(v, "widths", "CNN", 1, fix) for v in widths)
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

    @property
    def piecewise_linear(self) -> bool:
        """ReLU units and max-pool ties: grad Phi jumps."""
        return True

    @property
    def dense_kinks(self) -> bool:
        """A ReLU switch per image, channel and pixel: nearly every step crosses one."""
        return True

    def spec(self):
        kwargs = {"out_dim": self.out_dim}
        if self.widths != (32, 64, 1024):
            kwargs["widths"] = list(self.widths)
        if self.conv != "auto":
            kwargs["conv"] = self.conv
        return {"class": "CNN", "kwargs": kwargs}

    def __call__(self, x):
        x = jnp.reshape(x, (1, 28, 28))
        conv = _conv_impl(self.conv)
        x = _maxpool2(jax.nn.relu(conv(x, self.conv1)))
        x = _maxpool2(jax.nn.relu(conv(x, self.conv2)))
        x = jax.nn.relu(self.fc1 @ x.reshape(-1))
        out = self.fc2 @ x
        return out[0] if self.out_dim == 1 else out
