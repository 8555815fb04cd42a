"""The compiled programs of `simulate`: the first step and solver state of a run (`_start`),
the solver state made anew at a change of state variables (`_restart`), and one segment's
integration with its saves (`_segment`). Each is jit-compiled once per flow class, model
structure, shapes and solver, and stored compiled for later processes (`_stored`; nothing
in them calls back to the host)."""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from .._stored import StoredProgram
from .._xla import EMITTERS, emitters_ours
from ._fields import (
    _decay_over,
    _drop,
    _gradient,
    _initial_moments,
    _psi,
    _psi_scale,
    _save_fn,
    _terms,
    _v_of_w,
)
from ._penalty import PenaltyIntegral
from ._saves import SavedAt
from ._solvers import decay_rate
from ._stops import stop_code


def _wrap(solver, controller=None):
    """The solver inside `PenaltyIntegral` (Lemma 3's I), whose dead band the controller's
    tolerances set (init, all a restart needs, does not use them)."""
    rtol, atol = (0.0, 0.0) if controller is None else (controller.rtol, controller.atol)
    return PenaltyIntegral(solver, _psi, _drop, _decay_over, _psi_scale, rtol, atol)


def _args(flow, objective, u, clock):
    """The fields' `args`: (flow, objective, the decay rate a in u's dtype, the clock)."""
    return flow, objective, decay_rate(flow).astype(u.dtype), clock


def _initial_y_traced(flow, objective, w0, lagged: bool, dtype):
    """y = (v, m, I) at t0 (v the margin-scale variable of `_w_of_v`, m = 0, I = 0), and for
    a flow with `sqrt_start` max |g(w0)| over coordinates and members (None otherwise; it
    picks the clock, `_clock.starts_in_sqrt_t`), as one program: eager, its few array
    operations would compile one small program each."""
    y = (_v_of_w(w0, objective.degree), _initial_moments(flow, objective, w0, lagged),
         jnp.zeros(w0.shape[:-1], dtype))
    if not type(flow).sqrt_start:
        return y, None
    return y, jnp.max(jnp.abs(_gradient(objective, w0)))


_initial_y = StoredProgram("initial_y", _initial_y_traced)


def _start_traced(flow, objective, y0, u_start, u_end, clock, solver, controller):
    """The first step size and the initial controller / solver states (no integration)."""
    args = _args(flow, objective, u_start, clock)
    terms = _terms(solver)
    controller = controller.wrap(1)
    error_order = solver.error_order(terms)
    tnext, cstate = controller.init(terms, u_start, u_end, y0, None, args, solver.func, error_order)
    tnext = jnp.minimum(tnext, u_end)
    sstate = _wrap(solver, controller).init(terms, u_start, tnext, y0, args)
    return cstate, sstate


_start = StoredProgram("start", _start_traced)


def _restart_traced(flow, objective, y, u_start, clock, solver, state, step_scale):
    """`state` with the solver's own state made anew for `solver` at y, in a new clock or
    state (a momentum flow's m1 turned into its lag where u becomes log t, see `_fields`;
    the switch from sqrt t to log t, whose FSAL derivative is in the old variable).

    The controller's error history carries over, its proposed step is multiplied by
    `step_scale` (du_new / du_old: 2 from sqrt t to log t at t = 1, 1 / t from t), and the
    dead band of
    Lemma 3's I moves to u_start (psi, its argument, is the same function of t)."""
    args = _args(flow, objective, u_start, clock)
    controller_state, (_, band) = state
    step = controller_state[1] * step_scale
    controller_state = (controller_state[0], step, *controller_state[2:])
    inner, _ = _wrap(solver).init(_terms(solver), u_start, u_start + step, y, args)
    return controller_state, (inner, band.moved_to(u_start))


_restart = StoredProgram("restart", _restart_traced)


def _band_to_log_time_traced(state):
    """`state` with the band of Lemma 3's I in u = log t from u = 0 (t = 1) on."""
    controller_state, (inner, band) = state
    return controller_state, (inner, band.moved_to(0.0))


_band_to_log_time = StoredProgram("band_to_log_time", _band_to_log_time_traced)


def _segment_traced(
    flow, objective, y0, u_start, u_end, clock, save_us, solver, controller, max_steps, state
):
    """Integrate one segment [u_start, u_end] in u (t, sqrt t or log t), saving at save_us.

    Nothing in this program calls back to the host (the saves are `SavedAt`'s, the first
    step size is the controller's field), so it can be stored for later processes; the
    result code and the number of saves made are checked on the host afterwards."""
    controller_state, solver_state = state
    args = _args(flow, objective, u_start, clock)
    saving = SavedAt(_wrap(solver, controller), save_us, _save_fn)
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
        stop_code(sol.result),
        sol.stats["num_steps"],
        sol.stats["num_accepted_steps"],
        sol.stats["num_rejected_steps"],
    )


# The trace counter (eqx.debug.get_num_traces(_segment_counted)) lets the tests check that a
# new t1, n_save, eps, b or data set of the same shape does not retrace the segment.
_segment_counted = eqx.debug.assert_max_traces(_segment_traced, max_traces=None)
# A warm process loads the compiled segment instead of tracing it (`_stored`).
_segment = StoredProgram("segment", _segment_counted)

# XLA's CPU backend has two code generators for fused loops: its fusion emitters (XLA's
# default) and the classic loop emitters (the process default marginflow sets, `_xla`). The
# segment is a few hundred small kernels, which the classic emitters compile 15-30% faster;
# the results are the same bit for bit, but on large arrays their kernels run slower.
# `benchmarks/emitters.py` (docs/performance.md, "Which code generator"), RMSProp flow,
# classic / fusion, two recordings: the toy (p n = 300) compiles in 0.68-0.73x the time, its
# run (0.05-0.1 s) no slower; MLP(5, 16, 2) on 100 points (9.6e3) 0.75-0.81x, run
# 0.85-1.09x; MLP(20, 64, 2) on 200 points (2.7e5) 0.81-0.86x but runs 1.14-1.36x;
# MLP(20, 256, 2) on 400 points (2.2e6) 0.82-0.86x, runs 1.26-1.30x. So problems where
# compiling is the whole wait get the classic emitters, p n (times the batch) <=
# CLASSIC_EMITTERS_MAX_WORK, and larger ones the fusion emitters, each named explicitly so
# that the choice does not depend on the process default.
CLASSIC_EMITTERS_MAX_WORK = 100_000
_segment_classic = StoredProgram("segment", _segment_counted, compiler_options={EMITTERS: False})
_segment_fusion = StoredProgram("segment", _segment_counted, compiler_options={EMITTERS: True})


def segment_program(objective, w0, platform: str):
    """The segment compiled with XLA's classic CPU loop emitters when the problem is small
    (see CLASSIC_EMITTERS_MAX_WORK) and with its fusion emitters otherwise, on CPU; the
    plain `_segment` elsewhere, or where the choice is not marginflow's
    (`_xla.emitters_ours`: XLA_FLAGS names the option, MARGINFLOW_XLA_DEFAULTS=0, or a
    jaxlib it was not measured with)."""
    if not emitters_ours(platform):
        return _segment
    work = w0.size * objective.data.X.shape[0]  # p n, times the batch when w0 is (B, p)
    return _segment_classic if work <= CLASSIC_EMITTERS_MAX_WORK else _segment_fusion
