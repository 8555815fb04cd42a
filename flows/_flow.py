"""The continuous flows of GD, AdaGrad, RMSProp and Adam, and the momentum flows (docs/math.md
sections 2 and 9).

State (w, m) in R^p x R^p, m(0) = 0, g = grad L(w), all operations elementwise:

    dw/dt = -h * g,    h = 1 / sqrt(eps + psi(m, t))   (eps_placement="inside", the paper's)
                       h = 1 / (sqrt(psi(m, t)) + eps)  (eps_placement="outside", PyTorch's)
    dm/dt = phi(m, g)

| flow     | phi(m, g)          | psi(m, t)                                        |
|----------|--------------------|--------------------------------------------------|
| GD       | none (m stays 0)   | h = 1                                            |
| AdaGrad  | g^2                | m                                                |
| RMSProp  | (1 - b)(g^2 - m)   | m                                                |
| Adam w/m | (1 - b)(g^2 - m)   | m / (1 - b^t) ("paper"), m / (1 - e^{-(1-b)t}) ("ema") |

The momentum flows carry a first moment m1 as well, dm1/dt = (1 - b1)(g - m1), m1(0) = 0,
and move along it instead of g; their state m is (m2, m1) concatenated, length 2p:

| flow                 | dw/dt                    | second moment m2                |
|----------------------|--------------------------|---------------------------------|
| MomentumFlow(b1)     | -m1                      | none (stays 0, h = 1)           |
| AdamFlow(eps, b, b1) | -h * m1 / c1(t)          | as Adam w/m, h = h(m2 / c(t))   |

with c1(t) = 1 - b1^t ("paper") or 1 - e^{-(1-b1)t} ("ema"), the same correction as m2's.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._checks import _caller_level, check_b, check_eps, check_eps_placement, is_concrete
from .._records import record_repr
from .._registry import lookup, register


class AbstractFlow(eqx.Module):
    """A flow dw/dt = -h(t) * g, dm/dt = phi(m, g) (module docstring for the table).

    Subclasses define `phi` (the m-equation) and `psi` (the second-moment estimate inside
    the conditioner). Everything else (h, the vector field, d log h / dt for the paper's
    Lemma 3) is derived here, once, from those two.
    """

    __repr__ = record_repr  # values, not shapes: RMSPropFlow(eps=1e-05, b=0.9, ...)

    name: ClassVar[str]
    eps_placement: eqx.AbstractVar[str]  # "inside" (the paper's) or "outside"

    @property
    def n_moments(self) -> int:
        """Blocks of p in the state m: 1 (m), or 2 for momentum flows (m2, then m1)."""
        return 1

    @property
    def conditioner(self) -> str:
        """Deprecated: the eps placement under its old name, "eps_inside" / "eps_outside"
        (use `eps_placement`; `Trajectory.conditioner` is h)."""
        import warnings

        warnings.warn("flow.conditioner is deprecated: use flow.eps_placement ('inside' or "
                      "'outside').", DeprecationWarning, stacklevel=_caller_level())
        return "eps_" + self.eps_placement

    def split(self, m):
        """(m2, m1) of a momentum flow's state m = (m2, m1); (m, None) otherwise."""
        if self.n_moments == 1:
            return m, None
        p = m.shape[-1] // 2
        return m[..., :p], m[..., p:]

    def nonnegative(self, m):
        """m with its second moment clipped at 0 (a Runge-Kutta stage can undershoot it;
        the first moment m1 has either sign)."""
        m2, m1 = self.split(m)
        if m1 is None:
            return jnp.maximum(m, 0.0)
        return jnp.concatenate([jnp.maximum(m2, 0.0), m1], axis=-1)

    def direction(self, t, m, g):
        """What w moves along, dw/dt = -h * direction: g, or the momentum flows' m1."""
        return g

    @abc.abstractmethod
    def phi(self, t, m, g) -> Float[Array, " p"]:
        """dm/dt."""

    @abc.abstractmethod
    def psi_and_rate(self, t, m, dm, g):
        """(psi(m, t), d psi/dt along the flow), given dm/dt."""

    def init_state(self, w0: Float[Array, " p"]):
        """(w0, m0) with m0 = 0 (length n_moments * p)."""
        return w0, jnp.zeros(w0.shape[:-1] + (self.n_moments * w0.shape[-1],), w0.dtype)

    def h_of_psi(self, psi):
        eps = self.eps
        if self.eps_placement == "inside":
            return 1.0 / jnp.sqrt(eps + psi)
        # sqrt(psi), with derivative 0 at psi = 0 (sqrt's own is infinite there), as the
        # field's d log h/dt is 0 there: a save whose m fell to 0 (solver error near atol)
        # gave autodiff through h, as in lemma3_terms, an infinite rate. NaN below 0 and for
        # NaN, as sqrt gives: a non-finite h still says that m went wrong.
        positive = psi > 0
        root = jnp.where(positive, jnp.sqrt(jnp.where(positive, psi, 1.0)),
                         jnp.where(psi == 0, 0.0, jnp.nan))
        return 1.0 / (root + eps)

    def h(self, t, m, g) -> Float[Array, " p"]:
        """The conditioner h(t) (g is only used by Adam's 'paper' correction at t = 0)."""
        psi, _ = self.psi_and_rate(t, m, jnp.zeros_like(m), g)
        return self.h_of_psi(psi)

    def log_h_drop(self, psi0, psi1):
        """-1/2 (log h(psi1) - log h(psi0)) per coordinate, formed from psi1 - psi0.

        Lemma 3's penalty integral is the positive variation of -1/2 log h_i; differences
        of logs of nearly equal numbers would add rounding noise of size |log h| u at every
        step to it, these forms only rounding relative to the increment:
        eps inside:  1/4 log1p((psi1 - psi0) / (eps + psi0));
        eps outside: 1/2 log1p((sqrt psi1 - sqrt psi0) / (sqrt psi0 + eps)), with
        sqrt psi1 - sqrt psi0 = (psi1 - psi0) / (sqrt psi1 + sqrt psi0).
        """
        dpsi = psi1 - psi0
        if self.eps_placement == "inside":
            return 0.25 * jnp.log1p(dpsi / (self.eps + psi0))
        r0, r1 = jnp.sqrt(psi0), jnp.sqrt(psi1)
        s = r0 + r1
        droot = jnp.where(s > 0, dpsi / jnp.where(s > 0, s, 1.0), 0.0)
        return 0.5 * jnp.log1p(droot / (r0 + self.eps))

    def vector_field(self, t, w, m, g):
        """(dw/dt, dm/dt, h, d log h/dt) at state (w, m) with gradient g = grad L(w)."""
        dm = self.phi(t, m, g)
        psi, dpsi = self.psi_and_rate(t, m, dm, g)
        h = self.h_of_psi(psi)
        if self.eps_placement == "inside":
            dlogh = -0.5 * dpsi / (self.eps + psi)
        else:
            root = jnp.sqrt(psi)
            safe = jnp.where(root > 0, root, 1.0)
            dlogh = jnp.where(root > 0, -0.5 * dpsi / (safe * (safe + self.eps)), 0.0)
        return -h * self.direction(t, m, g), dm, h, dlogh

    def hyperparameters(self) -> dict:
        return {}

    # What the solvers ask of a flow (flows/_solvers.py), instead of switching on its class.
    has_decay: ClassVar[bool] = False  # does dm/dt = ... - a m decay (a stiff part)?
    has_conditioner: ClassVar[bool] = True  # False: h = 1, Lemma 3's I stays 0
    # Does psi grow from 0 like t g^2 (no bias correction), so that h ~ 1 / sqrt(t) early and
    # dw/dt ~ -sign(g) / sqrt(t)? Then [t0, 1] is integrated in s = sqrt t (`_clock`).
    sqrt_start: ClassVar[bool] = False

    def decay_rate(self):
        """The rate a of the linear decay dm/dt = ... - a m of the m-equation: 0 here (GD,
        AdaGrad: nothing stiff); 1 - b for RMSProp and Adam; for a momentum flow, whose m is
        (m2, m1), the pair (a2, a1) of the two blocks' rates, a1 = 1 - b1."""
        return jnp.zeros((), dtype=jnp.result_type(float))


