"""The conditioner's limit h_inf, beta(t) = h(t)/h_inf and the direction of h_inf^{-1/2}
(docs/math.md sections 3-4; the paper's Def. 1, Theorems 4-5, Fig. 2)."""

from __future__ import annotations

import equinox as eqx
import numpy as np

from .._checks import check_int
from .._records import record_repr
from ._common import check_trajectory


class ConditionerLimit(eqx.Module):
    """The estimate of h_inf from a finite run and how much h still moved (see
    `conditioner_limit`)."""

    h_inf: np.ndarray
    t_end: float = eqx.field(static=True)
    decade_starts: np.ndarray
    change: np.ndarray
    last_decade_change: float = eqx.field(static=True)

    __repr__ = record_repr


def _index_at_or_before(ts: np.ndarray, t: float) -> int | None:
    k = int(np.searchsorted(ts, t, side="right")) - 1
    return k if k >= 0 else None


def conditioner_limit(traj, *, decades: int = 3) -> ConditionerLimit:
    """h_inf estimated as h(t_end), with the change of log h over the last decades of t.

    Theorem 4 (AdaGrad): h is non-increasing and converges to h_inf with no zero entry;
    Theorem 5 (RMSProp, Adam w/m): h -> eps^{-1/2} (eps outside the root: 1/eps).
    Def. 1 asks beta = h/h_inf -> 1 with finite total variation of log h. A finite run can
    only estimate h_inf; `change[k]` = max_i |log h_i(t_end) - log h_i(t_end / 10^(k+1))|
    (using the last save at or before that time) says how much it still moved, and so
    whether the run was long enough for the use made of h_inf (e.g. the weights of (PA)
    in kkt_residual, whose error is of that relative size).

    Args:
        traj: a Trajectory (batched: h_inf of shape (B, p), change of shape (B, decades)).
        decades: how many decades back from t_end to report (>= 1).

    Returns:
        ConditionerLimit(h_inf, t_end, decade_starts = t_end / 10^(1..decades), change
        (NaN where the run did not reach that far back), last_decade_change = the largest
        finite entry of change[..., 0]).
    """
    check_trajectory(traj, "conditioner_limit")
    decades = check_int(decades, "decades", "conditioner_limit")
    h = np.asarray(traj.h(), np.float64)
    if not np.all(np.isfinite(h)) or not np.all(h > 0):
        raise ValueError(
            "conditioner_limit: the saved conditioner h must be finite and positive, found "
            f"min {np.nanmin(h):.3g}; the run broke down (see traj.message)."
        )
    ts = np.asarray(traj.ts, np.float64)
    t_end = float(ts[-1])
    h_inf = h[..., -1, :]
    starts = t_end / 10.0 ** np.arange(1, decades + 1)
    change = np.full(h.shape[:-2] + (decades,), np.nan)
    for k, t in enumerate(starts):
        i = _index_at_or_before(ts, t)
        if i is None:
            continue
        change[..., k] = np.max(np.abs(np.log(h_inf) - np.log(h[..., i, :])), axis=-1)
    last = change[..., 0]
    return ConditionerLimit(
        h_inf=h_inf,
        t_end=t_end,
        decade_starts=starts,
        change=change,
        last_decade_change=float(np.nanmax(last)) if np.any(np.isfinite(last)) else float("nan"),
    )


def beta(traj) -> np.ndarray:
    """beta(t) = h(t) / h_inf at the save times (Def. 1; the paper's component learning rate).

    h_inf is conditioner_limit(traj).h_inf (the last save), so beta(t_end) = 1 exactly; the
    paper's coordinates are v = h_inf^{-1/2} * w. Shape like traj.w.
    """
    lim = conditioner_limit(traj, decades=1)
    return np.asarray(traj.h(), np.float64) / lim.h_inf[..., None, :]


def h_direction(traj) -> np.ndarray:
    """The unit vector u = h_end^{-1/2} / ||h_end^{-1/2}|| at the end of the run (paper Fig. 2).

    For RMSProp/Adam (Theorem 5) u -> (1, ..., 1)/sqrt(p); for AdaGrad it depends on the
    initialisation (Sec. 6.2). Shape (p,) or (B, p) for a batched run.
    """
    h_inf = conditioner_limit(traj, decades=1).h_inf
    s = h_inf**-0.5
    return s / np.linalg.norm(s, axis=-1, keepdims=True)
