"""Flows on a ReLU network: marginflow's kink steps against diffrax's dtmin baseline.

The problem of issue 14: MLP(5, 16, 2) with ReLU on separable_gaussians(100, 5, seed=0),
eps 1e-5, b 0.9, rtol 1e-8, to t1 = 1e10, for GD, AdaGrad, RMSProp and Adam. Per flow:
- marginflow's default (kink_tol = 1e-3, `simulate`'s kink steps) and a run at a 10x
  tighter kink_tol (1e-4): steps, kink steps, compiled wall time (median of 3), whether it
  reached t1, the normalised margin, and |w - w_tight| / |w_tight| at t1;
- the default kink_tol with `DecayIMEX2`, the second-order IMEX pair offered as an option (2
  gradient evaluations per step against 8 or 13), and with `DecayHeun` (exponential Heun,
  2 evaluations, convex weights; Heun itself for GD and AdaGrad), against the same tight
  run;
- without kink steps (kink_tol = 0, the solvers before this work): where it stops;
- the baseline the issue names: diffrax's PIDController(dtmin, force_dtmin=True) with a
  low-order solver (Bosh3), in the same time variables (t, then log t), dtmin = 1e-4 and
  1e-5 (in t on [0, 1], in log t after): steps, wall time, the error against the tight
  marginflow run.
Every run has max_steps = 100000 per segment (a decade of t). The rows go to
docs/data/benchmarks/kinks.json with --record.
Run: python benchmarks/kinks.py [--record] [--flows gd,rmsprop]   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffrax as dfx
import jax
import numpy as np
from marginflow.analysis import normalized_margin
from marginflow.flows import (
    AdaGradFlow,
    AdamFlow,
    DecayHeun,
    DecayIMEX2,
    GradientFlow,
    RMSPropFlow,
    simulate,
)
from marginflow.flows import _plan as sim  # where simulate picks its controller
from marginflow.flows._solvers import CarriedPID, default_controller, wm_norm
from marginflow.models import MLP, separable_gaussians

FLOWS = {
    "gd": GradientFlow(),
    "adagrad": AdaGradFlow(1e-5),
    "rmsprop": RMSPropFlow(1e-5, 0.9),
    "adam": AdamFlow(1e-5, 0.9),
}
T1, MAX_STEPS = 1e10, 100_000


def _timed(fn, repeats: int):
    fn()  # compile
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _baseline(flow, model, data, dtmin: float):
    """simulate's time variables and solver loop, with diffrax's dtmin controller and Bosh3
    in place of marginflow's controller and default solver, kink steps off."""
    def controller(rtol, atol, kink_tol=None):
        pid = dfx.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4, norm=wm_norm,
                                dtmin=dtmin, force_dtmin=True)
        return CarriedPID(pid, None, None)

    sim.default_controller = controller
    try:
        return simulate(flow, model, data, T1, n_save=20, solver=dfx.Bosh3(), kink_tol=0,
                        max_steps=MAX_STEPS, throw=False)
    finally:
        sim.default_controller = default_controller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = MLP(5, 16, 2, key=jax.random.key(0))
    data = separable_gaussians(100, 5, seed=0)

    def cell(traj, ref=None):
        reached = f"t = {traj.ts[-1]:.3g}" if traj.success else f"stopped at t = {traj.ts[-1]:.2g}"
        err = "" if ref is None else f"{np.linalg.norm(traj.w[-1] - ref) / np.linalg.norm(ref):.2g}"
        return reached, err

    rows = []
    for name in args.flows.split(","):
        flow = FLOWS[name]

        def run(tol, flow=flow, solver=None):
            return simulate(flow, model, data, T1, n_save=20, kink_tol=tol, solver=solver,
                            max_steps=MAX_STEPS, throw=False)

        tight, t_tight = _timed(lambda: run(1e-4), 1)
        ref = tight.w[-1]
        for label, tol, solver in (("marginflow, kink_tol 1e-3 (default)", 1e-3, None),
                                   ("marginflow, kink_tol 1e-4", 1e-4, None),
                                   ("marginflow, kink_tol 1e-3, DecayIMEX2", 1e-3,
                                    DecayIMEX2()),
                                   ("marginflow, kink_tol 1e-3, DecayHeun", 1e-3,
                                    DecayHeun())):
            if tol == 1e-4:
                traj, wall = tight, t_tight
            else:
                traj, wall = _timed(lambda s=solver: run(1e-3, solver=s), args.repeats)
            reached, err = cell(traj, None if tol == 1e-4 else ref)
            if solver is None:  # the default solver, named: Bosh3 for GD and AdaGrad here
                label = label.replace("(default)", f"(default, {traj.meta['solver']})")
            margin = float(normalized_margin(model, data, traj.w[-1]))
            rows.append([name, label, reached, traj.stats["num_steps"],
                         traj.stats.get("num_kink_steps", 0), f"{wall:.2f}", f"{margin:.4f}",
                         err or "(reference)"])
            print(rows[-1], flush=True)
        off, wall = _timed(lambda: run(0), 1)
        reached, _ = cell(off)
        rows.append([name, "marginflow, kink_tol 0 (no kink steps)", reached,
                     off.stats["num_steps"], 0, f"{wall:.2f}", "", ""])
        print(rows[-1], flush=True)
        for dtmin in (1e-4, 1e-5):
            traj, wall = _timed(lambda d=dtmin, f=flow: _baseline(f, model, data, d), 1)
            reached, err = cell(traj, ref)
            ok = traj.success and np.all(np.isfinite(traj.w[-1]))
            margin = f"{float(normalized_margin(model, data, traj.w[-1])):.4f}" if ok else ""
            rows.append([name, f"diffrax Bosh3 + PID(dtmin={dtmin:g}, force_dtmin)", reached,
                         traj.stats["num_steps"], 0, f"{wall:.2f}", margin,
                         err if ok else "-"])  # no w(1e10) to compare
            print(rows[-1], flush=True)
    if args.record:
        from _record import record

        record(
            "kinks",
            ["flow", "integrator", "reached", "steps", "kink steps", "wall (s)",
             "margin", "|w - w(1e-4)| / |w(1e-4)| at 1e10"],
            rows,
            command="python benchmarks/kinks.py --record",
            notes=[
                "MLP(5, 16, 2), ReLU, separable_gaussians(100, 5, seed=0), eps 1e-5, b 0.9, "
                "rtol 1e-8, t1 = 1e10, max_steps 1e5 per segment; wall: compiled, median of "
                f"{args.repeats} for the default, one run otherwise.",
            ],
        )


if __name__ == "__main__":
    main()
