"""The solver's overhead over the physical limit on the paper's MNIST CNN (issue 5).

overhead = (wall time of the integration, after compilation)
           / (number of gradient evaluations x time of one jit-compiled gradient evaluation)

CNN (3,240,736 parameters, 10 classes; im2col convolutions on CPU), n random MNIST-size
inputs, cross-entropy, RMSProp flow (eps 1e-5, b 0.9), the default solver (for the CNN,
whose kinks are dense, `DecayHeun`: 2 gradient evaluations per step, O(p) besides; a run
with solver=DecayIMEX() would take 8). Gradient evaluations counted: that many per step,
rejected steps included, 3 at the start (the controller's first-step guess and the first
stage) and one per save.

    python benchmarks/cnn_overhead.py --n 512 --max-steps 8   # ~2 minutes on a 2-core CPU
    python benchmarks/cnn_overhead.py --n 32 --max-steps 40
    python benchmarks/cnn_overhead.py --dtype float32
    python benchmarks/cnn_overhead.py --record   # n 512 and 32, float64 and float32 (about
                         # 8 minutes), table written to docs/data/benchmarks/cnn_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401
import numpy as np
from marginflow.flows import RMSPropFlow, simulate
from marginflow.models import CNN, Dataset, Objective

# Gradient evaluations per step of the solvers `simulate` picks for the CNN's flows (Heun
# for AdaGrad; gpu_cnn.py uses this too).
EVALS_PER_STEP = {"DecayHeun": 2, "Heun": 2, "DecayIMEX": 8}


def measure(n: int, dtype_name: str, t1: float, max_steps: int) -> list[str]:
    """Print one set-up's figures and return its table row."""
    dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    rtol, atol = (1e-8, 1e-12) if dtype == jnp.float64 else (1e-5, 1e-8)
    rng = np.random.default_rng(0)
    data = Dataset(rng.uniform(0, 1, (n, 28, 28)), rng.integers(0, 10, n))
    model = CNN(key=jax.random.key(0))
    flow = RMSPropFlow(1e-5, 0.9)
    n_save = 2

    objective = Objective(model, data)
    w = objective.w0().astype(dtype)
    fn = eqx.filter_jit(lambda obj, w: obj.log_loss_and_grad(w))
    grad = lambda w: fn(objective, w)  # noqa: E731
    jax.block_until_ready(grad(w))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(grad(w))
        times.append(time.perf_counter() - start)
    t_grad = statistics.median(times)

    # A run stopped by max_steps is fine here: the ratio counts the steps actually taken.
    kw = dict(n_save=n_save, rtol=rtol, atol=atol, dtype=dtype, max_steps=max_steps,
              throw=False)
    start = time.perf_counter()
    simulate(flow, model, data, t1, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    traj = simulate(flow, model, data, t1, **kw)
    wall = time.perf_counter() - start
    steps = int(traj.stats["num_steps"])
    rejected = int(traj.stats["num_rejected_steps"])
    reached = float(traj.ts[-1]) if len(traj.ts) else float("nan")
    per_step = EVALS_PER_STEP[traj.meta["solver"]]
    evals = per_step * steps + 3 + n_save
    overhead = wall / (evals * t_grad)
    print(f"CNN p = {w.size}, n = {n}, {dtype_name}, t1 = {t1:g}, devices {jax.devices()}")
    print(f"one gradient evaluation: {t_grad * 1e3:.1f} ms (median of 5, jit-compiled)")
    print(f"integration: {wall:.2f} s after compilation (first call {first:.1f} s), "
          f"{steps} steps ({rejected} rejected), {traj.meta['solver']}, {evals} gradient "
          f"evaluations, reached "
          f"t = {reached:.3g}, result {traj.result}")
    print(f"overhead = {wall:.2f} / ({evals} x {t_grad:.4f}) = {overhead:.2f}", flush=True)
    return [str(n), dtype_name, f"{t_grad * 1e3:.1f} ms", f"{wall:.1f} s",
            f"{steps} ({rejected})", str(evals), f"{overhead:.2f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="number of inputs")
    parser.add_argument("--t1", type=float, default=1e-2, help="end time of the flow")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--max-steps", type=int, default=40,
                        help="stop after this many steps (the ratio needs no full run)")
    parser.add_argument("--record", action="store_true",
                        help="measure n = 512 and 32 in float64 and float32 and write the "
                        "table to docs/data/benchmarks/cnn_overhead.json")
    args = parser.parse_args()
    if not args.record:
        measure(args.n, args.dtype, args.t1, args.max_steps)
        return
    from _record import record

    rows = [measure(n, d, args.t1, args.max_steps)
            for n in (512, 32) for d in ("float64", "float32")]
    record("cnn_overhead", ["n", "dtype", "one gradient", "integration", "steps (rejected)",
                            "gradient evals", "overhead"], rows,
           command=f"python benchmarks/cnn_overhead.py --record --max-steps {args.max_steps}",
           notes=["CNN (3,240,736 parameters), RMSProp flow (eps 1e-5, b 0.9), the default "
                  f"solver, at most {args.max_steps} steps to t1 = {args.t1:g}; overhead = "
                  "integration wall time after compilation / (gradient evaluations x one "
                  "jit-compiled gradient, median of 5)."])


if __name__ == "__main__":
    main()
