"""The paper's CNN flow on a GPU: how far and how fast, against one gradient's cost.

CNN(out_dim=10) at the paper's widths (32, 64, 1024; 3,240,736 parameters, ReLU and
max-pooling, convolutions by lax.conv on a GPU), the cross-entropy loss, the first --n
digits of the `mnist` extra's sample (mnist_5k, seed 0), eps 1e-5, b 0.9, the default
solver and kink tolerance, to t1 = 1e6. The script prints, in one run:

1. the devices and versions;
2. a check that the device integrates like the CPU: the main job's RMSProp flow on the toy
   to t1 = 1e6 (docs/getting-started.md), compared with the same run on the CPU when the
   process can see one (max |w_gpu - w_cpu| / max |w_cpu| over the saves; both runs hold
   rtol 1e-8 and round differently, so they agree to the tolerance's level, not bit for
   bit: 8.9e-8 on an H200);
3. one jit-compiled gradient of the loss on the CNN (median of 5) in float64, in float32
   at JAX's default matmul precision (TF32 on recent NVIDIA GPUs: a 10-bit mantissa in
   matrix products and convolutions) and in float32 at "highest", each with its distance
   to the float64 gradient;
4. for each of --runs (flow:dtype; dtype float64, float32 at "highest" as simulate traces
   it, or float32-tf32 at JAX's default precision; run in turn while the --budget in
   seconds lasts, each free to use all that is left): a line per segment (a decade of t)
   with the time reached, steps and wall time; then the result, the kink steps, the
   first save at 100% training accuracy, the accuracy at the end, the compile time, and
   the solver's overhead = wall time after compilation / (gradient evaluations x one
   gradient at the run's precision), with 2 evaluations per step (rejected ones
   included) for Heun and DecayHeun, the CNN's default solvers; the Lemma 3 walk's cost
   is in the wall time. A run still going when the budget runs out is stopped at its
   next segment end and reported as far as it got, no segment takes more steps than the
   budget left at the run's start allows (a stalled one ends as max_steps_reached and is
   reported so: the script can take the budget plus the time before the stalled segment),
   and no run starts with less than --min-start seconds left.

Run: python benchmarks/gpu_cnn.py [--n 1000] [--runs rmsprop:float64,adagrad:float64]
     [--budget 420] [--mnist path/to/mnist_5k.csv.gz] [--widths 32,64,1024]
Printed only (no --record): its figures are quoted in docs/performance.md with the date.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow
import numpy as np
from cnn_overhead import EVALS_PER_STEP  # per step of each solver picked for the CNN
from marginflow.experiments import mnist_5k
from marginflow.flows import AbstractProgressMeter, AdaGradFlow, RMSPropFlow, simulate
from marginflow.models import CNN, Objective, ToyLeaky, toy_dataset, unflatten

FLOWS = {"rmsprop": lambda: RMSPropFlow(1e-5, 0.9), "adagrad": lambda: AdaGradFlow(1e-5)}


class OutOfTime(Exception):
    """The run's share of the budget is spent (raised at a segment end)."""


class SegmentLines(AbstractProgressMeter):
    """One printed line per segment; stops the run at the first segment end after `until`,
    unless that segment used all its `max_steps` (the run stops there anyway, and reports
    itself as max_steps_reached)."""

    def __init__(self, until: float, max_steps: int):
        self.until, self.max_steps = until, max_steps
        self.start_time, self.last = time.perf_counter(), (0.0, 0, 0.0)

    def done(self, t, steps, compile_seconds, count=1):
        wall = time.perf_counter() - self.start_time
        capped = steps - self.last[1] >= self.max_steps
        self.last = (t, steps, compile_seconds)
        print(f"  t = {t:9.3g}   steps {steps:6d}   wall {wall:7.1f} s   "
              f"(compiling {compile_seconds:.1f} s)", flush=True)
        if time.perf_counter() > self.until and t < 1e6 and not capped:
            raise OutOfTime  # not at the last segment's end