class _Unconditioned(AbstractFlow):
    """A flow without a conditioner: h = 1, the second moment m2 stays 0, dw/dt = -direction
    (g for GD, m1 for the momentum flow), and Lemma 3's penalty is 0."""

    has_conditioner: ClassVar[bool] = False

    def psi_and_rate(self, t, m, dm, g):
        m2, _ = self.split(m)
        return jnp.zeros_like(m2), jnp.zeros_like(m2)

    def h_of_psi(self, psi):
        return jnp.ones_like(psi)

    def log_h_drop(self, psi0, psi1):
        return jnp.zeros_like(psi1)

    def vector_field(self, t, w, m, g):
        zero = jnp.zeros_like(w)
        return -self.direction(t, m, g), self.phi(t, m, g), jnp.ones_like(w), zero


@register("flow")
class GradientFlow(_Unconditioned):
    """Gradient flow dw/dt = -grad L(w): h = 1, no second moment (m stays 0).

    Example: `simulate(GradientFlow(), Linear(2, key=k), soudry_dataset(), 1e6)`.
    """

    name: ClassVar[str] = "gd"
    eps_placement: str = eqx.field(static=True, default="inside")

    def __init__(self, *, eps_placement=None, conditioner=None):
        self.eps_placement = check_eps_placement(eps_placement, "GradientFlow", conditioner,
                                                 "conditioner")

    def phi(self, t, m, g):
        return jnp.zeros_like(m)


