"""The time variable u that `simulate` integrates in, segment by segment (its `clock`).

- `LOG_T`, u = log t, from t = 1 on: late in training g ~ 1/t and t reaches 1e100, and
  the fields in u are O(1) (constant cost per decade; `_fields`).
- `SQRT_T`, u = sqrt t, on [t0, 1] for the flows whose conditioner starts singular
  (`AbstractFlow.sqrt_start`: AdaGrad, RMSProp). From m = 0, psi = m grows like t g^2, so
  once t >> eps / g^2 (eps inside; eps^2 / g^2 outside) dw/dt ~ -sign(g) / sqrt(t): the
  field in t blows up at t = 0 and a solver in t spends a constant number of steps per
  decade of t from eps / g^2 to 1, ten decades and more for a small eps, while w moves
  by sqrt(t). In s = sqrt t the same flow is dw/ds = 2 s dw/dt ~ -2 sign(g): bounded,
  and smooth past s ~ sqrt(eps) / |g|. Measured (benchmarks/early_phase.py): the flow
  of fig1's AdaGrad on the quick CNN to t = 1e-10, 565 steps in s against 3,589 in t.
- `T`, u = t, on [t0, 1] for the others (GD, Adam, momentum flows: bounded at t = 0), and
  for AdaGrad and RMSProp where their eps transition is not over by t = 1e-12 (below).

Before the transition, t < t_c = eps / (c g^2) (eps inside the root; eps^2 / (c g^2)
outside; psi grows like c t g^2, c = 1 for AdaGrad and 1 - b for RMSProp), h is about
eps^(-1/2) and w moves linearly in t: quadratically in s. A solver whose error estimate is
first order (Heun's, the default on the CNN) then takes steps of about sqrt(rtol) in s,
where in t its estimate is exact. Measured on the quick CNN (AdaGrad, eps 1e-5 inside,
t_c = 2.4e-6 for the largest |g(w0)|): 2,419 steps to t = 1e-6 in s against 141 in t; and
fig1's AdaGrad flow (t_c = 4e-21): 565 steps to 1e-10 in s against 3,589 in t. So s is
used where t_c of the largest |g(w0)| is at most `SQRT_BELOW` = 1e-12, a threshold
between those two measured cases (the crossover between them was not measured).

With J = dt/du (1, t, or 2 sqrt t) every field is J times the field in t.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

T, LOG_T, SQRT_T = 0, 1, 2
SQRT_BELOW = 1e-12


def transition_time(flow, g_max: float) -> float:
    """t_c = eps / (c g_max^2) (eps inside) or eps^2 / (c g_max^2) (outside), where the
    second moment c t g^2 of a flow that starts like AdaGrad's reaches eps (c = phi at
    m = 0, g = 1: 1 for AdaGrad, 1 - b for RMSProp); inf where g_max = 0."""
    c = float(flow.phi(0.0, 0.0, 1.0))
    if g_max <= 0.0 or c <= 0.0:
        return float("inf")
    eps = float(flow.eps)
    return (eps if flow.eps_placement == "inside" else eps**2) / (c * g_max**2)


def starts_in_sqrt_t(flow, g_max: float) -> bool:
    """Whether [t0, 1] is integrated in s = sqrt t: flows with `sqrt_start` whose eps
    transition (of the largest |g(w0)|, `g_max`) is over by t = SQRT_BELOW."""
    return bool(type(flow).sqrt_start) and transition_time(flow, g_max) <= SQRT_BELOW


def clock_of(lo: float, sqrt_start: bool, log_from: float = 1.0) -> int:
    """The clock of a segment that starts at t = lo: log t from `log_from` on (1, but
    `lag_from` for a momentum flow on a piecewise-linear model, `_fields`)."""
    if lo >= (1.0 if sqrt_start else log_from):
        return LOG_T
    return SQRT_T if sqrt_start else T


# A momentum flow carries its first moment as the lag r = m1 - g in log time (`_fields`),
# which misses g's jumps where a ReLU or max-pool kink is crossed: an error of about
# |dg| / (1 - b1) in w per crossing. On a piecewise-linear model it therefore stays in
# u = t, with m1 itself, until (1 - b1) t reaches `LAG_AT` (from the next segment start,
# a decade; at most 1e6): kinks crossed before are followed, later ones err by about
# |g| / (1 - b1), with |g| ~ 1/t late, so about 1/LAG_AT relative in the 1/t regime.
# Later than that m1 itself stiffens: an explicit step across its coupling to w is
# limited to dt ~ sqrt(t / ((1 - b1) H)), H ~ 1/t the Hessian, so a decade costs about
# sqrt((1 - b1) t) steps times a problem's constant. Measured on a ReLU MLP(2, 8, 2) on
# 20 points to 1e7: m1 in t up to 1e6 took 38,378 steps over [1e5, 1e6] with b1 = 0 and
# ran out of steps there with b1 = -9; with LAG_AT = 1e4, 10,843 and 15,153 steps in all
# (7,911 and 11,122 in the decade before the switch); the lag from t = 1: 1,843 and 4,125.
LAG_AT = 1e4


def lag_from(decay: float) -> float:
    """The t from which a momentum flow whose m1 decays at the rate `decay` = 1 - b1 is
    integrated as its lag on a piecewise-linear model: LAG_AT / (1 - b1) in [1, 1e6],
    rounded up to a power of ten (a segment start) with a margin for rounding (b1 = 0.9
    gives 1e4 / 0.09999999999999998, which is 1e5)."""
    t = min(max(LAG_AT / decay, 1.0), 1e6)
    return float(10.0 ** math.ceil(math.log10(t) - 1e-9))


def u_of_t(t, clock: int):
    """u at t (host numbers: segment ends, save times)."""
    return np.log(t) if clock == LOG_T else np.sqrt(t) if clock == SQRT_T else t


def t_of_u(u, clock: int) -> float:
    """t at u (host number: where a failed segment stopped)."""
    u = float(u)
    return float(np.exp(u)) if clock == LOG_T else u * u if clock == SQRT_T else u


def time_and_log_j(u, clock):
    """(t, log J) at u on a traced clock, J = dt/du: (e^u, u), (u^2, log 2u), (u, 0).

    log J is -inf at u = 0 in sqrt t (J = 0: the fields in s vanish there)."""
    is_log, is_sqrt = clock == LOG_T, clock == SQRT_T
    t = jnp.where(is_log, jnp.exp(jnp.where(is_log, u, 0.0)), jnp.where(is_sqrt, u * u, u))
    log_j = jnp.where(is_log, u, jnp.where(is_sqrt, jnp.log(jnp.where(is_sqrt, 2 * u, 1.0)),
                                           0.0))
    return t, log_j


def log_t_span(u0, u1, clock):
    """log(t1 / t0) over a step [u0, u1] (0 where t0 = 0)."""
    positive = jnp.where(u0 > 0, u0, 1)
    ratio = jnp.where(u0 > 0, jnp.log(u1 / positive), 0)
    return jnp.where(clock == LOG_T, u1 - u0, jnp.where(clock == SQRT_T, 2 * ratio, ratio))