def check_toy_against_cpu() -> None:
    """The main job's flow on the default device, and on the CPU when one is visible."""
    run = lambda: simulate(RMSPropFlow(1e-5, 0.9), ToyLeaky(key=jax.random.key(0)),  # noqa: E731
                           toy_dataset(0), 1e6, n_save=50)
    start = time.perf_counter()
    traj = run()
    print(f"toy RMSProp flow to 1e6 on {jax.default_backend()}: {traj.result}, "
          f"{traj.stats['num_steps']} steps, {time.perf_counter() - start:.1f} s with "
          "compilation", flush=True)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        print("  no CPU device visible: not compared")
        return
    if jax.default_backend() == "cpu":
        return
    with jax.default_device(cpu):
        ref = run()
    w, w_ref = np.asarray(traj.w), np.asarray(ref.w)
    print(f"  against the CPU run: max |w - w_cpu| / max |w_cpu| = "
          f"{np.max(np.abs(w - w_ref)) / np.max(np.abs(w_ref)):.2e} over {len(w)} saves; "
          f"steps {traj.stats['num_steps']} against {ref.stats['num_steps']}", flush=True)


def gradient_seconds(objective, dtype, precision=None) -> tuple[float, jnp.ndarray]:
    """Median of 5 timed calls of the jit-compiled (log L, grad log L), and the gradient.
    precision: None (JAX's default: on recent NVIDIA GPUs float32 matrix products and
    convolutions run in TF32, a 10-bit mantissa) or "highest" (full float32)."""
    w = objective.w0().astype(dtype)
    fn = eqx.filter_jit(lambda obj, w: obj.log_loss_and_grad(w))
    with jax.default_matmul_precision(precision):
        grad = jax.block_until_ready(fn(objective, w))[1]
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(objective, w))
            times.append(time.perf_counter() - start)
    return statistics.median(times), grad


