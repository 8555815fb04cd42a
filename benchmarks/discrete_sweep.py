"""The paper's toy sweep (Sec. 6.2, App. F.3) with marginflow.discrete.run vs a numpy loop.

100 initialisations of the toy network Phi = v sigma(<w, x>) (leaky ReLU of slope 1/2) on
the toy data, each trained with GD, AdaGrad, RMSProp and Adam (w/m) for 5000 full-batch
steps (lr 0.1, b 0.9, eps 1e-5, the paper's convention: eps inside the root), exponential
loss summed over the samples (docs/math.md section 1).

- marginflow: one `run(optimizer, models, data, steps, batch=True)` per optimiser (all
  initialisations in one vmapped, jit-compiled scan), as a user calls it: by default the
  batch is cut into one chunk per core, run concurrently (`run`'s `workers`). The same
  with workers=1 (one core) is timed too and printed as the single-core ratio.
- reference: what the authors' script does, a plain per-step Python loop over
  initialisations and steps with numpy, gradient of the toy model and the exponential loss
  written out by hand, the update rules written out by hand.

Both save every `save_every` steps; the script checks the two agree to 1e-10 (relative,
on w and log L at every save), then prints the medians of the timed repeats, the compile
time of marginflow (first call minus the median), and the ratio, in wall-clock time and
in CPU time of this process (all threads; less sensitive to other jobs on a shared
machine).

    python benchmarks/discrete_sweep.py            # the full sweep
    python benchmarks/discrete_sweep.py --quick    # 10 initialisations x 500 steps
    python benchmarks/discrete_sweep.py --record   # the full sweep, table written to
                                                   # docs/data/benchmarks/discrete_sweep.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import equinox as eqx
import jax
import marginflow  # noqa: F401  (enables float64)
import numpy as np
from marginflow.discrete import GD, AdaGrad, Adam, RMSProp, run
from marginflow.models import ToyLeaky, flatten, toy_dataset

LR, B, EPS = 0.1, 0.9, 1e-5


# ------------------------------------------------------------------ numpy reference
def _loss_and_grad(p, X, y):
    """log L and grad L for Phi = v sigma(<w, x>), L = sum_i exp(-y_i Phi_i); p = (v, w1, w2)."""
    v, w = p[0], p[1:]
    z = X @ w
    s = np.where(z >= 0, z, 0.5 * z)
    ds = np.where(z >= 0, 1.0, 0.5)
    a = -y * v * s  # log of each loss term
    top = a.max()
    log_l = top + np.log(np.sum(np.exp(a - top)))
    e = np.exp(a)
    grad = np.empty(3)
    grad[0] = -np.sum(e * y * s)
    grad[1:] = -(e * y * v * ds) @ X
    return log_l, grad


def numpy_sweep(name, p0s, X, y, steps, save_every):
    """Per-initialisation, per-step loops; saves like marginflow.discrete.run."""
    ks = list(range(0, steps, save_every)) + [steps]
    ws = np.full((len(p0s), len(ks), 3), np.nan)
    lls = np.full((len(p0s), len(ks)), np.nan)
    for i, p0 in enumerate(p0s):
        p = p0.copy()
        acc = np.zeros(3)
        j = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(steps + 1):
                log_l, g = _loss_and_grad(p, X, y)
                if not (np.isfinite(log_l) and np.all(np.isfinite(g))):
                    break
                if k == ks[j]:
                    ws[i, j], lls[i, j] = p, log_l
                    j += 1
                if k == steps:
                    break
                if name == "gd":
                    p = p - LR * g
                elif name == "adagrad":
                    acc = acc + g * g
                    p = p - LR * g / np.sqrt(EPS + acc)
                elif name == "rmsprop":
                    acc = B * acc + (1 - B) * g * g
                    p = p - LR * g / np.sqrt(EPS + acc)
                else:  # Adam (w/m)
                    acc = B * acc + (1 - B) * g * g
                    p = p - LR * g / np.sqrt(EPS + acc / (1 - B ** (k + 1)))
    return ws, lls


# ---------------------------------------------------------------------- marginflow
def optimizer(name):
    return {"gd": GD(LR), "adagrad": AdaGrad(LR, eps=EPS), "rmsprop": RMSProp(LR, b=B, eps=EPS),
            "adam": Adam(LR, b2=B, eps=EPS)}[name]


def marginflow_sweep(name, models, data, steps, save_every, workers=None):
    traj = run(optimizer(name), models, data, steps, save_every=save_every, batch=True,
               throw=False, workers=workers)
    return traj


def _rel(a, b):
    """max relative difference, NaN patterns required to match."""
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return np.inf
    ok = ~np.isnan(b)
    scale = np.maximum(np.abs(b[ok]), 1.0)
    return float(np.max(np.abs(a[ok] - b[ok]) / scale)) if ok.any() else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 initialisations x 500 steps")
    parser.add_argument("--inits", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats of each side (default 5 marginflow, 3 numpy; "
                        "1 numpy with --quick)")
    parser.add_argument("--record", action="store_true",
                        help="write the table to docs/data/benchmarks/discrete_sweep.json")
    args = parser.parse_args()
    inits = args.inits or (10 if args.quick else 100)
    steps = args.steps or (500 if args.quick else 5000)
    rep_mf = args.repeats or 5
    rep_np = args.repeats or (1 if args.quick else 3)

    data = toy_dataset(0)
    X, y = np.asarray(data.X), np.asarray(data.y)
    keys = jax.random.split(jax.random.key(0), inits)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    p0s = np.asarray(eqx.filter_vmap(flatten)(models))

    names = ["gd", "adagrad", "rmsprop", "adam"]
    print(f"toy sweep: {inits} initialisations x {names}, {steps} steps, lr {LR}, b {B}, "
          f"eps {EPS}, save every {args.save_every}; {jax.devices()[0].platform}")
    first, mf_times, np_times, mf_cpu, np_cpu, worst = {}, {}, {}, {}, {}, 0.0
    one_core = {}
    for name in names:
        t = time.perf_counter()
        traj = marginflow_sweep(name, models, data, steps, args.save_every)
        first[name] = time.perf_counter() - t
        times, cpu = [], []
        for _ in range(rep_mf):
            t, c = time.perf_counter(), time.process_time()
            traj = marginflow_sweep(name, models, data, steps, args.save_every)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        mf_times[name], mf_cpu[name] = statistics.median(times), statistics.median(cpu)
        times = []
        marginflow_sweep(name, models, data, steps, args.save_every, workers=1)  # compiles
        for _ in range(rep_mf):
            t = time.perf_counter()
            single = marginflow_sweep(name, models, data, steps, args.save_every, workers=1)
            times.append(time.perf_counter() - t)
        one_core[name] = statistics.median(times)
        times, cpu = [], []
        for _ in range(rep_np):
            t, c = time.perf_counter(), time.process_time()
            ws, lls = numpy_sweep(name, p0s, X, y, steps, args.save_every)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        np_times[name], np_cpu[name] = statistics.median(times), statistics.median(cpu)
        err = max(_rel(traj.w, ws), _rel(traj.log_loss, lls), _rel(single.w, ws),
                  _rel(single.log_loss, lls))
        worst = max(worst, err)
        diverged = sum(k < steps for k in traj.stats["num_steps"])
        print(f"  {name:8s} marginflow {mf_times[name] * 1e3:9.1f} ms (first call "
              f"{first[name]:.2f} s)  numpy {np_times[name]:8.2f} s  ratio "
              f"{np_times[name] / mf_times[name]:5.0f}x "
              f"(CPU time {np_cpu[name] / mf_cpu[name]:.0f}x; one core "
              f"{one_core[name] * 1e3:.1f} ms, {np_times[name] / one_core[name]:.0f}x)"
              f"  max rel diff {err:.1e}  "
              f"non-finite runs {diverged}/{inits}")
    mf, ref = sum(mf_times.values()), sum(np_times.values())
    compile_s = sum(first.values()) - mf
    print(f"total: marginflow {mf:.3f} s (median of {rep_mf}; compile {compile_s:.2f} s "
          f"extra on first calls), numpy loop {ref:.2f} s (median of {rep_np}); "
          f"ratio {ref / mf:.0f}x")
    mf1 = sum(one_core.values())
    print(f"one core (workers=1): marginflow {mf1:.3f} s, ratio {ref / mf1:.0f}x")
    print(f"CPU time: marginflow {sum(mf_cpu.values()):.3f} s, numpy loop "
          f"{sum(np_cpu.values()):.2f} s; ratio {sum(np_cpu.values()) / sum(mf_cpu.values()):.0f}x")
    print(f"max relative difference over w and log L at every save: {worst:.2e} "
          f"({'OK' if worst <= 1e-10 else 'FAIL'}: tolerance 1e-10)")
    if worst > 1e-10:
        raise SystemExit(1)
    if args.record:
        from _record import record

        label = {"gd": "GD", "adagrad": "AdaGrad", "rmsprop": "RMSProp", "adam": "Adam (w/m)"}
        rows = [[label[n], f"{mf_times[n] * 1e3:.1f} ms", f"{one_core[n] * 1e3:.1f} ms",
                 f"{np_times[n]:.2f} s", f"{np_times[n] / mf_times[n]:.0f}x",
                 f"{np_times[n] / one_core[n]:.0f}x", f"{first[n] - mf_times[n]:.2f} s"]
                for n in names]
        rows.append(["sweep", f"{mf:.3f} s", f"{mf1:.3f} s", f"{ref:.2f} s", f"{ref / mf:.0f}x",
                     f"{ref / mf1:.0f}x", f"{compile_s:.2f} s"])
        argv = " ".join(sys.argv[1:])
        record("discrete_sweep", ["optimiser", "marginflow (default workers)",
                                  "one core (workers=1)", "numpy loop", "ratio",
                                  "one-core ratio", "compile (first call - median)"],
               rows, command=f"python benchmarks/discrete_sweep.py {argv}".strip(),
               notes=[f"{inits} initialisations x {steps} steps, lr {LR}, b {B}, eps {EPS}, "
                      f"saves every {args.save_every} steps; medians of {rep_mf} (marginflow) "
                      f"and {rep_np} (numpy) repeats; the two agree to {worst:.1e} (relative, "
                      "w and log L at every save)."])


if __name__ == "__main__":
    main()
