"""The default solver per flow and size (docs/math.md section 2, "Stiffness").

- `default_solver`: `DecayIMEX` (module `_imex`), its choice and the measured figures;
- `CarriedPID`: diffrax's PID controller carrying its step size across `simulate`'s segments;
- `decay_rate`, `is_imex`, `wm_norm`: what `_fields` needs to lay out the terms.

The time variable (t or sqrt t on [t0, 1], u = log t after) is `_clock`'s business.
"""

from __future__ import annotations

from typing import get_origin

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx

from ._clock import log_t_span
from ._imex import all_finite, at_resolution


def wm_norm(y):
    """RMS norm of the (v, m) part of the state (v, m, I), v = w ||w||^(L-1).

    Error control on (v, m) only (relative errors of v and w agree within a factor L; an
    atol on v is atol ||w||^(1-L) on w). I(t) is not integrated but set from each step's
    end states (`PenaltyIntegral`, module `_penalty`): it inherits the accuracy of m.
    """
    v, m, _ = y
    return optx.rms_norm((v, m))


# --------------------------------------------------------------- the stiff part
def decay_rate(flow) -> jax.Array:
    """The rate a of the linear decay dm/dt = ... - a m of the flow's m-equation
    (`flow.decay_rate()`: 1 - b for RMSProp and Adam, (a2, a1) for the momentum flows, 0 for
    GD and AdaGrad, whose m-equation is not stiff; docs/math.md section 2)."""
    return flow.decay_rate()


def has_decay(flow) -> bool:
    """Whether the flow's m-equation has a linear decay (RMSProp, Adam, the momentum flows)."""
    return flow.has_decay


def is_imex(solver) -> bool:
    """Whether `solver` takes a MultiTerm (explicit, implicit) pair, like diffrax's KenCarp."""
    structure = getattr(solver, "term_structure", None)
    return get_origin(structure) is dfx.MultiTerm or isinstance(structure, dfx.MultiTerm)


