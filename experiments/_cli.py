"""The `marginflow` command line.

    marginflow simulate [--flow rmsprop] [--model toy] [--t1 1e6] --out DIR

Bad input is reported as one line on stderr (the rule, the value, the fix) with exit code 2;
a run that stopped early writes what it computed, says why and exits with code 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time

from . import _reproduce  # noqa: F401  (registers the `reproduce` subcommand)
from ._cli_figure import plot_trajectory
from ._commands import (
    _SUBCOMMANDS,
    HelpFormatter,
    UsageError,
    print_table,
    subcommand,
    writable_folder,
)

ORDER = ("simulate", "resume", "reproduce")  # as `marginflow --help` lists them

# ----------------------------------------------------------------------- simulate
def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flow", default="rmsprop", choices=["gd", "adagrad", "rmsprop", "adam"],
                   help="which flow: gradient flow, or the AdaGrad / RMSProp / Adam (w/m) flow")
    p.add_argument("--model", default="toy",
                   choices=["toy", "linear", "deeplinear", "mlp", "relu-mlp"],
                   help="toy: the paper's v*sigma(<w,x>); linear; deeplinear (3 layers); "
                   "mlp (2 layers of width 16, ReLU^2); relu-mlp (the same with ReLU)")
    p.add_argument("--data", default="toy", choices=["toy", "soudry", "gaussians"],
                   help="toy: the paper's 100 points in 2-D; soudry: Soudry et al.'s 2-D set; "
                   "gaussians: 40 separable points in 5-D")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--t1", type=float, default="1e6", help="end time of the flow")
    p.add_argument("--eps", type=float, default="1e-5",
                   help="eps of the conditioner (the paper's value; unused by gd)")
    p.add_argument("--b", type=float, default=0.9,
                   help="decay b of the second moment, rmsprop / adam only")
    p.add_argument("--bias-correction", default="paper", choices=["paper", "ema"],
                   help="adam only: the paper's 1 - b^t, or 1 - e^{-(1-b)t}, the limit of "
                   "discrete Adam")
    p.add_argument("--eps-placement", default="inside", choices=["inside", "outside"],
                   help="where eps sits in the conditioner: h = 1/sqrt(eps + m) (inside, the "
                   "paper's) or h = 1/(sqrt(m) + eps) (outside, PyTorch's)")
    p.add_argument("--loss", default="exponential", choices=["exponential", "logistic"],
                   help="the loss of each margin q: exp(-q) or log(1 + exp(-q))")
    p.add_argument("--rtol", type=float, default="1e-8",
                   help="relative tolerance of the adaptive ODE solver")
    p.add_argument("--kink-tol", type=float, default=None,
                   help="kink tolerance for ReLU / leaky-ReLU models (toy, relu-mlp): where "
                   "the solver is stuck among kinks it accepts steps within it; default "
                   "1e-3 for those models, 0 resolves every kink at --rtol")
    p.add_argument("--n-save", type=int, default=200,
                   help="number of saved times, t = 0 then log-spaced up to --t1")
    p.add_argument("--out", required=True,
                   help="output folder (created if missing) for trajectory.npz, "
                   "trajectory.png and summary.json")
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
        "relu-mlp": lambda: MLP(dim, 16, 2, key=key),
    }[args.model]()
    c = args.eps_placement
    flow = {
        "gd": lambda: GradientFlow(eps_placement=c),
        "adagrad": lambda: AdaGradFlow(args.eps, eps_placement=c),
        "rmsprop": lambda: RMSPropFlow(args.eps, args.b, eps_placement=c),
        "adam": lambda: AdamFlow(args.eps, args.b, bias_correction=args.bias_correction,
                                 eps_placement=c),
    }[args.flow]()
    return flow, model, data


def summary_values(traj, model, data) -> dict:
    """The numbers of a trajectory's last save: written to summary.json as JSON numbers
    (`_plain_json`) and printed in the summary table."""
    import numpy as np

    from ..analysis import normalized_margin

    h = np.asarray(traj.h()[-1], np.float64)
    gamma = float(normalized_margin(model, data, traj.w[-1], loss=traj.meta["loss"]))
    return {
        "t": float(traj.ts[-1]),
        "log L (final loss)": float(traj.log_loss[-1]),
        "||w||": float(np.linalg.norm(traj.w[-1])),
        "normalised margin": gamma,
        "h spread (max h / min h)": float(np.max(h) / np.min(h)),
        "solver steps": int(np.sum(traj.stats["num_steps"])),
        **({"kink steps": int(np.sum(traj.stats["num_kink_steps"]))}
           if "num_kink_steps" in traj.stats else {}),
        "result": traj.result,
    }


def _plain_json(x):
    """x with every non-finite float replaced by None (JSON null): strict JSON, whose
    numbers cannot be NaN or infinite."""
    if isinstance(x, dict):
        return {k: _plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _display(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _simulate_run(args) -> int:
    from .._cache import use_cache
    from .._trajectory import SimulationError
    from ..flows import simulate

    if not args.t1 > 0:
        raise UsageError(f"--t1 must be > 0, got {args.t1!r}; e.g. --t1 1e6.")
    # The cache on before the model is built: its random initialisation is a dozen small
    # programs, compiled afresh in every process otherwise (simulate would switch the cache
    # on only at its call; the CLI owns its process, so no JAX setting of the user's is
    # overridden, and use_cache keeps one that is set).
    use_cache()
    flow, model, data = _build(args)
    # Before any computing: a run must not be lost because its outputs cannot be written.
    writable_folder(args.out, "--out")
    if args.checkpoint is not None:
        writable_folder(args.checkpoint, "--checkpoint")
    start = time.perf_counter()
    try:
        traj = simulate(flow, model, data, args.t1, progress=not args.no_progress,
                        checkpoint=args.checkpoint, rtol=args.rtol, n_save=args.n_save,
                        loss=args.loss, kink_tol=args.kink_tol)
    except SimulationError as err:
        traj = err.trajectory
    wall = time.perf_counter() - start
    return _write_outputs(traj, model, data, args.out,
                          f"marginflow simulate: {args.flow} flow on {args.model} / {args.data}",
                          wall_s=wall)


def _write_outputs(traj, model, data, out, title, wall_s=None) -> int:
    """trajectory.npz, trajectory.png and summary.json in `out` (all with the mode a plain
    open() gives, 0666 minus the umask), and the summary table on stdout. `wall_s`: the
    wall time of the one simulate call (compilation included), or None when nothing was
    timed (resume)."""
    paths = [os.path.join(out, name) for name in ("trajectory.npz", "trajectory.png",
                                                  "summary.json")]
    traj.save(paths[0])
    plot_trajectory(traj, model, data, paths[1])
    values = summary_values(traj, model, data)
    rows = [(k, _display(v)) for k, v in values.items()]
    if wall_s is not None:
        compile_s = traj.meta.get("compile_time_s", 0.0)
        values["wall_s"] = wall_s
        values["compile_s"] = compile_s
        values["integration_s"] = max(wall_s - compile_s, 0.0)
        rows.append(("wall time of the run", f"{wall_s:.2f} s"))
        rows.append(("  of it compiling (or loading the compiled program)", f"{compile_s:.2f} s"))
        rows.append(("  of it integrating, saving, checking", f"{wall_s - compile_s:.2f} s"))
    with open(paths[2], "w") as fh:
        json.dump(_plain_json(values | {"meta": traj.meta}), fh, indent=2, allow_nan=False)
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
    p.add_argument("--out", required=True,
                   help="output folder (created if missing) for trajectory.npz, "
                   "trajectory.png and summary.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress meter")


def _resume_run(args) -> int:
    from .._trajectory import SimulationError
    from ..flows import resume

    writable_folder(args.out, "--out")
    try:
        traj = resume(args.checkpoint, progress=not args.no_progress)
    except SimulationError as err:
        traj = err.trajectory
    model = traj.model_at(0)
    from .._checkpoint import read_run
    from ..models import Dataset

    _, arrays = read_run(args.checkpoint)  # the data set; the segments were read by resume
    data = Dataset(arrays["X"], arrays["y"])
    return _write_outputs(traj, model, data, args.out, f"marginflow resume: {args.checkpoint}")


subcommand("resume", "continue a checkpointed simulate run")((_resume_arguments, _resume_run))


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The `marginflow` parser with every registered subcommand (help shows defaults)."""
    parser = argparse.ArgumentParser(
        prog="marginflow",
        description="Flows of adaptive optimisers on homogeneous networks (Wang et al. 2021).",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in sorted(
            _SUBCOMMANDS.items(),
            key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER)):
        add_arguments(sub.add_parser(name, help=help_text, description=help_text,
                                     formatter_class=HelpFormatter))
    return parser


