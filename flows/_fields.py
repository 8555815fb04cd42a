"""The flows in the variables `simulate` integrates: the time u (t or sqrt t, then log t),
the state v = w ||w||^(L-1), a momentum flow's lag r = m1 - g; the fields, their explicit /
implicit split for the IMEX solvers, what is saved, and the pieces of Lemma 3's I(t)."""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from ._clock import LOG_T
from ._clock import time_and_log_j as _time
from ._imex import DecaySplit
from ._solvers import is_imex

# The integration variable u is t, log t or sqrt t (a segment's clock, `_clock`). With
# J = dt/du every field below is J times the field in t. Late in training g ~ 1/t and
# t ~ 1e100: the log-time fields are O(1) in u (so steps are O(1) in u: constant cost per
# decade), and J * g is computed as exp(log L + log J) * grad log L, which never underflows
# although g itself may be 1e-300. At t = 1, t and log t coincide to first order (du = dt,
# J = 1), so the step size and the solver's FSAL state carry across that switch unchanged;
# from sqrt t they are made anew (`Engine._switch`). `_time(u, clock)` is (t, log J).


# The state variable is v = w ||w||^(L-1) (L = the model's degree; v = w for L = 1), so
# that ||v|| = ||w||^L is the scale of the margins q_i(w) = ||w||^L q_i(w / ||w||). Late in
# training q_min ~ log t: v grows linearly in u while w grows like u^(1/L). The radial mode
# of the late field (Jacobian J w ~ -w, eigenvalue -1 in u) carries that growth, and a
# Runge-Kutta step's error along it is much smaller in v. Measured from t = 1e5 to 1e100
# (DecayIMEX, rtol 1e-8, one solve): GD on MLP(4, 8, 2, k=2) 359 steps in w, 233 in v; on
# DeepLinear(4, 4, 4, 1) 423 and 227, with errors 4e-10 (w) and 1e-10 / 3e-11 (v) against
# an rtol-1e-13 reference (benchmarks/late_phase.py, docs/performance.md). The map is O(p)
# and smooth for w != 0.
def _safe_norm(x):
    """||x|| over the last axis (kept), 1 where x = 0: finite values and derivatives there
    (the double-where keeps NaN out of the gradient an implicit solver's Jacobian takes)."""
    n2 = jnp.sum(x * x, axis=-1, keepdims=True)
    return jnp.sqrt(jnp.where(n2 > 0, n2, 1.0))


def _w_of_v(v, degree: int):
    if degree == 1:
        return v
    return v * _safe_norm(v) ** (1.0 / degree - 1.0)


def _v_of_w(w, degree: int):
    if degree == 1:
        return w
    return w * _safe_norm(w) ** (degree - 1)


def _dv(w, dw, degree: int):
    """dv = ||w||^(L-1) (dw + (L-1) <w, dw> / ||w||^2 w), the derivative of v along dw."""
    if degree == 1:
        return dw
    n = _safe_norm(w)
    radial = jnp.sum(w * dw, axis=-1, keepdims=True) / n**2
    return n ** (degree - 1) * (dw + (degree - 1) * radial * w)


# A momentum flow's first moment m1 relaxes to g at the rate (1 - b1) t in u = log t, and
# w moves along it with the coefficient J = t: the pair (w, m1) couples with the factor
# J * J (1 - b1) H ~ (1 - b1) t late in training (H ~ 1/t, the Hessian of L), a stiffness
# that no O(p) implicit treatment of the decay alone removes (measured: `DecayIMEX` and
# Kvaerno5 + Newton-Krylov both hit max_steps in [1e10, 1e20] on the toy, b1 = 0). The
# state therefore carries r = m1 - g(w), the lag of the first moment behind the gradient:
#     dr/dt = dm1/dt - H dw/dt = -(1 - b1) r - H dw/dt,
# whose only stiff part is its linear decay (-(1 - b1) J r in u, implicit in `DecayIMEX`),
# and whose coupling term H (J dw/dt) is O(1/t): one Hessian-vector product per field
# evaluation. The lag is exact where g is continuous; where it jumps (a ReLU kink crossed)
# r misses the jump -dg, an error in m1 that decays at the rate 1 - b1 and moves w by about
# |dg| / (1 - b1). So r is used in log time only (segments with clock LOG_T), where
# g ~ 1/t; before (J = 1, nothing stiff yet), m1 itself is integrated: on [t0, 1], and on
# a piecewise-linear model, whose kinks are still crossed after t = 1, until
# `_clock.lag_from`. At that switch `simulate` converts m1 to r and restarts the solver's
# own state. The saves hold m1.
def _lag_to_m1(flow, m, g, lagged):
    """The flow's moments (m2, m1) from the integrated (m2, r) where `lagged` (m itself
    otherwise, and for one-moment flows)."""
    if flow.n_moments == 1:
        return m
    m2, r = flow.split(m)
    return jnp.concatenate([m2, jnp.where(lagged, r + g, r)], axis=-1)


