"""`simulate`: integrate a flow on a model and data set with a diffrax adaptive solver.

The integration runs in segments, one per decade of t up to 1e10 ([0, 1], [1, 10], ...,
[1e9, 1e10]) and one per ten decades after ([1e10, 1e20], ...), each a call of ONE
jit-compiled diffeqsolve that carries the solver's and the step-size controller's state
across the boundary (so nothing restarts). Segments give a progress
meter that moves on the log scale the theory lives on, and a place to stop, report and
checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checkpoint as ckpt
from .._cache import CompileClock, use_cache
from .._checks import check_finite_params
from .._threads import map_chunks
from .._threads import n_workers as n_threads
from .._trajectory import Trajectory, raise_if_failed
from ..models import Objective
from ..models._base import check_real_type
from ..models._homogeneity import check_homogeneous
from ..models._objective import initial_point
from ._flow import AbstractFlow
from ._imex import DecayIMEX
from ._penalty import PenaltyIntegral
from ._saves import SavedAt
from ._separation import separation_verdict
from ._solvers import (
    decay_rate,
    default_controller,
    default_solver,
    is_imex,
    kink_stats,
    solver_name,
)

_RESULT_NAMES = [
    "successful",
    "max_steps_reached",
    "singular",
    "breakdown",
    "diverged",
    "max_steps_rejected",
    "internal_error",
    "event_occurred",
    "dt_min_reached",
    "nonlinear_max_steps_reached",
    "nonlinear_divergence",
]

_HINTS = {
    "max_steps_reached": "increase `max_steps` (a limit per segment: a decade of t, ten "
    "after 1e10), loosen rtol, or use an implicit solver (solver=None picks one)",
    "dt_min_reached": "the step size underflowed: loosen rtol/atol or check the model for "
    "a kink the solver cannot step over",
    "nonlinear_divergence": "the implicit solver's root finder diverged: loosen rtol or "
    "pass another solver",
    "nonlinear_max_steps_reached": "the implicit solver's root finder did not converge: "
    "loosen rtol or pass another solver",
    "nonfinite_state": "the vector field became non-finite (NaN/inf) at the state reached: "
    "check the data scale, the initialisation and the flow's hyper-parameters",
    "breakdown": "the state became non-finite (NaN/inf): check the data scale and the "
    "initialisation, or lower t1",
}


def _result_name(code) -> str:
    if int(code) == int(dfx.RESULTS.nonfinite._value):
        return "nonfinite_state"
    for name in _RESULT_NAMES:
        item = getattr(dfx.RESULTS, name, None)
        if item is not None and int(code) == int(item._value):
            return name
    return "unknown_failure"


def _result_message(code) -> str:
    if int(code) == int(dfx.RESULTS.nonfinite._value):
        return "The vector field is non-finite (NaN/inf) at the state reached."
    for name in _RESULT_NAMES:
        item = getattr(dfx.RESULTS, name, None)
        if item is not None and int(code) == int(item._value):
            return str(dfx.RESULTS[item])
    return "the solver stopped."


# ------------------------------------------------------------------------ the ODE
# The integration variable u is t itself on [t0, 1] and u = log t from t = 1 on (a
# segment's `log_time` flag). With J = dt/du (1, or t) every field below is J times the
# field in t. Late in training g ~ 1/t and t ~ 1e100: the log-time fields are O(1) in u
# (so steps are O(1) in u: constant cost per decade), and J * g is computed as
# exp(log L + log J) * grad log L, which never underflows although g itself may be 1e-300.
# At t = 1 both variables coincide to first order (du = dt, J = 1), so the step size and
# the solver's FSAL state carry across the switch unchanged.
def _time(u, log_time):
    t = jnp.where(log_time, jnp.exp(jnp.where(log_time, u, 0.0)), u)
    log_j = jnp.where(log_time, u, 0.0)
    return t, log_j


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
# |dg| / (1 - b1). So r is used in log time only (t >= 1, segments with `log_time`), where
# g ~ 1/t; before, on [t0, 1] (J = 1, nothing stiff), m1 itself is integrated. At t = 1
# `simulate` converts m1 to r and restarts the solver's own state. The saves hold m1.
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
    flow, objective, a, log_time = args
    v, m, _ = y
    w = _w_of_v(v, objective.degree)
    t, log_j = _time(u, log_time)
    j = jnp.exp(log_j)
    log_l, glog = jax.value_and_grad(objective.log_loss)(w)
    log_l = log_l.astype(w.dtype)  # float64 labels would promote a float32 run
    jg = jnp.exp(log_l + log_j) * glog  # J * grad L, computed in log space
    g = jg / j  # >= 1e-300-ish for t <= 1e300: representable; only g^2 may underflow (to 0)
    moments = _lag_to_m1(flow, m, g, log_time)
    # m >= 0 on the exact solution, but a Runge-Kutta stage (whose tableau has negative
    # weights) can put it below -eps, where sqrt(eps + m) is NaN; measured on an MLP: every
    # step near t = 0 rejected. The conditioner sees max(m, 0) (a momentum flow's m1 is not
    # clipped); the m-equation itself, linear in m, keeps the raw value.
    dw, _, _, _ = flow.vector_field(t, w, flow.nonnegative(moments), g)
    # J * (the flow's dw/dt): a subclass's field is honoured; g = J g / J is a normal
    # float64 number for t <= 1e300, so this product does not underflow either.
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
        explicit = jnp.concatenate([m2_exp, jnp.where(log_time, coupling, m1_exp)], axis=-1)
        full = jnp.concatenate(
            [m2_full, jnp.where(log_time, coupling - j * a[1] * r, m1_full)], axis=-1)
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
    _, _, a, log_time = args
    w, m, I = y
    _, log_j = _time(u, log_time)
    return jnp.zeros_like(w), jnp.exp(log_j) * _rates_of(a, m), jnp.zeros_like(I)


def _terms(solver):
    if isinstance(solver, DecayIMEX):
        return dfx.MultiTerm(dfx.ODETerm(_explicit_field), dfx.ODETerm(_decay_rates))
    if is_imex(solver):
        return dfx.MultiTerm(dfx.ODETerm(_explicit_field), dfx.ODETerm(_implicit_field))
    return dfx.ODETerm(_full_field)


def _save_fn(u, y, args):
    flow, objective, _, log_time = args
    v, m, I = y
    w = _w_of_v(v, objective.degree)
    t, _ = _time(u, log_time)
    log_l, g = objective.log_loss_and_grad(w)
    log_l, g = log_l.astype(w.dtype), g.astype(w.dtype)
    m = _lag_to_m1(flow, m, g, log_time)
    return {"w": w, "m": m, "I": I, "log_loss": log_l, "h": flow.h(t, flow.nonnegative(m), g)}


def _psi(u, y, args, start: bool):
    """psi_i, the argument of the conditioner h_i, at (u, y) (for `PenaltyIntegral`)."""
    flow, objective, _, log_time = args
    m = flow.nonnegative(y[1])
    t, _ = _time(u, log_time)
    g = jnp.zeros_like(y[0])
    if start:  # Adam's psi at t = 0 is a limit proportional to g(0)^2
        log_l, glog = jax.value_and_grad(objective.log_loss)(_w_of_v(y[0], objective.degree))
        g = (jnp.exp(log_l) * glog).astype(m.dtype)
    return flow.psi_and_rate(t, m, jnp.zeros_like(m), g)[0]


def _rise(args, psi0, psi1):
    """sum_i (-1/2 log h_i(psi1) + 1/2 log h_i(psi0))_+: Lemma 3's I over one step."""
    return jnp.sum(jnp.maximum(args[0].log_h_drop(psi0, psi1), 0.0))