def run_flow(name, dtype_name, model, train, until, t_grad) -> None:
    dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    # float32 runs of simulate are traced at "highest" unless a precision is set; the
    # "float32-tf32" run sets JAX's "default" (TF32 on the GPU) to see what it does.
    precision = "default" if dtype_name == "float32-tf32" else None
    rtol, atol = (1e-8, 1e-12) if dtype == jnp.float64 else (1e-6, 1e-9)
    print(f"{name} flow, {dtype_name}, rtol {rtol:g}:", flush=True)
    start = time.perf_counter()
    # The budget is checked at segment ends, and a segment that stalls has none: a float32
    # run once sat in one segment past its budget until the machine's time limit killed
    # it, so it never said how far it got. So no segment may take more steps than the time
    # left at the start allows, at 2 gradients per step (Heun and DecayHeun, the CNN's
    # defaults) and 4 ms besides (measured on an H200: 3.4-4 ms in float64, about 2 ms in
    # float32): a stalled segment ends as max_steps_reached and the run reports its figures,
    # at most the budget after the segment began.
    label = {"float32": "float32-highest", "float32-tf32": "float32"}.get(dtype_name,
                                                                        dtype_name)
    per_step = 2 * t_grad[label] + 4e-3
    max_steps = int(min(100_000, max(100, (until - start) / per_step)))
    meter = SegmentLines(until, max_steps)
    try:
        with jax.default_matmul_precision(precision):
            traj = simulate(FLOWS[name](), model, train, 1e6, loss="cross_entropy",
                            n_save=40, rtol=rtol, atol=atol, dtype=dtype, throw=False,
                            progress=meter, max_steps=max_steps)
    except OutOfTime:
        t, steps, compiling = meter.last
        print(f"  stopped by the budget at t = {t:.3g} after {steps} steps, "
              f"{time.perf_counter() - start:.0f} s ({compiling:.0f} s compiling)")
        return
    wall = time.perf_counter() - start
    X, y = jnp.asarray(train.X, dtype), np.asarray(train.y)
    acc = [float(np.mean(np.argmax(np.asarray(jax.vmap(unflatten(model, w))(X)), 1) == y))
           for w in jnp.asarray(traj.w)]
    full = [t for t, a in zip(traj.ts, acc, strict=True) if a == 1.0]
    steps, rejected = int(traj.stats["num_steps"]), int(traj.stats["num_rejected_steps"])
    compiling = float(traj.meta["compile_time_s"])
    solver = traj.meta["solver"]
    evals = EVALS_PER_STEP.get(solver, float("nan")) * steps  # num_steps counts rejected
    if traj.result == "max_steps_reached":
        print(f"  a segment used the {max_steps} steps the budget allowed: {traj.message}")
    print(f"  {traj.result}: t = {traj.ts[-1]:.3g}, {steps} steps ({rejected} rejected, "
          f"{traj.stats.get('num_kink_steps', 0)} kink steps), solver {solver}, "
          f"{wall:.1f} s in all, {compiling:.1f} s compiling\n"
          f"  first save at 100% training accuracy: "
          f"{f'{full[0]:.3g}' if full else 'not reached'}; at the end {acc[-1]:.3f}\n"
          f"  overhead = {wall - compiling:.1f} s / ({evals} evaluations x "
          f"{t_grad[label] * 1e3:.2f} ms) = "
          f"{(wall - compiling) / (evals * t_grad[label]):.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="training digits")
    parser.add_argument("--runs", default="rmsprop:float64,adagrad:float64",
                        help="flow:dtype pairs, run in turn")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds in all")
    parser.add_argument("--mnist", default=None, help="a copy of mnist_5k.csv.gz")
    parser.add_argument("--widths", default="32,64,1024")
    parser.add_argument("--min-start", type=float, default=300.0,
                        help="do not start a run with fewer seconds of budget left: the first "
                        "segment, [0, 1], took 253 s of the paper CNN's 399 s on an H200, and "
                        "a run with less would end there, cut by its step limit")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget
    print(f"marginflow {marginflow.__version__}, jax {jax.__version__}, "
          f"devices {jax.devices()}", flush=True)
    if jax.default_backend() == "cpu":
        print("no accelerator: the figures below are the CPU's")
    try:
        check_toy_against_cpu()
    except Exception as error:  # a finding to print, not a reason to skip the CNN
        print(f"the toy check failed: {type(error).__name__}: {error}", flush=True)

    train, _ = mnist_5k(args.n, 0, path=args.mnist)
    widths = tuple(int(k) for k in args.widths.split(","))
    model = CNN(out_dim=10, widths=widths, key=jax.random.key(0))
    objective = Objective(model, train)
    t_grad = {}
    for label, dtype, precision in (("float64", jnp.float64, None),
                                    ("float32", jnp.float32, None),
                                    ("float32-highest", jnp.float32, "highest")):
        t_grad[label], grad = gradient_seconds(objective, dtype, precision)
        if label == "float64":
            ref = np.asarray(grad)
        err = np.linalg.norm(np.asarray(grad, np.float64) - ref) / np.linalg.norm(ref)
        print(f"CNN widths {widths}, p = {ref.size}, {args.n} digits, {label}: one gradient "
              f"{t_grad[label] * 1e3:.2f} ms, |g - g64| / |g64| = {err:.1e}", flush=True)

    runs = [r.split(":") for r in args.runs.split(",")]
    for name, dtype_name in runs:
        left = deadline - time.perf_counter()
        if left < args.min_start:
            print(f"{name} flow, {dtype_name}: not run ({left:.0f} s of the budget left, "
                  f"under --min-start {args.min_start:g})")
            continue
        # A run may use all that is left: a finished run says more than several halves.
        run_flow(name, dtype_name, model, train, deadline, t_grad)


if __name__ == "__main__":
    main()
