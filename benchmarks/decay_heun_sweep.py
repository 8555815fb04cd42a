"""DecayHeun against DecayIMEX for the RMSProp flow on ReLU MLPs of several sizes.

Is there a rule by model size for the default solver of the flows with a decay on ReLU
MLPs? Six ReLU MLPs (widths 4 to 32, 8 to 200 points of separable_gaussians; switching
surfaces = points x hidden units from 32 to 6,400), RMSPropFlow(1e-5, 0.9) to t1 = 1e10 at
the default kink_tol (1e-3): steps, kink steps, compiled wall time (median of 3) for each
solver, and the distance |w - w_ref| / |w_ref| at t1 to the default run at kink_tol 1e-4.
Printed only (docs/solvers.md quotes one run).

    python benchmarks/decay_heun_sweep.py   # about 4 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import time

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
from marginflow.flows import DecayHeun, RMSPropFlow, simulate
from marginflow.models import MLP, separable_gaussians

CASES = [(2, 4, 8, 1), (3, 8, 16, 5), (4, 8, 32, 0), (5, 16, 100, 0), (3, 16, 64, 2),
         (5, 32, 200, 0)]  # (input dim, width, points, seed)


def main():
    flow = RMSPropFlow(1e-5, 0.9)
    for d, width, n, seed in CASES:
        data = separable_gaussians(n, d, seed=seed)
        model = MLP(d, width, 2, key=jax.random.key(seed))
        runs = {}
        for name, kw in [("DecayIMEX", {}), ("DecayHeun", {"solver": DecayHeun()}),
                         ("reference", {"kink_tol": 1e-4})]:
            def call(kw=kw, model=model, data=data):
                return simulate(flow, model, data, 1e10, n_save=4, max_steps=200_000, **kw)

            traj, times = call(), []
            for _ in range(1 if name == "reference" else 3):
                start = time.perf_counter()
                traj = call()
                times.append(time.perf_counter() - start)
            runs[name] = (traj, statistics.median(times))
        w_ref = np.asarray(runs["reference"][0].w[-1])
        for name in ("DecayIMEX", "DecayHeun"):
            traj, wall = runs[name]
            err = np.linalg.norm(np.asarray(traj.w[-1]) - w_ref) / np.linalg.norm(w_ref)
            print(f"MLP({d}, {width}, 2), {n} points ({n * width} surfaces), {name}: "
                  f"{traj.stats['num_steps']} steps ({traj.stats.get('num_kink_steps', 0)} "
                  f"kink steps), {wall:.3f} s, {err:.1e} from kink_tol 1e-4", flush=True)


if __name__ == "__main__":
    main()
