"""The `marginflow` command line.

    marginflow simulate [--flow rmsprop] [--model toy] [--t1 1e6] --out DIR

Bad input is reported as one line on stderr (the rule, the value, the fix) with exit code 2;
a run that stopped early writes what it computed, says why and exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_SUBCOMMANDS: dict[str, tuple] = {}


def subcommand(name: str, help: str):
    """Register `add_arguments(parser)` / `run(args) -> int` pairs under a subcommand name."""

    def register(pair):
        _SUBCOMMANDS[name] = (help, *pair)
        return pair

    return register


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------- simulate
def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flow", default="rmsprop", choices=["gd", "adagrad", "rmsprop", "adam"],
                   help="which flow (default: rmsprop)")
    p.add_argument("--model", default="toy", choices=["toy", "linear", "deeplinear", "mlp"],
                   help="toy: the paper's v*sigma(<w,x>); linear; deeplinear (3 layers); "
                   "mlp (2 layers of width 16, ReLU^2)")
    p.add_argument("--data", default="toy", choices=["toy", "soudry", "gaussians"],
                   help="toy: the paper's 100 points (default); soudry; gaussians (40 points)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--t1", type=float, default=1e6, help="end time (default 1e6)")
    p.add_argument("--eps", type=float, default=1e-5, help="eps (default 1e-5, the paper's)")
    p.add_argument("--b", type=float, default=0.9, help="b for rmsprop/adam (default 0.9)")
    p.add_argument("--bias-correction", default="paper", choices=["paper", "ema"])
    p.add_argument("--conditioner", default="eps_inside", choices=["eps_inside", "eps_outside"])
    p.add_argument("--loss", default="exponential", choices=["exponential", "logistic"])
    p.add_argument("--rtol", type=float, default=1e-8)
    p.add_argument("--n-save", type=int, default=200)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress meter")
    p.add_argument("--checkpoint", default=None,
                   help="write the run to this folder segment by segment; continue a killed "
                   "run with `marginflow resume FOLDER`")


def _build(args):
    import jax

    from ..flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow
    from ..models import (
        MLP,
        DeepLinear,
        Linear,
        ToyLeaky,
        separable_gaussians,
        soudry_dataset,
        toy_dataset,
    )

    data = {
        "toy": lambda: toy_dataset(args.seed),
        "soudry": lambda: soudry_dataset(args.seed),
        "gaussians": lambda: separable_gaussians(40, 5, gap=0.5, seed=args.seed),
    }[args.data]()
    dim = int(data.X.shape[1])
    key = jax.random.PRNGKey(args.seed)
    if args.model == "toy" and dim != 2:
        raise UsageError(
            f"--model toy takes 2-D inputs but --data {args.data} is {dim}-D; "
            "use --data toy or soudry, or another --model."
        )
    model = {
        "toy": lambda: ToyLeaky(key=key),
        "linear": lambda: Linear(dim, key=key),
        "deeplinear": lambda: DeepLinear([dim, 8, 8, 1], key=key),
        "mlp": lambda: MLP(dim, 16, 2, activation=2, key=key),
    }[args.model]()
    c = args.conditioner
    flow = {
        "gd": lambda: GradientFlow(conditioner=c),
        "adagrad": lambda: AdaGradFlow(args.eps, conditioner=c),
        "rmsprop": lambda: RMSPropFlow(args.eps, args.b, conditioner=c),
        "adam": lambda: AdamFlow(args.eps, args.b, bias_correction=args.bias_correction,
                                 conditioner=c),
    }[args.flow]()
    return flow, model, data


def summary_rows(traj, model, data) -> list[tuple[str, str]]:
    """The rows of the summary table of a trajectory's last save."""
    import numpy as np

    from ..analysis import normalized_margin

    h = traj.h()[-1]
    gamma = float(normalized_margin(model, data, traj.w[-1], loss=traj.meta["loss"]))
    return [
        ("t", f"{traj.ts[-1]:.4g}"),
        ("log L (final loss)", f"{traj.log_loss[-1]:.6g}"),
        ("||w||", f"{np.linalg.norm(traj.w[-1]):.6g}"),
        ("normalised margin", f"{gamma:.6g}"),
        ("h spread (max h / min h)", f"{np.max(h) / np.min(h):.6g}"),
        ("solver steps", f"{int(np.sum(traj.stats['num_steps']))}"),
        ("result", traj.result),
    ]


