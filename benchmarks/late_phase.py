"""The late phase t = 1e5 -> 1e100 of the runs that were over issue 5's step-ratio bound.

The runs are GD on MLP(4, 8, 2, k=2) and on DeepLinear(4, 4, 4, 1), and AdaGrad on the deep
linear net (the three over 2.5 with `DecayIMEX` throughout), and AdaGrad on the MLP (1.93
then; the other run of the implicit late solver). The models and data are those of
tests/test_long_horizon.py, with rtol 1e-8.

Each run starts from `simulate`'s state at t = 1e5 and is integrated to t = 1e100 with:
- `DecayIMEX` and Dopri8 in u = log t (`simulate`'s variable), on the state w;
- `DecayIMEX`, Dopri8 (`simulate`'s default for GD and AdaGrad) and Kvaerno5 with a
  Newton-Krylov stage solve (`newton_solver`, AdaGrad's opt-in implicit solver) in u on the
  state v = w ||w||^(L-1), which `simulate` integrates;
- Kvaerno5 with a dense Newton solve (formed Jacobian, LU) in the state v: at
  `newton_solver`'s tolerances (the cost of GMRES(5) against an exact linear solve), and
  stopped at rtol 1e-11 and an absolute stage residual of 1e-15, below the rounding of the
  residual: the set-up first measured here, whose failed Newton solves (each one a
  rejected step) hid what an implicit solver gains;
- Dopri8 in tau = log log t, where the late solution varies on an O(1) scale but the modes
  with rates O(1) in u get rates O(u);
- `DecayIMEX` with the loss level sigma = -log L as the clock. There dw/dsigma =
  -h grad log L / <grad log L, h grad log L>, and u = log t is carried in the state.

A second table (`sizes`) times Dopri8 against the Newton-Krylov Kvaerno5 on AdaGrad for
wider MLPs, from `simulate`'s state at 1e10 to 1e30: the wall-time price of the implicit
late solver as p grows. A third (`saves`) checks `simulate`'s saved points after 1e10 for
AdaGrad (interpolated by the solver's dense output).

For each one the script prints the steps, the rejected steps, the wall time after
compilation (median of 3; a single timing for runs over 1 s), the relative error of w at
1e100 against a Dopri8 rtol-1e-13 reference, and the ratio that `simulate` would have with
that late phase from 1e5: (steps to 1e5 + late steps) / steps to 1e5.
Run: python benchmarks/late_phase.py [--record]   (--record writes the three tables to
docs/data/benchmarks/late_phase*.json, which docs/performance.md renders)
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import diffrax as dfx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import numpy as np
import optimistix as optx
from marginflow.flows import AdaGradFlow, GradientFlow, newton_solver, simulate
from marginflow.flows._fields import _dv, _v_of_w, _w_of_v
from marginflow.flows._imex import DecayIMEX
from marginflow.models import MLP, DeepLinear, separable_gaussians
from marginflow.models._objective import Objective, initial_point

RTOL, ATOL = 1e-8, 1e-12
U5, U100 = math.log(1e5), math.log(1e100)
CASES = {
    "MLP, GD": (
        lambda: MLP(4, 8, 2, activation=2, key=jax.random.key(1)),
        lambda: separable_gaussians(20, 4, gap=0.5, seed=1),
        GradientFlow(),
    ),
    "deep linear, GD": (
        lambda: DeepLinear((4, 4, 4, 1), key=jax.random.key(2)),
        lambda: separable_gaussians(20, 4, gap=0.5, seed=2),
        GradientFlow(),
    ),
    "deep linear, AdaGrad": (
        lambda: DeepLinear((4, 4, 4, 1), key=jax.random.key(2)),
        lambda: separable_gaussians(20, 4, gap=0.5, seed=2),
        AdaGradFlow(1e-5),
    ),
    "MLP, AdaGrad": (
        lambda: MLP(4, 8, 2, activation=2, key=jax.random.key(1)),
        lambda: separable_gaussians(20, 4, gap=0.5, seed=1),
        AdaGradFlow(1e-5),
    ),
}


def fields(flow, obj):
    """The flow in u = log t, in tau = log u, and with the clock sigma = -log L."""

    def parts(t, w, m):
        log_l, glog = jax.value_and_grad(obj.log_loss)(w)
        g = jnp.exp(log_l) * glog
        _, _, h, _ = flow.vector_field(t, w, jnp.maximum(m, 0.0), g)
        return log_l, glog, g, h

    def in_u(u, y, args):
        w, m = y
        t = jnp.exp(u)
        log_l, glog, g, h = parts(t, w, m)
        return -h * jnp.exp(log_l + u) * glog, t * flow.phi(t, m, g)

    def in_tau(tau, y, args):
        u = jnp.exp(tau)
        return jax.tree.map(lambda d: u * d, in_u(u, y, args))

    def in_sigma(sigma, y, args):
        w, m, u = y
        t = jnp.exp(u)
        log_l, glog, g, h = parts(t, w, m)
        rate = jnp.sum(glog * h * glog)  # dsigma/dt = L <grad log L, h grad log L>
        dt_dsigma = jnp.exp(-log_l) / rate
        return -h * glog / rate, dt_dsigma * flow.phi(t, m, g), jnp.exp(-log_l - u) / rate

    def in_v(u, y, args):
        # The state simulate uses: v = w ||w||^(L-1) (flows/_fields.py, `_w_of_v`).
        v, m = y
        w = _w_of_v(v, obj.degree)
        dw, dm = in_u(u, (w, m), args)
        return _dv(w, dw, obj.degree), dm

    return in_u, in_tau, in_sigma, in_v


def no_decay(s, y, args):
    # GD and AdaGrad have no linear decay: DecayIMEX's implicit part is zero.
    return jax.tree.map(jnp.zeros_like, y)


def newton_k5_dense(rtol, atol):
    # Newton with the formed Jacobian and an LU solve (lineax's default linear solver).
    return dfx.Kvaerno5(root_finder=optx.Newton(rtol=rtol, atol=atol))


def integrate(field, solver, x0, x1, y0, rtol, atol, event=None, imex=False,
              back=lambda w: w, max_steps=100_000, may_stop=False):
    """(w at x1, steps, rejected steps, median wall time); w is None for a run that
    stopped at max_steps, allowed with may_stop (any other failure raises)."""
    terms = dfx.MultiTerm(dfx.ODETerm(field), dfx.ODETerm(no_decay)) if imex else dfx.ODETerm(field)
    controller = dfx.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)

    @jax.jit
    def run(y0):
        sol = dfx.diffeqsolve(terms, solver, x0, x1, None, y0, stepsize_controller=controller,
                              event=event, max_steps=max_steps, throw=False)
        stats = sol.stats
        return back(sol.ys[0][-1]), stats["num_steps"], stats["num_rejected_steps"], sol.result

    out = jax.block_until_ready(run(y0))  # compiles
    times = []
    while len(times) < 3 and sum(times) < 1.0:  # one timing of a run slower than 1 s
        start = time.perf_counter()
        jax.block_until_ready(run(y0))
        times.append(time.perf_counter() - start)
    w, steps, rejected, result = out
    if may_stop and result == dfx.RESULTS.max_steps_reached:
        return None, int(steps), int(rejected), statistics.median(times)
    if result != dfx.RESULTS.successful and result != dfx.RESULTS.event_occurred:
        raise RuntimeError(f"{solver} failed: {result}")
    return np.asarray(w), int(steps), int(rejected), statistics.median(times)


def case(name, model, data, flow):
    """One case's rows: [run, set-up, steps (rejected), wall, error of w, ratio]."""
    traj = simulate(flow, model, data, 1e100, ts=[0.0, 1e5, 1e100])
    per_segment = np.asarray(traj.stats["num_steps_per_segment"])
    early = np.asarray(traj.stats["segment_ends"]) <= 1e5
    n5, late_default = int(per_segment[early].sum()), int(per_segment[~early].sum())
    obj = Objective(initial_point(model, False)[0], data)
    in_u, in_tau, in_sigma, in_v = fields(flow, obj)
    y0 = (jnp.asarray(traj.w[1]), jnp.asarray(traj.m[1]))
    ref, *_ = integrate(in_u, dfx.Dopri8(), U5, U100, y0, 1e-13, 1e-17)
    sigma0 = -float(obj.log_loss(y0[0]))
    reached = dfx.Event(lambda t, y, args, **kw: y[2] - U100,
                        root_finder=optx.Newton(rtol=1e-13, atol=1e-13))
    rows = [
        ("DecayIMEX, u", lambda: integrate(in_u, DecayIMEX(), U5, U100, y0, RTOL, ATOL,
                                           imex=True)),
        ("DecayIMEX, u, state v = w ||w||^(L-1)", lambda: integrate(
            in_v, DecayIMEX(), U5, U100, (_v_of_w(y0[0], obj.degree), y0[1]), RTOL, ATOL,
            imex=True, back=lambda v: _w_of_v(v, obj.degree))),
        ("Dopri8, u", lambda: integrate(in_u, dfx.Dopri8(), U5, U100, y0, RTOL, ATOL)),
        ("Dopri8, u, state v (simulate's default)", lambda: integrate(
            in_v, dfx.Dopri8(), U5, U100, (_v_of_w(y0[0], obj.degree), y0[1]), RTOL, ATOL,
            back=lambda v: _w_of_v(v, obj.degree))),
        ("Kvaerno5 + Newton-Krylov, u, state v (late_solver=newton_solver)", lambda: integrate(
            in_v, newton_solver(RTOL), U5, U100, (_v_of_w(y0[0], obj.degree), y0[1]), RTOL,
            ATOL, back=lambda v: _w_of_v(v, obj.degree))),
        ("Kvaerno5 + dense Newton (LU), newton_solver's tolerances, state v", lambda: integrate(
            in_v, newton_k5_dense(RTOL, RTOL), U5, U100, (_v_of_w(y0[0], obj.degree), y0[1]),
            RTOL, ATOL, back=lambda v: _w_of_v(v, obj.degree))),
        ("Kvaerno5 + dense Newton (LU), rtol 1e-11, residual atol 1e-15, state v", lambda:
            integrate(in_v, newton_k5_dense(1e-3 * RTOL, 1e-3 * ATOL), U5, U100,
                      (_v_of_w(y0[0], obj.degree), y0[1]), RTOL, ATOL,
                      back=lambda v: _w_of_v(v, obj.degree), max_steps=30_000,
                      may_stop=True)),
        ("Dopri8, log log t", lambda: integrate(
            in_tau, dfx.Dopri8(), math.log(U5), math.log(U100), y0, RTOL, ATOL)),
        ("DecayIMEX, sigma = -log L", lambda: integrate(
            in_sigma, DecayIMEX(), sigma0, sigma0 + 2 * U100, (*y0, jnp.asarray(U5)),
            RTOL, ATOL, event=reached, imex=True)),
    ]
    print(f"\n{name}: simulate takes {n5} steps to 1e5 and {late_default} from 1e5 to "
          f"1e100 (ratio {(n5 + late_default) / n5:.2f})")
    out = []
    for label, fn in rows:
        w, steps, rejected, wall = fn()
        if w is None:
            row = [name, label, f"stopped at {steps} ({rejected})", f"{1e3 * wall:.1f} ms",
                   "-", "-"]
        else:
            err = np.linalg.norm(w - ref) / np.linalg.norm(ref)
            row = [name, label, f"{steps} ({rejected})", f"{1e3 * wall:.1f} ms", f"{err:.1e}",
                   f"{(n5 + steps) / n5:.2f}"]
        print("| " + " | ".join(row) + " |")
        out.append(row)
    return out


