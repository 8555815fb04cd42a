"""AdaGrad to t1 = 1e100 with four solver set-ups: whole runs, steps and wall time.

- `DecayIMEX` throughout (`solver=DecayIMEX()`; explicit ARK5 here, AdaGrad has no decay);
- Dopri8 throughout (`solver=diffrax.Dopri8()`);
- Kvaerno5 + Newton-Krylov throughout (`solver=newton_solver(1e-8)`), the implicit option;
- the default: `DecayIMEX`, then Dopri8 from t = 1e10 (`late_solver`). (Until the
  verification bank found it stalling in float32, the default went on with Kvaerno5 +
  Newton-Krylov from 1e10; it was also slower in wall time than the explicit set-ups.)

On the toy, MLP(4, 8, 2, k=2) and DeepLinear(4, 4, 4, 1) of tests/test_long_horizon.py,
rtol 1e-8. Each set-up runs in a fresh Python process, so its first call (compilation
included) is timed as a user meets it; then the median of 3 compiled calls.
Run: python benchmarks/adagrad_late.py
"""

from __future__ import annotations

import os
import subprocess
import sys

SETUPS = {"DecayIMEX throughout": "imex", "Dopri8 throughout": "dopri8",
          "Kvaerno5 + Newton-Krylov throughout": "newton", "default": "default"}
MODELS = {"toy": "toy", "MLP(4, 8, 2, k=2)": "mlp", "DeepLinear(4,4,4,1)": "deep_linear"}


def one(model: str, setup: str) -> None:
    """Run one model and set-up in this process and print 'steps first median'."""
    import statistics
    import time

    import diffrax as dfx
    from marginflow.flows import newton_solver, simulate
    from marginflow.flows._imex import DecayIMEX

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_long_horizon import FLOWS
    from test_long_horizon import MODELS as BUILD

    m, d = BUILD[model]()
    solver = {"imex": DecayIMEX(), "dopri8": dfx.Dopri8(),
              "newton": newton_solver(1e-8)}.get(setup)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        traj = simulate(FLOWS["adagrad"], m, d, 1e100, ts=[0.0, 1e5, 1e100], solver=solver)
        times.append(time.perf_counter() - start)
    print(traj.stats["num_steps"], times[0], statistics.median(times[1:]))


def main() -> None:
    print("AdaGrad (eps 1e-5) to t1 = 1e100, rtol 1e-8: steps, compiled wall time (median of "
          "3), first call in brackets\n")
    print("| run | " + " | ".join(SETUPS) + " |")
    print("|---|" + "---|" * len(SETUPS))
    for label, model in MODELS.items():
        cells = []
        for setup in SETUPS.values():
            out = subprocess.run([sys.executable, __file__, model, setup], check=True,
                                 capture_output=True, text=True).stdout.split()
            steps, first, median = int(out[-3]), float(out[-2]), float(out[-1])
            cells.append(f"{steps} steps, {median:.3f} s ({first:.1f} s)")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        one(*sys.argv[1:])
    else:
        main()