# ------------------------------------------------------------------ the controller
class CarriedPID(dfx.AbstractAdaptiveStepSizeController):
    """diffrax's PID controller that also carries its proposed next step size in its state,
    and, with `kink_tol`, steps across the kinks of a piecewise-linear model.

    `simulate` integrates one segment per diffeqsolve call. diffrax carries the PID error
    history across calls but, given a controller state and dt0=None, re-guesses the first
    step of every call (two more field evaluations and a cold start per segment). This
    wrapper stores the last proposal in its state; `carrying(dt)` is this controller with
    that proposal as its first step. It is passed as a field, not as diffeqsolve's dt0:
    diffrax checks a traced dt0's sign with a host callback, and a program holding a host
    callback is never written to JAX's persistent compilation cache (`marginflow.cache`).

    Kinks (`kink_tol`; docs/solvers.md, "Non-smooth models: kink steps"). Where grad L
    jumps (a ReLU preactivation or a max-pool tie crosses zero), a step across it errs by
    O(dt |jump|), not O(dt^(p+1)): the PID resolves an isolated crossing by shrinking its
    step to about rtol |y| / |jump| for a few steps, but where the flow slides along a
    switching surface (pushed onto it from both sides), or crosses thousands of them, every
    step crosses one and the run creeps at that size. With `kink_tol` = tau: once more than
    _CHATTER_STEPS steps whose increment on v is within tau norm-wise,
    ||v1 - v0|| <= atol + tau max(||v0||, ||v1||) (RMS norms), were rejected since the last
    accepted larger step, a step that fails the error test but is that small is accepted:
    a "kink step". A step's error never exceeds about its increment, so a kink step errs by
    at most about tau ||v||. The next step is sized for an increment of 0.9 tau (increments
    scale with the step), so in a sliding phase the steps follow the state's own rate of
    relative change: about 1 / tau steps per unit of relative change of v, a bounded cost.
    As tau falls the kink steps shrink with it and the result converges (at first order,
    measured) to the Filippov solution, the limit of such small-step polygons. Isolated
    crossings are mostly still resolved at rtol: the count of small rejections also
    restarts once the steps have grown back _CLEAR_FACTOR times past the last rejected one
    (on the toy, 4 initialisations x 4 flows to 1e6, one run took one kink step; at rtol
    1e-9 GD took 3, docs/performance.md). The state then also counts the kink steps and
    their span in log t (`kink_stats`).
    """

    pid: dfx.PIDController
    dt: jax.Array | None = None
    # An array (traced: another kink_tol reuses the compiled program) or None (no kink steps).
    kink_tol: jax.Array | None = None

    def carrying(self, dt) -> CarriedPID:
        """This controller, starting its next solve with the step size `dt`."""
        return CarriedPID(self.pid, dt, self.kink_tol)

    @property
    def rtol(self):
        return self.pid.rtol

    @property
    def atol(self):
        return self.pid.atol

    @property
    def norm(self):
        return self.pid.norm

    def wrap(self, direction):
        return CarriedPID(self.pid.wrap(direction), self.dt, self.kink_tol)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        if dt0 is None and self.dt is not None:
            dt0 = self.dt
        tnext, state = self.pid.init(terms, t0, t1, y0, dt0, args, func, error_order)
        # Arrays throughout (PID's `at_dtmin` is a Python bool here): vmappable state.
        state = (jtu.tree_map(jnp.asarray, state), jnp.asarray(tnext - t0))
        if self.kink_tol is not None:
            zero = jnp.zeros((), jnp.result_type(t0))
            state = (*state, (jnp.zeros((), jnp.int32), zero, jnp.zeros((), jnp.int32), zero))
        return tnext, state

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        state = controller_state[0]
        # A step too long for the field (an exp overflowing) gives NaN or inf. diffrax's PID
        # turns a NaN error into a NaN step size, and every later step is rejected (seen:
        # AdaGrad on a ReLU MLP with Bosh3 near t = 1e159). An infinite error makes it shrink
        # the step 5x instead, and a finite candidate keeps its error scale finite.
        # `DecayIMEX` and `DecayHeun` do the same in their own steps (`_imex.guard`).
        finite = all_finite((y1_candidate, y_error))
        safe_error = jtu.tree_map(lambda e: jnp.where(finite, e, jnp.inf), y_error)
        safe_y1 = jtu.tree_map(lambda a, b: jnp.where(finite, a, b), y1_candidate, y0)
        keep, next_t0, next_t1, jump, state, result = self.pid.adapt_step_size(
            t0, t1, y0, safe_y1, args, safe_error, error_order, state
        )
        # Still not finite at a step at the resolution of t: the field itself is NaN or inf
        # there, and shrinking further cannot help: stop with that result.
        stuck = ~finite & at_resolution(t0, t1 - t0)
        result = dfx.RESULTS.where(stuck, dfx.RESULTS.nonfinite, result)
        state = jtu.tree_map(jnp.asarray, state)
        if self.kink_tol is None:
            return keep, next_t0, next_t1, jump, (state, jnp.asarray(next_t1 - next_t0)), result
        # The step's increment on v, norm-wise relative: at most kink_tol when size <= 1.
        v0, v1 = y0[0], y1_candidate[0]
        scale = self.pid.atol + self.kink_tol * jnp.maximum(optx.rms_norm(v0), optx.rms_norm(v1))
        size = optx.rms_norm(v1 - v0) / scale
        n, total, small, dt_small = controller_state[2]
        chattering = small > _CHATTER_STEPS  # kink steps are being taken
        dt = t1 - t0
        # Rejections of steps this small since the run was last clear of kinks: the PID
        # resolves an isolated crossing with a few (it shrinks the step up to 5x per
        # rejection); more mean the run is stuck among kinks (sliding, or dense crossings).
        # Clear of kinks: an accepted step above the kink tolerance, or an accepted step
        # _CLEAR_FACTOR times longer than the last small rejection (`dt_small`). Among
        # kinks (sliding, dense crossings) the accepted steps stay near the size of the
        # rejected ones; after an isolated crossing they grow back to the smooth field's,
        # by orders of magnitude, and the count starts again. Without that second rule the
        # rejections of many isolated crossings added up where increments stay below
        # kink_tol (the toy in t <= 1), and a tighter rtol set off kink steps: GD on the toy
        # at rtol 1e-9 took 3 and erred by 1.3e-7 against 2.0e-8 at rtol 1e-8.
        # Never a kink step with a non-finite state, nor one whose implicit stages failed
        # (diffrax reports those with an infinite error estimate): `finite`, above. (A step
        # that `_imex.guard` gave y1 = y0 has size 0 and counts as small, as it always has:
        # the step sequences of the default runs depend on it.)
        rejected_small = ~keep & (size <= 1)
        clear = keep & ((size > 1) | (dt > _CLEAR_FACTOR * dt_small))
        small = jnp.where(rejected_small, small + 1, jnp.where(clear, 0, small))
        dt_small = jnp.where(rejected_small, dt, dt_small)
        kink = rejected_small & finite & (small > _CHATTER_STEPS)
        keep = keep | kink
        next_t0 = jnp.where(kink, t1, next_t0)
        # The next step: sized for an increment of 0.9 kink_tol (increments scale with dt).
        grow = jnp.clip(0.9 / jnp.maximum(size, 1e-3), 1.0, 10.0)
        next_t1 = jnp.where(kink, t1 + dt * grow, next_t1)
        # Among kinks, a step rejected for an increment above kink_tol is retried at the size
        # that increment asks for (0.9 kink_tol), not at the PID's smaller guess from an
        # error estimate that the kinks dominate: the retry is then a kink step or passes.
        over = ~keep & chattering & finite & (size > 1)
        retry = t0 + dt * jnp.clip(0.9 / size, 0.1, 1.0)
        next_t1 = jnp.where(over, jnp.maximum(next_t1, retry), next_t1)
        # The span in log t (args[3] is the clock: t, sqrt t or log t).
        span = log_t_span(t0, t1, args[3])
        counts = (n + kink.astype(jnp.int32), total + jnp.where(kink, span, 0), small,
                  dt_small)
        return keep, next_t0, next_t1, jump, (state, jnp.asarray(next_t1 - next_t0), counts), result