def sizes():
    """AdaGrad on wider MLPs, 1e10 -> 1e30: Dopri8 against the Newton-Krylov Kvaerno5."""
    flow, u10, u30 = AdaGradFlow(1e-5), math.log(1e10), math.log(1e30)
    print("\nAdaGrad, MLP(d, width, 2, activation=2) on separable_gaussians(40, d), from "
          "simulate's state at 1e10 to 1e30")
    out = []
    for dim, width in [(8, 16), (20, 40), (40, 80), (100, 200)]:
        model = MLP(dim, width, 2, activation=2, key=jax.random.key(1))
        data = separable_gaussians(40, dim, gap=0.5, seed=1)
        traj = simulate(flow, model, data, 1e10, ts=[0.0, 1e10])
        obj = Objective(initial_point(model, False)[0], data)
        in_v = fields(flow, obj)[3]
        y0 = (_v_of_w(jnp.asarray(traj.w[1]), obj.degree), jnp.asarray(traj.m[1]))
        _, s8, r8, t8 = integrate(in_v, dfx.Dopri8(), u10, u30, y0, RTOL, ATOL)
        _, sk, rk, tk = integrate(in_v, newton_solver(RTOL), u10, u30, y0, RTOL, ATOL)
        row = [str(y0[0].size), f"{s8} ({r8})", f"{1e3 * t8:.1f} ms", f"{sk} ({rk})",
               f"{1e3 * tk:.1f} ms", f"{tk / t8:.1f}"]
        print("| " + " | ".join(row) + " |")
        out.append(row)
    return out