def _hessian_times(objective, w, log_l, glog, x):
    """H x with H the Hessian of L at w, as L (H_log x + glog <glog, x>) (H_log: Hessian of
    log L), so that nothing underflows where L itself is tiny but representable."""
    _, dglog = jax.jvp(jax.grad(lambda v: objective.log_loss(v).astype(w.dtype)), (w,), (x,))
    return jnp.exp(log_l) * (dglog + glog * jnp.sum(glog * x, axis=-1, keepdims=True))


def _fields(u, y, args):
    """(dv/du, J dm/du, dI/du, J dm/du without m's linear decay): the pieces both term
    layouts are made of (dm for a momentum flow: that of (m2, r), r = m1 - g)."""
    flow, objective, a, clock = args
    v, m, _ = y
    w = _w_of_v(v, objective.degree)
    t, log_j = _time(u, clock)
    j = jnp.exp(log_j)
    log_l, glog = jax.value_and_grad(objective.log_loss)(w)
    log_l = log_l.astype(w.dtype)  # float64 labels would promote a float32 run
    lagged = clock == LOG_T
    # In log time J * grad L is computed in log space and g = J g / J is >= 1e-300-ish for
    # t <= 1e300: representable; only g^2 may underflow (to 0). Before t = 1, g directly
    # (J = 2 sqrt t is 0 at t = 0 in sqrt t, where J g / J would be 0 / 0).
    log_jg = jnp.where(lagged, log_j, 0.0)
    g = jnp.exp(log_l + log_jg) * glog / jnp.exp(log_jg)
    moments = _lag_to_m1(flow, m, g, lagged)
    # m >= 0 on the exact solution, but a Runge-Kutta stage (whose tableau has negative
    # weights) can put it below -eps, where sqrt(eps + m) is NaN; measured on an MLP: every
    # step near t = 0 rejected. The conditioner sees max(m, 0) (a momentum flow's m1 is not
    # clipped); the m-equation itself, linear in m, keeps the raw value.
    dw, _, _, _ = flow.vector_field(t, w, flow.nonnegative(moments), g)
    # J * (the flow's dw/dt): a subclass's field is honoured; g is a normal float64 number
    # for t <= 1e300, so this product does not underflow either.
    jdw = j * dw
    # Lemma 3's I(t) is not integrated: `PenaltyIntegral` sets it from each step's ends.
    dI = jnp.zeros_like(y[2])
    # Everything but the linear decay -a m: phi is affine in m, so that is J phi(t, 0, g)
    # (= J a g^2), taken as such: forming it as J dm + J a m cancels catastrophically once
    # m >> g^2 (rounding ~ 1e-16 J a m, measured to stall the controller from t ~ 1e18 on).
    explicit = j * flow.phi(t, jnp.zeros_like(moments), g)
    full = j * flow.phi(t, moments, g)
    if flow.n_moments == 2:  # the lag r: decay -(1 - b1) J r, explicit part -H (J dw/dt)
        _, r = flow.split(m)
        coupling = -_hessian_times(objective, w, log_l, glog, jdw)
        m2_exp, m1_exp = flow.split(explicit)
        m2_full, m1_full = flow.split(full)
        explicit = jnp.concatenate([m2_exp, jnp.where(lagged, coupling, m1_exp)], axis=-1)
        full = jnp.concatenate(
            [m2_full, jnp.where(lagged, coupling - j * a[1] * r, m1_full)], axis=-1)
    return _dv(w, jdw, objective.degree), full, dI, explicit


def _full_field(u, y, args):
    dw, dm, dI, _ = _fields(u, y, args)
    return dw, dm, dI


def _explicit_field(u, y, args):
    # Everything but the linear decay of the m-equation (a = 1 - b; 0 for GD/AdaGrad).
    dw, _, dI, explicit = _fields(u, y, args)
    return dw, explicit, dI


def _implicit_field(u, y, args):
    # -J a m: linear and diagonal (for diffrax's own IMEX solvers, e.g. KenCarp5).
    w, m, I = y
    rates = _decay_rates(u, y, args)
    return jnp.zeros_like(w), -rates[1] * m, jnp.zeros_like(I)


