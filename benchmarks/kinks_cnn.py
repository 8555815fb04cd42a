"""The paper's CNN architecture, narrowed, on MNIST digits: flows with kink steps.

CNN(out_dim=10, widths=(4, 8, 32)) (ReLU and max-pooling; 15,416 parameters), the
cross-entropy loss, the first 128 digits of the `mnist` extra's sample (mnist_5k, seed 0),
eps 1e-5, b 0.9, rtol 1e-8 and the default kink_tol (1e-3), to t1 = 1e6. Per flow
(RMSProp, AdaGrad): when the training accuracy first reaches 100% (at the saves), the
steps and kink steps, and the wall time; a run is cut at --limit seconds (default 1800,
the issue's 30 minutes) and reports how far it got.
Run: python benchmarks/kinks_cnn.py [--flows rmsprop,adagrad] [--limit 1800] [--record]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _one(flow_name: str, t1: float, queue) -> None:
    import jax
    import numpy as np
    from marginflow.experiments import mnist_5k
    from marginflow.flows import AdaGradFlow, RMSPropFlow, simulate
    from marginflow.models import CNN

    flow = {"rmsprop": RMSPropFlow(1e-5, 0.9), "adagrad": AdaGradFlow(1e-5)}[flow_name]
    train, _ = mnist_5k(128, 0)
    model = CNN(out_dim=10, widths=(4, 8, 32), key=jax.random.key(0))
    ts = np.concatenate([[0.0], np.geomspace(1e-4, t1, 41)])
    start = time.perf_counter()
    traj = simulate(flow, model, train, t1, loss="cross_entropy", ts=ts, throw=False,
                    progress=True)
    wall = time.perf_counter() - start
    X, y = np.asarray(train.X), np.asarray(train.y)
    acc = []
    for w in traj.w:
        from marginflow.models import unflatten

        m = unflatten(model, w)
        pred = np.argmax(np.asarray(jax.vmap(m)(X)), axis=1)
        acc.append(float(np.mean(pred == y)))
    first = next((t for t, a in zip(traj.ts, acc) if a == 1.0), None)
    queue.put(dict(flow=flow_name, result=traj.result, t_end=float(traj.ts[-1]),
                   steps=traj.stats["num_steps"], kink=traj.stats.get("num_kink_steps", 0),
                   wall=wall, compile=traj.meta["compile_time_s"], acc_end=acc[-1],
                   t_100=first, p=int(traj.w.shape[-1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="rmsprop,adagrad")
    parser.add_argument("--t1", type=float, default=1e6)
    parser.add_argument("--limit", type=float, default=1800.0)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.flows.split(","):
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_one, args=(name, args.t1, queue))
        start = time.perf_counter()
        proc.start()
        proc.join(args.limit)
        if proc.is_alive():
            proc.kill()
            rows.append([name, f"cut at {args.limit:.0f} s", "", "", "", f"> {args.limit:.0f}", ""])
        else:
            r = queue.get()
            t100 = "never" if r["t_100"] is None else f"t = {r['t_100']:.3g}"
            rows.append([name, f"{r['result']} at t = {r['t_end']:.3g}", t100, r["steps"],
                         r["kink"], f"{time.perf_counter() - start:.0f}",
                         f"{r['acc_end']:.3f}"])
        print(rows[-1], flush=True)
    if args.record:
        from _record import record

        record("kinks_cnn", ["flow", "result", "100% training accuracy", "steps",
                             "kink steps", "wall (s, whole process)", "accuracy at the end"],
               rows, command="python benchmarks/kinks_cnn.py --record",
               notes=["CNN(out_dim=10, widths=(4, 8, 32)), 128 digits of mnist_5k, "
                      "cross-entropy, eps 1e-5, b 0.9, rtol 1e-8, kink_tol 1e-3, t1 = 1e6; "
                      "2-core CPU."])


if __name__ == "__main__":
    main()
