"""256 SDE paths (`flows.simulate_sde`) against 256 minibatch SGD runs, side by side.

The problem of tests/test_sde.py: Linear(2) on separable_gaussians(16, 2, seed=0), the
logistic loss, batches of 4 drawn without replacement afresh at each step (sampling=
"independent"), flow time t = k eta B / N.
1. Cost and agreement at T = 5 for eta = 0.2, 0.1, 0.05: wall time (compiled, median of
   3) of 256 paths and of 256 runs, their ratio, and the statistics of log L(T) and ||w(T)||
   (mean, variance) of both, with the flow's value (whose variance is 0).
2. The horizon: 256 paths at eta = 0.1 to t = 1e6 (in log t after t = 1), against the
   flow at the same times: the spread std(log L) and the mean angle of w to the flow's w.
Run: python benchmarks/sde_paths.py [--record] [--repeats 3]   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import numpy as np
from marginflow.discrete import GD, run
from marginflow.flows import GradientFlow, simulate, simulate_sde
from marginflow.models import Linear, separable_gaussians

N, B, T, PATHS = 16, 4, 5.0, 256
LOSS = "logistic"


def _problem():
    return Linear(2, key=jax.random.key(0)), separable_gaussians(N, 2, seed=0)


def _timed(fn, repeats: int):
    out = fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _agreement(eta: float, repeats: int) -> list:
    model, data = _problem()
    steps = round(T * N / (eta * B))
    models = eqx.filter_vmap(lambda k: _problem()[0])(jax.random.split(jax.random.key(0),
                                                                       PATHS))

    def sde():
        return simulate_sde(GradientFlow(), model, data, T, batch_size=B, eta=eta,
                            key=jax.random.key(1), n_paths=PATHS, ts=[T], loss=LOSS)

    def runs():
        return run(GD(eta), models, data, steps, batch_size=B, sampling="independent",
                   key=jax.random.split(jax.random.key(2), PATHS), batch=True,
                   save_every=steps, loss=LOSS)

    s, ts = _timed(sde, repeats)
    d, td = _timed(runs, repeats)
    flow = simulate(GradientFlow(), model, data, T, ts=[T], loss=LOSS)
    ls, ld = s.log_loss[:, -1], d.log_loss[:, -1]
    ns, nd = (np.linalg.norm(x.w[:, -1], axis=-1) for x in (s, d))
    fmt = "{:.4f}".format
    return [f"{eta:g}", steps, s.stats["num_steps"], f"{ts:.3f}", f"{td:.3f}",
            f"{ts / td:.1f}x", f"{fmt(ls.mean())} / {fmt(ld.mean())} / "
            f"{fmt(float(flow.log_loss[-1]))}", f"{ls.var():.2e} / {ld.var():.2e}",
            f"{fmt(ns.mean())} / {fmt(nd.mean())} / {fmt(float(np.linalg.norm(flow.w[-1])))}",
            f"{ns.var():.2e} / {nd.var():.2e}"]


def _horizon() -> list[list]:
    model, data = _problem()
    ts = [1.0, 10.0, 1e2, 1e3, 1e4, 1e6]
    start = time.perf_counter()
    s = simulate_sde(GradientFlow(), model, data, ts[-1], batch_size=B, eta=0.1,
                     key=jax.random.key(3), n_paths=PATHS, ts=ts, loss=LOSS)
    wall = time.perf_counter() - start
    flow = simulate(GradientFlow(), model, data, ts[-1], ts=ts, loss=LOSS)
    rows = []
    for k, t in enumerate(ts):
        w, wf = s.w[:, k], flow.w[k]
        cos = w @ wf / (np.linalg.norm(w, axis=-1) * np.linalg.norm(wf))
        angle = np.arccos(np.clip(cos, -1.0, 1.0))
        rows.append([f"{t:g}", f"{s.log_loss[:, k].mean():.4f}", f"{flow.log_loss[k]:.4f}",
                     f"{s.log_loss[:, k].std():.2e}", f"{angle.mean():.2e}",
                     f"{s.stats['num_steps']} steps, {wall:.1f} s" if k == 0 else ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cols = ["eta", "SGD steps", "SDE steps", f"{PATHS} paths (s)", f"{PATHS} runs (s)",
            "paths / runs", "mean log L(T): SDE / runs / flow", "Var log L(T): SDE / runs",
            "mean ||w(T)||: SDE / runs / flow", "Var ||w(T)||: SDE / runs"]
    rows = [_agreement(eta, args.repeats) for eta in (0.2, 0.1, 0.05)]
    for r in rows:
        print(dict(zip(cols, r, strict=True)), flush=True)
    hcols = ["t", "mean log L: SDE", "flow", "std log L: SDE", "mean angle to the flow's w",
             "cost"]
    hrows = _horizon()
    for r in hrows:
        print(dict(zip(hcols, r, strict=True)), flush=True)
    if args.record:
        from _record import record

        note = (f"Linear(2), separable_gaussians({N}, 2, seed=0), {LOSS} loss, batch {B} "
                f"drawn afresh each step, T = {T:g}, {PATHS} paths and runs; wall: compiled, "
                f"median of {args.repeats}; the SDE at 4 Euler-Maruyama steps per SGD step.")
        record("sde_paths", cols, rows, command="python benchmarks/sde_paths.py --record",
               notes=[note])
        record("sde_horizon", hcols, hrows, command="python benchmarks/sde_paths.py --record",
               notes=["The same problem, eta = 0.1, 256 paths to t = 1e6 (log t after 1)."])


if __name__ == "__main__":
    main()