def _rates_of(a, m):
    """The decay rate of every entry of m: a, or for a momentum flow's m = (m2, m1) the
    pair a = (a2, a1) spread over the two blocks."""
    if jnp.ndim(a) == 0:
        return jnp.full_like(m, a)
    p = m.shape[-1] // 2
    block = m.shape[:-1] + (p,)
    return jnp.concatenate([jnp.full(block, a[0], m.dtype), jnp.full(block, a[1], m.dtype)],
                           axis=-1)


def _decay_rates(u, y, args):
    # The diagonal decay rates lambda of the implicit part -lambda * y (for `DecayIMEX`).
    _, _, a, clock = args
    w, m, I = y
    _, log_j = _time(u, clock)
    return jnp.zeros_like(w), jnp.exp(log_j) * _rates_of(a, m), jnp.zeros_like(I)


def _terms(solver):
    if isinstance(solver, DecaySplit):
        return dfx.MultiTerm(dfx.ODETerm(_explicit_field), dfx.ODETerm(_decay_rates))
    if is_imex(solver):
        return dfx.MultiTerm(dfx.ODETerm(_explicit_field), dfx.ODETerm(_implicit_field))
    return dfx.ODETerm(_full_field)


def _save_fn(u, y, args):
    flow, objective, _, clock = args
    v, m, I = y
    w = _w_of_v(v, objective.degree)
    t, _ = _time(u, clock)
    log_l, g = objective.log_loss_and_grad(w)
    log_l, g = log_l.astype(w.dtype), g.astype(w.dtype)
    m = _lag_to_m1(flow, m, g, clock == LOG_T)
    return {"w": w, "m": m, "I": I, "log_loss": log_l, "h": flow.h(t, flow.nonnegative(m), g)}


def _psi(u, y, args, start: bool):
    """psi_i, the argument of the conditioner h_i, at (u, y) (for `PenaltyIntegral`)."""
    flow, objective, _, clock = args
    m = flow.nonnegative(y[1])
    t, _ = _time(u, clock)
    g = jnp.zeros_like(y[0])
    if start:  # Adam's psi at t = 0 is a limit proportional to g(0)^2
        log_l, glog = jax.value_and_grad(objective.log_loss)(_w_of_v(y[0], objective.degree))
        g = (jnp.exp(log_l) * glog).astype(m.dtype)
    return flow.psi_and_rate(t, m, jnp.zeros_like(m), g)[0]


def _drop(args, psi0, psi1):
    """phi_i(psi1) - phi_i(psi0), phi = -1/2 log h: Lemma 3's I accumulates its rises."""
    return args[0].log_h_drop(psi0, psi1)


def _psi_scale(u, args, psi):
    """psi_i at m = 1 (psi is linear in m: 1, or Adam's 1 / c(t)): atol's size in psi, for
    the dead band of I (`_penalty._width`). psi gives the shape."""
    flow, _, _, clock = args
    t, _ = _time(u, clock)
    ones = jnp.ones(psi.shape[:-1] + (flow.n_moments * psi.shape[-1],), psi.dtype)
    return flow.psi_and_rate(t, ones, jnp.zeros_like(ones), jnp.zeros_like(psi))[0]


def _decay_over(u0, u1, args):
    """lambda du over [u0, u1]: m's decay rate a J (at u1, its largest) times the step."""
    _, _, a, clock = args
    _, log_j = _time(u1, clock)
    return jnp.max(a) * jnp.exp(log_j) * (u1 - u0)


def _initial_moments(flow, objective, w0, lagged: bool):
    """m(t0) = 0, integrated as (m2, r) = (0, -g(w0)) for a momentum flow in log time."""
    m0 = flow.init_state(w0)[1]
    if flow.n_moments == 1 or not lagged:
        return m0
    return _to_lag(objective, w0, m0)


def _gradient(objective, w):
    """g(w) = grad L(w) in w's dtype, member by member for a batch (w of shape (B, p))."""

    def g(w):
        return objective.log_loss_and_grad(w)[1].astype(w.dtype)

    return g(w) if w.ndim == 1 else jax.vmap(g)(w)


@eqx.filter_jit
def _to_lag(objective, w, m):
    """A momentum flow's (m2, m1) at w as (m2, r), r = m1 - g(w) (see `_fields`)."""
    return m.at[..., w.shape[-1]:].add(-_gradient(objective, w))