def _decay_over(u0, u1, args):
    """lambda du over [u0, u1]: m's decay rate a J (at u1, its largest) times the step."""
    _, _, a, log_time = args
    _, log_j = _time(u1, log_time)
    return jnp.max(a) * jnp.exp(log_j) * (u1 - u0)


def _initial_moments(flow, objective, w0, lagged: bool):
    """m(t0) = 0, integrated as (m2, r) = (0, -g(w0)) for a momentum flow in log time."""
    m0 = flow.init_state(w0)[1]
    if flow.n_moments == 1 or not lagged:
        return m0
    return _to_lag(objective, w0, m0)


@eqx.filter_jit
def _to_lag(objective, w, m):
    """A momentum flow's (m2, m1) at w as (m2, r), r = m1 - g(w) (see `_fields`)."""

    def minus_g(w):
        return -objective.log_loss_and_grad(w)[1].astype(w.dtype)

    g = minus_g(w) if w.ndim == 1 else jax.vmap(minus_g)(w)
    return m.at[..., w.shape[-1]:].add(g)


def _wrap(solver):
    return PenaltyIntegral(solver, _psi, _rise, _decay_over)


def _args(flow, objective, u, log_time):
    """The fields' `args`: (flow, objective, the decay rate a in u's dtype, log_time)."""
    return flow, objective, decay_rate(flow).astype(u.dtype), log_time


@eqx.filter_jit
def _start(flow, objective, y0, u_start, u_end, log_time, solver, controller):
    """The first step size and the initial controller / solver states (no integration)."""
    args = _args(flow, objective, u_start, log_time)
    terms = _terms(solver)
    controller = controller.wrap(1)
    error_order = solver.error_order(terms)
    tnext, cstate = controller.init(terms, u_start, u_end, y0, None, args, solver.func, error_order)
    tnext = jnp.minimum(tnext, u_end)
    sstate = _wrap(solver).init(terms, u_start, tnext, y0, args)
    return cstate, sstate


@eqx.filter_jit
def _restart(flow, objective, y, u_start, log_time, solver, state):
    """`state` with the solver's own state made anew for `solver` at y (a new state: a
    momentum flow's m1 turned into its lag at t = 1, see `_fields`).

    The controller's state (error history, proposed step) carries over unchanged."""
    args = _args(flow, objective, u_start, log_time)
    controller_state, _ = state
    u_next = u_start + controller_state[1]
    return controller_state, _wrap(solver).init(_terms(solver), u_start, u_next, y, args)


def _segment_traced(
    flow, objective, y0, u_start, u_end, log_time, save_us, solver, controller, max_steps, state
):
    """Integrate one segment [u_start, u_end] in u (t or log t), saving at save_us.

    Nothing in this program calls back to the host (the saves are `SavedAt`'s, the first
    step size is the controller's field), so JAX's persistent cache keeps it; the result
    code and the number of saves made are checked on the host afterwards."""
    controller_state, solver_state = state
    args = _args(flow, objective, u_start, log_time)
    saving = SavedAt(_wrap(solver), save_us, _save_fn)
    sol = dfx.diffeqsolve(
        _terms(solver),
        saving,
        u_start,
        u_end,
        None,  # the first step: the one the controller proposed last (CarriedPID.dt)
        y0,
        args=args,
        saveat=dfx.SaveAt(
            subs=[
                dfx.SubSaveAt(t1=True, fn=_save_fn),
                dfx.SubSaveAt(t1=True),  # the state (v, m, I) itself, carried on exactly
            ],
            controller_state=True,
            solver_state=True,
        ),
        stepsize_controller=controller.carrying(controller_state[1]),
        max_steps=max_steps,
        throw=False,
        controller_state=controller_state,
        solver_state=(solver_state, *saving.empty(u_start, y0, args)),
        made_jump=False,
    )
    final, raw = sol.ys
    inner_state, saved, n_saved = sol.solver_state
    final = jax.tree.map(lambda x: x[-1], final)
    y_end = jax.tree.map(lambda x: x[-1], raw)
    return (
        n_saved,
        saved,
        y_end,
        (sol.ts[0][-1], final),
        (sol.controller_state, inner_state),
        sol.result._value,
        sol.stats["num_steps"],
        sol.stats["num_accepted_steps"],
        sol.stats["num_rejected_steps"],
    )


