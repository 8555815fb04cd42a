"""Losses in log space (MATH.md section 1).

The loss is a SUM over samples, L(w) = sum_i exp(-f(q_i(w))). Late in training L is
e^{-1000} and smaller, so everything is computed as log L = logsumexp_i(-f(q_i)), which is
finite and accurate whenever the margins are.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def log_softplus_neg(q: Float[Array, "..."]) -> Float[Array, "..."]:
    """log(log(1 + e^{-q})), accurate for every finite q.

    For q > 0 write u = e^{-q}: log(log1p(u)) = -q + log(log1p(u)/u), and log1p(u)/u -> 1
    as u underflows, so the value stays -q + O(e^{-q}) instead of log(0) = -inf.
    """
    q_pos = jnp.where(q > 0, q, 1.0)  # double-where keeps gradients of the other branch finite
    u = jnp.exp(-q_pos)
    ratio = jnp.where(u > 0, jnp.log1p(u) / jnp.where(u > 0, u, 1.0), 1.0)
    large = -q_pos + jnp.log(ratio)
    q_neg = jnp.where(q > 0, 0.0, q)
    small = jnp.log(jax.nn.softplus(-q_neg))
    return jnp.where(q > 0, large, small)


class AbstractLoss(eqx.Module):
    """A margin loss ell(q) = exp(-f(q)) summed over samples.

    `margins(outputs, y)` gives q_i; `log_terms(outputs, y)` gives log ell_i = -f(q_i)
    (for cross-entropy, of the soft margin); `log_loss` is log L = logsumexp(log ell_i).
    `f`, `g = f^{-1}` and `f_prime` are the functions of the paper's Assumption 2.
    """

    name: ClassVar[str]
    multiclass: ClassVar[bool]

    @abc.abstractmethod
    def margins(self, outputs, y) -> Float[Array, " n"]: ...

    @abc.abstractmethod
    def log_terms(self, outputs, y) -> Float[Array, " n"]: ...

    def log_loss(self, outputs, y) -> Float[Array, ""]:
        return jax.nn.logsumexp(self.log_terms(outputs, y))

    @abc.abstractmethod
    def f(self, q): ...

    @abc.abstractmethod
    def g(self, x): ...

    @abc.abstractmethod
    def f_prime(self, q): ...

    def g_prime(self, x):
        """g'(x) = 1 / f'(g(x))."""
        return 1.0 / self.f_prime(self.g(x))


class Exponential(AbstractLoss):
    """exp(-q): f(q) = q, g(x) = x. Binary labels in {-1, +1}."""

    name: ClassVar[str] = "exponential"
    multiclass: ClassVar[bool] = False

    def margins(self, outputs: Float[Array, " n"], y: Float[Array, " n"]):
        return y * outputs

    def log_terms(self, outputs, y):
        return -self.margins(outputs, y)

    def f(self, q):
        return q

    def g(self, x):
        return x

    def f_prime(self, q):
        return jnp.ones_like(q)


class Logistic(AbstractLoss):
    """log(1 + e^{-q}): f(q) = -log log(1 + e^{-q}), g(x) = -log(expm1(e^{-x}))."""

    name: ClassVar[str] = "logistic"
    multiclass: ClassVar[bool] = False

    def margins(self, outputs: Float[Array, " n"], y: Float[Array, " n"]):
        return y * outputs

    def log_terms(self, outputs, y):
        return log_softplus_neg(self.margins(outputs, y))

    def f(self, q):
        return -log_softplus_neg(q)

    def g(self, x):
        # -log(expm1(e^{-x})); for large x, expm1(e^{-x}) = e^{-x}(1 + e^{-x}/2 + ...), so
        # g(x) = x - log(expm1(u)/u) with u = e^{-x} stays accurate when u underflows.
        u = jnp.exp(-x)
        ratio = jnp.where(u > 0, jnp.expm1(u) / jnp.where(u > 0, u, 1.0), 1.0)
        return x - jnp.log(ratio)

    def f_prime(self, q):
        # f'(q) = e^{-q} / ((1 + e^{-q}) log(1 + e^{-q})) = sigmoid(-q) / softplus(-q),
        # written with log_softplus_neg so it stays finite (-> 1) for large q.
        return jnp.exp(jax.nn.log_sigmoid(-q) - log_softplus_neg(q))


class CrossEntropy(AbstractLoss):
    """Multi-class cross-entropy, sum_i log(1 + sum_{j != y_i} e^{Phi_j - Phi_{y_i}}).

    Margin (App. E): q_i = Phi_{y_i} - max_{j != y_i} Phi_j. The loss of a sample equals the
    logistic loss at the soft margin -logsumexp_{j != y_i}(Phi_j - Phi_{y_i}) <= q_i, so f,
    g and f' are the logistic ones.
    """

    name: ClassVar[str] = "cross_entropy"
    multiclass: ClassVar[bool] = True

    def _others(self, outputs: Float[Array, "n C"], y: Int[Array, " n"]):
        n, c = outputs.shape
        own = jnp.take_along_axis(outputs, y[:, None], axis=1)
        mask = jnp.arange(c)[None, :] == y[:, None]
        return jnp.where(mask, -jnp.inf, outputs - own)

    def margins(self, outputs, y):
        return -jnp.max(self._others(outputs, y), axis=1)

    def log_terms(self, outputs, y):
        soft_margin = -jax.nn.logsumexp(self._others(outputs, y), axis=1)
        return log_softplus_neg(soft_margin)

    def f(self, q):
        return Logistic().f(q)

    def g(self, x):
        return Logistic().g(x)

    def f_prime(self, q):
        return Logistic().f_prime(q)


_LOSSES = {cls.name: cls for cls in (Exponential, Logistic, CrossEntropy)}


def get_loss(loss: str | AbstractLoss) -> AbstractLoss:
    """The loss object for a name ("exponential", "logistic", "cross_entropy")."""
    if isinstance(loss, AbstractLoss):
        return loss
    if not isinstance(loss, str) or loss not in _LOSSES:
        raise ValueError(
            f"`loss` must be one of {sorted(_LOSSES)}, got {loss!r}; "
            "pass one of these names or a marginflow.models loss object."
        )
    return _LOSSES[loss]()
