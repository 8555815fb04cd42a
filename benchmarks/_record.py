"""Benchmark results as data: a script's table goes to docs/data/benchmarks/NAME.json, with
the date, the machine, the versions, the commit and the command (docs/_generate.py's
`provenance`), and the docs render it where a page says `<!-- benchmark-table: NAME -->`
(docs/_hooks.py). No performance table in the docs is typed by hand."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "docs", "data", "benchmarks")


def record(name: str, columns: list[str], rows: list[list], *, command: str,
           notes: list[str] = ()) -> str:
    """Write the table (cells as the text to show) to docs/data/benchmarks/NAME.json."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        from _generate import provenance
    finally:
        sys.path.pop(0)
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"record({name!r}): every row needs {len(columns)} cells")
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, f"{name}.json")
    data = {"columns": list(columns), "rows": [[str(c) for c in row] for row in rows],
            "notes": list(notes), "provenance": provenance("quick", command)}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path