def print_table(rows, title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def plot_trajectory(traj, model, data, path: str) -> None:
    """Loss and normalised margin against t, log axes (first save at t = 0 dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..analysis import normalized_margin

    keep = traj.ts > 0
    t = traj.ts[keep]
    gamma = normalized_margin(model, data, traj.w[keep], loss=traj.meta["loss"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(t, traj.log_loss[keep] / np.log(10))
    a.set_xscale("log")
    a.set_xlabel("t")
    a.set_ylabel("log10 L(w(t))")
    a.set_title("training loss")
    b.plot(t, gamma)
    b.set_xscale("log")
    b.set_xlabel("t")
    b.set_ylabel("q_min / ||w||^L")
    b.set_title("normalised margin")
    b.set_ylim(bottom=max(float(np.min(gamma)), -float(np.max(np.abs(gamma)))))
    fig.suptitle(f"{traj.meta['flow']} flow, {traj.meta['model']['class']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _simulate_run(args) -> int:
    from ..flows import SimulationError, simulate

    if not args.t1 > 0:
        raise UsageError(f"--t1 must be > 0, got {args.t1!r}; e.g. --t1 1e6.")
    flow, model, data = _build(args)
    os.makedirs(args.out, exist_ok=True)
    kwargs = dict(rtol=args.rtol, n_save=args.n_save, loss=args.loss)
    start = time.perf_counter()
    try:
        traj = simulate(flow, model, data, args.t1, progress=not args.no_progress,
                        checkpoint=args.checkpoint, **kwargs)
    except SimulationError as err:
        traj = err.trajectory
    first = time.perf_counter() - start
    run = None
    if traj.success:
        # A second, compiled call separates compilation from integration time.
        start = time.perf_counter()
        simulate(flow, model, data, args.t1, **kwargs)
        run = time.perf_counter() - start
    traj.save(os.path.join(args.out, "trajectory.npz"))
    plot_trajectory(traj, model, data, os.path.join(args.out, "trajectory.png"))
    rows = summary_rows(traj, model, data)
    rows.append(("first call (compile + run)", f"{first:.2f} s"))
    if run is not None:
        rows.append(("run (compiled)", f"{run:.3f} s"))
    return _write_outputs(traj, model, data, args.out, rows,
                          f"marginflow simulate: {args.flow} flow on {args.model} / {args.data}")


def _write_outputs(traj, model, data, out, rows, title) -> int:
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(dict(rows) | {"meta": traj.meta}, fh, indent=2)
    print_table(rows, title)
    print(f"wrote {out}/trajectory.npz, trajectory.png, summary.json")
    if not traj.success:
        print(f"marginflow: the run stopped early: {traj.message}", file=sys.stderr)
        return 1
    return 0


subcommand("simulate", "integrate a flow and write trajectory, plot and summary")(
    (_simulate_arguments, _simulate_run)
)


# ------------------------------------------------------------------------- resume
def _resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the folder given to simulate --checkpoint")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress meter")


def _resume_run(args) -> int:
    from ..flows import SimulationError, resume

    try:
        traj = resume(args.checkpoint, progress=not args.no_progress)
    except SimulationError as err:
        traj = err.trajectory
    os.makedirs(args.out, exist_ok=True)
    model = traj.model_at(0)
    from ..flows._checkpoint import read_checkpoint
    from ..models import Dataset

    _, arrays, _ = read_checkpoint(args.checkpoint)
    data = Dataset(arrays["X"], arrays["y"])
    traj.save(os.path.join(args.out, "trajectory.npz"))
    plot_trajectory(traj, model, data, os.path.join(args.out, "trajectory.png"))
    return _write_outputs(traj, model, data, args.out, summary_rows(traj, model, data),
                          f"marginflow resume: {args.checkpoint}")


subcommand("resume", "continue a checkpointed simulate run")((_resume_arguments, _resume_run))


# ---------------------------------------------------------------------------- main
def _load_subcommands() -> None:
    # Sub-commands defined in other modules register themselves on import.
    import importlib

    for module in ("._reproduce",):
        try:
            importlib.import_module(module, __package__)
        except ModuleNotFoundError as err:
            if err.name is None or not err.name.endswith(module.lstrip(".")):
                raise


def main(argv=None) -> int:
    _load_subcommands()
    parser = argparse.ArgumentParser(
        prog="marginflow",
        description="Flows of adaptive optimisers on homogeneous networks (Wang et al. 2021).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in _SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    _, _, run = _SUBCOMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, TypeError) as err:
        # Bad input: one line naming the rule, the value and the fix; no traceback.
        print(f"marginflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