@register("flow")
class AdaGradFlow(AbstractFlow):
    """AdaGrad flow: dm/dt = g^2, h = 1/sqrt(eps + m), so m(t) = int_0^t g^2 ds.

    Theorem 4: h is non-increasing and converges to h_inf > 0; the limit direction is a
    KKT point of (PA) min 1/2 ||h_inf^{-1/2} w||^2 s.t. q_i(w) >= 1.
    Args: eps > 0 (paper: 1e-5); eps_placement "inside" (paper) or "outside".
    """

    name: ClassVar[str] = "adagrad"
    sqrt_start: ClassVar[bool] = True
    eps: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    def __init__(self, eps=1e-5, *, eps_placement=None, conditioner=None):
        self.eps = check_eps(eps, "AdaGradFlow")
        self.eps_placement = check_eps_placement(eps_placement, "AdaGradFlow", conditioner,
                                                 "conditioner")

    def phi(self, t, m, g):
        return g * g

    def psi_and_rate(self, t, m, dm, g):
        return m, dm

    def hyperparameters(self):
        return {"eps": float(self.eps)}


@register("flow")
class RMSPropFlow(AbstractFlow):
    """RMSProp flow: dm/dt = (1 - b)(g^2 - m), h = 1/sqrt(eps + m).

    Theorem 5: m -> 0, h -> eps^{-1/2}; the limit direction is a KKT point of
    (P) min 1/2 ||w||^2 s.t. q_i(w) >= 1. Args: eps > 0, b < 1 (paper: 1e-5, 0.9; the
    paper's b is in [0, 1), and b < 0, a decay rate above 1, is the flow of a discrete
    RMSProp with 1 - b_d > lr, `discrete.matching_flow`).
    """

    name: ClassVar[str] = "rmsprop"
    sqrt_start: ClassVar[bool] = True
    eps: Float[Array, ""]
    b: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    def __init__(self, eps=1e-5, b=0.9, *, eps_placement=None, conditioner=None):
        self.eps = check_eps(eps, "RMSPropFlow")
        self.b = check_b(b, "RMSPropFlow")
        self.eps_placement = check_eps_placement(eps_placement, "RMSPropFlow", conditioner,
                                                 "conditioner")

    def phi(self, t, m, g):
        return (1.0 - self.b) * (g * g - m)

    def psi_and_rate(self, t, m, dm, g):
        return m, dm

    def hyperparameters(self):
        return {"eps": float(self.eps), "b": float(self.b)}

    has_decay: ClassVar[bool] = True

    def decay_rate(self):
        return 1.0 - self.b


