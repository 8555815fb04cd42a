"""The momentum (heavy-ball) flow (docs/math.md section 9); the flows with a conditioner are
in `_flow`, and `AdamFlow(eps, b, b1=...)` is Adam with both moments."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._checks import check_b, check_eps_placement
from .._registry import register
from ._flow import _Unconditioned


@register("flow")
class MomentumFlow(_Unconditioned):
    """Momentum (heavy-ball) flow: dm1/dt = (1 - b1)(g - m1), dw/dt = -m1, m1(0) = 0.

    m1 is an exponential moving average of the gradient; eliminating it gives the heavy-ball
    ODE w'' + (1 - b1) w' + (1 - b1) g = 0. No conditioner (h = 1) and no second moment: the
    state m = (m2, m1) keeps m2 = 0, as GD keeps its m. Heavy-ball SGD with momentum mu and
    step lr follows it at time t = k lr / (1 - mu) when 1 - mu = eta (1 - b1), eta =
    lr / (1 - mu) (`matching_flow`, docs/math.md section 9). Lemma 3 is not proven for it.
    Args: b1 < 1: m1 decays at the rate 1 - b1 (b1 < 0 for heavy ball with
    1 - mu > eta, whose momentum forgets within one unit of flow time).
    Example: `MomentumFlow(0.9)`.
    """

    name: ClassVar[str] = "momentum"
    b1: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    def __init__(self, b1=0.9, *, eps_placement=None, conditioner=None):
        self.b1 = check_b(b1, "MomentumFlow", "b1")
        self.eps_placement = check_eps_placement(eps_placement, "MomentumFlow", conditioner,
                                                 "conditioner")

    @property
    def n_moments(self) -> int:
        return 2

    def phi(self, t, m, g):
        m2, m1 = self.split(m)
        return jnp.concatenate([jnp.zeros_like(m2), (1.0 - self.b1) * (g - m1)], axis=-1)

    def direction(self, t, m, g):
        return self.split(m)[1]

    def hyperparameters(self):
        return {"b1": float(self.b1)}

    has_decay: ClassVar[bool] = True

    def decay_rate(self):
        zero = jnp.zeros((), dtype=jnp.result_type(float))  # m2 stays 0: no decay
        return jnp.stack([zero, 1.0 - self.b1])
