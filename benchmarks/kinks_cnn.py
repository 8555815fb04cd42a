"""The paper's CNN architecture, narrowed, on MNIST digits: flows with kink steps.

CNN(out_dim=10, widths=(4, 8, 32)) (ReLU and max-pooling), the cross-entropy loss, the
first 128 digits of the `mnist` extra's sample (mnist_5k, seed 0), eps 1e-5, b 0.9, rtol
1e-8, to t1 = 1e6, for AdaGrad, RMSProp (eps inside the root, the paper's flow) and
RMSProp with eps outside (`rmsprop_out`: PyTorch's placement, which the paper's MNIST runs
used), with the default solver (the CNN declares dense kinks: Heun for AdaGrad,
`DecayHeun` for the RMSProp flows, whose moments decay; --solver DecayIMEX for the
previous default) and kink_tol.
Each run is capped at --max-steps per segment (a decade of t; the [0, 1] segment first)
and prints how far it got: the time reached, steps, kink steps, wall time (compilation
included), the first save time with 100% training accuracy, and the training accuracy at
the last save. --record writes the rows to
docs/data/benchmarks/kinks_cnn.json (--append: added to the rows there, a row of the same
flow, kink_tol and solver replaced).
Run: python benchmarks/kinks_cnn.py [--flows adagrad,rmsprop,rmsprop_out] [--kink-tol 1e-3]
     [--max-steps 20000] [--solver default|DecayIMEX|DecayHeun] [--record [--append]]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from marginflow.experiments import mnist_5k
from marginflow.flows import AdaGradFlow, DecayHeun, DecayIMEX, RMSPropFlow, simulate
from marginflow.models import CNN, unflatten


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="adagrad,rmsprop")
    parser.add_argument("--kink-tol", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--t1", type=float, default=1e6)
    parser.add_argument("--solver", choices=["default", "DecayIMEX", "DecayHeun"],
                        default="default", help="the solver of the flows with a decay")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    train, _ = mnist_5k(128, 0)
    model = CNN(out_dim=10, widths=(4, 8, 32), key=jax.random.key(0))
    X, y = np.asarray(train.X), np.asarray(train.y)
    rows = []
    for name in args.flows.split(","):
        flow = {"rmsprop": RMSPropFlow(1e-5, 0.9), "adagrad": AdaGradFlow(1e-5),
                "rmsprop_out": RMSPropFlow(1e-5, 0.9, eps_placement="outside")}[name]
        solver = None
        if args.solver != "default" and flow.has_decay:
            solver = {"DecayIMEX": DecayIMEX, "DecayHeun": DecayHeun}[args.solver]()
        start = time.perf_counter()
        traj = simulate(flow, model, train, args.t1, loss="cross_entropy", n_save=60,
                        throw=False, max_steps=args.max_steps, kink_tol=args.kink_tol,
                        progress=True, solver=solver)
        wall = time.perf_counter() - start
        acc = [float(np.mean(np.argmax(np.asarray(jax.vmap(unflatten(model, w))(X)), 1) == y))
               for w in traj.w]
        full = [t for t, a in zip(traj.ts, acc, strict=True) if a == 1.0]
        rows.append([name, f"{args.kink_tol:g}", traj.meta["solver"],
                     traj.result + ("" if traj.result == "successful"
                                    else f" (cap {args.max_steps})"),
                     f"{traj.ts[-1]:.3g}", traj.stats["num_steps"],
                     traj.stats.get("num_kink_steps", 0), f"{wall:.0f}",
                     f"{traj.meta['compile_time_s']:.0f}",
                     f"{full[0]:.3g}" if full else "not reached", f"{acc[-1]:.3f}"])
        # simulate's own check: the exact flow's loss never rises, so a rise between saves
        # (relative to max(1, |log L|)) is the kink steps' error.
        print(rows[-1], f"rejected steps {traj.stats['num_rejected_steps']}, "
              f"kink_loss_rise {traj.stats.get('kink_loss_rise', 0.0):.3g}", flush=True)
    if args.record:
        from _record import DATA, record

        path = os.path.join(DATA, "kinks_cnn.json")
        if args.append and os.path.exists(path):
            with open(path) as fh:
                old = json.load(fh)["rows"]
            new = {(n[0], n[1], n[2]) for n in rows}
            rows = [r for r in old if (r[0], r[1], r[2]) not in new] + rows

        record("kinks_cnn",
               ["flow", "kink_tol", "solver", "result", "t reached", "steps", "kink steps",
                "wall (s)", "compiling (s)", "first save at 100% accuracy",
                "accuracy at the end"],
               rows, command="python benchmarks/kinks_cnn.py --record",
               notes=["CNN(out_dim=10, widths=(4, 8, 32)), cross-entropy, 128 digits of "
                      "mnist_5k, eps 1e-5, b 0.9, rtol 1e-8, t1 = 1e6, 60 saves; a "
                      "run that hit max_steps (per segment) gives the cap; wall time of one run, "
                      "compilation included; rows of several invocations (--append)."])


if __name__ == "__main__":
    main()