# The trace counter (eqx.debug.get_num_traces(_segment_counted)) lets the tests check that a
# new t1, n_save, eps, b or data set of the same shape does not retrace the segment.
_segment_counted = eqx.debug.assert_max_traces(_segment_traced, max_traces=None)
_segment = eqx.filter_jit(_segment_counted)


# Segments are decades up to t = 1e10 and ten decades wide after. A segment's end clips the
# step that would cross it, which costs about one step per segment: measured on GD, MLP(4, 8,
# 2, k=2), t1 = 1e100, 485 steps from 1e5 on with decade segments against 359 in one solve.
# Late decades cost 2-15 steps each, so decade segments there spent 7-30% of the steps (and a
# Python round trip each) on clipping; the first ten decades hold the transients measured.
_DECADE_SEGMENTS_UNTIL = 10
_LATE_SEGMENT_DECADES = 10
# Save slots of one compiled segment call: a number fixed per model size, so that a run with
# another t1, n_save or ts reuses the compiled program; a segment holding more save times is
# integrated in several calls, each ending at a save time (about one clipped step each).
# The slots live in the solver state, which diffrax selects (accepted or not) at every step.
# Measured on MLP(50, 512, 2) (p = 26112), RMSProp to t = 1e3, n_save = 200, against diffrax's
# own saves (5.25 s, 333 steps): 64 slots 6.5-7.3 s (334 steps), 32 slots 5.1-5.4 s (341),
# 8 slots 5.9-6.8 s (374: more pieces, more clipped steps). So the slots shrink as p grows,
# keeping slots * p <= 2^20; the toy gets 64 (25-50 saves per decade with the default
# n_save = 200 and t1 <= 1e8). Medians of 3 on the shared 2-core machine.
_SAVE_SLOTS = 64
_SAVE_SLOTS_MIN = 4
# What `_save_fn` saves at each save time, in the Trajectory's and the checkpoints' order.
_SAVED = ("w", "m", "I", "log_loss", "h")
_SAVE_BUDGET = 2**20


def save_slots(p: int) -> int:
    """Save slots per segment call for p numbers per slot (B * p for a batch): the largest
    power of two <= 2^20 / p, within [4, 64]."""
    fit = _SAVE_BUDGET // max(int(p), 1)
    return int(min(_SAVE_SLOTS, max(_SAVE_SLOTS_MIN, 1 << max(fit.bit_length() - 1, 0))))


def _segment_bounds(t0: float, t1: float) -> list[float]:
    """t0, the segment ends strictly between t0 and t1, t1 (see the comment above)."""
    lo = 0 if t0 <= 0 else math.floor(math.log10(t0)) + 1
    hi = math.ceil(math.log10(t1)) - 1
    inner = [
        10.0**k
        for k in range(lo, hi + 1)
        if t0 < 10.0**k < t1
        and (k <= _DECADE_SEGMENTS_UNTIL or k % _LATE_SEGMENT_DECADES == 0)
    ]
    return [t0, *inner, t1]


def default_save_times(t0: float, t1: float, n_save: int) -> np.ndarray:
    """t0 then n_save - 1 log-spaced times of t - t0 up to t1 (first at min(1e-2, span/100))."""
    span = t1 - t0
    if n_save == 2:  # geomspace(first, span, 1) would be [first], not [span]
        return np.array([t0, t1])
    first = min(1e-2, span / 100.0)
    return np.concatenate([[t0], t0 + np.geomspace(first, span, n_save - 1)])


# ------------------------------------------------------------------- validation
def _check_number(x, name: str, rule: str, ok, example: str) -> float:
    check_real_type(x, name, "simulate", example)
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"simulate: `{name}` must be a real number, got {x!r}.") from None
    if not ok(v):
        raise ValueError(f"simulate: `{name}` {rule}, got {x!r}.")
    return v


