"""How well a ReLU MLP's flow determines w(t1): runs from w0 moved by 1e-10 (relative).

The problem of benchmarks/kinks.py (MLP(5, 16, 2) with ReLU on separable_gaussians(100, 5,
seed=0), eps 1e-5, b 0.9, rtol 1e-8, t1 = 1e10), saved at t = 1e-2, 1, 1e2 and 1e10
instead of kinks.py's n_save = 20 (the save times change the compiled program, and with
it which outcome a DecayIMEX run at kink_tol 1e-3 takes: 2.8e-4 here; 1.4e-3 in one
recording of kinks.py's table and 2.8e-4 in the latest). For
RMSProp and Adam, at kink_tol 1e-4 and at the default 1e-3: one run from w0 and N runs
from w0 + e, e random with |e| = 1e-10 |w0| (rounding-sized changes). Printed per flow
and kink_tol:
- |w(t) - w_ref(t)| / |w_ref(t)| of each run at the save times, where w_ref is the
  unperturbed run at kink_tol 1e-4 with the default solver (DecayIMEX);
- the largest relative distance between two runs at the same kink_tol at t1;
- at kink_tol 1e-3, each run's distance at t1 to the kink_tol 1e-4 run (DecayIMEX) from
  the same start (the issue's measure, once per start);
- the same at kink_tol 1e-3 with solver=DecayHeun() (the option docs/solvers.md weighs
  against DecayIMEX), still against the DecayIMEX runs at 1e-4.
A spread among the runs at one kink_tol comes from the integrator: a rounding-sized change
flips a discrete choice of its kink steps (DecayIMEX). A comparison with the tighter run
says nothing below that spread. What is seen and why: docs/solvers.md, "How well the runs
determine w(t1)".
Instead of that, with
  --branches   where each flow's run meets a switching surface that turns from sliding to
               repelling (marginflow.analysis.switching_surfaces), and Adam's branch point
               at kink_tol 1e-3 and 1e-4 in detail (a minute);
  --figure PNG Adam's branch point drawn: the normal velocities on each side of the
               surface and the output weight a_11, and DecayHeun's runs at kink_tol
               1e-3 and 1e-4 leaving it on opposite sides (a minute);
  --part       where the default runs at kink_tol 1e-3 and 1e-4 part (RMSProp, Adam): their
               distance at dense saves, and the side Adam's runs take at its branch
               point (a minute);
  --discrete   discrete Adam (b1 = 0) through that branch point, against the flow it
               follows: the side each run leaves on at 25 steps eta, and distances at 6
               of them (five minutes);
  --series     DecayHeun's own runs at kink_tol 1e-3, 3e-4 and 1e-4 (Adam also 3e-5 and
               1e-5), and Adam's compiled time by default and with DecayHeun at 1e-4
               (three minutes);
  --few-kinks  DecayIMEX against DecayHeun on a ReLU MLP with few kinks (a minute).
Run: python benchmarks/kinks_reproducibility.py [--n 6] [--flows rmsprop,adam]
(about 5 minutes on 2 cores with --n 6; printed only)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from kinks import FLOWS, _timed  # the flows (eps 1e-5, b 0.9); compile, then median
from marginflow.analysis import switching_surfaces
from marginflow.discrete import matching_optimizer, run
from marginflow.flows import AdamFlow, DecayHeun, simulate
from marginflow.models import MLP, flatten, separable_gaussians, unflatten

TS = (1e-2, 1.0, 1e2, 1e10)


def _rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


# Adam's branch point (--branches): hidden unit 11's surface for sample 53.
UNIT, SAMPLE = 11, 53


def _z(model, data, w) -> float:
    """<w_11, x_53> at the flat state w: its sign is the side of the surface."""
    w1 = np.asarray(unflatten(model, jnp.asarray(w)).weights[0])[UNIT]
    return float(w1 @ np.asarray(data.X)[SAMPLE])


def _a(model, w) -> float:
    """The output weight a_11 of unit 11 at the flat state w."""
    return float(unflatten(model, jnp.asarray(w)).weights[1][0, UNIT])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="perturbed runs per kink_tol")
    parser.add_argument("--flows", default="rmsprop,adam")
    parser.add_argument("--figure", metavar="PNG",
                        help="only: draw Adam's branch point (docs/gallery/adam_branch.png)")
    for flag, what in (
            ("--branches", "where each flow's run meets a surface that turns repelling"),
            ("--part", "where the default runs at kink_tol 1e-3 and 1e-4 part"),
            ("--discrete", "discrete Adam at several steps through Adam's branch point"),
            ("--series", "DecayHeun's own runs at kink_tol 1e-3 to 1e-4 (Adam to 1e-5)"),
            ("--few-kinks", "DecayIMEX against DecayHeun on a ReLU MLP with few kinks")):
        parser.add_argument(flag, action="store_true", help=f"only: {what}")
    args = parser.parse_args()
    data = separable_gaussians(100, 5, seed=0)
    model = MLP(5, 16, 2, key=jax.random.PRNGKey(0))
    if args.branches:
        branches(model, data)
    if args.figure:
        figure(model, data, args.figure)
    if args.part:
        part(model, data)
    if args.discrete:
        discrete(model, data)
    if args.series:
        series(model, data)
    if args.few_kinks:
        few_kinks()
    if args.branches or args.figure or args.part or args.discrete or args.series or args.few_kinks:
        return
    theta = np.asarray(flatten(model))
    rng = np.random.default_rng(1)
    starts = [theta]
    for _ in range(args.n):
        e = rng.standard_normal(theta.shape)
        starts.append(theta + e * (1e-10 * np.linalg.norm(theta) / np.linalg.norm(e)))
    for name in args.flows.split(","):
        flow = FLOWS[name]

        def w_of(w0, tol, solver, flow=flow):
            kw = {} if solver is None else {"solver": solver}
            traj = simulate(flow, unflatten(model, w0), data, TS[-1], ts=TS, kink_tol=tol,
                            **kw)
            assert traj.success, traj.message
            return np.asarray(traj.w)

        tight = None
        for tol, solver in ((1e-4, None), (1e-3, None), (1e-3, DecayHeun())):
            clock = time.perf_counter()
            ws = [w_of(w0, tol, solver) for w0 in starts]
            tight = ws if tight is None else tight
            ref = tight[0]
            d = np.array([_rel(w, ref) for w in ws])  # (runs, times)
            spread = max(_rel(a[-1], b[-1]) for i, a in enumerate(ws) for b in ws[i + 1:])
            which = "" if solver is None else ", solver=DecayHeun()"
            print(f"{name}, kink_tol {tol:g}{which} ({len(ws)} runs, the first from w0 itself, "
                  f"{time.perf_counter() - clock:.0f} s): distance to the unperturbed "
                  "kink_tol 1e-4 run (default solver)")
            for j, t in enumerate(TS):
                print(f"  t = {t:<6g} " + " ".join(f"{x:.1e}" for x in d[:, j]))
            print(f"  largest distance between two of these runs at t1: {spread:.1e}")
            if tol != 1e-4:
                same = [_rel(w[-1], w_tight[-1]) for w, w_tight in zip(ws, tight, strict=True)]
                print("  at t1, distance to the kink_tol 1e-4 run (default solver) from the "
                      "same start: " + " ".join(f"{x:.1e}" for x in same))
            print(flush=True)


def branches(model, data) -> None:
    """Where each flow's run meets a switching surface that turns from sliding to repelling
    (`marginflow.analysis.switching_surfaces`): the four flows at the default kink_tol,
    801 saves from t = 1e-4 to 1e4; then Adam's runs at kink_tol 1e-3 and 1e-4 saved every
    1e-3 over [0.07, 0.13], with unit 11's surface for sample 53 and its output weight."""
    ts = np.geomspace(1e-4, 1e4, 801)
    for name, flow in FLOWS.items():
        traj = simulate(flow, model, data, ts[-1], ts=ts)
        found = switching_surfaces(traj, model, data)
        counts = dict(Counter(found.kinds()))
        print(f"{name}: triples within 1e-3 of their surface {counts}, "
              f"{int(found.junction.sum())} of them at junctions; branch points "
              f"(t, unit, sample): {found.branch_points()}", flush=True)
    ts = np.linspace(0.07, 0.13, 61)
    for tol in (1e-3, 1e-4):
        traj = simulate(FLOWS["adam"], model, data, ts[-1], ts=ts, kink_tol=tol)
        found = switching_surfaces(traj, model, data)
        print(f"adam, kink_tol {tol:g}, saves every 1e-3 on [0.07, 0.13]: branch points "
              f"{found.branch_points()}; unit 11, sample 53 (z relative, velocity above / "
              "below, kind, output weight a_11):")
        for k in np.flatnonzero((found.unit == 11) & (found.sample == 53))[::3]:
            a11 = _a(model, traj.w[found.save[k]])
            print(f"  t = {found.ts[k]:.3f}  z {found.z[k]:+.1e}  {found.above[k]:+.2e} / "
                  f"{found.below[k]:+.2e}  {found.kinds()[k]:<9}  a_11 {a11:+.2e}")


