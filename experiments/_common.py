"""Helpers shared by the experiments: flows by name, runs that report instead of crashing,
log-log slopes, and matplotlib set-up."""

from __future__ import annotations

import numpy as np

# The longest horizon the flows are integrated to in the full runs (measured: the toy
# flows, batched, and the linear AdaGrad/Adam/RMSProp flows reach 1e30-1e40 with the
# current solver).
LONG_HORIZON = 1e30

# The paper's flow settings (Sec. 6.2): eps = 1e-5 (the authors' code), b = 0.9.
PAPER_EPS = 1e-5
PAPER_B = 0.9


def make_flow(name: str, *, eps: float = PAPER_EPS, b: float = PAPER_B):
    """GD / AdaGrad / RMSProp / Adam (w/m) flow by name, at the paper's eps and b."""
    from ..flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow

    flows = {
        "GD": lambda: GradientFlow(),
        "AdaGrad": lambda: AdaGradFlow(eps),
        "RMSProp": lambda: RMSPropFlow(eps, b),
        "Adam (w/m)": lambda: AdamFlow(eps, b),
    }
    if name not in flows:
        raise ValueError(f"unknown flow {name!r}; choose one of {sorted(flows)}.")
    return flows[name]()


def run_flow(flow, model, data, t1, **kwargs):
    """simulate(..., throw=False): a run that stops early is returned, not raised, so the
    experiment can report how far it got (its claims are then marked undecided)."""
    from ..flows import simulate

    return simulate(flow, model, data, t1, throw=False, **kwargs)


def loglog_slope(t, y, t_from: float, t_to: float | None = None) -> float:
    """Least-squares slope of log y against log t on t_from <= t <= t_to (NaN if < 3 points)."""
    t = np.asarray(t, np.float64)
    y = np.asarray(y, np.float64)
    keep = (t >= t_from) & (t <= (np.inf if t_to is None else t_to)) & (y > 0) & np.isfinite(y)
    if np.count_nonzero(keep) < 3:
        return float("nan")
    return float(np.polyfit(np.log(t[keep]), np.log(y[keep]), 1)[0])


def at_time(t, y, when: float):
    """y at the last save at or before `when` (NaN if none)."""
    t = np.asarray(t)
    i = int(np.searchsorted(t, when, side="right")) - 1
    return np.asarray(y)[i] if i >= 0 else np.nan


def pyplot():
    """matplotlib.pyplot with the user's backend left as it is: the experiments draw on
    Figure objects and save them, which every backend can do, and matplotlib falls back to
    a non-interactive backend by itself where there is no display. (Forcing "Agg" here
    switched off a notebook's or a GUI session's figures for the rest of the process.)"""
    import matplotlib.pyplot as plt

    return plt