def _check_args(flow, t0, t1, n_save, ts, rtol, atol, max_steps):
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "simulate: `flow` must be a marginflow flow (GradientFlow(), AdaGradFlow(eps), "
            "RMSPropFlow(eps, b), AdamFlow(eps, b, b1=None), MomentumFlow(b1)), got "
            f"{type(flow).__name__}."
        )
    t0 = _check_number(t0, "t0", "must be finite and >= 0",
                       lambda v: math.isfinite(v) and v >= 0, "0.0")
    t1 = _check_number(t1, "t1", "must be finite", math.isfinite, "1e6")
    if not t1 > t0:
        raise ValueError(
            f"simulate: `t1` must be greater than `t0`, got t0 = {t0!r}, t1 = {t1!r}; "
            "pass the end time of the integration as t1 (e.g. 1e6)."
        )
    if t1 > 1e300:
        raise ValueError(f"simulate: `t1` must be <= 1e300 (float64 time axis), got {t1!r}.")
    rtol = _check_number(rtol, "rtol", "must be in (0, 1)", lambda v: 0 < v < 1, "1e-8")
    atol = _check_number(atol, "atol", "must be > 0", lambda v: math.isfinite(v) and v > 0,
                          "1e-12")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"simulate: `max_steps` must be a positive integer, got {max_steps!r}.")
    if ts is None:
        if isinstance(n_save, bool) or not isinstance(n_save, (int, np.integer)) or n_save < 2:
            raise ValueError(f"simulate: `n_save` must be an integer >= 2, got {n_save!r}.")
        ts = default_save_times(t0, t1, int(n_save))
    else:
        ts = np.asarray(ts, dtype=np.float64)
        if ts.ndim != 1 or ts.size < 1:
            raise ValueError(
                f"simulate: `ts` must be a 1-D array of save times, got shape {ts.shape}."
            )
        if not np.all(np.isfinite(ts)):
            raise ValueError("simulate: `ts` must be finite, found NaN/inf save times.")
        if ts[0] < t0 or ts[-1] > t1:
            raise ValueError(
                f"simulate: save times `ts` must lie in [t0, t1] = [{t0}, {t1}], got "
                f"[{ts[0]}, {ts[-1]}]; clip them or change t0/t1."
            )
        if np.any(np.diff(ts) <= 0):
            raise ValueError(
                "simulate: save times `ts` must be strictly increasing; sort them and "
                "drop duplicates (np.unique)."
            )
    return t0, t1, ts, rtol, atol, int(max_steps)


