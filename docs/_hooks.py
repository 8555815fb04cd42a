"""mkdocs hooks for the marginflow site.

- The API reference reads the source of this checkout: the repository root is the package
  `marginflow`, so the hook points mkdocstrings at a temporary folder holding one link,
  `marginflow` -> the repository root (whatever the checkout's folder is called, and
  whether or not the package is installed).
- The notebooks live in notebooks/ (outside docs/), where the tests execute them; each
  one is added to the site's files and to the "Notebooks" section of the navigation, so a
  new notebook appears without editing mkdocs.yml. mkdocs-jupyter renders them, and
  executes them first when MARGINFLOW_DOCS_EXECUTE=true (mkdocs.yml).
- A line `<!-- experiments-table: MODE -->` in a page becomes the table of the claims
  stored in docs/data/experiments/MODE/*.json (written by `python docs/_generate.py
  MODE`), with when, where and how they were run. A missing file is a warning, which
  fails a strict build.
- A line `<!-- benchmark-table: NAME -->` becomes the table a benchmark script stored in
  docs/data/benchmarks/NAME.json (`benchmarks/_record.py`), with when, where and by which
  command it was measured.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile

import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
EXPERIMENTS = os.path.join(ROOT, "docs", "data", "experiments")
ORDER = ("fig2", "fig1", "fig4", "fig5", "soudry", "crossover", "qian", "momentum")
_TABLE = re.compile(r"^<!-- experiments-table: ([\w-]+) -->$", flags=re.M)
BENCHMARKS = os.path.join(ROOT, "docs", "data", "benchmarks")
_BENCH = re.compile(r"^<!-- benchmark-table: ([\w-]+) -->$", flags=re.M)
log = logging.getLogger("mkdocs.hooks.marginflow")


def _notebooks() -> list[str]:
    if not os.path.isdir(NOTEBOOKS):
        return []
    return sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def _title(name: str) -> str:
    stem = name[: -len(".ipynb")]
    number, _, rest = stem.partition("_")
    words = rest.replace("_", " ") if number.isdigit() else stem.replace("_", " ")
    words = words[:1].upper() + words[1:]
    return f"{number}. {words}" if number.isdigit() else words


def _source_path() -> str:
    folder = tempfile.mkdtemp(prefix="marginflow-docs-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.symlink(ROOT, os.path.join(folder, "marginflow"), target_is_directory=True)
    return folder


# Before mkdocstrings' own on_config (priority 0), which creates the Python handler.
@mkdocs.plugins.event_priority(50)
def on_config(config, **kwargs):
    python = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python["paths"] = [_source_path()]
    entries = ["notebooks.md"] + [{_title(n): f"notebooks/{n}"} for n in _notebooks()]
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Notebooks" in item:
            item["Notebooks"] = entries
    return config


# Before mkdocs-jupyter's own on_files (priority 0), which wraps every .ipynb it is given.
@mkdocs.plugins.event_priority(50)
def on_files(files, config, **kwargs):
    for name in _notebooks():
        files.append(
            File(
                f"notebooks/{name}",
                src_dir=ROOT,
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown, page, **kwargs):
    """Append the list of notebooks to the notebooks' index page; fill experiment tables."""
    if page.file.src_uri == "notebooks.md":
        links = [f"- [{_title(n)}](notebooks/{n})" for n in _notebooks()]
        markdown = markdown.rstrip("\n") + "\n\n" + "\n".join(links) + "\n"
    markdown = _BENCH.sub(lambda m: benchmark_table(m.group(1), page.file.src_uri), markdown)
    return _TABLE.sub(lambda m: experiments_table(m.group(1), page.file.src_uri), markdown)


def benchmark_table(name: str, where: str = "") -> str:
    """docs/data/benchmarks/NAME.json as a Markdown table and a line saying when, where
    and by which command it was measured."""
    path = os.path.join(BENCHMARKS, f"{name}.json")
    if not os.path.isfile(path):
        log.warning(f"{where}: no benchmark results in docs/data/benchmarks/{name}.json; "
                    f"run `python benchmarks/{name}.py`")
        return f"*(no results in docs/data/benchmarks/{name}.json)*"
    with open(path) as fh:
        run = json.load(fh)
    rows = ["| " + " | ".join(_cell(c) for c in run["columns"]) + " |",
            "|" + "---|" * len(run["columns"])]
    rows += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in run["rows"]]
    p = run["provenance"]
    load = f", load average {p['load']}" if p.get("load") is not None else ""
    line = (f"Generated from `docs/data/benchmarks/{name}.json`, written by "
            f"`{p['command']}` on {p['date']} on {p['machine']} ({p['devices']}{load}), "
            f"jax {p['jax']}, commit {p['commit']}.")
    notes = [_cell(n) for n in run.get("notes", [])]
    return "\n".join(rows) + "\n\n" + " ".join([line, *notes]) + "\n"


def _cell(text) -> str:
    """Plain text (with `*`, `_`, `<` and `|` in formulas) as one Markdown table cell."""
    text = str(text).replace("\\", "\\\\").replace("\n", " ")
    for char in "*_|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;")


def experiments_table(mode: str, where: str = "") -> str:
    """The claims of docs/data/experiments/MODE/*.json as a Markdown table, with the runs'
    provenance and wall times."""
    folder = os.path.join(EXPERIMENTS, mode)
    names = sorted(
        (f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json"))
        if os.path.isdir(folder) else [],
        key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n),
    )
    if not names:
        log.warning(f"{where}: no experiment results in docs/data/experiments/{mode}/; "
                    f"run `python docs/_generate.py {mode}`")
        return f"*(no results in docs/data/experiments/{mode}/)*"
    runs = {}
    for name in names:
        with open(os.path.join(folder, f"{name}.json")) as fh:
            runs[name] = json.load(fh)
    rows = ["| experiment | claim | paper | measured | verdict |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        for claim in run["claims"]:
            rows.append(f"| {name} | {_cell(claim['claim'])} | {_cell(claim['paper'])} | "
                        f"{_cell(claim['measured'])} | **{claim['verdict']}** |")
    # one provenance line per distinct run set-up (usually one for the whole table)
    setups: dict = {}
    for name, run in runs.items():
        p = run.get("provenance", {})
        key = tuple(p.get(k, "?") for k in ("date", "machine", "devices", "jax", "commit"))
        setups.setdefault(key, []).append(name)
    command = next(iter(runs.values())).get("provenance", {}).get("command", "")
    lines = [
        f"Generated from `docs/data/experiments/{mode}/*.json`, written by "
        f"`python docs/_generate.py {mode}` (`{command}` for each experiment)."
    ]
    for (date, machine, devices, jax_version, commit), members in setups.items():
        which = "" if len(setups) == 1 else f" ({', '.join(members)})"
        lines.append(f"Run{which} on {date} on {machine} ({devices}), jax {jax_version}, "
                     f"commit {commit}.")
    walls = ", ".join(f"{n} {float(r['seconds']):.1f} s" for n, r in runs.items()
                      if isinstance(r.get("seconds"), (int, float)))
    loads = [r["provenance"]["load"] for r in runs.values()
             if isinstance(r.get("provenance", {}).get("load"), (int, float))]
    if walls:
        load = (f" (the machine's load average at the end of the runs: "
                f"{min(loads):g}-{max(loads):g})" if loads else "")
        lines.append(f"Wall times: {walls}{load}.")
    return " ".join(lines) + "\n\n" + "\n".join(rows) + "\n"