def figure(model, data, path) -> None:
    """Adam's branch point drawn: left, the normal velocities of unit 11's surface for
    sample 53 on each side, and the unit's output weight a_11, along the default run at
    kink_tol 1e-4 (saves every 1e-3 on [0.07, 0.13]); right, <w_11, x_53> / (|w_11||x_53|)
    along DecayHeun's runs at kink_tol 1e-3 and 1e-4, which leave it on opposite sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X = np.asarray(data.X)
    ts = np.linspace(0.07, 0.13, 61)
    traj = simulate(FLOWS["adam"], model, data, ts[-1], ts=ts, kink_tol=1e-4)
    found = switching_surfaces(traj, model, data)
    pair = np.flatnonzero((found.unit == 11) & (found.sample == 53))
    a11 = [_a(model, traj.w[s]) for s in found.save[pair]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    left.plot(found.ts[pair], found.above[pair], "C3.-", label=r"$\dot z$ just above")
    left.plot(found.ts[pair], found.below[pair], "C0.-", label=r"$\dot z$ just below")
    left.axhline(0, color="0.6", lw=0.8)
    for t, _, _ in found.branch_points():
        left.axvline(t, color="k", ls=":", lw=1)
    weight = left.twinx()
    weight.plot(found.ts[pair], a11, "k--", lw=1)
    weight.set_ylabel(r"output weight $a_{11}$ (dashed)")
    left.set_ylim(-1.0, 0.5)  # the two axes' zeros at one height: a_11 = 0 where they cross
    weight.set_ylim(-0.02, 0.01)
    left.set(xlabel="t", ylabel=r"normal velocity of $z_{11,53}$",
             title="sliding (above < 0 < below), then repelling")
    left.legend(loc="lower right", fontsize=8)
    grid = np.linspace(0.07, 0.2, 131)
    for tol, style in ((1e-3, "C2-"), (1e-4, "C1-")):
        w = np.asarray(simulate(FLOWS["adam"], model, data, grid[-1], ts=grid, kink_tol=tol,
                                solver=DecayHeun()).w)
        norms = [np.linalg.norm(unflatten(model, jnp.asarray(v)).weights[0][UNIT]) for v in w]
        z = np.array([_z(model, data, v) for v in w]) / norms / np.linalg.norm(X[SAMPLE])
        right.plot(grid, z, style, label=f"DecayHeun, kink_tol {tol:g}")
    right.axhline(0, color="0.6", lw=0.8)
    right.set(xlabel="t", ylabel=r"$z_{11,53} / (\|w_{11}\| \|x_{53}\|)$",
              title="two runs leave it on opposite sides")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}; branch points {found.branch_points()}", flush=True)


def part(model, data) -> None:
    """Where the default (DecayIMEX) runs at kink_tol 1e-3 and 1e-4 from w0 part: both
    saved at 161 times from 1e-3 to 1 and at 1e10, their relative distance at every tenth
    save; for Adam, the side of unit 11's surface for sample 53 (its branch point near
    t = 0.097, --branches) each run is on at t = 0.2. The save times are part of the
    compiled program, so these runs may take other outcomes than the main table's
    (module docstring)."""
    ts = np.concatenate([np.geomspace(1e-3, 1.0, 161), [1e10]])
    k_side = int(np.argmin(np.abs(ts - 0.2)))
    for name in ("rmsprop", "adam"):
        w = {tol: np.asarray(simulate(FLOWS[name], model, data, ts[-1], ts=ts,
                                      kink_tol=tol).w) for tol in (1e-3, 1e-4)}
        d = _rel(w[1e-3], w[1e-4])
        print(f"{name}: distance between the runs at kink_tol 1e-3 and 1e-4 at t = "
              + ", ".join(f"{ts[k]:.3g}: {d[k]:.1e}" for k in [*range(0, 161, 10), 161]))
        if name == "adam":
            z = {tol: _z(model, data, v[k_side]) for tol, v in w.items()}
            print(f"  <w_11, x_53> at t = {ts[k_side]:.3g}: "
                  + ", ".join(f"kink_tol {tol:g}: {x:+.1e}" for tol, x in z.items()),
                  flush=True)


def discrete(model, data) -> None:
    """Discrete Adam (b1 = 0) at step eta against the flow it follows (AdamFlow with the
    'ema' bias correction, `matching_optimizer`), through the branch point near t = 0.1:
    the side of unit 11's surface for sample 53 each run leaves on, and pairwise
    distances at t = 0.4."""
    flow = AdamFlow(1e-5, 0.9, bias_correction="ema")
    grid = np.array([0.09, 0.1, 0.11, 0.4])
    runs = {}
    window = np.linspace(0.07, 0.13, 61)
    found = switching_surfaces(simulate(flow, model, data, window[-1], ts=window,
                                        solver=DecayHeun()), model, data)
    print(f"the 'ema' flow's branch points on [0.07, 0.13]: {found.branch_points()}")
    for tol in (1e-3, 1e-4, 1e-5):
        runs[f"flow, kink_tol {tol:g}"] = np.asarray(simulate(
            flow, model, data, grid[-1], ts=grid, kink_tol=tol, solver=DecayHeun(),
            max_steps=1_000_000).w)
    sides = []
    for eta in np.geomspace(1e-3, 3e-6, 25):  # which side each leaves on
        traj = run(matching_optimizer(flow, float(eta)), model, data,
                   int(round(0.11 / eta)), save_every=int(round(0.11 / eta)))
        side = "above" if _z(model, data, np.asarray(traj.w)[-1]) > 0 else "below"
        sides.append(f"{eta:.2g}: {side}")
    print("discrete Adam at 25 steps eta, side of unit 11's surface for sample 53 at t = "
          "0.11: " + ", ".join(sides))
    for eta in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6):
        traj = run(matching_optimizer(flow, eta), model, data, int(round(grid[-1] / eta)),
                   save_every=int(round(0.01 / eta)))
        ts = np.asarray(traj.ts)
        runs[f"discrete, eta {eta:g}"] = np.asarray(traj.w)[
            [int(np.argmin(np.abs(ts - t))) for t in grid]]
    print("z = <w_11, x_53> at t = " + ", ".join(f"{t:g}" for t in grid[:3]) + "; then the "
          "distance at t = 0.4 to each run, in the order listed")
    for label, w in runs.items():
        z = [_z(model, data, x) for x in w[:3]]
        far = [_rel(w[-1], other[-1]) for other in runs.values()]
        side = "above" if z[2] > 0 else "below"
        print(f"  {label:<22} " + " ".join(f"{x:+.1e}" for x in z) + f"  ({side})  "
              + " ".join(f"{x:.1e}" for x in far), flush=True)


def series(model, data) -> None:
    """DecayHeun's own runs from w0 at kink_tol 1e-3, 3e-4 and 1e-4 (Adam also 3e-5 and
    1e-5): steps, and pairwise distances at the save times; then Adam's compiled wall time
    to 1e10 by default and with DecayHeun at kink_tol 1e-4 (median of 3)."""
    for name, tols in (("rmsprop", (1e-3, 3e-4, 1e-4)),
                       ("adam", (1e-3, 3e-4, 1e-4, 3e-5, 1e-5))):
        runs = {tol: simulate(FLOWS[name], model, data, TS[-1], ts=(0.2, *TS[1:]),
                              kink_tol=tol, solver=DecayHeun(), max_steps=2_000_000)
                for tol in tols}
        print(f"{name}, DecayHeun, steps: " + ", ".join(
            f"{tol:g}: {runs[tol].stats['num_steps']}" for tol in tols))
        if name == "adam":  # the side of its branch point (--branches) each run is on
            z = [_z(model, data, traj.w[0]) for traj in runs.values()]
            print("  <w_11, x_53> at t = 0.2: " + ", ".join(
                f"{tol:g}: {x:+.1e}" for tol, x in zip(tols, z, strict=True)))
        w = {tol: np.asarray(traj.w) for tol, traj in runs.items()}
        for one, other in [(a, b) for k, a in enumerate(tols) for b in tols[k + 1:]]:
            print(f"  kink_tol {one:g} against {other:g} at t = "
                  + ", ".join(f"{t:g}" for t in (0.2, *TS[1:])) + ": "
                  + " ".join(f"{x:.1e}" for x in _rel(w[one], w[other])), flush=True)
    for label, kw in (("default (DecayIMEX, kink_tol 1e-3)", {}),
                      ("DecayHeun, kink_tol 1e-4", {"solver": DecayHeun(), "kink_tol": 1e-4})):
        traj, seconds = _timed(
            lambda kw=kw: simulate(FLOWS["adam"], model, data, 1e10, **kw), 3)
        print(f"adam to 1e10, {label}: {traj.stats['num_steps']} steps, {seconds:.2f} s "
              "(median of 3, compiled)", flush=True)


def few_kinks() -> None:
    """A ReLU MLP with few kinks, MLP(2, 4, 2) on separable_gaussians(8, 2, seed=0), to
    1e10: DecayIMEX (the default) against DecayHeun, steps and compiled wall time."""
    data = separable_gaussians(8, 2, seed=0)
    model = MLP(2, 4, 2, key=jax.random.PRNGKey(0))
    for name in ("rmsprop", "adam"):
        for solver in (None, DecayHeun()):
            kw = {} if solver is None else {"solver": solver}

            traj, seconds = _timed(
                lambda kw=kw, name=name: simulate(FLOWS[name], model, data, 1e10, **kw), 3)
            print(f"{name}, {'DecayHeun' if solver else 'default (DecayIMEX)'}: "
                  f"{traj.stats['num_steps']} steps, {traj.stats['num_kink_steps']} kink "
                  f"steps, {seconds:.3f} s (median of 3, compiled)", flush=True)


if __name__ == "__main__":
    main()
