"""How fast the direction converges on Soudry et al.'s data: RMSProp flow (eps 1e-5,
b 0.9), Linear, soudry_dataset(0), rtol 1e-8, the default solver.

Prints, at t = 1e5 ... 1e300: the angle to the max-margin direction (1, 1)/sqrt 2, the best
KKT residual of (P) and the paper's eps_rel = sqrt(2 (1 - cos theta)); then fits of the
angle against c / log t and against a power of t, and the local power-law slopes.

    python benchmarks/soudry_kkt_figures.py 1e300            # prints the table and the fits
    python benchmarks/soudry_kkt_figures.py 1e300 --record   # and writes
                                      # docs/data/benchmarks/soudry_kkt.json (docs: theory checks)
Not a timing benchmark: a measurement script, kept here with the other scripts.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from marginflow.analysis import (
    angle,
    conditioner_limit,
    kkt_residual,
    max_margin_linear,
    monotone_quantity,
    rate_fit,
)
from marginflow.flows import RMSPropFlow, simulate
from marginflow.models import Linear, soudry_dataset

WANT = [1e5, 1e10, 1e12, 1e15, 1e20, 1e30, 1e50, 1e100, 1e200, 1e300]
SLOPE_WINDOWS = [(1e5, 1e10), (1e10, 1e15), (1e15, 1e20), (1e20, 1e30), (1e30, 1e45)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("t1", type=float, nargs="?", default=1e14)
    parser.add_argument("--record", action="store_true",
                        help="write the table to docs/data/benchmarks/soudry_kkt.json")
    args = parser.parse_args()
    data = soudry_dataset(0)
    model = Linear(2, key=jax.random.key(0))
    dec = int(np.log10(args.t1))
    ts = np.concatenate([[0.0], np.logspace(-2, dec, 4 * (dec + 2) + 1)])
    start = time.perf_counter()
    traj = simulate(RMSPropFlow(1e-5, 0.9), model, data, args.t1, ts=ts, throw=False)
    head = (f"simulate to {args.t1:.0e}: {time.perf_counter() - start:.1f} s (first call), "
            f"result {traj.result}, reached t = {traj.ts[-1]:.3g}, "
            f"{traj.stats['num_steps']} steps")
    print(head)
    u = np.ones(2) / np.sqrt(2)
    ref = max_margin_linear(data.X, data.y)
    print(f"max_margin_linear direction {ref.direction}, margin {ref.margin} "
          f"(sqrt 2 = {np.sqrt(2)}), verified {ref.verified}")

    rows = []
    for t in WANT:
        i = int(np.argmin(np.abs(traj.ts - t)))
        if abs(traj.ts[i] / t - 1) > 1e-9:
            continue
        k = kkt_residual(model, data, traj.w[i])
        a = float(angle(traj.w[i], u))
        rows.append([f"{traj.ts[i]:.0e}", f"{a:.2e}", f"{float(k.residual_best):.2e}",
                     f"{float(k.eps_paper_rel):.2e}"])
        print(f"t = {traj.ts[i]:.0e}: angle {a:.3e} rad, best KKT residual "
              f"{float(k.residual_best):.3e} (eps {float(k.eps_best_rel):.2e}, delta "
              f"{float(k.delta_best):.2e}), paper eps_rel {float(k.eps_paper_rel):.3e}, "
              f"paper delta {float(k.delta_paper):.3e}")

    # Fits over [1e4, the last save where the angle is above rounding (1e-13 rad)].
    a_all = np.asarray(angle(traj.w, u))
    last = np.nonzero(a_all > 1e-13)[0][-1]
    sel = (traj.ts >= 1e4) & (np.arange(traj.ts.size) <= last)
    t, a = traj.ts[sel], a_all[sel]
    x = np.stack([1 / np.log(t)], 1)
    c, *_ = np.linalg.lstsq(x, a, rcond=None)
    misfit = np.sqrt(np.mean((x @ c - a) ** 2)) / np.sqrt(np.mean(a**2))
    fits = [f"the best c / log t fit of the angle over [1e4, {t[-1]:.0e}] has a relative rms "
            f"misfit of {misfit:.2f}"]
    slopes = []
    for lo, hi in SLOPE_WINDOWS:
        s = (traj.ts >= lo) & (traj.ts <= hi) & (a_all > 1e-13)
        if s.sum() >= 3:
            slope = np.polyfit(np.log(traj.ts[s]), np.log(a_all[s]), 1)[0]
            slopes.append(f"{slope:.3f} ({lo:.0e}..{hi:.0e})")
    fits.append("local slopes of log angle against log t: " + ", ".join(slopes))
    for line in fits:
        print(line)
    mq = monotone_quantity(traj, model, data)
    print(f"monotone quantity: t0 {mq.t0}, max drop {mq.max_drop}")
    print(rate_fit(traj))
    cl = conditioner_limit(traj)
    print(f"h_inf sqrt(eps) - 1: {np.max(np.abs(cl.h_inf * np.sqrt(1e-5) - 1)):.2e}, "
          f"last decade change {cl.last_decade_change:.2e}")
    if args.record:
        from _record import record

        record("soudry_kkt", ["t", "angle to (1,1)/sqrt 2 (rad)", "best KKT residual of (P)",
                              "paper's eps_rel = sqrt(2 (1 - cos theta))"], rows,
               command=f"python benchmarks/soudry_kkt_figures.py {args.t1:g} --record",
               notes=[head + "; " + "; ".join(fits) + "."])


if __name__ == "__main__":
    main()