@register("flow")
class AdamFlow(AbstractFlow):
    """Adam without momentum: dm/dt = (1 - b)(g^2 - m), h = 1/sqrt(eps + m / c(t)).

    bias_correction "paper": c(t) = 1 - b^t (eq. 9). At t = 0 both m and c vanish; the
    limit is psi(0+) = (1 - b) g(0)^2 / (-log b), used there so the field is finite.
    bias_correction "ema": c(t) = 1 - e^{-(1-b) t}, which makes psi an exact weighted
    average of g^2 (limit g(0)^2) and is the flow a discrete Adam follows (docs/math.md sec. 5).
    Theorem 5: h -> eps^{-1/2}; limit direction a KKT point of (P).
    """

    name: ClassVar[str] = "adam"
    eps: Float[Array, ""]
    b: Float[Array, ""]
    b1: Float[Array, ""] | None = None
    bias_correction: str = eqx.field(static=True, default="paper")
    eps_placement: str = eqx.field(static=True, default="inside")

    def __init__(
        self,
        eps=1e-5,
        b=0.9,
        *,
        b1=None,
        bias_correction: str = "paper",
        eps_placement=None,
        conditioner=None,
    ):
        self.eps = check_eps(eps, "AdamFlow")
        self.b = check_b(b, "AdamFlow")
        self.b1 = None if b1 is None else check_b(b1, "AdamFlow", "b1")
        if bias_correction not in ("paper", "ema"):
            raise ValueError(
                "AdamFlow: `bias_correction` must be 'paper' (1 - b^t, eq. 9) or 'ema' "
                f"(1 - e^{{-(1-b) t}}, the limit of discrete Adam), got {bias_correction!r}."
            )
        self.bias_correction = bias_correction
        if bias_correction == "paper":  # c(t) = 1 - b^t needs b >= 0 (b^t of b < 0 is not real)
            for name, v in (("b", self.b), ("b1", self.b1)):
                if v is not None and is_concrete(v) and float(v) < 0:
                    raise ValueError(
                        f"AdamFlow: bias_correction='paper' (c(t) = 1 - {name}^t, eq. 9) needs "
                        f"`{name}` in [0, 1), got {float(v)!r}; pass bias_correction='ema' "
                        f"(c(t) = 1 - e^{{-(1 - {name}) t}}), defined for every {name} < 1.")
        self.eps_placement = check_eps_placement(eps_placement, "AdamFlow", conditioner,
                                                 "conditioner")

    @property
    def n_moments(self) -> int:
        return 1 if self.b1 is None else 2

    has_decay: ClassVar[bool] = True

    def decay_rate(self):
        a2 = 1.0 - self.b
        return a2 if self.b1 is None else jnp.stack([a2, 1.0 - self.b1])

    def phi(self, t, m, g):
        m2, m1 = self.split(m)
        dm2 = (1.0 - self.b) * (g * g - m2)
        if m1 is None:
            return dm2
        return jnp.concatenate([dm2, (1.0 - self.b1) * (g - m1)], axis=-1)

    def _correction(self, t, b=None):
        """(c(t), c'(t), lim_{t->0} psi / g^2) for the decay b (default: the flow's b;
        the first moment's correction is the same function of b1, its limit m1_hat / g)."""
        b = self.b if b is None else b
        t = jnp.asarray(t, dtype=b.dtype)
        if self.bias_correction == "paper":
            # b = 0 gives log b = -inf: c(t) = 1 for t > 0 and the limit ratio is 0.
            log_b = jnp.log(b)
            tlog = jnp.where(t > 0, t * log_b, 0.0)
            c = -jnp.expm1(tlog)
            dc = jnp.where(b > 0, -jnp.exp(tlog) * log_b, 0.0)
            limit = jnp.where(b > 0, (1.0 - b) / -jnp.where(b > 0, log_b, -1.0), 0.0)
        else:
            rate = 1.0 - b
            c = -jnp.expm1(-rate * t)
            dc = rate * jnp.exp(-rate * t)
            limit = jnp.ones_like(c)
        return c, dc, limit

    def direction(self, t, m, g):
        """m1_hat = m1 / c1(t), its limit at t = 0 (where m1 = c1 = 0) proportional to g(0)."""
        _, m1 = self.split(m)
        if m1 is None:
            return g
        c, _, limit = self._correction(t, self.b1)
        positive = c > 0
        return jnp.where(positive, m1 / jnp.where(positive, c, 1.0), limit * g)

    def psi_and_rate(self, t, m, dm, g):
        m, _ = self.split(m)
        dm, _ = self.split(dm)
        c, dc, limit = self._correction(t)
        positive = c > 0
        c_safe = jnp.where(positive, c, 1.0)
        psi = jnp.where(positive, m / c_safe, limit * g * g)
        # d/dt (m / c) = dm / c - m c' / c^2; at t = 0 (where c = 0) the rate is not
        # needed (a single point of the integral I(t)) and is set to 0.
        dpsi = jnp.where(positive, dm / c_safe - m * dc / (c_safe * c_safe), 0.0)
        return psi, dpsi

    def hyperparameters(self):
        hyper = {"eps": float(self.eps), "b": float(self.b)}
        if self.b1 is not None:
            hyper["b1"] = float(self.b1)
        return hyper | {"bias_correction": self.bias_correction}


def flow_from_meta(name: str, hyper: dict, eps_placement: str) -> AbstractFlow:
    """Rebuild a flow from a Trajectory's or a checkpoint's metadata (its registered name;
    `eps_placement` may be a name used before, "eps_inside" / "eps_outside")."""
    old = {"eps_inside": "inside", "eps_outside": "outside"}
    return lookup("flow", name)(**hyper, eps_placement=old.get(eps_placement, eps_placement))