# Rejected steps within the kink tolerance before kink steps are taken (`CarriedPID`).
_CHATTER_STEPS = 30
# An accepted step this many times longer than the last small rejection is clear of kinks.
# Measured (MARGINFLOW_EXPORT=0, fresh caches): on the toy at rtol 1e-10 to t = 10, factors
# 10 to 1000 all keep GD and AdaGrad free of kink steps (1e6: 4 and 3, the old behaviour);
# at rtol 1e-9 to 1e100 GD still takes 3 with 1000, none with 10.
# On the ReLU MLP(5, 16, 2) of benchmarks/kinks.py, 1000 leaves the steps of GD, AdaGrad,
# RMSProp and the Heun solvers exactly as before (e.g. AdaGrad 6573, 4970 kink steps),
# while 10 let crossings between kink steps be resolved at rtol: AdaGrad took 8458 steps,
# with DecayHeun 18191 against 7045, at no gain against the kink_tol 1e-4 run.
_CLEAR_FACTOR = 1000.0


def kink_stats(controller_state):
    """(kink steps, their span in log t) counted by a CarriedPID with kink_tol, or None."""
    return controller_state[2][:2] if len(controller_state) > 2 else None


def default_controller(rtol: float, atol: float, kink_tol: float | None = None) -> CarriedPID:
    """PID gains (0.3, 0.4) were measured to need fewer steps than I-control on the toy.

    rtol and atol are arrays, as kink_tol is: traced, so a run at another tolerance (a
    convergence study) reuses the compiled program. As Python floats they were static, and
    each tolerance compiled the segment anew. They are weakly typed (from Python floats),
    so a float32 run's error norms stay in float32."""
    pid = dfx.PIDController(rtol=jnp.asarray(float(rtol)), atol=jnp.asarray(float(atol)),
                            pcoeff=0.3, icoeff=0.4, norm=wm_norm)
    return CarriedPID(pid, None, None if kink_tol is None else jnp.asarray(kink_tol))


