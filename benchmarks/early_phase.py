"""AdaGrad's and RMSProp's flows on [0, 1] integrated in s = sqrt t against the same flows in
t, side by side, each clock forced; the "default clock" column names the one `simulate`
picks (s where the eps transition of the largest |g(w0)| is over by t = 1e-12,
`flows/_clock.py`).

From m = 0, psi = m grows like t g^2, so once t >> eps / g^2 (eps inside; eps^2 / g^2
outside) dw/dt ~ -sign(g) / sqrt(t): a solver in t spends a constant number of steps per
decade from there to t = 1, and a small eps makes that many decades (fig1's AdaGrad: the
flow of lr 1e-2, eps 1.28e-8 is eps 1.28e-10 outside). In s the field is bounded.

Rows: the toy, the ReLU MLP of issue 14 and a linear model, at the paper's eps and a small
one, to t1 = 1e6. Each row prints the steps on [0, 1] and in all, the compiled wall time
(median of 3 after a first call), and the relative difference of w(t1) between the clocks
against rtol. `--cnn` adds fig1's AdaGrad flow on the quick CNN (128 digits, widths
(4, 8, 32), kink_tol 1e-2) to t = 1e-10, one timed call each (minutes in t).
Run: python benchmarks/early_phase.py [--cnn] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import ClassVar

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
from marginflow.flows import AdaGradFlow, RMSPropFlow, _clock, simulate
from marginflow.models import MLP, Linear, Objective, ToyLeaky, separable_gaussians, toy_dataset

RTOL = 1e-8


# Both clocks through classes defined here, so that both are traced in this process: a
# marginflow class may run from its stored executable (`_stored.py`), which is not what
# this table compares.
class AdaGradInT(AdaGradFlow):
    sqrt_start: ClassVar[bool] = False


class RMSPropInT(RMSPropFlow):
    sqrt_start: ClassVar[bool] = False


class AdaGradInS(AdaGradFlow):
    sqrt_start: ClassVar[bool] = True


class RMSPropInS(RMSPropFlow):
    sqrt_start: ClassVar[bool] = True


def _models():
    gauss = separable_gaussians(100, 5, seed=0)
    return {
        "toy": (ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(seed=0)),
        "ReLU MLP(5, 16, 2)": (MLP(5, 16, 2, activation="relu", key=jax.random.PRNGKey(0)),
                               gauss),
        "linear": (Linear(5, key=jax.random.PRNGKey(0)), gauss),
    }


def _flows(eps, placement):
    return {"AdaGrad": (AdaGradInS(eps, eps_placement=placement),
                        AdaGradInT(eps, eps_placement=placement)),
            "RMSProp": (RMSPropInS(eps, 0.9, eps_placement=placement),
                        RMSPropInT(eps, 0.9, eps_placement=placement))}


def _timed(flow, model, data, t1, repeats, **kw):
    # sqrt t is forced for the classes with sqrt_start (simulate uses it only where the
    # eps transition is over by t = 1e-12, `_clock.SQRT_BELOW`; the "default" column).
    below, _clock.SQRT_BELOW = _clock.SQRT_BELOW, float("inf")
    try:
        begin = time.perf_counter()
        traj = simulate(flow, model, data, t1, n_save=2, rtol=RTOL, throw=False, **kw)
        walls = [time.perf_counter() - begin] if repeats == 0 else []  # compilation included
        for _ in range(repeats):
            begin = time.perf_counter()
            traj = simulate(flow, model, data, t1, n_save=2, rtol=RTOL, throw=False, **kw)
            walls.append(time.perf_counter() - begin)
    finally:
        _clock.SQRT_BELOW = below
    return traj, statistics.median(walls)


def _default(flow, model, data):
    """The clock simulate picks, and t_c of the largest |g(w0)|."""
    objective = Objective(model, data)
    g = np.asarray(objective.log_loss_and_grad(objective.w0())[1])
    t_c = _clock.transition_time(flow, float(np.max(np.abs(g))))
    return f"{'sqrt t' if t_c <= _clock.SQRT_BELOW else 't'} (t_c {t_c:.1e})"


def _cell(traj):
    if traj.result != "successful":
        return traj.result
    return f"{traj.stats['num_steps_per_segment'][0]} / {traj.stats['num_steps']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn", action="store_true", help="add fig1's AdaGrad flow on the CNN")
    parser.add_argument("--record", action="store_true",
                        help="write docs/data/benchmarks/early_phase.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    columns = ["model", "flow", "eps", "default clock", "steps [0,1] / all, sqrt t",
               "steps, t", "wall sqrt t", "wall t", "ratio", "|w_s - w_t| / |w| (rtol 1e-8)"]
    rows = []
    for mname, (model, data) in _models().items():
        for eps, placement in ((1e-5, "inside"), (1e-10, "outside")):
            for fname, (in_s, in_t) in _flows(eps, placement).items():
                a, wall_a = _timed(in_s, model, data, 1e6, args.repeats)
                b, wall_b = _timed(in_t, model, data, 1e6, args.repeats)
                both = a.result == b.result == "successful"
                diff = np.linalg.norm(a.w[-1] - b.w[-1]) / np.linalg.norm(b.w[-1])
                rows.append([mname, fname, f"{eps:g} {placement}",
                             _default(in_s, model, data), _cell(a), _cell(b),
                             f"{wall_a:.3f} s", f"{wall_b:.3f} s",
                             f"{wall_a / wall_b:.2f}" if both else "-",
                             f"{diff:.1e}" if both else "-"])
                print(" | ".join(rows[-1]), flush=True)
    if args.cnn:
        rows.append(_cnn_row())
        print(" | ".join(rows[-1]), flush=True)
    if args.record:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _record import record

        record("early_phase", columns, rows,
               command="python benchmarks/early_phase.py" + (" --cnn" if args.cnn else ""),
               notes=["t1 = 1e6 (fig1's CNN: 1e-10), rtol 1e-8; walls are medians of "
                      f"{args.repeats} compiled calls (the CNN: one call, compilation included).",
                      "nonfinite_state: the run in t stopped at t = 0, its field non-finite "
                      "there; in sqrt t the same flow runs."])


def _cnn_row():
    from marginflow.discrete import AdaGrad, matching_flow
    from marginflow.experiments._mnist import mnist_5k
    from marginflow.models import CNN

    train, _ = mnist_5k(128, 128, seed=0)
    model = CNN(widths=(4, 8, 32), key=jax.random.PRNGKey(0))
    flow = matching_flow(AdaGrad(1e-2, eps=1e-10 * 128, eps_placement="outside"))
    in_s = AdaGradInS(flow.eps, eps_placement="outside")
    out = []
    for f in (in_s, AdaGradInT(flow.eps, eps_placement="outside")):
        out.append(_timed(f, model, train, 1e-10, 0, kink_tol=1e-2))  # one call, compiling
    (a, wall_a), (b, wall_b) = out
    diff = np.linalg.norm(a.w[-1] - b.w[-1]) / np.linalg.norm(b.w[-1])
    return ["fig1's CNN (quick)", "AdaGrad", f"{float(flow.eps):.3g} outside",
            _default(in_s, model, train), _cell(a), _cell(b), f"{wall_a:.1f} s",
            f"{wall_b:.1f} s", f"{wall_a / wall_b:.2f}", f"{diff:.1e}"]


if __name__ == "__main__":
    main()
