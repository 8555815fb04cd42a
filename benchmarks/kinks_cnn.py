"""The paper's CNN architecture, narrowed, on MNIST digits: flows with kink steps.

CNN(out_dim=10, widths=(4, 8, 32)) (ReLU and max-pooling), the cross-entropy loss, the
first 128 digits of the `mnist` extra's sample (mnist_5k, seed 0), eps 1e-5, b 0.9, rtol
1e-8, to t1 = 1e6, for RMSProp and AdaGrad. Each run is capped at --max-steps per segment
(a decade of t; the [0, 1] segment first) and prints how far it got: the time reached,
steps, kink steps, wall time, and the training accuracy at the last save.
Run: python benchmarks/kinks_cnn.py [--flows rmsprop,adagrad] [--kink-tol 1e-3]
     [--max-steps 2000]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from marginflow.experiments import mnist_5k
from marginflow.flows import AdaGradFlow, RMSPropFlow, simulate
from marginflow.models import CNN, unflatten


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="rmsprop,adagrad")
    parser.add_argument("--kink-tol", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--t1", type=float, default=1e6)
    args = parser.parse_args()
    train, _ = mnist_5k(128, 0)
    model = CNN(out_dim=10, widths=(4, 8, 32), key=jax.random.key(0))
    X, y = np.asarray(train.X), np.asarray(train.y)
    for name in args.flows.split(","):
        flow = {"rmsprop": RMSPropFlow(1e-5, 0.9), "adagrad": AdaGradFlow(1e-5)}[name]
        start = time.perf_counter()
        traj = simulate(flow, model, train, args.t1, loss="cross_entropy", n_save=30,
                        throw=False, max_steps=args.max_steps, kink_tol=args.kink_tol,
                        progress=True)
        wall = time.perf_counter() - start
        pred = np.argmax(np.asarray(jax.vmap(unflatten(model, traj.w[-1]))(X)), axis=1)
        print(f"{name}: {traj.result} at t = {traj.ts[-1]:.3g}, "
              f"{traj.stats['num_steps']} steps ({traj.stats.get('num_kink_steps', 0)} kink "
              f"steps), {wall:.0f} s ({traj.meta['compile_time_s']:.0f} s compiling), "
              f"training accuracy {np.mean(pred == y):.3f}", flush=True)


if __name__ == "__main__":
    main()