# ---------------------------------------------------------------------- the solver
def default_solver(flow, p: int, *, rtol: float = 1e-8, atol: float = 1e-12,
                   dense_kinks: bool = False, frequent_kinks: bool = False):
    """The solver `simulate(..., solver=None)` uses: `DecayIMEX` for the flows whose moments
    decay (RMSProp, Adam, the momentum flows), diffrax's Dopri8 for GD and AdaGrad, each
    for the whole run (`late_solver` is the same choice); with `dense_kinks` (a model
    whose `dense_kinks` is True, kink steps on) diffrax's Heun for GD and AdaGrad and
    `DecayHeun` (exponential Heun) for the flows with a decay, with `frequent_kinks` (a
    ReLU MLP) diffrax's Bosh3 for GD and AdaGrad.

    Why Bosh3 where kinks are frequent (docs/solvers.md, "Frequent kinks"). On the ReLU
    MLP(5, 16, 2) on 100 points to t = 1e10, kink_tol 1e-3, Dopri8 took 10257 steps for
    AdaGrad and its w differed from a run at kink_tol 1e-4 by 2.3e-3; Bosh3 took 6573 steps,
    0.43 s against 1.39 s compiled, and differed by 2.9e-4 (GD: 6609 steps, 0.19 s against
    7889, 0.74 s). A step across a kink errs at first order whatever the solver, and
    Bosh3's weights (2/9, 1/3, 4/9) are positive where Dopri8's 13 stages extrapolate. The
    toy keeps Dopri8: with Bosh3 its AdaGrad run took 212 kink steps (kink_tol accuracy)
    where Dopri8 took none.

    Why Heun where kinks are dense (docs/solvers.md, "Dense kinks"). A step across a kink
    errs at first order whatever the solver's order, so where most steps cross one (the
    CNN: a ReLU or max-pool switch per image, channel and pixel) a step's cost counts more
    than its order: Heun takes 2 gradient evaluations against Dopri8's 13. Its weights
    are convex (1/2, 1/2), so a step across a jump of the field averages the two sides. On
    the narrowed CNN (AdaGrad, kink_tol 1e-2, to t = 1) Heun took 945 steps and 33 s.
    `DecayIMEX2`, whose explicit weights extrapolate (-0.71, 1.71), took 3000 steps to
    reach t = 0.0013, where Heun reached t = 0.01 in 427. The flows with a decay take
    `DecayHeun` (module `_etd`): Heun's convex weights on F, the decay integrated exactly
    (an explicit step is unstable on it in log time), 2 evaluations per step against
    `DecayIMEX`'s 8. On the narrowed CNN at kink_tol 1e-3 it took RMSProp to t = 1e6 in
    325 s (eps inside) and 453 s (eps outside); at kink_tol 1e-2, with eps outside, in
    1,232 s, where `DecayIMEX` stopped at t = 2.9e5 after 31 minutes at 4,000 steps per
    segment (docs/solvers.md, "Dense kinks"). Only the CNN declares dense kinks: an MLP's
    density depends on its data.

    Chosen by wall time at matched accuracy (`benchmarks/solver_choice.py`,
    docs/performance.md): each candidate's compiled time to t1 = 1e100 and its error (the
    direction of w against an rtol-1e-12 reference), the lower-order ones also at rtol 1e-9
    and 1e-10. For GD and AdaGrad Dopri5 and Tsit5 were up to 2x faster than Dopri8 at
    rtol 1e-8 but 3 to 38 times less accurate; matching Dopri8's error cost them more time
    on the MLP and the deep linear net. On the toy, whose cost is its kink crossings,
    Tsit5 at 1e-9 was 1.2-1.7x faster than Dopri8 at 1e-8 and more accurate; Dopri8
    stays, since a toy rule would buy 0.04 s compiled against a 3 s first call and change
    every toy result. Against `DecayIMEX` then Dopri8 from 1e10 (an earlier default),
    Dopri8 throughout compiles one program instead of two: a first call of 2.5-3.2 s
    against 5.9-7.5 s. With a decay, an explicit step is stable only below about
    3 / ((1 - b) t) in u = log t, and `DecayIMEX` is the choice.

    Why `DecayIMEX` for a decay. After separation g ~ 1/t, and in u = log t (which
    `simulate` uses from t = 1 on) the w-equation dw/du = -t h g is O(1): a constant number
    of steps per decade. The one stiff part is the decay of m, dm/du = -(1 - b) t m + ...,
    rate 1e99 at t = 1e100. `DecayIMEX` (module `_imex`) treats that decay implicitly and
    everything else explicitly with Kennedy & Carpenter's 5(4) IMEX pair; the implicit
    stages are diagonal and solved by a division, so a step costs 8 gradient evaluations
    plus O(p): the same solver runs the toy and the CNN's 3.3e6 parameters (Kvaerno5 +
    dense Newton formed a p x p Jacobian). Steps to 1e5 / to 1e100 on the toy (2-core CPU,
    eps 1e-5, b 0.9, rtol 1e-8): RMSProp 1908 / 2105, Adam 1636 / 1834; every (flow, model)
    row is in the generated table of docs/performance.md.
    Rejected alternatives, measured:
    - Kvaerno5 + dense Newton in log time: 2155 / 2397 steps, 0.30 s to 1e5, O(p^2) memory;
    - the old default, Kvaerno5 in t: stalled in [1e15, 1e16] (steps ~ t, and its Newton
      test |residual| < atol is absolute: unmeetable where the field is large);
    - diffrax's KenCarp5 on the same split: stalled from t ~ 1e18 (the cancellations that
      `DecayIMEX` avoids, see its module).

    Args:
        flow: the flow; p: unused today (one O(p) solver fits every size).
        rtol, atol: unused (the implicit stages are solved exactly).
        dense_kinks: pick Heun for GD and AdaGrad, `DecayHeun` for a decay (above).
        frequent_kinks: pick Bosh3 for GD and AdaGrad (above); dense_kinks wins.
    """
    del p, rtol, atol
    if dense_kinks:
        from ._etd import DecayHeun

        return DecayHeun() if has_decay(flow) else dfx.Heun()
    if frequent_kinks and not has_decay(flow):
        return dfx.Bosh3()
    return late_solver(flow, 0)


