"""The default solver by wall time: every candidate on each (flow, model) row of the step
table, to t1 = 1e100, compiled and on a first call.

Rows: GD, AdaGrad, RMSProp, Adam (eps 1e-5, b 0.9) and the momentum flows (b1 = 0) on the
toy, MLP(4, 8, 2, k=2) and DeepLinear(4, 4, 4, 1) of tests/test_long_horizon.py, rtol 1e-8,
saves at 0, 1e5, 1e100.
Candidates:
- the default (`solver=None`): Dopri8 for GD and AdaGrad, `DecayIMEX` for the flows with
  a decay, each for the whole run;
- `DecayIMEX` throughout for GD and AdaGrad (for the others it is the default; an
  explicit solver is no candidate there: their moments decay at the rate (1 - b) t in
  u = log t, 1e99 at t = 1e100, and an explicit step is stable only below about
  3 / ((1 - b) t));
- Kvaerno5 + Newton-Krylov throughout (`newton_solver(1e-8)`; for the flows with a decay
  only on the toy's RMSProp row, see `candidates`).
Each (row, candidate) runs in a fresh process with an empty compilation cache, so its first
call (tracing and compiling included) is timed as a new user meets it; then the median of
3 compiled calls. It prints whether the default's compiled time is within 1.1x of the
fastest candidate's, and the default's steps(1e100) / steps(1e5), a check on the cost of
the late decades relative to the early ones.
Run: python benchmarks/solver_choice.py [--record]   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

FLOWS = ("gd", "adagrad", "rmsprop", "adam", "momentum", "adam_momentum")
MODELS = {"toy": "toy", "mlp": "MLP(4, 8, 2, k=2)", "deep_linear": "DeepLinear(4, 4, 4, 1)"}


def candidates(flow: str, model: str) -> list[str]:
    if flow in ("gd", "adagrad"):  # the default is Dopri8 throughout
        return ["default", "imex", "newton"]
    # The default is DecayIMEX throughout here, and an explicit solver is unstable.
    # Kvaerno5 + Newton-Krylov is run on the toy with RMSProp only: it ran out of steps
    # there after 71 s (max_steps_reached in [1e10, 1e20]), and each such run costs a
    # minute; the other rows of the flows with a decay have no working alternative.
    return ["default", "newton"] if (flow, model) == ("rmsprop", "toy") else ["default"]


LABELS = {"default": "default", "imex": "DecayIMEX", "dopri8": "Dopri8",
          "newton": "Kvaerno5 + Newton"}


def one(flow: str, model: str, setup: str) -> None:
    """One (flow, model, set-up) in this process: prints 'steps steps_1e5 first median'."""
    import statistics
    import time

    import diffrax as dfx
    from marginflow.flows import newton_solver, simulate
    from marginflow.flows._imex import DecayIMEX

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_long_horizon import FLOWS as FLOW_OBJECTS
    from test_long_horizon import MODELS as BUILD

    m, d = BUILD[model]()
    solver = {"imex": DecayIMEX(), "dopri8": dfx.Dopri8(),
              "newton": newton_solver(1e-8)}.get(setup)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        traj = simulate(FLOW_OBJECTS[flow], m, d, 1e100, ts=[0.0, 1e5, 1e100], solver=solver,
                        throw=False)
        times.append(time.perf_counter() - start)
    ends = traj.stats["segment_ends"]
    per = traj.stats["num_steps_per_segment"]
    to_1e5 = sum(n for n, end in zip(per, ends, strict=False) if end <= 1e5)
    ok = traj.result == "successful"
    print(traj.stats["num_steps"] if ok else -1, to_1e5, times[0], statistics.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true",
                        help="write the table to docs/data/benchmarks/solver_choice.json")
    args = parser.parse_args()
    rows, verdicts = [], []
    print("(flow, model): steps to 1e100, compiled wall time (median of 3), first call")
    for flow in FLOWS:
        for model, label in MODELS.items():
            results = {}
            for setup in candidates(flow, model):
                env = {**os.environ, "MARGINFLOW_CACHE_DIR": tempfile.mkdtemp()}
                out = subprocess.run([sys.executable, __file__, flow, model, setup], env=env,
                                     check=True, capture_output=True, text=True).stdout.split()
                steps, to_1e5 = int(out[-4]), int(out[-3])
                results[setup] = (steps, to_1e5, float(out[-2]), float(out[-1]))
            done = {k: v for k, v in results.items() if v[0] > 0}
            fastest = min(done, key=lambda k: done[k][3])
            steps, to_1e5, first, compiled = results["default"]
            ratio = compiled / done[fastest][3]
            growth = steps / to_1e5
            verdict = "yes" if ratio <= 1.1 else "NO"
            verdicts.append(verdict)
            cells = [f"{v[0]} steps, {v[3]:.3f} s ({v[2]:.1f} s)" if v[0] > 0 else
                     f"failed ({v[2]:.1f} s)" for v in results.values()]
            print(f"{flow} / {label}: " + "; ".join(
                f"{LABELS[k]} {c}" for k, c in zip(results, cells, strict=True))
                + f"; fastest {LABELS[fastest]}, default / fastest {ratio:.2f} ({verdict}), "
                f"steps(1e100) / steps(1e5) {growth:.2f}", flush=True)
            by = dict(zip(results, cells, strict=True))
            rows.append([flow, label, by["default"], by.get("imex", "= default"),
                         by.get("newton", "not run (failed on the toy's RMSProp row)"),
                         f"{ratio:.2f} ({verdict})", f"{growth:.2f}"])
    print(f"default within 1.1x of the fastest compiled on {verdicts.count('yes')} of "
          f"{len(verdicts)} rows")
    if args.record:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _record import record

        record("solver_choice", ["flow", "model", "default", "DecayIMEX throughout",
                                 "Kvaerno5 + Newton throughout",
                                 "default / fastest compiled (within 1.1x?)",
                                 "default's steps(1e100) / steps(1e5)"], rows,
               command="python benchmarks/solver_choice.py --record",
               notes=["Cells: steps to t = 1e100, compiled wall time (median of 3 calls), "
                      "the first call of a fresh process with an empty compilation cache "
                      "in brackets. The last column is a check on the late decades' cost, "
                      "relative to the early ones."])


if __name__ == "__main__":
    if len(sys.argv) == 4:
        one(*sys.argv[1:])
    else:
        main()
