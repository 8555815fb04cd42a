"""`ExperimentResult`: what every experiment returns, and how it is written to disk.

A result carries
- `data`: the arrays behind the figures (saved to `<name>.npz`, no pickle);
- `numbers`: the key numbers, JSON-serialisable (saved with the claims to `<name>.json`,
  strict JSON: a NaN or infinite number, e.g. a crossover time that never came, is null);
- `claims`: the paper's claims this experiment checks, each marked reproduced or not with
  the numbers that decide it;
- `settings`: what was run (sizes, horizons, hyper-parameters, quick or full);
- a plotting function that turns the result into matplotlib figures (`<name>_<fig>.png`,
  written at DPI = 150 dots per inch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

DPI = 150  # every PNG the package writes


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the paper and what we measured.

    `reproduced` is True, False, or None when the run cannot decide (e.g. a solver stopped
    early); `measured` states the deciding numbers in words.
    """

    claim: str
    paper: str
    measured: str
    reproduced: bool | None

    @property
    def verdict(self) -> str:
        return {True: "reproduced", False: "not reproduced", None: "undecided"}[self.reproduced]

    def to_json(self) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "paper": self.paper,
            "measured": self.measured,
            "reproduced": self.reproduced,
            "verdict": self.verdict,
        }


def _jsonable(x):
    """numpy scalars/arrays to plain JSON; NaN and infinities to None (null), as strict
    JSON has no number for them (the same rule as the CLI's summary.json)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


@dataclasses.dataclass
class ExperimentResult:
    """The outcome of one experiment (see the module docstring).

    Methods: `figures()` (name -> matplotlib Figure), `summary()` (the JSON object),
    `rows()` (the summary table), `save(out)` (JSON + npz + PNGs; returns the paths).
    """

    name: str
    quick: bool
    settings: dict[str, Any]
    numbers: dict[str, Any]
    claims: list[Claim]
    data: dict[str, np.ndarray]
    plot: Callable[[ExperimentResult], dict[str, Any]] | None = None
    seconds: float = float("nan")

    def figures(self) -> dict[str, Any]:
        return {} if self.plot is None else self.plot(self)

    def summary(self) -> dict[str, Any]:
        return _jsonable(
            {
                "experiment": self.name,
                "quick": self.quick,
                "seconds": self.seconds,
                "settings": self.settings,
                "numbers": self.numbers,
                "claims": [c.to_json() for c in self.claims],
            }
        )

    def rows(self) -> list[tuple[str, str]]:
        rows = [(k, _fmt(v)) for k, v in self.numbers.items() if not isinstance(v, (list, dict))]
        rows += [(f"[{c.verdict}] {c.claim}", c.measured) for c in self.claims]
        return rows

    def save(self, out: str | os.PathLike, *, dpi: int = DPI) -> list[str]:
        """Write `<name>.json`, `<name>.npz` and `<name>_<figure>.png` (at `dpi` dots per
        inch) into `out`."""
        import matplotlib.pyplot as plt

        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        paths = []
        path = os.path.join(out, f"{self.name}.json")
        with open(path, "w") as fh:
            json.dump(self.summary(), fh, indent=2, allow_nan=False)
        paths.append(path)
        path = os.path.join(out, f"{self.name}.npz")
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in self.data.items()})
        paths.append(path)
        for fig_name, fig in self.figures().items():
            path = os.path.join(out, f"{self.name}_{fig_name}.png")
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            paths.append(path)
        return paths


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def angle_deg(a, b) -> np.ndarray:
    """The angle in degrees between a and b along the last axis (numpy; for plots/tables)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def progress(iterable, *, enabled: bool, desc: str, total: int | None = None):
    """A tqdm bar over `iterable` when enabled (long work), the iterable itself otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def quick_from_env(quick: bool | None) -> bool:
    """`quick` if given, else the environment variable MARGINFLOW_QUICK (1/true/yes)."""
    if quick is not None:
        if not isinstance(quick, (bool, np.bool_)):
            raise TypeError(f"`quick` must be True, False or None, got {quick!r}.")
        return bool(quick)
    return os.environ.get("MARGINFLOW_QUICK", "").strip().lower() in ("1", "true", "yes")