# ----------------------------------------------------------------------- simulate
def simulate(
    flow: AbstractFlow,
    model,
    data,
    t1: float,
    *,
    loss=None,
    t0: float = 0.0,
    n_save: int = 200,
    ts=None,
    solver=None,
    rtol: float = 1e-8,
    atol: float = 1e-12,
    max_steps: int = 100_000,
    progress: bool = False,
    throw: bool = True,
    batch: bool = False,
    dtype=jnp.float64,
    shard: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    workers: int | None = None,
    kink_tol: float | None = None,
    _resume: list | None = None,
) -> Trajectory:
    """Integrate `flow` on `model` and `data` from t0 to t1 and save a Trajectory.

    dw/dt = -h(t) * grad L(w), dm/dt = phi(m, grad L(w)), w(t0) = the model's parameters,
    m(t0) = 0, with L(w) = sum_i exp(-f(q_i(w))) (docs/math.md sections 1-2). The integral
    I(t) = int_{t0}^t sum_i (-1/2 d log h_i/ds)_+ ds of Lemma 3 is integrated alongside.

    Args:
        flow: GradientFlow(), AdaGradFlow(eps), RMSPropFlow(eps, b) or AdamFlow(eps, b).
        model: a marginflow model; its parameters are the initial point w(t0). With
            batch=True every parameter array has a leading axis B of initialisations
            (build them with eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)).
        data: a Dataset. loss: "exponential" (default, binary), "logistic" or
            "cross_entropy" (default, multi-class).
        t1, t0: end and start time, 0 <= t0 < t1 <= 1e300.
        n_save: number of save times, t0 then log-spaced up to t1; or ts: explicit times.
        solver: a diffrax solver, used throughout; None picks `default_solver(flow, p)`
            (DecayIMEX for the flows whose moments decay, Dopri8 for GD and AdaGrad).
        rtol, atol: the step-size controller's tolerances, on the integrated state (v, m)
            with v = w ||w||^(L-1) (relative errors of v and w agree within a factor L).
        max_steps: the most solver steps per segment (a decade of t up to 1e10, ten decades
            after; `stats["segment_ends"]` lists them); a segment holding more save times
            than one call's slots (64; fewer for models of more than 16384 parameters,
            `save_slots`) is integrated in several calls, each with this limit.
        progress: a tqdm meter over the segments (decades of t, ten decades after 1e10).
        throw: raise SimulationError (holding the partial Trajectory) if the solver stops
            early, or if a Linear / DeepLinear model cannot separate the data (result
            "not_separable", checked by an LP only when the run failed or ended with
            L >= ell(0)); with throw=False the Trajectory is returned and its `result` /
            `message` say why.
        dtype: jnp.float64 (default; every theory check) or jnp.float32 (GPU speed runs;
            needs rtol >= 1e-6 and t1 <= 1e30).
        shard: with batch=True, split the batch over all local devices (jax.sharding; the
            default None does so whenever there are several); False keeps one device.
        checkpoint: a folder; the run is written there segment by segment (one file per
            segment, each written atomically) and `resume(folder)` continues it after a
            crash or kill, losing at most the segment in progress.
        workers: with batch=True on one CPU device, the batch is cut into this many equal
            chunks integrated concurrently from as many threads (one vmapped call keeps one
            core busy). Default: the cores this process may use; 1 = one vmapped call.
            Members do not interact, but batched kernels of another width may round
            differently and the step-size control turns that into differences at the
            tolerance level (measured on the toy to 1e5: bitwise equal with 2 chunks of 50,
            2.2e-5 absolute on w with 3 chunks of 34, as between sharded and unsharded runs).
        kink_tol: the kink tolerance tau for models whose gradient jumps (ReLU, leaky ReLU,
            max-pool: `model.piecewise_linear`). Where the solver is stuck among kinks
            (sliding along a switching surface, or crossing many), it accepts steps whose
            increment is within tau ||v|| (`CarriedPID`): each errs by at most about that,
            the cost is about 1 / tau steps per unit of relative change, and the run
            converges to the Filippov solution as tau falls (first order, measured;
            docs/solvers.md, "Non-smooth models: kink steps"). None (default): 1e-3 for
            piecewise-linear models, off for smooth ones (their solvers are unchanged); 0:
            off (every kink resolved at rtol, which can stall a ReLU network).
            `stats["num_kink_steps"]` and `stats["kink_log_time"]` say how many steps and
            how much log t went to it.

    How (docs/math.md section 2): [t0, 1] is integrated in t, the rest in u = log t, where the
    late fields are O(1) and steps are O(1) in u, i.e. a constant number per decade; the
    m-equation's decay (rate (1 - b) t in u) is the only stiff part and `default_solver`
    treats it implicitly, exactly and in O(p) (GD and AdaGrad have none: the explicit
    Dopri8); a momentum flow's first moment is integrated as its lag behind g from t = 1 on
    (docs/math.md section 9). Lemma 3's I(t) is accumulated from each step's end
    states (`PenaltyIntegral`), not integrated. t * grad L is formed as
    exp(log L + log t) * grad log L, so nothing underflows up to t = 1e300.

    Example:
        >>> import jax
        >>> from marginflow.flows import RMSPropFlow, simulate
        >>> from marginflow.models import ToyLeaky, toy_dataset
        >>> traj = simulate(RMSPropFlow(1e-5, 0.9), ToyLeaky(key=jax.random.key(0)),
        ...                 toy_dataset(0), t1=1e6)
    """
    t0, t1, save_ts, rtol, atol, max_steps = _check_args(
        flow, t0, t1, n_save, ts, rtol, atol, max_steps
    )
    if dtype not in (jnp.float64, jnp.float32):
        raise ValueError(f"simulate: `dtype` must be jnp.float64 or jnp.float32, got {dtype!r}.")
    if dtype == jnp.float32:
        if rtol < 1e-6:
            raise ValueError(
                f"simulate: with dtype=float32 `rtol` must be >= 1e-6 (float32 resolves "
                f"relative changes of 1.2e-7), got rtol = {rtol!r}; pass e.g. rtol=1e-5, "
                "atol=1e-8, or use float64."
            )
        if t1 > 1e30:
            raise ValueError(
                f"simulate: with dtype=float32 `t1` must be <= 1e30 (t = e^u and t * grad L "
                f"must stay below float32's 3.4e38), got t1 = {t1!r}; use float64 beyond."
            )
    template, w0 = initial_point(model, batch)
    objective = Objective(template, data, loss, where="simulate")
    if batch and w0.ndim != 2:
        raise ValueError("simulate: batch=True needs parameters with a leading batch axis.")
    check_finite_params(w0, "simulate")
    use_cache()  # compiled segments persist across processes (marginflow._cache)
    check_homogeneous(objective, w0, "simulate")

    w0 = jnp.asarray(w0, dtype=dtype)
    flow = jax.tree.map(lambda x: jnp.asarray(x, dtype) if eqx.is_inexact_array(x) else x, flow)
    p = int(w0.shape[-1])
    solver_is_default = solver is None
    if solver is None:
        solver = default_solver(flow, p, rtol=rtol, atol=atol)
    kink_tol = _kink_tol(kink_tol, objective.model, rtol)
    controller = default_controller(rtol, atol, kink_tol)
    n_batch = int(w0.shape[0]) if batch else 0
    devices = _devices(batch, shard, n_batch)
    threads = n_threads(workers, n_batch if len(devices) == 1 else 1, "simulate")

    if checkpoint is not None and not solver_is_default:
        raise ValueError(
            "simulate: `checkpoint` needs solver=None (the default solver), so that "
            "`resume` can rebuild it; got a custom solver."
        )
    # One writer per checkpoint folder, for the whole run (marginflow/_checkpoint.py).
    with ckpt.locked(checkpoint):
        if checkpoint is not None and _resume is None:
            ckpt.write_run(
                os.fspath(checkpoint),
                {
                    "flow": flow.name, "hyper": flow.hyperparameters(),
                    "conditioner": flow.conditioner, "loss": objective.loss.name,
                    "model": objective.model.spec(), "t0": t0, "t1": t1, "rtol": rtol,
                    "atol": atol, "max_steps": max_steps, "dtype": jnp.dtype(dtype).name,
                    "batch": bool(batch), "shard": shard,
                    # The chunking changes batched results at the tolerance level: resume
                    # with the same one, whatever this machine's core count.
                    "workers": threads,
                    "kink_tol": kink_tol if kink_tol is not None else 0.0,
                },
                w0=np.asarray(w0), X=np.asarray(objective.data.X), y=np.asarray(objective.data.y),
                save_ts=save_ts,
            )

        if len(devices) > 1:
            # Pad the batch to a multiple of the device count (copies of the last member,
            # dropped at the end) and split it over the devices; the vmapped segment then runs
            # as one SPMD program, each device integrating its share of the initialisations.
            extra = (-n_batch) % len(devices)
            if extra:
                w0 = jnp.concatenate([w0, jnp.repeat(w0[-1:], extra, axis=0)], axis=0)
        # The state: v (the margin-scale variable of `_w_of_v`), m = 0 and Lemma 3's I = 0.
        y = (_v_of_w(w0, objective.degree), _initial_moments(flow, objective, w0, t0 >= 1.0),
             jnp.zeros(w0.shape[:-1], dtype))
        if len(devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
            y = jax.device_put(
                y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
        bounds = _segment_bounds(t0, t1)
        per_segment = [
            save_ts[(save_ts > lo) & (save_ts <= hi)] if k else save_ts[save_ts <= hi]
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        axis = 1 if batch else 0  # the saves' time axis
        slots = save_slots(w0.size)  # a batch: B * p numbers per slot

        seg, start_fn, restart_fn = _segment, _start, _restart
        if batch:
            restart_fn = eqx.filter_vmap(_restart, in_axes=(None, None, 0, None, None, None, 0))
            seg = eqx.filter_vmap(
                _segment, in_axes=(None, None, 0, None, None, None, None, None, None, None, 0)
            )
            start_fn = eqx.filter_vmap(
                _start, in_axes=(None, None, 0, None, None, None, None, None))
            if threads > 1:
                vmapped = seg

                def seg(flow, objective, y, lo, hi, log_time, save_us, solver, controller,
                        max_steps, state):
                    def call(y_part, state_part):
                        return vmapped(flow, objective, y_part, lo, hi, log_time, save_us,
                                       solver, controller, max_steps, state_part)

                    return map_chunks(call, (y, state), threads)

        def to_u(t, log_time):
            return np.log(t) if log_time else t

        chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", *_SAVED)}
        steps = accepted = rejected = 0
        per_segment_steps: list[np.ndarray] = []
        result, message = "successful", ""
        wall_time = 0.0
        clock = CompileClock()  # the part of wall_time spent making programs
        bar = _progress_bar(len(bounds) - 1) if progress else None
        calls = []  # segment calls made in this run (see `phase` below)

        def phase():
            # The meter says "compiling" before the first segment call: in a fresh process it
            # traces and compiles (or loads) the program; later calls do not.
            if bar is not None:
                bar.set_description("simulate" if calls else "simulate (compiling)")
                bar.refresh()
            calls.append(1)

        begin = time.perf_counter()
        first_log = bounds[0] >= 1.0
        with clock:
            state = start_fn(
                flow,
                objective,
                y,
                jnp.asarray(to_u(bounds[0], first_log), dtype),
                jnp.asarray(to_u(bounds[1], first_log), dtype),
                jnp.asarray(first_log),
                solver,
                controller,
            )
        wall_time += time.perf_counter() - begin
        done = 0
        if _resume:
            # Continue after the last complete segment: its saves, its end state and the
            # solver / controller states (same tree structure as the fresh `state` above).
            for k, (header, arrays) in enumerate(_resume):
                if (header["lo"], header["hi"]) != (bounds[k], bounds[k + 1]):
                    raise ValueError(
                        f"resume: segment {k} of the checkpoint spans [{header['lo']:.3g}, "
                        f"{header['hi']:.3g}] but this run's segment {k} is [{bounds[k]:.3g}, "
                        f"{bounds[k + 1]:.3g}]; the checkpoint was written with another segment "
                        "layout. Rerun it with simulate(..., checkpoint=a new folder)."
                    )
                chunks["ts"].append(arrays["ts"])
                for key in _SAVED:
                    chunks[key].append(arrays[key])
                steps = steps + np.asarray(header["steps"])
                accepted = accepted + np.asarray(header["accepted"])
                rejected = rejected + np.asarray(header["rejected"])
                per_segment_steps.append(np.asarray(header["steps"]))
                result, message = header["result"], header["message"]
            arrays = _resume[-1][1]
            y = tuple(jnp.asarray(arrays[k], dtype) for k in ("y_v", "y_m", "y_I"))
            leaves, treedef = jax.tree.flatten(state)
            saved_leaves = [arrays[f"state_{i}"] for i in range(len(leaves))]
            if [np.shape(x) for x in saved_leaves] != [np.shape(x) for x in leaves]:
                raise ValueError(
                    "resume: the checkpoint was written with another batch padding (device "
                    "count); resume it on a machine with the same number of devices."
                )
            state = jax.tree.unflatten(
                treedef, [jnp.asarray(v, dtype=x.dtype) for v, x in zip(saved_leaves, leaves,
                                                                          strict=True)]
            )
            done = len(_resume)
            if bar is not None:
                bar.update(done)
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if k < done or result != "successful":
                continue
            # t on [t0, 1], log t from t = 1 on (see `_time`).
            log_time = lo >= 1.0
            if k and log_time and bounds[k - 1] < 1.0 and flow.n_moments == 2:
                # A momentum flow's first moment becomes its lag r = m1 - g from t = 1 on (see
                # `_fields`): a new state, so the solver's own state is made anew at it.
                y = (y[0], _to_lag(objective, _w_of_v(y[0], objective.degree), y[1]), y[2])
                state = restart_fn(flow, objective, y, jnp.asarray(0.0, dtype), jnp.asarray(True),
                                   solver, state)
            # At most `slots` saves per call (the slots are part of the compiled program's
            # shape): a segment with more is integrated in pieces, each ending at its last save.
            wanted = per_segment[k]
            pieces = [wanted[i : i + slots] for i in range(0, len(wanted), slots)]
            pieces = pieces or [wanted]  # a segment without saves is one call
            n = na = nr = 0
            piece_lo, kept = lo, []
            for j, piece in enumerate(pieces):
                piece_hi = hi if j == len(pieces) - 1 else float(piece[-1])
                pad = np.full(slots, piece_hi)
                pad[: len(piece)] = piece
                phase()
                begin = time.perf_counter()
                with clock:
                    out = seg(
                        flow,
                        objective,
                        y,
                        jnp.asarray(to_u(piece_lo, log_time), dtype),
                        jnp.asarray(to_u(piece_hi, log_time), dtype),
                        jnp.asarray(log_time),
                        jnp.asarray(to_u(pad, log_time), dtype),
                        solver,
                        controller,
                        max_steps,
                        state,
                    )
                    out = jax.block_until_ready(out)
                wall_time += time.perf_counter() - begin
                n_saved, saved, y, (end_u, end_saved), state, code, dn, dna, dnr = out
                n, na, nr = n + np.asarray(dn), na + np.asarray(dna), nr + np.asarray(dnr)
                codes = np.atleast_1d(np.asarray(code))
                ok = codes == int(dfx.RESULTS.successful._value)
                n_keep = len(piece)
                if not ok.all():
                    # Keep every save the solver reached (of the first failed member in a batch).
                    n_keep = min(int(np.atleast_1d(np.asarray(n_saved))[np.argmin(ok)]), n_keep)
                kept.append((pad[:n_keep], {key: np.asarray(saved[key])[:, :n_keep] if batch
                                            else np.asarray(saved[key])[:n_keep]
                                            for key in _SAVED}))
                piece_lo = piece_hi
                if not ok.all():
                    break
            steps = steps + n
            per_segment_steps.append(np.asarray(n))
            accepted = accepted + na
            rejected = rejected + nr
            kept_ts = np.concatenate([ts_ for ts_, _ in kept])
            chunks["ts"].append(np.asarray(kept_ts, np.float64))
            for key in _SAVED:
                chunks[key].append(np.concatenate([arrs[key] for _, arrs in kept], axis=axis))
            if not ok.all() and not batch:
                # Also keep the state where the solver stopped (one run: a batch's members stop
                # at different times and share one time axis).
                end_t = float(np.exp(end_u)) if log_time else float(end_u)
                if (
                    np.isfinite(end_t)
                    and (len(kept_ts) == 0 or end_t > kept_ts[-1])
                    and all(np.all(np.isfinite(np.asarray(v))) for v in end_saved.values())
                ):
                    kept_ts = np.append(kept_ts, end_t)
                    chunks["ts"][-1] = np.asarray(kept_ts, np.float64)
                    for key in _SAVED:
                        chunks[key][-1] = np.concatenate(
                            [chunks[key][-1], np.asarray(end_saved[key])[None]], axis=0
                        )
            if not ok.all():
                bad = codes[~ok][0]
                result = _result_name(bad)
                failed = int(np.sum(~ok))
                where = f"{failed} of {codes.size} runs" if batch else "the run"
                reached_t = (
                    float(np.nanmax(np.where(np.isfinite(kept_ts), kept_ts, np.nan)))
                    if len(kept_ts)
                    else lo
                )
                message = (
                    f"{where} stopped in the segment [{lo:.3g}, {hi:.3g}] at t = {reached_t:.6g}: "
                    f"{_result_message(bad)} Fix: {_HINTS.get(result, 'see the diffrax result')}."
                )
            if checkpoint is not None:
                ckpt.write_segment(
                    os.fspath(checkpoint), k,
                    {"lo": lo, "hi": hi, "result": result, "message": message,
                     "steps": np.asarray(n).tolist(), "accepted": np.asarray(na).tolist(),
                     "rejected": np.asarray(nr).tolist()},
                    ts=chunks["ts"][-1], **{key: chunks[key][-1] for key in _SAVED},
                    y_v=np.asarray(y[0]), y_m=np.asarray(y[1]), y_I=np.asarray(y[2]),
                    **{f"state_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))},
                )
            if bar is not None:
                bar.set_description("simulate")
                bar.set_postfix_str(f"t = {hi:.3g}, steps = {int(np.sum(steps))}, "
                                    f"compile {clock.seconds:.1f} s")
                bar.update(1)
            if result != "successful":
                break
        if bar is not None:
            bar.close()
        kinks = kink_stats(state[0])  # counted across all segments (and resumed ones)

        cat = {k: np.concatenate(v, axis=0 if k == "ts" else axis) for k, v in chunks.items()}
        if batch:  # drop the members that only padded the batch to the device count
            cat = {k: v if k == "ts" else v[:n_batch] for k, v in cat.items()}
            steps, accepted, rejected = (
                np.asarray(x)[:n_batch] for x in (steps, accepted, rejected))
        # A run that failed or ended without separating: does this model separate the data at
        # all? (An exact LP for linear models; a note on a stalled loss otherwise.)
        result, message = separation_verdict(
            objective, cat["ts"], cat["log_loss"], result, message, rtol, t1
        )
        if kinks is not None and np.any(np.asarray(kinks[0]) > 0):
            most = int(np.max(np.asarray(kinks[0])))
            message = (
                f"{message} {most} kink steps{' (the most of a member)' if batch else ''}: "
                f"where the solver was stuck among kinks it accepted steps within kink_tol = "
                f"{kink_tol:g}, so the accuracy there is kink_tol, not rtol (stats "
                "'num_kink_steps', 'kink_log_time'; kink_tol=0 resolves every kink at rtol)."
            ).strip()
        meta = _meta(flow, objective, t0, t1, rtol, atol, max_steps, solver, dtype, batch)
        meta["kink_tol"] = kink_tol  # None: every kink resolved at rtol
        meta["wall_time_s"] = wall_time  # includes compilation on a first call
        # Of it: tracing, lowering and compiling (or loading from the persistent cache) the
        # programs; wall_time - compile_time_s is the integration itself.
        meta["compile_time_s"] = min(clock.seconds, wall_time)
        meta["devices"] = len(devices)
        traj = Trajectory(
            ts=cat["ts"],
            w=cat["w"],
            m=cat["m"],
            conditioner=cat["h"],
            log_loss=cat["log_loss"],
            I=cat["I"],
            stats={
                "num_steps": _plain(steps),
                "num_accepted_steps": _plain(accepted),
                "num_rejected_steps": _plain(rejected),
                "num_segments": len(chunks["ts"]),
                # steps of segment k, which ends at t = segment_ends[k] (decades up to 1e10, ten
                # decades after); per member for a batch: (segments, B)
                "num_steps_per_segment": _plain_nested(per_segment_steps, n_batch if batch else 0),
                "segment_ends": tuple(float(b) for b in bounds[1 : len(per_segment_steps) + 1]),
                **_kink_counts(kinks, n_batch if batch else 0),
            },
            result=result,
            message=message,
            meta=meta,
        )
        return raise_if_failed(traj, "simulate", throw)


# The kink tolerance a piecewise-linear model gets by default (`_kink_tol`). Measured on
# MLP(5, 16, 2) with ReLU, 100 points, to t = 1e10 (benchmarks/kinks.py, docs/solvers.md):
# 8-12 thousand steps for the four flows, within 5e-5 (GD) to 2.5e-3 (Adam) of a run at
# 1e-4; 1e-2 took 0.6-1.3 thousand steps but differed by 3e-4 to 2.4e-2.
DEFAULT_KINK_TOL = 1e-3


def _kink_tol(kink_tol, model, rtol: float) -> float | None:
    """The kink tolerance of the run: None (no kink steps) or a float in [rtol, 1)."""
    if kink_tol is None:
        return DEFAULT_KINK_TOL if model.piecewise_linear else None
    v = _check_number(kink_tol, "kink_tol", "must be 0 (off) or in (0, 1)",
                      lambda v: 0 <= v < 1, "1e-3")
    if 0 < v < rtol:
        raise ValueError(
            f"simulate: `kink_tol` must be 0 (off) or >= rtol = {rtol:g} (a kink step may "
            f"err up to kink_tol; below rtol it would accept nothing), got {kink_tol!r}; "
            "pass kink_tol=0 to resolve every kink at rtol."
        )
    return v or None


def _kink_counts(kinks, n_batch: int) -> dict:
    """`stats` entries of a run with kink steps: how many, and their span in log t."""
    if kinks is None:
        return {}
    n, span = (np.asarray(x) for x in kinks)
    if n_batch:
        n, span = n[:n_batch], span[:n_batch]
    span = float(span) if span.ndim == 0 else tuple(float(x) for x in span)
    return {"num_kink_steps": _plain(n), "kink_log_time": span}


def _plain(x):
    """A Python int (one run) or a tuple of ints (a batch): hashable, as static fields want."""
    x = np.asarray(x)
    return int(x) if x.ndim == 0 else tuple(int(v) for v in x)


def _devices(batch: bool, shard, n_batch: int) -> list:
    """The devices a batch is split over: all local ones by default (shard=None)."""
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"simulate: `shard` must be None, True or False, got {shard!r}.")
    if shard and not batch:
        raise ValueError(
            "simulate: shard=True splits a batch of initialisations over devices and needs "
            "batch=True; pass batch=True with stacked models, or drop `shard`."
        )
    if not batch or shard is False:
        return jax.local_devices()[:1]
    devices = jax.local_devices()
    return devices if n_batch > 1 else devices[:1]


def _plain_nested(rows, n_batch: int):
    if not n_batch:
        return tuple(int(r) for r in rows)
    return tuple(tuple(int(v) for v in np.asarray(r)[:n_batch]) for r in rows)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="segment", desc="simulate")


def _meta(flow, objective, t0, t1, rtol, atol, max_steps, solver, dtype, batch) -> dict[str, Any]:
    return {
        "kind": "flow",
        "flow": flow.name,
        "hyper": flow.hyperparameters(),
        "conditioner": flow.conditioner,
        **objective.describe(),
        "t0": t0,
        "t1": t1,
        "rtol": rtol,
        "atol": atol,
        "max_steps_per_segment": max_steps,
        "solver": solver_name(solver),
        "dtype": jnp.dtype(dtype).name,
        "batch": bool(batch),
    }


def resume(checkpoint: str | os.PathLike, *, progress: bool = False,
           throw: bool = True) -> Trajectory:
    """Continue a run started with `simulate(..., checkpoint=DIR)` and return its Trajectory.

    Reads the inputs and the complete segments from DIR (a killed run leaves complete files
    only; a half-written temporary file is removed), restores the state, the step size and
    the solver state at the end of the last complete segment, and integrates the remaining
    segments, still writing checkpoints. A finished run is returned as it is. The result
    equals the uninterrupted run's (same compiled steps from the same state).

    The folder's lock is held while it runs (another process that tries to write to it gets
    a clear error), its segments must form the run's hash chain, and a damaged newest
    segment is moved aside with a warning and recomputed (marginflow/_checkpoint.py).
    """
    directory = os.fspath(checkpoint)
    with ckpt.locked(directory, create=False):  # held through the simulate call
        return _resume(directory, progress, throw)


def _resume(directory: str, progress: bool, throw: bool) -> Trajectory:
    from ..models import Dataset, from_spec, unflatten
    from ._flow import flow_from_meta

    header, arrays, segments = ckpt.read_checkpoint(directory, repair=True)
    flow = flow_from_meta(header["flow"], header["hyper"], header["conditioner"])
    data = Dataset(arrays["X"], arrays["y"])
    skeleton = from_spec(header["model"])
    if header["batch"]:
        model = eqx.filter_vmap(lambda w: unflatten(skeleton, w))(jnp.asarray(arrays["w0"]))
    else:
        model = unflatten(skeleton, jnp.asarray(arrays["w0"]))
    dtype = jnp.float64 if header["dtype"] == "float64" else jnp.float32
    return simulate(
        flow, model, data, header["t1"], loss=header["loss"], t0=header["t0"],
        ts=arrays["save_ts"], rtol=header["rtol"], atol=header["atol"],
        max_steps=header["max_steps"], progress=progress, throw=throw,
        batch=header["batch"], dtype=dtype, shard=header["shard"], checkpoint=directory,
        workers=header.get("workers"), kink_tol=header.get("kink_tol", 0.0), _resume=segments,
    )