def _as_flags(message: str, parser, command: str) -> str:
    """The library's message in the command line's words: `n_save` -> `--n-save` and
    "pass e.g. n_save=100" -> "pass e.g. --n-save 100", for the sub-command's own flags."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.dest == "help":
            continue
        flag = flags[0]
        message = message.replace(f"`{action.dest}`", f"`{flag}`")
        message = re.sub(rf"(?<![\w.-]){re.escape(action.dest)}=", f"{flag} ", message)
    return message


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = _SUBCOMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, TypeError) as err:
        # Bad input: one line naming the rule, the value and the fix; no traceback.
        print(f"marginflow {args.command}: error: {_as_flags(str(err), parser, args.command)}",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output left (`| head`): not bad input, and nothing is left to
        # tell it. Point stdout at devnull so that the interpreter's final flush does not
        # fail again, and exit as Python's own docs advise (1, as a run cut short).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:
        # A file that cannot be read or written (a full disk, a folder made read-only during
        # the run): one line naming the file and the cause, no traceback.
        where = f" {err.filename!r}" if err.filename else ""
        print(f"marginflow {args.command}: error: cannot access{where}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 2


def entry() -> int:
    """The `marginflow` console script and `python -m marginflow.experiments`: `main` in a
    process of its own, whose garbage collector it may therefore tune.

    Python's cyclic collector walks every tracked object on each full pass and once more at
    exit, and a process that has imported JAX and traced a program holds about a million.
    On the main job (2 cores) that was 0.25-0.35 s of collections during the run and
    0.4-0.5 s at exit, of a 4 s process. Here the youngest generation is collected every
    10,000 net allocations instead of 700 (so the older ones far less often), and at the
    end every object is frozen (gc.freeze) so that the collection at exit skips them.
    Memory barely changes: objects are still freed as their last reference goes, and
    cycles are still collected during the run, after at most 10,000 allocations (the main
    job's peak resident memory: 379.9-380.8 MB against 379.1-379.8 MB, 3 runs each).
    `main` itself leaves the collector alone,
    since tests and notebooks call it in processes they own."""
    gc.set_threshold(10_000, 10, 10)
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(entry())
