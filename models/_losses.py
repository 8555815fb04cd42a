"""Losses in log space, and the logistic f, g and their derivatives exact to a few ulps.

The loss is a SUM over samples, L(w) = sum_i exp(-f(q_i(w))). Late in training L is
e^{-1000} and smaller, so everything is computed as log L = logsumexp_i(-f(q_i)), which is
finite and accurate whenever the margins are.

Why the logistic functions carry their own derivatives. With u = e^{-q}, every quantity
of the logistic loss is a ratio of functions that vanish together as u -> 0
(log(1 + u) / u, (u - log(1 + u)) / u^2, ...). Autodiff of a formula that is exact for the
value differentiates the ratio, divides by u^2, and returns inf or NaN once u^2
underflows (q > 354; q in [690, 708] even for the first derivative, where u is subnormal
and flushed to zero) or loses digits to cancellation long before (q ~ 30). So each of
f, f', f'' and g, g', g'' is a `jax.custom_jvp` whose derivative is the next function of
the chain, and every function of the chain is written, per regime, in a form without
cancellation:

- q > 0 (0 < u <= 1): R(u) = log1p(u)/u (-> 1), and E(u) = u - log1p(u) from its series
  in z = u / (2 + u), E = 2 sum_{k>=2} c_k z^k with c_k = 1 (k even), 1 - 1/k (k odd):
  every term is positive, so the sum has no cancellation (z <= 1/3: 36 terms reach
  2^-54);
- q <= 0: v = e^q in (0, 1], softplus(-q) = -q + log1p(v) >= log 2;
- g(x), with v = e^{-x}: K(v) = 1 - (1 + v) e^{-v} from its alternating series for v <= 1
  (terms fall like v^k / k!), and from -expm1(-v) - v e^{-v} above.

The tests hold every function against mpmath at 50 digits (tests/test_loss_numerics.py;
the bounds reached are in the README).
"""

from __future__ import annotations

import abc
import math
from decimal import Decimal
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._registry import known, lookup, register

# E(u) = u - log1p(u) = 2 z^2 sum_{k>=2} c_k z^{k-2}, z = u/(2+u) <= 1/3 (see module doc).
_E_COEFFS = tuple(1.0 if k % 2 == 0 else 1.0 - 1.0 / k for k in range(2, 38))
# K(v) = 1 - (1+v) e^{-v} = v^2 sum_{k>=2} (-1)^k (k-1) v^{k-2} / k!, for v <= 1.
_K_COEFFS = tuple((-1.0) ** k * (k - 1) / float(math.factorial(k))
                  for k in range(2, 22))


def _horner(coeffs, z):
    acc = jnp.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * z + c
    return acc


def _split(digits: str, dtype):
    """A constant as hi + lo in `dtype` (hi the rounded value, lo the rest), so that x - c
    is exact to a few ulps of the difference even where x is within rounding of c."""
    exact = Decimal(digits)
    hi = np.asarray(float(exact), dtype)
    lo = np.asarray(float(exact - Decimal(float(hi))), dtype)
    return hi, lo


# The roots of f (q0 = -log(e - 1), where softplus(-q) = 1) and of g (x0 = f(0) =
# -log(log 2)), to 35 digits. Near them f and g are written in q - q0 and x - x0 so that
# their values keep a few ulps relative accuracy through the sign change.
_Q0 = "-0.5413248546129181089783563549326703"
_X0 = "0.36651292058166432701243915823266947"
_ROOT_WINDOW = 0.25


def _minus_root(x, digits: str):
    hi, lo = _split(digits, jnp.result_type(x))
    # The barrier stops XLA from folding (x - hi) - lo into x - (hi + lo) = x - hi.
    return jax.lax.optimization_barrier(x - hi) - lo


def _tiny(x):
    """Below this, u and u^2 / 2 are lost against 1: the ratios below are their limits."""
    return jnp.finfo(jnp.result_type(x)).eps


# ----------------------------------------------------------- pieces for q > 0
def _pos_parts(q):
    """u = e^{-q}, R = log1p(u)/u, P = E / (2 z^2), z = u/(2+u), for q > 0 (q clipped)."""
    qp = jnp.where(q > 0, q, 1.0)
    u = jnp.exp(-qp)
    small = u < _tiny(u)
    R = jnp.where(small, 1.0, jnp.log1p(u) / jnp.where(small, 1.0, u))
    z = u / (2.0 + u)
    P = _horner(_E_COEFFS, z)
    return qp, u, R, P


def _neg_parts(q):
    """v = e^q and s = softplus(-q) = -q + log1p(v) >= log 2, for q <= 0 (q clipped)."""
    qn = jnp.where(q > 0, 0.0, q)
    v = jnp.exp(qn)
    return qn, v, -qn + jnp.log1p(v)


def _differentiates_to(fun, derivative) -> None:
    """Give the custom_jvp `fun` the derivative `derivative` (the next link of a chain)."""

    @fun.defjvp
    def _jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        return fun(x), derivative(x) * dx


