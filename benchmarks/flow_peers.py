"""marginflow vs scipy solve_ivp (LSODA, BDF) on the toy problem, RMSProp flow (issue 5).

Same flow (eps 1e-5, b 0.9), data (toy_dataset(0)), initialisation and tolerances
(rtol 1e-8, atol 1e-12). Prints wall time after compilation (median), marginflow's compile
time separately, vector-field evaluations, the final normalised margins and the ratio.
torchdiffeq is skipped when torch is absent. Run: python benchmarks/flow_peers.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import equinox as eqx
import jax
import marginflow  # noqa: F401
import numpy as np
from marginflow.flows import RMSPropFlow, simulate
from marginflow.models import ToyLeaky, toy_dataset
from marginflow.models._objective import flatten
from peer_scipy_job import EPS, B, rmsprop_field
from scipy.integrate import solve_ivp

RTOL, ATOL = 1e-8, 1e-12


def numpy_field(X, y):
    """The RMSProp flow on the toy model in numpy (peer_scipy_job.py's), counting calls."""
    f, _ = rmsprop_field(X, y)
    calls = [0]

    def counted(t, state):
        calls[0] += 1
        return f(t, state)

    return counted, calls


def margin(p, X, y):
    v, w = p[0], p[1:]
    z = X @ w
    q = y * v * np.where(z >= 0, z, 0.5 * z)
    return q.min() / np.dot(p, p)


def scipy_run(method, p0, X, y, t1):
    f, calls = numpy_field(X, y)
    start = time.perf_counter()
    sol = solve_ivp(
        f, (0.0, t1), np.concatenate([p0, np.zeros(3)]), method=method, rtol=RTOL, atol=ATOL
    )
    wall = time.perf_counter() - start
    return wall, calls[0], sol.success, margin(sol.y[:3, -1], X, y)


def marginflow_run(model, data, t1, repeats):
    flow = RMSPropFlow(EPS, B)
    start = time.perf_counter()
    traj = simulate(flow, model, data, t1, n_save=2, rtol=RTOL, atol=ATOL)
    first = time.perf_counter() - start
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        traj = simulate(flow, model, data, t1, n_save=2, rtol=RTOL, atol=ATOL)
        walls.append(time.perf_counter() - start)
    med = statistics.median(walls)
    return med, first - med, traj


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 repeats, batch of 20")
    parser.add_argument("--record", action="store_true",
                        help="write the tables to docs/data/benchmarks/flow_peers.json")
    args = parser.parse_args()
    rows, notes = [], []
    repeats = 3 if args.quick else 5
    n_batch = 20 if args.quick else 100
    data = toy_dataset(0)
    X, y = np.asarray(data.X, np.float64), np.asarray(data.y, np.float64)
    model = ToyLeaky(key=jax.random.key(0))
    p0 = np.asarray(flatten(model))
    print(
        f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"devices {jax.devices()}"
    )
    print(
        "| t1 | marginflow s (compile s) | steps (evals) | LSODA s (evals) | BDF s (evals) | "
        "LSODA / marginflow | margin diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for t1 in (1e5, 1e30, 1e100):
        med, compile_s, traj = marginflow_run(model, data, t1, repeats)
        mf_margin = margin(traj.w[-1], X, y)
        lsoda = [scipy_run("LSODA", p0, X, y, t1) for _ in range(repeats)]
        bdf = scipy_run("BDF", p0, X, y, t1)
        l_wall = statistics.median(r[0] for r in lsoda)
        diff = abs(lsoda[0][3] - mf_margin)
        # DecayIMEX: 8 field evaluations per step (7 stages + the new state's), 3 at start.
        n = traj.stats["num_steps"]
        rows.append([f"{t1:.0e}", f"{med:.3f} ({compile_s:.1f})", f"{n} ({8 * n + 3})",
                     f"{l_wall:.3f} ({lsoda[0][1]}{'' if lsoda[0][2] else ', failed'})",
                     f"{bdf[0]:.3f} ({bdf[1]}{'' if bdf[2] else ', failed'})",
                     f"{l_wall / med:.1f}x", f"{diff:.1e}"])
        print("| " + " | ".join(rows[-1]) + " |")
    # A batch of initialisations: one call (one chunk per core) against sequential LSODA runs.
    keys = jax.random.split(jax.random.key(7), n_batch)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    t1 = 1e5
    flow = RMSPropFlow(EPS, B)
    start = time.perf_counter()
    simulate(flow, models, data, t1, n_save=2, batch=True, throw=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    bt = simulate(flow, models, data, t1, n_save=2, batch=True, throw=False)
    mf = time.perf_counter() - start
    # The same on one core (workers=1: one vmapped call, no threads), compiled first.
    simulate(flow, models, data, t1, n_save=2, batch=True, throw=False, workers=1)
    start = time.perf_counter()
    simulate(flow, models, data, t1, n_save=2, batch=True, throw=False, workers=1)
    mf1 = time.perf_counter() - start
    start = time.perf_counter()
    w0s = np.asarray(eqx.filter_vmap(flatten)(models))
    margins = [scipy_run("LSODA", w0s[i], X, y, t1)[3] for i in range(n_batch)]
    ls = time.perf_counter() - start
    mf_m = np.array([margin(bt.w[i, -1], X, y) for i in range(n_batch)])
    notes.append(
        f"A batch of {n_batch} initialisations to t1 = 1e5 in one call: marginflow {mf:.2f} s "
        f"(compile {first - mf:.1f} s, result {bt.result}), {n_batch} LSODA runs {ls:.2f} s: "
        f"{ls / mf:.1f}x; max margin difference {np.max(np.abs(mf_m - margins)):.1e}; on one "
        f"core (workers=1) marginflow {mf1:.2f} s, {ls / mf1:.1f}x."
    )
    print("\n" + notes[-1])
    if args.record:
        from _record import record

        record("flow_peers", ["t1", "marginflow s (compile s)", "steps (evals)",
                              "LSODA s (evals)", "BDF s (evals)", "LSODA / marginflow",
                              "margin diff"], rows,
               command="python benchmarks/flow_peers.py" + (" --quick" if args.quick else "")
               + " --record",
               notes=["Median wall time after compilation, compilation in brackets; "
                      f"{repeats} repeats.", *notes])
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        print("torchdiffeq: not installed (torch absent), skipped")


if __name__ == "__main__":
    main()