def saves():
    """AdaGrad, `simulate`'s saved w at 37 log-spaced times in [1e10, 1e100] (Kvaerno5's
    dense output interpolates) against an rtol-1e-13 Dopri8 reference."""
    print("\nAdaGrad, simulate's saves in [1e10, 1e100] against an rtol-1e-13 reference")
    out = []
    ts = np.geomspace(1e10, 1e100, 37)
    for name in ("deep linear, AdaGrad", "MLP, AdaGrad"):
        model_fn, data_fn, flow = CASES[name]
        model, data = model_fn(), data_fn()
        traj = simulate(flow, model, data, 1e100, ts=np.concatenate([[0.0], ts]))
        obj = Objective(initial_point(model, False)[0], data)
        in_v = fields(flow, obj)[3]
        y0 = (_v_of_w(jnp.asarray(traj.w[1]), obj.degree), jnp.asarray(traj.m[1]))
        sol = dfx.diffeqsolve(
            dfx.ODETerm(in_v), dfx.Dopri8(), math.log(1e10), U100, None, y0,
            saveat=dfx.SaveAt(ts=jnp.log(jnp.asarray(ts))), max_steps=100_000,
            stepsize_controller=dfx.PIDController(rtol=1e-13, atol=1e-17))
        ref = np.asarray(_w_of_v(sol.ys[0], obj.degree))
        err = np.linalg.norm(traj.w[1:] - ref, axis=1) / np.linalg.norm(ref, axis=1)
        row = [name, f"{err.max():.1e}", f"{err[-1]:.1e}"]
        print("| " + " | ".join(row) + " |")
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true",
                        help="write the tables to docs/data/benchmarks/late_phase*.json")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; rtol {RTOL}, atol {ATOL}")
    rows = [row for name, (model_fn, data_fn, flow) in CASES.items()
            for row in case(name, model_fn(), data_fn(), flow)]
    size_rows, save_rows = sizes(), saves()
    if args.record:
        from _record import record

        command = "python benchmarks/late_phase.py --record"
        record("late_phase", ["run", "late phase 1e5 -> 1e100", "steps (rejected)",
                              "wall after compile", "error of w at 1e100",
                              "steps ratio it would give"], rows, command=command,
               notes=[f"rtol {RTOL}, atol {ATOL}; the error is against a Dopri8 rtol-1e-13 "
                      "reference; the ratio is (simulate's steps to 1e5 + late steps) / "
                      "(steps to 1e5)."])
        record("late_phase_sizes", ["p", "Dopri8 steps (rejected)", "wall",
                                    "Kvaerno5 + Newton-Krylov steps (rejected)", "wall",
                                    "wall ratio"], size_rows, command=command,
               notes=["AdaGrad (eps 1e-5), MLP(d, width, 2, activation=2) on "
                      "separable_gaussians(40, d), from simulate's state at 1e10 to 1e30."])
        record("late_phase_saves", ["run", "largest relative error of w over 37 saves",
                                    "at the last save (1e100)"], save_rows, command=command,
               notes=["simulate's saves at 37 log-spaced times in [1e10, 1e100] against a "
                      "Dopri8 rtol-1e-13 reference."])


if __name__ == "__main__":
    main()
