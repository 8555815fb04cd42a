"""Time to a first result: whole processes, marginflow's main job against the scipy peer.

Side by side in one run, each repeated (medians printed, then the ratios and the issue's
targets):
- cold:  `marginflow simulate --out DIR` with an empty compilation cache folder;
- warm:  the same command again, the cache now holding the compiled programs;
- peer:  `peer_scipy_job.py`, the same job (RMSProp flow on the toy to t = 1e6 with LSODA
         at rtol 1e-8, 200 saves, npz + PNG + summary) in numpy / scipy / matplotlib;
- notebook: in one process that has run the RMSProp flow already, the first call of
         another (flow, model) pair (the gradient flow, an MLP) whose programs a previous
         process left in the cache, and then that pair again with new t1, n_save and data.
Run: python benchmarks/first_result.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))

_NOTEBOOK = textwrap.dedent(
    """
    import json, time, jax
    import marginflow
    from marginflow.flows import GradientFlow, RMSPropFlow, simulate
    from marginflow.models import MLP, ToyLeaky, separable_gaussians, toy_dataset
    simulate(RMSPropFlow(eps=1e-5, b=0.9), ToyLeaky(key=jax.random.PRNGKey(0)),
             toy_dataset(seed=0), t1=1e6)
    model = MLP(5, 16, 2, activation=2, key=jax.random.PRNGKey(1))
    data = separable_gaussians(40, 5, seed=0)
    t = time.perf_counter()
    traj = simulate(GradientFlow(), model, data, t1=1e6)
    first = time.perf_counter() - t
    t = time.perf_counter()
    simulate(GradientFlow(), model, separable_gaussians(40, 5, seed=1), t1=1e8, n_save=50)
    again = time.perf_counter() - t
    print(json.dumps({"first": first, "compile": traj.meta["compile_time_s"], "again": again}))
    """
)


def _timed(cmd, env) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{cmd} failed:\n{out.stderr[-2000:]}")
    return wall


def _last_json(cmd, env) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_data(path: str) -> None:
    # The CLI's default problem: toy_dataset(0) and ToyLeaky(key=PRNGKey(0)).
    import jax
    import numpy as np
    from marginflow.models import ToyLeaky, toy_dataset
    from marginflow.models._objective import flatten

    data = toy_dataset(0)
    w0 = np.asarray(flatten(ToyLeaky(key=jax.random.PRNGKey(0))))
    np.savez(path, X=np.asarray(data.X), y=np.asarray(data.y), w0=w0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true",
                        help="write the table to docs/data/benchmarks/first_result.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="first_result_")
    data = os.path.join(work, "data.npz")
    _write_data(data)
    cli = [sys.executable, "-c", "import sys; from marginflow.experiments._cli import entry; "
           "sys.exit(entry())", "simulate", "--no-progress"]
    peer = [sys.executable, os.path.join(HERE, "peer_scipy_job.py"), data]
    times = {"cold": [], "warm": [], "peer": [], "first call": [], "its compile": [],
             "new numbers": []}
    for r in range(args.repeats):
        env = {**os.environ, "MARGINFLOW_CACHE_DIR": os.path.join(work, f"cache{r}")}
        times["cold"].append(_timed([*cli, "--out", os.path.join(work, f"cold{r}")], env))
        times["warm"].append(_timed([*cli, "--out", os.path.join(work, f"warm{r}")], env))
        times["peer"].append(_timed([*peer, os.path.join(work, f"peer{r}")], env))
        _last_json([sys.executable, "-c", _NOTEBOOK], env)  # leaves the pair in the cache
        nb = _last_json([sys.executable, "-c", _NOTEBOOK], env)
        times["first call"].append(nb["first"])
        times["its compile"].append(nb["compile"])
        times["new numbers"].append(nb["again"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"first_result: medians of {args.repeats}, {os.cpu_count()} cores")
    # JAX imports ml_dtypes in every process; its 0.7.0 release alone took 0.7 s to import.
    mld = _last_json([sys.executable, "-c", "import json, time, numpy; t = time.perf_counter(); "
                      "import ml_dtypes; print(json.dumps([ml_dtypes.__version__, "
                      "time.perf_counter() - t]))"], os.environ)
    print(f"  (import ml_dtypes {mld[0]}: {mld[1]:.3f} s)")
    for k, v in times.items():
        print(f"  {k:<12} {med[k]:7.2f} s   ({', '.join(f'{x:.2f}' for x in v)})")
    print(f"main job, warm caches / peer:  {med['warm'] / med['peer']:.2f}  (target <= 1.5)")
    print(f"main job, cold caches / peer:  {med['cold'] / med['peer']:.2f}  (target <= 4)")
    print(f"notebook, first call of a new pair, warm disk cache: {med['first call']:.2f} s "
          "(target <= 2 s)")
    print(f"notebook, the pair again with new t1, n_save and data: {med['new numbers']:.3f} s")
    if args.record:
        from _record import record

        def runs(k):
            return ", ".join(f"{x:.2f}" for x in times[k])

        ratio = {k: f"{med[k] / med['peer']:.1f}x" for k in ("cold", "warm")}
        record("first_result", ["process", "median wall time (runs)", "against the scipy peer",
                                "target"], [
            ["main job, cold caches", f"{med['cold']:.2f} s ({runs('cold')})", ratio["cold"],
             "4x"],
            ["main job, warm caches (second run)", f"{med['warm']:.2f} s ({runs('warm')})",
             ratio["warm"], "1.5x"],
            ["the scipy peer (peer_scipy_job.py)", f"{med['peer']:.2f} s ({runs('peer')})",
             "1x", ""],
            ["notebook: first call of a new (flow, model) pair, warm disk cache",
             f"{med['first call']:.2f} s ({runs('first call')})", "", "2 s"],
            ["notebook: that pair again with new t1, n_save and data",
             f"{med['new numbers']:.3f} s", "", "no recompilation"],
        ], command=f"python benchmarks/first_result.py --repeats {args.repeats} --record",
           notes=[f"Medians of {args.repeats} whole processes each."])


if __name__ == "__main__":
    main()
