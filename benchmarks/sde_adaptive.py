"""The adaptive flows' SDEs (`flows.simulate_sde`) against minibatch runs, side by side.

The problem of tests/test_sde_adaptive.py: Linear(2) on separable_gaussians(16, 2, seed=0),
the logistic loss, batches of 4 drawn without replacement afresh at each step, each flow's
run `matching_optimizer(flow, eta)`, flow time t = k eta, compared at T = 5.
1. Weak error, per flow, at eta = 0.05, 0.025, 0.0125 over 4096 paths and 4096 runs: the
   difference of the means of log L(T) and ||w(T)|| (with its Monte Carlo standard error),
   the fitted log-log slope of that difference in eta, and the ratio of the variances.
2. Cost: 256 paths against 256 runs at eta = 0.05 (compiled, median of `--repeats`).
3. The square-root scaling rule on a problem whose gradient noise dominates its second
   moment: (B, eta, b, eps) and (4B, 2 eta, 1 - 2 (1 - b), 4 eps) compared at the same
   number of samples seen (t' = t / 2), runs against runs and SDE against SDE. (At
   B = 8, eta = 0.1, b = 0 the second moment's relative noise is ~30% and the Gaussian
   m2 crosses 0: the SDE's variance came out 3x the runs'; this choice keeps
   eta (1 - b) <= 0.008.)
Run: python benchmarks/sde_adaptive.py [--record] [--repeats 3]   (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import numpy as np
from marginflow.discrete import matching_optimizer, run
from marginflow.flows import AdaGradFlow, AdamFlow, MomentumFlow, RMSPropFlow, simulate_sde
from marginflow.models import Dataset, Linear, separable_gaussians

N, B, T, P = 16, 4, 5.0, 4096
ETAS = (0.05, 0.025, 0.0125)
LOSS = "logistic"
FLOWS = {
    "RMSPropFlow(0.1, 0.5)": RMSPropFlow(0.1, 0.5),
    "RMSPropFlow(1e-5, 0.9) (paper)": RMSPropFlow(1e-5, 0.9),
    "RMSPropFlow(0.1, 0.5, outside)": RMSPropFlow(0.1, 0.5, eps_placement="outside"),
    "AdamFlow(0.1, 0.5, ema)": AdamFlow(0.1, 0.5, bias_correction="ema"),
    "AdamFlow(0.1, 0.5, b1=0.5, ema)": AdamFlow(0.1, 0.5, b1=0.5, bias_correction="ema"),
    "AdaGradFlow(0.1)": AdaGradFlow(0.1),
    "MomentumFlow(0.5)": MomentumFlow(0.5),
}


def _problem():
    return Linear(2, key=jax.random.key(0)), separable_gaussians(N, 2, seed=0)


def _pair(flow, model, data, b, eta, t1, paths, keys=(1, 2)):
    """(SDE, runs) of `paths` each, saved at t1 (t1 / eta steps)."""
    steps = round(t1 / eta)
    models = eqx.filter_vmap(lambda k: model)(jax.random.split(jax.random.key(0), paths))

    def sde():
        return simulate_sde(flow, model, data, t1, batch_size=b, eta=eta, n_paths=paths,
                            key=jax.random.key(keys[0]), ts=[t1], loss=LOSS,
                            brownian="increments")

    def runs():
        return run(matching_optimizer(flow, eta), models, data, steps, batch_size=b,
                   sampling="independent", key=jax.random.split(jax.random.key(keys[1]),
                                                                paths),
                   batch=True, save_every=steps, loss=LOSS)

    return sde, runs


def _stats(traj):
    return (np.asarray(traj.log_loss)[:, -1],
            np.linalg.norm(np.asarray(traj.w)[:, -1], axis=-1))


def _weak_error(name: str, flow) -> list:
    model, data = _problem()
    errs, cells = [[], []], []
    for eta in ETAS:
        sde, runs = _pair(flow, model, data, B, eta, T, P)
        s, d = _stats(sde()), _stats(runs())
        for k in (0, 1):
            errs[k].append(abs(s[k].mean() - d[k].mean()))
        se = np.sqrt(s[0].var() / P + d[0].var() / P)
        cells.append(f"{errs[0][-1]:.1e} ± {se:.0e} / {errs[1][-1]:.1e}; "
                     f"{s[0].var() / d[0].var():.3f} / {s[1].var() / d[1].var():.3f}")
    slopes = [np.polyfit(np.log(ETAS), np.log(e), 1)[0] for e in errs]
    return [name, *cells, f"{slopes[0]:.2f} / {slopes[1]:.2f}"]


def _timed(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cost(repeats: int) -> list[list]:
    model, data = _problem()
    rows = []
    for name in ("RMSPropFlow(1e-5, 0.9) (paper)", "AdamFlow(0.1, 0.5, b1=0.5, ema)"):
        sde, runs = _pair(FLOWS[name], model, data, B, 0.05, T, 256)
        ts, td = _timed(sde, repeats), _timed(runs, repeats)
        rows.append([name, f"{round(T / 0.05)}", f"{ts:.3f}", f"{td:.3f}", f"{ts / td:.0f}x"])
    return rows


def noisy_problem():
    """64 Gaussian points in 2-D with labels that are a coin flip: the mean gradient is
    small against the per-sample spread, so the batch noise dominates g_B^2."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 2))
    y = np.where(rng.random(64) < 0.5, 1.0, -1.0)
    return Linear(2, key=jax.random.key(0)), Dataset(X, y)