# ------------------------------------------- the logistic chain: -f, f', f'', f'''
@jax.custom_jvp
def log_softplus_neg(q: Float[Array, "..."]) -> Float[Array, "..."]:
    """log(log(1 + e^{-q})) = -f(q) of the logistic loss, exact for every finite q.

    For q > 0 it is -q + log(R(u)), R(u) = log1p(u)/u -> 1 as u = e^{-q} underflows, so the
    value stays -q + O(e^{-q}) instead of log(0) = -inf; its derivative is -f'(q).
    """
    qp, _, R, _ = _pos_parts(q)
    _, _, s = _neg_parts(q)
    # Near q0: softplus(-q) - 1 = log1p((1 - 1/e) expm1(q0 - q)), without cancellation.
    d = _minus_root(q, _Q0)
    dc = jnp.clip(d, -_ROOT_WINDOW, _ROOT_WINDOW)
    near = jnp.log1p(jnp.log1p((1.0 - math.exp(-1.0)) * jnp.expm1(-dc)))
    value = jnp.where(q > 0, -qp + jnp.log(R), jnp.log(s))
    return jnp.where(jnp.abs(d) < _ROOT_WINDOW, near, value)


@jax.custom_jvp
def logistic_f_prime(q):
    """f'(q) = sigmoid(-q) / softplus(-q): 1/((1+u) R(u)) for q > 0, 1/((1+v) s) else."""
    _, u, R, _ = _pos_parts(q)
    _, v, s = _neg_parts(q)
    return jnp.where(q > 0, 1.0 / ((1.0 + u) * R), 1.0 / ((1.0 + v) * s))


@jax.custom_jvp
def logistic_f_second(q):
    """f''(q) = f'(q) (f'(q) - sigmoid(q)) = u E(u) / ((1+u) log1p(u))^2 (> 0).

    q > 0: 2 u P / ((2+u) R (1+u))^2 with E = 2 z^2 P, so no u^2 is formed (-> u/2);
    q <= 0: (1 - v s) / ((1+v) s)^2, where 1 - v s >= 1 - log 2.
    """
    _, u, R, P = _pos_parts(q)
    _, v, s = _neg_parts(q)
    pos = 2.0 * u * P / jnp.square((2.0 + u) * R * (1.0 + u))
    neg = (1.0 - v * s) / jnp.square((1.0 + v) * s)
    return jnp.where(q > 0, pos, neg)


def logistic_f_third(q):
    """f'''(q) = f''(q) d/dq log f''(q), each logarithmic derivative term O(1).

    q > 0: -f'' (1 + (2+u)^2 / (2 P (1+u)) - 2u/(1+u) - 2/((1+u) R))   (-> -u/2);
    q <= 0: f'' (v (1/(1+v) - s) / (1 - v s) - 2v/(1+v) + 2/((1+v) s))  (-> 2/|q|^3).
    """
    _, u, R, P = _pos_parts(q)
    _, v, s = _neg_parts(q)
    f2 = logistic_f_second(q)
    bracket_pos = (1.0 + jnp.square(2.0 + u) / (2.0 * P * (1.0 + u))
                   - 2.0 * u / (1.0 + u) - 2.0 / ((1.0 + u) * R))
    bracket_neg = (v * (1.0 / (1.0 + v) - s) / (1.0 - v * s)
                   - 2.0 * v / (1.0 + v) + 2.0 / ((1.0 + v) * s))
    return f2 * jnp.where(q > 0, -bracket_pos, bracket_neg)





_differentiates_to(log_softplus_neg, lambda q: -logistic_f_prime(q))
_differentiates_to(logistic_f_prime, logistic_f_second)
_differentiates_to(logistic_f_second, logistic_f_third)


# --------------------------------------------------- the logistic chain: g, g', g'', g'''
def _g_parts(x):
    """v = e^{-x}, S = 1 - e^{-v}, R2 = S/v (-> 1), H = K(v)/v^2 (series, v <= 1), K."""
    v = jnp.exp(-x)
    small = v < _tiny(v)
    S = -jnp.expm1(-v)
    R2 = jnp.where(small, 1.0, S / jnp.where(small, 1.0, v))
    H = _horner(_K_COEFFS, jnp.minimum(v, 1.0))
    K = S - v * jnp.exp(-v)
    return v, S, R2, H, K


