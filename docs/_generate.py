"""Regenerate the data behind the docs' generated tables.

    python docs/_generate.py quick                           # every experiment, quick mode
    python docs/_generate.py full fig2 soudry crossover qian # full mode on CPU
    python docs/_generate.py mnist-long                      # fig1, fig4, fig5, 1000 epochs

Each experiment's JSON summary (what `marginflow reproduce` writes as NAME.json: settings,
key numbers, the claims with their verdicts, the wall time) is written to
docs/data/experiments/<mode>/NAME.json, with a "provenance" entry: the date, the machine
(CPU model, cores this process may use), the Python / JAX versions, the commit of the
checkout and the machine's load average when the run ended (other work slows wall
times). The docs hook (docs/_hooks.py) renders the tables of "Experiments and claims" from
these files, so a table is never typed by hand: rerun this script and rebuild.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "docs", "data", "experiments")

# mode -> (the experiments it runs by default, quick flag, overrides passed to each)
MODES = {
    "quick": (("fig2", "fig1", "fig4", "fig5", "soudry", "crossover", "qian", "momentum"), True,
              {}),
    "full": (("fig2", "soudry", "crossover", "qian", "momentum"), False, {}),
    "mnist-long": (("fig1", "fig4", "fig5"), True, {"epochs": 1000, "save_every_epochs": 10}),
}
COMMANDS = {
    "quick": "marginflow reproduce NAME --quick",
    "full": "marginflow reproduce NAME",
    "mnist-long": "NAME(quick=True, epochs=1000, save_every_epochs=10)",
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain") else "")


def provenance(mode: str, command: str | None = None) -> dict:
    """When, where and with what a run was made; `command` overrides the mode's command."""
    import jax

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {_cpu_model()}, {cores} cores",
        "devices": ", ".join(sorted({d.platform for d in jax.devices()})),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "commit": _commit(),
        "command": command or COMMANDS[mode],
        # other work on the machine slows the wall times down: the 1-minute load average
        # when the run ended, against the number of cores
        "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=list(MODES))
    parser.add_argument("names", nargs="*", help="experiments (default: all of the mode's)")
    args = parser.parse_args(argv)

    import time

    from marginflow.experiments._reproduce import get_experiment

    defaults, quick, overrides = MODES[args.mode]
    names = args.names or list(defaults)
    out = os.path.join(DATA, args.mode)
    os.makedirs(out, exist_ok=True)
    for name in names:
        print(f"{args.mode}: {name} ...", flush=True)
        start = time.perf_counter()
        result = get_experiment(name)(quick=quick, **overrides)
        result.seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            result.save(tmp)
            with open(os.path.join(tmp, f"{name}.json")) as fh:
                summary = json.load(fh)
        summary["provenance"] = provenance(args.mode)
        with open(os.path.join(out, f"{name}.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
            fh.write("\n")
        print(f"  {result.seconds:.1f} s, wrote {os.path.relpath(fh.name, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