def _scaling_rule() -> list[list]:
    model, data = noisy_problem()
    b, eta, kappa, t1, eps, decay = 2, 0.02, 4, 4.0, 1e-3, 0.1
    rows = []
    for label, bb, e, flow in (
            ("(B, eta)", b, eta, RMSPropFlow(eps, 1 - decay)),
            ("(4B, 2 eta)", kappa * b, np.sqrt(kappa) * eta,
             RMSPropFlow(kappa * eps, 1 - np.sqrt(kappa) * decay))):
        t = t1 * eta / e  # the same number of samples seen: steps / kappa
        sde, runs = _pair(flow, model, data, bb, e, t, P, keys=(3, 4))
        s_traj = sde()
        s, d = _stats(s_traj), _stats(runs())
        rows.append([label, f"{bb}", f"{e:g}", f"{flow.b:.2g}", f"{flow.eps:g}",
                     f"{round(t / e)}", f"{d[0].mean():.5f} / {s[0].mean():.5f}",
                     f"{d[0].var():.3e} / {s[0].var():.3e}",
                     f"{d[1].var():.3e} / {s[1].var():.3e}",
                     f"{s_traj.stats['paths_m2_negative']}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cols = ["flow", *(f"eta = {e:g}: |mean err| log L ± MC / ||w||; Var ratio log L / ||w||"
                      for e in ETAS), "slope log L / ||w||"]
    rows = []
    for name, flow in FLOWS.items():
        rows.append(_weak_error(name, flow))
        print(dict(zip(cols, rows[-1], strict=True)), flush=True)
    ccols = ["flow", "steps", "256 paths (s)", "256 runs (s)", "paths / runs"]
    crows = _cost(args.repeats)
    for r in crows:
        print(dict(zip(ccols, r, strict=True)), flush=True)
    scols = ["rule", "batch", "eta", "b", "eps", "steps", "mean log L: runs / SDE",
             "Var log L: runs / SDE", "Var ||w||: runs / SDE", "paths with m2 < 0"]
    srows = _scaling_rule()
    for r in srows:
        print(dict(zip(scols, r, strict=True)), flush=True)
    if args.record:
        from _record import record

        cmd = "python benchmarks/sde_adaptive.py --record"
        record("sde_adaptive", cols, rows, command=cmd, notes=[
            f"Linear(2), separable_gaussians({N}, 2, seed=0), {LOSS} loss, batch {B} drawn "
            f"afresh each step, T = {T:g}, {P} paths (independent increments, 4 "
            "Euler-Maruyama steps per step, the first 16 steps exact, 64 for AdaGrad, none "
            "for heavy ball) against "
            f"{P} runs of matching_optimizer(flow, eta)."])
        record("sde_adaptive_cost", ccols, crows, command=cmd, notes=[
            f"The same problem, eta = 0.05, T = {T:g}; compiled, median of {args.repeats}."])
        record("sde_scaling_rule", scols, srows, command=cmd, notes=[
            "Linear(2) on 64 Gaussian points with coin-flip labels, logistic loss, "
            "RMSPropFlow(1e-3, 0.9) at B = 2, eta = 0.02 to t = 4 against "
            "RMSPropFlow(4e-3, 0.8) at B = 8, eta = 0.04 to t = 2 (the same samples seen), "
            f"{P} runs and {P} paths each."])


if __name__ == "__main__":
    main()