@jax.custom_jvp
def logistic_g(x):
    """g(x) = f^{-1}(x) = -log(expm1(v)), v = e^{-x}, in three forms without cancellation.

    x > 0: x - log(expm1(v)/v) (the ratio -> 1 as v underflows); x <= 0 (v >= 1):
    -v - log(1 - e^{-v}) (no overflow of expm1(v) for x down to -709); near the root
    x0 = -log(log 2): expm1(v) - 1 = 2 expm1(log 2 expm1(x0 - x)).
    """
    xp = jnp.where(x > 0, x, 1.0)
    v = jnp.exp(-xp)
    small = v < _tiny(v)
    ratio = jnp.where(small, 1.0, jnp.expm1(v) / jnp.where(small, 1.0, v))
    vn = jnp.exp(-jnp.where(x > 0, 0.0, x))
    d = _minus_root(x, _X0)
    dc = jnp.clip(d, -_ROOT_WINDOW, _ROOT_WINDOW)
    near = -jnp.log1p(2.0 * jnp.expm1(math.log(2.0) * jnp.expm1(-dc)))
    value = jnp.where(x > 0, xp - jnp.log(ratio), -vn - jnp.log(-jnp.expm1(-vn)))
    return jnp.where(jnp.abs(d) < _ROOT_WINDOW, near, value)


@jax.custom_jvp
def logistic_g_prime(x):
    """g'(x) = 1 / f'(g(x)) = v / (1 - e^{-v}) = 1 / R2  (-> 1 + v/2 as v = e^{-x} -> 0)."""
    _, _, R2, _, _ = _g_parts(x)
    return 1.0 / R2


@jax.custom_jvp
def logistic_g_second(x):
    """g''(x) = -v K(v) / (1 - e^{-v})^2 with K(v) = 1 - (1+v) e^{-v}  (< 0, -> -v/2)."""
    v, S, R2, H, K = _g_parts(x)
    return jnp.where(v <= 1.0, -v * H / jnp.square(R2), -v * K / jnp.square(S))


def logistic_g_third(x):
    """g'''(x) = v / S^2 (K + v^2 e^{-v} - 2 v K e^{-v} / S)  (-> v/2 as v -> 0, -> v)."""
    v, S, R2, H, K = _g_parts(x)
    ev = jnp.exp(-v)
    small = v / jnp.square(R2) * (H + ev - 2.0 * H * ev / R2)
    large = v / jnp.square(S) * (K + v * v * ev - 2.0 * v * K * ev / S)
    return jnp.where(v <= 1.0, small, large)





_differentiates_to(logistic_g, logistic_g_prime)
_differentiates_to(logistic_g_prime, logistic_g_second)
_differentiates_to(logistic_g_second, logistic_g_third)


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


@register("loss")
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


@register("loss")
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
        return logistic_g(x)

    def f_prime(self, q):
        return logistic_f_prime(q)

    def g_prime(self, x):
        return logistic_g_prime(x)


@register("loss")
class CrossEntropy(AbstractLoss):
    """Multi-class cross-entropy, sum_i log(1 + sum_{j != y_i} e^{Phi_j - Phi_{y_i}}).

    Margin (App. E): q_i = Phi_{y_i} - max_{j != y_i} Phi_j. The loss of a sample equals the
    logistic loss at the soft margin -logsumexp_{j != y_i}(Phi_j - Phi_{y_i}) <= q_i, so f,
    g and f' are the logistic ones.
    """

    name: ClassVar[str] = "cross_entropy"
    multiclass: ClassVar[bool] = True

    def _rivals(self, outputs: Float[Array, "n C"], y: Int[Array, " n"]):
        """(Phi_y, Phi_j with -inf at j = y, max_{j != y} Phi_j) per sample."""
        n, c = outputs.shape
        own = jnp.take_along_axis(outputs, y[:, None], axis=1)[:, 0]
        mask = jnp.arange(c)[None, :] == y[:, None]
        rivals = jnp.where(mask, -jnp.inf, outputs)
        return own, rivals, jnp.max(rivals, axis=1)

    def margins(self, outputs, y):
        own, _, top = self._rivals(outputs, y)
        return own - top

    def log_terms(self, outputs, y):
        # soft margin = -logsumexp_{j != y}(Phi_j - Phi_y) = (Phi_y - m) - logsumexp(Phi_j - m)
        # with m the top rival: the rivals' differences Phi_j - m are formed exactly, not
        # as (Phi_j - Phi_y) rounded at the size of the margin (which lost the softmax of
        # near rivals to the rounding of a margin of 1e4). The value does not depend on m,
        # so m carries no gradient.
        own, rivals, top = self._rivals(outputs, y)
        m = jax.lax.stop_gradient(top)
        soft_margin = (own - m) - jax.nn.logsumexp(rivals - m[:, None], axis=1)
        return log_softplus_neg(soft_margin)

    def f(self, q):
        return Logistic().f(q)

    def g(self, x):
        return Logistic().g(x)

    def f_prime(self, q):
        return Logistic().f_prime(q)

    def g_prime(self, x):
        return Logistic().g_prime(x)


def get_loss(loss: str | AbstractLoss) -> AbstractLoss:
    """The loss object for a name ("exponential", "logistic", "cross_entropy")."""
    if isinstance(loss, AbstractLoss):
        return loss
    if not isinstance(loss, str) or loss not in known("loss"):
        raise ValueError(
            f"`loss` must be one of {known('loss')}, got {loss!r}; "
            "pass one of these names or a marginflow.models loss object."
        )
    return lookup("loss", loss)()
