"""The common interface of marginflow's homogeneous models."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax


class AbstractModel(eqx.Module):
    """A positively homogeneous network Phi(w; x): Phi(a w; x) = a^L Phi(w; x), a > 0.

    Subclasses have an integer attribute `degree` (L), an `in_shape` (the shape of one
    input), an `out_dim` (1: binary, scalar output; C > 1: C logits) and `spec()`, the
    constructor arguments, so a saved trajectory can rebuild the model without pickle.

    `piecewise_linear`: True when grad Phi jumps on switching surfaces (ReLU and leaky-ReLU
    units, max-pooling); `simulate` then steps across those kinks (its `kink_tol`).
    `frequent_kinks`: True when the surfaces are many (one per sample and hidden unit: a
    ReLU MLP), so that a run crosses thousands; `simulate` then picks Bosh3 for GD and
    AdaGrad. `dense_kinks`: True when they are so many (the CNN: one per image, channel and
    pixel) that nearly every step crosses one; `simulate` then picks Heun for GD and
    AdaGrad and `DecayHeun` for the flows with a decay.
    """

    degree: eqx.AbstractVar[int]
    out_dim: eqx.AbstractVar[int]

    @property
    def piecewise_linear(self) -> bool:
        """Whether grad Phi has kinks (ReLU, leaky ReLU, max-pool); False: smooth."""
        return False

    @property
    def frequent_kinks(self) -> bool:
        """Whether a run crosses kinks by the thousand (a ReLU MLP: a switching surface per
        sample and hidden unit): `simulate` then defaults to Bosh3 for GD and AdaGrad,
        whose convex weights err less across a kink than Dopri8's (docs/solvers.md,
        "Frequent kinks"). False for the toy (one hidden unit, kinks are rare)."""
        return self.dense_kinks

    @property
    def dense_kinks(self) -> bool:
        """Whether the kinks are dense enough that most solver steps cross one (the CNN's
        switches per image, channel and pixel): `simulate` then defaults to the 2-stage
        Heun for GD and AdaGrad and its exponential form `DecayHeun` for the flows with
        a decay, as a kink step is first order whatever the solver (docs/solvers.md,
        "Dense kinks")."""
        return False

    @property
    @abc.abstractmethod
    def in_shape(self) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """{"class": name, "kwargs": constructor arguments}: JSON-serialisable."""

    @abc.abstractmethod
    def __call__(self, x): ...


def check_key(key, where: str):
    if key is None:
        raise TypeError(
            f"{where} needs a PRNG key: pass `key=jax.random.key(0)` (or PRNGKey(0))."
        )
    return key


def from_spec(spec: dict[str, Any]) -> AbstractModel:
    """Rebuild a model skeleton from `model.spec()` (parameters from a fixed key)."""
    from .._registry import lookup  # the models register themselves on import

    cls = lookup("model", spec.get("class"), "model class")
    kwargs = spec.get("kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"from_spec: the spec must hold the model's constructor arguments under 'kwargs' "
            f"(a dict), got {kwargs!r}; pass the dict that model.spec() returns."
        )
    return cls(**kwargs, key=jax.random.PRNGKey(0))