# AdaGrad's late Newton solve (`late_solver`) never forms the Newton matrix: it applies it
# (one JVP of the field each) inside GMRES with a Krylov space of _KRYLOV_DIM vectors: O(p)
# memory and O(_KRYLOV_DIM p) time per Newton iteration. The late field's stiff part is a
# handful of fast modes (eigenvalues -15, -5, -1 in u, the rest O(1/u), measured on
# AdaGrad / DeepLinear(4, 4, 4, 1)), which a small Krylov space holds; an inexact linear
# solve only slows Newton's contraction (Newton iterates to its own tolerance, and a stage
# that needs more than diffrax's 10 iterations rejects its step). Measured from 1e5 to
# 1e100 (benchmarks/late_phase.py, state v): an LU solve of the formed matrix and GMRES(5)
# took the same steps (70 and 74 for GD on the MLP and the deep linear net, 87 and 132 for
# AdaGrad) with the same errors at 1e100, and GMRES(5) was faster in every case (e.g. 77.6
# against 85.9 ms on the deep linear AdaGrad run, p = 36); the LU solve is O(p^3) per
# iteration and O(p^2) in memory.
_KRYLOV_DIM = 5


def newton_solver(rtol: float, dtype=jnp.float64) -> dfx.Kvaerno5:
    """Kvaerno5 (L-stable ESDIRK 5(4)) with a matrix-free Newton-Krylov solve of its stages.

    Stage i solves f_i = F(u_0 + c_i dt, y_0 + dt sum_{j<i} a_ij f_j + dt gamma f_i) for the
    stage derivative f_i (gamma = a_ii); Newton's update d solves (I - dt gamma J) d = -r,
    J = dF/dy, r the residual, and GMRES minimises |(I - dt gamma J) d + r| over
    span{r, A r, ..., A^4 r}, A = I - dt gamma J, each A x one JVP of F.
    The stage derivatives f = dy/du are O(1-10) in u = log t late in
    training. Newton stops (optimistix's Cauchy test) when its increment is below
    tol + rtol |f| and its residual below tol, tol = max(rtol, 1e3 machine eps): a residual
    delta f moves the state by about dt delta f, below the controller's rtol |v| for
    |v| >~ dt (|v| is 1e2-1e4 late); the floor keeps tol above the rounding of the residual,
    seen to plateau near 1e-13 in float64 in a one-off check on the deep linear net. Stopped
    at rtol 1e-11 and an absolute 1e-15 instead (the set-up first measured here), Newton
    mostly fails to converge and each failure rejects the step: with a dense Newton from
    1e5 to 1e100 (benchmarks/late_phase.py), AdaGrad on the deep linear net took 27732 steps
    (14107 rejected) against 87 (none) at these tolerances.
    """
    tol = max(float(rtol), 1e3 * float(np.finfo(dtype).eps))
    # rtol = atol = 0: exactly one cycle of _KRYLOV_DIM Arnoldi vectors (max_steps=2:
    # lineax's first pass only forms the residual), reported as converged; a Krylov space
    # that closes early gives the exact solution (checked in tests/test_long_horizon.py).
    linear = lx.GMRES(rtol=0.0, atol=0.0, restart=_KRYLOV_DIM, max_steps=2)
    return dfx.Kvaerno5(root_finder=optx.Newton(rtol=rtol, atol=tol, linear_solver=linear))


