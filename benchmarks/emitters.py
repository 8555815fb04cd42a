"""XLA's two CPU code generators for the segment program: compile time and run time.

`simulate` compiles the segment of small problems (p n <= CLASSIC_EMITTERS_MAX_WORK, see
flows/_kernels.py) with XLA's classic loop emitters and larger ones with the fusion
emitters (XLA's default; marginflow's import makes the classic ones the process default,
marginflow/_xla.py). This script measures both on a ladder of problem sizes: each job runs in a
fresh process with an empty compilation cache, once (first call: compile time from
`Trajectory.meta["compile_time_s"]`) and again (the compiled run), with XLA_FLAGS choosing
the code generator for every program of the process (`--xla_cpu_use_fusion_emitters=false`
or `=true`, which hands the segment's choice to XLA_FLAGS too). The two
alternate, so the machine's drift falls on both; medians of the repeats are printed, with
the ratio classic / default, and whether the final states agree bit for bit.
Run: python benchmarks/emitters.py [--repeats 3] [--record]
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

_JOB = textwrap.dedent(
    """
    import hashlib, json, sys, time
    import jax, numpy as np
    import marginflow
    from marginflow.flows import RMSPropFlow, simulate
    from marginflow.models import MLP, ToyLeaky, separable_gaussians, toy_dataset
    name = sys.argv[1]
    flow = RMSPropFlow(eps=1e-5, b=0.9)
    if name == "toy":
        model, data, t1 = ToyLeaky(key=jax.random.PRNGKey(0)), toy_dataset(seed=0), 1e6
    else:
        d, h, n = {"mlp_small": (5, 16, 100), "mlp_mid": (20, 64, 200),
                   "mlp_big": (20, 256, 400)}[name]
        model = MLP(d, h, 2, activation=2, key=jax.random.PRNGKey(1))
        data, t1 = separable_gaussians(n, d, seed=0), 1e10
    first = simulate(flow, model, data, t1=t1)
    t = time.perf_counter()
    again = simulate(flow, model, data, t1=t1)
    run = time.perf_counter() - t
    p = int(np.asarray(again.w).shape[-1])
    digest = hashlib.md5(np.asarray(again.w).tobytes()).hexdigest()
    print(json.dumps({"compile": first.meta["compile_time_s"], "run": run, "work": p * len(data.y),
                      "steps": again.stats["num_steps"], "hash": digest}))
    """
)
PROBLEMS = ("toy", "mlp_small", "mlp_mid", "mlp_big")
CLASSIC_EMITTERS_MAX_WORK = 100_000  # flows/_kernels.py (not imported: it would start JAX)


def _job(name: str, classic: bool, cache: str) -> dict:
    env = {**os.environ, "MARGINFLOW_CACHE_DIR": cache}
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_cpu_use_fusion_emitters={'false' if classic else 'true'}")
    out = subprocess.run([sys.executable, "-c", _JOB, name], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true",
                        help="write the table to docs/data/benchmarks/emitters.json")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="emitters_")
    rows = []
    print(f"emitters: medians of {args.repeats}, {os.cpu_count()} cores; RMSProp flow "
          "(eps 1e-5, b 0.9)")
    print(f"{'problem':<10} {'p n':>9} {'compile classic/default':>26} "
          f"{'run classic/default':>26} {'same bits':>9}  simulate picks")
    for name in PROBLEMS:
        res = {True: [], False: []}
        for r in range(args.repeats):
            for classic in (True, False):
                res[classic].append(_job(name, classic, os.path.join(work, f"{name}{r}{classic}")))
        med = {c: {k: statistics.median(x[k] for x in res[c]) for k in ("compile", "run")}
               for c in res}
        same = len({x["hash"] for x in res[True] + res[False]}) == 1
        work_pn = res[True][0]["work"]
        comp = (f"{med[True]['compile']:.2f} / {med[False]['compile']:.2f} s "
                f"({med[True]['compile'] / med[False]['compile']:.2f}x)")
        run = (f"{med[True]['run']:.3f} / {med[False]['run']:.3f} s "
               f"({med[True]['run'] / med[False]['run']:.2f}x)")
        picks = "classic" if work_pn <= CLASSIC_EMITTERS_MAX_WORK else "fusion"
        print(f"{name:<10} {work_pn:>9.1e} {comp:>26} {run:>26} {str(same):>9}  {picks}")
        rows.append([name, f"{work_pn:.1e}", comp, run, "yes" if same else "no", picks])
    if args.record:
        from _record import record

        record("emitters", ["problem", "p n", "compile: classic / default",
                            "compiled run: classic / default", "same bits", "simulate picks"], rows,
               command=f"python benchmarks/emitters.py --repeats {args.repeats} --record",
               notes=[f"Medians of {args.repeats} fresh processes per program, alternating.",
                      "toy: ToyLeaky on toy_dataset(0) to t = 1e6 (the main job); mlp_*: "
                      "MLP(d, h, 2) with ReLU^2 on separable_gaussians(n, d) to t = 1e10, "
                      "(d, h, n) = (5, 16, 100), (20, 64, 200), (20, 256, 400)."])


if __name__ == "__main__":
    main()