def late_solver(flow, p: int, *, rtol: float = 1e-8, dtype=jnp.float64):
    """The solver for the late phase, t >= 1e10; today the same as `default_solver`, which
    uses it for the whole run (why each, below).

    - RMSProp, Adam and the momentum flows: `DecayIMEX`: their moments decay at the rate
      (1 - b) t, 1e99 at t = 1e100, which it treats implicitly.
    - GD and AdaGrad: diffrax's Dopri8. Late in training GD's field is smooth and not stiff
      (Jacobian eigenvalues -2, -1 and O(1/u) in u, measured on DeepLinear(4, 4, 4, 1)) and
      the 8th-order pair takes long steps: from 1e5 to 1e100 in the state v
      (benchmarks/late_phase.py), 109 / 123 steps against DecayIMEX's 233 / 227 (MLP(4, 8,
      2, k=2), DeepLinear(4, 4, 4, 1)). AdaGrad's frozen conditioner can leave fast modes
      (eigenvalues -15 and -5 in u on the deep linear net), which an implicit method steps
      over in fewer steps (Kvaerno5 + Newton-Krylov, `newton_solver`: 87 against 854), but
      each of its steps costs about 8 field evaluations per Newton iteration: in wall time
      it was slower on the toy, the MLP and the deep linear net
      (benchmarks/solver_choice.py), it compiles a larger program, and in float32 its
      Newton iteration cannot converge below float32 rounding and stalled (the
      verification bank's rows linear-exp-adagrad-f32-s101 / adagrad_out-f32-s102,
      max_steps_reached at 3.7e19).
      `solver=newton_solver(rtol)` still runs it throughout, for very stiff problems.
    Since `default_solver` makes the same choice, a default run does not switch.
    """
    del p, rtol, dtype  # one O(p) solver per flow fits every size and dtype
    from ._imex import DecayIMEX

    if has_decay(flow):
        return DecayIMEX()
    return dfx.Dopri8()


def solver_name(solver) -> str:
    """The solver's class; for a Newton-Krylov one also its Krylov dimension."""
    name = type(solver).__name__
    newton = getattr(solver, "root_finder", None)
    if isinstance(newton, optx.Newton) and isinstance(newton.linear_solver, lx.GMRES):
        name += f" + Newton-Krylov (GMRES({newton.linear_solver.restart}))"
    return name
